"""Layering rules, checked on the source: lower layers never import upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# folder -> module prefixes it must not import
RULES = {
    "kernels": ("baton.services", "baton.router", "baton.kvstore", "baton.loadgen"),
    "kvstore": ("baton.services", "baton.router", "baton.loadgen"),
    "router": ("baton.services.engine", "torch"),
    "loadgen": ("baton.services", "baton.router", "baton.kvstore", "torch"),
    "services/engine": ("baton.services.worker", "baton.services.gateway", "baton.router"),
}


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
    """Top-level names like `kernels` or `services` are other projects' on PyPI (DESIGN.md)."""
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
