"""Regenerates the Python stubs from generation.proto (grpcio-tools, pinned in the test extra).

    python proto/regenerate.py [OUT_DIR]     # default: this directory

The stubs belong to the installed package `epserve_proto` (this directory), so protoc sees the file
as `epserve_proto/generation.proto`: the generated modules then import and name themselves
`epserve_proto.generation_pb2`, which Serve's proxy and replicas can import (and pickle).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATED = ("generation_pb2.py", "generation_pb2.pyi", "generation_pb2_grpc.py")


def regenerate(out_dir: Path = HERE) -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "epserve_proto"
        package.mkdir()
        shutil.copy(HERE / "generation.proto", package / "generation.proto")
        args = ["protoc", f"-I{tmp}", f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                str(package / "generation.proto")]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            shutil.copy(package / name, out_dir / name)


if __name__ == "__main__":
    regenerate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
