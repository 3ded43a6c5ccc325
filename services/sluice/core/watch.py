"""A configuration file the gateway re-reads when it changes, with no restart.

The merchant's rules (:mod:`sluice.rules`) and the experiments (:mod:`sluice.experiments`)
are such files. Each is read at start (a bad file stops the start), then checked every
``poll_s``: a Kubernetes ConfigMap mount replaces a symlink, which the check sees too. A
changed file that does not load is logged and counted, and what is in force stays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ValidationError

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)


def read_json_file(path: Path, model: type[M], what: str, error: type[ValueError]) -> M:
    """The file validated as ``model``; ``error`` names the file and the first bad field."""
    try:
        return model.model_validate_json(path.read_bytes())
    except OSError as err:
        raise error(f"cannot read the {what} file {path}: {err}") from err
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(the file)"
        raise error(
            f"{what} file {path}: {where}: {first['msg']} ({err.error_count()} errors)"
        ) from err


def write_json_file(path: Path, spec: dict[str, object], model: type[BaseModel]) -> None:
    """Write ``spec`` atomically, validated as ``model`` first (what an operator's tool
    would do), so that a process re-reading it never sees half a file."""
    model.model_validate(spec)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(spec, indent=2))
    os.replace(tmp, path)


class WatchedFile(Generic[T]):
    """What ``load(path)`` made of the file, kept current (see the module)."""

    def __init__(
        self,
        path: Path,
        load: Callable[[Path], T],
        *,
        name: str,
        reloads: Counter,
        loaded_at: Gauge,
        version: Callable[[T], str],
        poll_s: float = 1.0,
    ) -> None:
        """``load`` raises ValueError (or OSError) for a file that cannot be used;
        ``reloads`` is labelled by result (ok, error)."""
        self.path = path
        self.poll_s = poll_s
        self._read = load
        self._name = name
        self._reloads = reloads
        self._loaded_at = loaded_at
        self._version = version
        self._stamp: tuple[int, int, int] | None = None
        self._current = self._load()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> T:
        return self._current

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)  # follows the symlink a ConfigMap swaps
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> T:
        stamp = self._stat()
        value = self._read(self.path)
        self._stamp = stamp
        self._reloads.labels("ok").inc()
        self._loaded_at.set_to_current_time()
        log.info(
            f"{self._name} loaded",
            extra={"file": str(self.path), "version": self._version(value)},
        )
        return value

    def check(self) -> bool:
        """Re-read the file if it changed; True if a new version is in force."""
        try:
            if self._stat() == self._stamp:
                return False
            self._current = self._load()
            return True
        except (OSError, ValueError) as err:
            self._reloads.labels("error").inc()
            log.error(
                f"{self._name} not reloaded; the version in force stays",
                extra={
                    "file": str(self.path),
                    "version": self._version(self._current),
                    "error": str(err),
                },
            )
            with contextlib.suppress(OSError):
                self._stamp = self._stat()  # report a bad file once, not every poll
            return False

    def start(self) -> WatchedFile[T]:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"watch {self._name}", daemon=True
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()

    def close(self) -> None:
        self._stop.set()
