"""The committed stubs are what protoc makes of the committed .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_are_current(tmp_path: Path) -> None:
    # In a child process: grpc_tools' bundled protoc library crashes when loaded into a process
    # that already holds NIXL/UCX's native libraries (as this test session may).
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(tmp_path.glob("*_pb2*.py*"))
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
