"""Check an image's venv against deploy/images/constraints.txt, inside the image build.

pip's ``--constraint`` only pins what it lists: a new dependency that nobody pinned would
install at whatever version PyPI has that day. Run with the venv's own interpreter after
``pip install``; it exits 1, naming the distributions, when

- an installed distribution has no ``name==version`` line in the constraints, or its
  version differs from that line, or
- a distribution the image must not carry (``--forbid``, e.g. torch in a serving image)
  is installed.

Standard library only: it runs in a bare venv.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

# Installers and build tools: their versions come with the base image's python3-venv.
TOOLS = {"pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    """PEP 503 normalised name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: not a name==version pin: {raw!r}")
        pins[canonical(name.split("[", 1)[0])] = version.strip()
    return pins


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--constraints", type=Path, required=True)
    ap.add_argument("--forbid", nargs="*", default=[], help="distributions that must be absent")
    ap.add_argument("--allow-unpinned", nargs="*", default=[], help="e.g. the project itself")
    args = ap.parse_args(argv)

    pins = read_pins(args.constraints)
    allowed = {canonical(n) for n in args.allow_unpinned} | TOOLS
    forbidden = {canonical(n) for n in args.forbid}
    problems: list[str] = []
    installed: dict[str, str] = {}
    for dist in metadata.distributions():
        name = canonical(dist.metadata["Name"])
        installed[name] = dist.version
    for name, version in sorted(installed.items()):
        if name in forbidden:
            problems.append(f"{name}=={version} must not be in this image")
        elif name in allowed:
            continue
        elif name not in pins:
            problems.append(f"{name}=={version} is not pinned in {args.constraints.name}")
        elif pins[name] != version:
            problems.append(f"{name}=={version} differs from its pin =={pins[name]}")
    if problems:
        print("check_pins: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"check_pins: {len(installed)} distributions, all pinned")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
