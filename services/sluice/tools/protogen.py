"""Generate the package's build-time files from the source tree's ``protos/`` and
``model_repository/``.

- Python protobuf and gRPC code: proto package ``sluice.recall.v2`` lands in
  ``<out>/sluice/recall/v2``, so generated modules import as
  ``sluice.recall.v2.recall_pb2`` with no path hacks.
- The model-repository templates (``config.pbtxt``, ``configs/``, the python-backend
  ``model.py``, without trained versions) land in ``<out>/sluice/model_templates``, where
  ``sluice build`` finds them through :func:`sluice.paths.model_templates`.

The package build (``setup.py``) runs this for every wheel and editable install, and
``make proto`` runs it in a checkout after a proto changed. The output is reproducible and
git-ignored. This module imports nothing from ``sluice``: the build loads it by path.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

TEMPLATES = "model_templates"


def generate_protos(proto_root: Path, out: Path) -> list[str]:
    """Compile every ``.proto`` under ``proto_root`` into the package tree under ``out``."""
    files = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    if not files:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
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
        raise RuntimeError(f"protoc failed on {proto_root}")
    for f in files:
        init = out / Path(f).parent / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated from protos/; do not edit."""\n')
    return files


def copy_model_templates(repository: Path, out: Path) -> Path:
    """Copy each model's configs and code, not its numbered (trained) version directories."""
    target = out / "sluice" / TEMPLATES
    if target.exists():
        shutil.rmtree(target)
    for model in sorted(p for p in repository.iterdir() if p.is_dir()):
        shutil.copytree(
            model,
            target / model.name,
            ignore=lambda d, names: [
                n for n in names if n.isdigit() or n.startswith(".") or n == "__pycache__"
            ],
        )
    return target


def generate(source_root: Path, out: Path) -> None:
    files = generate_protos(source_root / "protos", out)
    templates = copy_model_templates(source_root / "model_repository", out)
    print(f"generated {len(files)} proto files and {templates.name}/ into {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=Path.cwd(), help="the checkout's root")
    ap.add_argument("--out", type=Path, help="package root (default: <source>/services)")
    args = ap.parse_args(argv)
    try:
        generate(args.source, args.out or args.source / "services")
    except (FileNotFoundError, RuntimeError) as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
