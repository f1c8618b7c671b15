"""The wheel ships the package as baton.<folder>, and imports work from the wheel alone."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ["services", "proto", "kvstore", "router", "kernels", "loadgen"]


def test_required_top_level_folders_exist() -> None:
    for folder in [*FOLDERS, "deploy/helm", "tests"]:
        assert (ROOT / folder).is_dir(), folder


def test_every_source_folder_is_a_listed_package() -> None:
    """pyproject lists packages by hand (the root maps to `baton`): none may be forgotten."""
    text = (ROOT / "pyproject.toml").read_text()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] in {"tests", "build", ".venv", "docs", "deploy"}:
            continue
        name = ".".join(("baton", *rel.parts))
        assert f'"{name}"' in text, f"{name} missing from [tool.setuptools] packages"


@pytest.mark.slow
def test_built_wheel_imports_as_baton(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("baton-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "baton/__init__.py" in names
    assert "baton/services/engine/scheduler.py" in names
    assert not any(n.startswith(("baton/tests/", "tests/")) for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # A bare venv that sees the wheel's files first and this venv's dependencies, but not the
    # editable install's import hook (a .pth line adds the folder without running its .pth files).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    venv_site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(venv_site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    check = textwrap.dedent(
        f"""
        import baton, baton.kvstore.block_hash as bh
        assert baton.__file__.startswith({str(site)!r}), baton.__file__
        from baton import LLM, SamplingParams
        from baton.services.engine.scheduler import Scheduler
        from baton.kernels.attention_ref import paged_attention
        import baton.router, baton.proto, baton.loadgen
        assert len(bh.hash_blocks(list(range(32)), 16, b"")) == 2
        print("ok")
        """
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([str(py), "-c", check], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
