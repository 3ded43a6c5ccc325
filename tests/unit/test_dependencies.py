"""Every third-party module the package imports is declared in pyproject.toml.

The import statements of every module under ``services/sluice`` (the generated code aside)
are read, each top-level name is mapped to the distribution that installs it, and that
distribution must be a requirement of ``sluice`` (core or an extra). Which services import
what at run time is ``test_import_sets.py``'s subject.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "services" / "sluice"
GENERATED = re.compile(r"/(v1|v2|model_templates)/")
# Provided by the process that loads the module, not installable: Triton's python backend.
HOST_PROVIDED = {"triton_python_backend_utils"}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, set[str]]:
    """Top-level module name -> the files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if GENERATED.search(path.as_posix()):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.name)
    return found


def declared() -> set[str]:
    requirements = metadata.requires("sluice") or []
    return {normalise(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def test_every_import_is_a_declared_requirement() -> None:
    providers = metadata.packages_distributions()
    requirements = declared()
    undeclared = {}
    for module, files in imported_modules().items():
        if module in sys.stdlib_module_names or module in HOST_PROVIDED or module == "sluice":
            continue
        dists = {normalise(d) for d in providers.get(module, [])}
        if not dists & requirements:
            undeclared[module] = (sorted(dists) or ["not installed"], sorted(files))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_the_check_sees_imports() -> None:
    """The scan finds what the package plainly uses, so an empty result above means something."""
    modules = imported_modules()
    assert {"numpy", "grpc", "faiss", "torch", "redis"} <= modules.keys()
    assert {"numpy", "faiss-cpu", "torch", "grpcio"} <= declared()
