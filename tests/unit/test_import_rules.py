"""Layering rules, checked on the source: lower layers never import upper ones."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# folder -> module prefixes it must not import
RULES = {
    "kernels": ("baton.services", "baton.router", "baton.kvstore", "baton.loadgen"),
    "kvstore": ("baton.services", "baton.router", "baton.loadgen"),
    "router": ("baton.services.engine", "torch"),
    "loadgen": ("baton.services", "baton.router", "baton.kvstore", "torch"),
    "services/engine": ("baton.services.worker", "baton.services.gateway", "baton.router"),
    # The gateway and the worker meet only on the wire (services/wire.py, baton.v1 messages);
    # in-process composition of the two lives outside both (services/local_backend.py).
    "services/gateway": ("baton.services.worker", "baton.services.local_backend", "torch"),
    "services/worker": ("baton.services.gateway", "baton.services.local_backend"),
}

# Modules whose whole import graph must stay free of torch: the gateway (a CPU front that must
# start fast and small), and what it shares with the worker.
TORCH_FREE = sorted(
    {
        "baton.services.wire",
        "baton.services.engine.sequence_ids",
        "baton.services.engine.loader",
        "baton.services.engine.loader.model_info",
    }
    | {
        "baton.services.gateway." + p.stem
        for p in (ROOT / "services" / "gateway").glob("*.py")
        if p.stem != "__init__"
    }
)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layering() -> None:
    violations = []
    for folder, banned in RULES.items():
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                if any(name == b or name.startswith(b + ".") for b in banned):
                    violations.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not violations, "\n".join(violations)


def test_code_imports_baton_namespace_only() -> None:
    """Top-level names like `kernels` or `services` are other projects' on PyPI
    (docs/design.md, Layout)."""
    own = {"services", "proto", "kvstore", "router", "kernels", "loadgen"}
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "build", "dist"}:
            continue
        for name in _imports(path):
            if name.split(".")[0] in own:
                bad.append(f"{rel} imports {name}")
    assert not bad, "\n".join(bad)


def test_gateway_and_wire_import_no_torch() -> None:
    """In a fresh interpreter, import each module in turn; name the first that pulls torch."""
    check = textwrap.dedent(
        f"""
        import importlib, sys
        for name in {TORCH_FREE!r}:
            importlib.import_module(name)
            if "torch" in sys.modules:
                sys.exit(f"{{name}} imports torch")
        print("ok", len({TORCH_FREE!r}))
        """
    )
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr or res.stdout
    assert res.stdout.split() == ["ok", str(len(TORCH_FREE))]
    assert (
        "baton.services.gateway.main" in TORCH_FREE and "baton.services.gateway.app" in TORCH_FREE
    )
