"""Print the requirements a wheel declares for some of its extras, one per line.

    python wheel_requirements.py dist/sluice-0.1.0-py3-none-any.whl cpu > requirements.txt

The images install these first, in a layer of their own, and the wheel itself after them
with ``--no-deps``: a change to the code rebuilds only the wheel's layer, and the
dependencies' layer stays cached until the declared dependencies change. Markers are
evaluated for the running interpreter (the image's python3); extras that name the project
itself (``sluice[cpu]`` inside ``build``) are followed. Needs ``packaging``.
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def wheel_metadata(path: str) -> tuple[str, list[Requirement]]:
    with zipfile.ZipFile(path) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(wheel.read(name).decode())
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]
    return canonicalize_name(metadata["Name"]), requires


def requirements(project: str, requires: list[Requirement], extras: list[str]) -> list[str]:
    wanted = {""} | {canonicalize_name(e) for e in extras}
    seen: set[str] = set()
    out: dict[str, Requirement] = {}
    while wanted - seen:
        extra = sorted(wanted - seen)[0]
        seen.add(extra)
        for req in requires:
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            if req.marker is None and extra:
                continue  # unconditional ones are the base's, taken with extra ""
            if canonicalize_name(req.name) == project:
                wanted |= {canonicalize_name(e) for e in req.extras}
                continue
            extras_ = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            key = str(Requirement(f"{req.name}{extras_}{req.specifier}"))
            out[key] = req
    return sorted(out)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    project, requires = wheel_metadata(argv[0])
    for line in requirements(project, requires, argv[1:]):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
