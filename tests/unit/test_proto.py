"""The committed stubs are what protoc makes of the committed .proto files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_are_current(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "no stubs generated"
    for path in fresh:
        committed = ROOT / "proto" / path.name
        assert committed.exists(), (
            f"{path.name} is not committed: run python -m baton.proto.generate"
        )
        assert committed.read_text() == path.read_text(), (
            f"proto/{path.name} is stale: run python -m baton.proto.generate"
        )


def test_service_names_are_versioned() -> None:
    from baton.proto import worker_pb2

    service = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    assert service.full_name == "baton.v1.Worker"
    assert {m.name for m in service.methods} >= {"Generate", "Prefill", "Abort", "Health"}
