"""Where Sluice keeps its files, independent of where the package is installed.

Nothing here looks at the source tree: an installed wheel and a checkout behave alike.
Every default is relative to the *home* directory, ``$SLUICE_HOME`` or else the current
directory (a checkout's root, where ``make`` runs):

    <home>/artifacts/default    the build ``sluice build`` writes and the services read
    <home>/model_repository     the Triton model repository the build exports the ranker to
    <home>/var/                 logs, the durable event log, caches, benchmark output

The files a build copies into a Triton model repository (configs and the python-backend
``model.py``) are package data, generated into the package from the top-level
``model_repository/`` when the package is built (:mod:`sluice.tools.protogen`).
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

HOME_ENV = "SLUICE_HOME"


def home() -> Path:
    """``$SLUICE_HOME``, or the current directory."""
    return Path(os.environ.get(HOME_ENV) or Path.cwd())


def var(*parts: str) -> Path:
    """``<home>/var/<parts>``: logs, events, caches and benchmark output."""
    return home().joinpath("var", *parts)


def default_artifacts() -> Path:
    return home() / "artifacts" / "default"


def default_model_repository() -> Path:
    return home() / "model_repository"


def model_templates() -> Traversable:
    """The packaged copy of the top-level ``model_repository/`` (configs, ``model.py``)."""
    return resources.files("sluice") / "model_templates"


def shared_data() -> Path:
    """The real data sets (``$SLUICE_SHARED_DATA``, else ``<home>/../shared/data``)."""
    return Path(os.environ.get("SLUICE_SHARED_DATA") or home().parent / "shared" / "data")
