"""Generate Python protobuf and gRPC code from ``protos/`` into ``services/``.

Proto package ``sluice.recall.v1`` lands in ``services/sluice/recall/v1``, so
generated modules import as ``sluice.recall.v1.recall_pb2`` with no path
hacks. The output is reproducible and git-ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[3]


def main() -> int:
    proto_root = ROOT / "protos"
    out = ROOT / "services"
    files = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for f in files:
        package_dir = out / Path(f).parent
        init = package_dir / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from protos/; do not edit."""\n')
    print(f"generated {len(files)} proto files into {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
