"""Regenerate the Python stubs of proto/*.proto: `python -m baton.proto.generate`.

Stubs are committed (installing baton needs no protoc); tests/unit/test_proto.py fails when they
fall behind the .proto files. The import path inside the stubs must be `baton.proto`, so protoc
runs on a scratch tree where the .proto files sit under baton/proto/.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    """Compile every .proto of this folder; write *_pb2.py, *_pb2.pyi, *_pb2_grpc.py to out_dir."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "baton", "proto")
        src.mkdir(parents=True)
        for proto in sorted(PROTO_DIR.glob("*.proto")):
            shutil.copy(proto, src / proto.name)
        include = str(Path(protoc.__file__).parent / "_proto")
        for proto in sorted(src.glob("*.proto")):
            rel = proto.relative_to(tmp)
            args = [
                "protoc",
                f"-I{tmp}",
                f"-I{include}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(rel),
            ]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed on {rel}")
        for path in sorted(src.glob("*_pb2*.py*")):
            target = out_dir / path.name
            shutil.copy(path, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(p)
