"""Build hook: the generated protobuf code and model templates are made at build time.

Everything else about the package is declared in pyproject.toml. ``pip wheel .`` and
``pip install .`` run ``build_py``, which compiles ``protos/`` and copies
``model_repository/``'s templates into the package (sluice/tools/protogen.py); an editable
install writes them into ``services/`` instead, where the editable import path finds them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _protogen():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "_sluice_protogen", HERE / "services" / "sluice" / "tools" / "protogen.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildWithGenerated(build_py):
    def run(self) -> None:
        # A wheel gets the files in its build directory; an editable install imports from
        # services/, so they go there.
        _protogen().generate(HERE, HERE / "services" if self.editable_mode else Path(self.build_lib))
        super().run()


setup(cmdclass={"build_py": BuildWithGenerated})
