"""Zero-downtime swaps: a store of versioned builds, the one that is current, and the builds a
process has loaded.

A *build store* is a directory::

    <store>/builds/<build id>/   one `sluice build` output each (immutable once written)
    <store>/CURRENT              the id of the published build (replaced atomically)

``sluice build --store S`` writes a new build under ``builds/``; ``sluice publish S ID`` makes
it current. A service whose ``artifacts`` setting names a store loads the current build at
start and then watches ``CURRENT`` (:class:`BuildWatcher`): a new id is loaded in the
background while the old build keeps serving, and becomes current only once loaded
(:class:`LoadedBuilds`). The old build stays loaded until no request has asked for it for
``retain_s``, so that requests pinned to it finish on it, and a gateway that still pins it
(waiting for another stage) keeps it. A service whose ``artifacts`` names a build directory
serves it alone.

Each request is pinned to one build: the gateway picks its current build, names it in the
request context (``RankContext.build_id``) and every stage answers from that build, so a
page never mixes two. The gateway switches only when every stage reports the new build
loaded, through the standard health service under the name :func:`health_name`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from sluice.artifacts import MANIFEST
from sluice.core import heap
from sluice.core.errors import InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

BUILDS = "builds"
CURRENT = "CURRENT"
HEALTH_PREFIX = "sluice.build/"

T = TypeVar("T")
Closers = list[Callable[[], None]]


def new_build_id() -> str:
    """Sortable by time, unique across builders: ``20261203T181500Z-3fa9c2``."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def build_id_of(build_dir: Path) -> str:
    """The id a build's manifest names (its directory name for builds that predate ids)."""
    manifest = json.loads((build_dir / MANIFEST).read_text())
    return str(manifest.get("build_id") or build_dir.name)


def health_name(build_id: str) -> str:
    """The health-service name a process reports SERVING once it has loaded ``build_id``."""
    return f"{HEALTH_PREFIX}{build_id}"


def is_store(path: Path) -> bool:
    """A build store (watched for published builds), as opposed to one build's directory."""
    return not (path / MANIFEST).exists() and (
        (path / CURRENT).is_file() or (path / BUILDS).is_dir()
    )


def current_build(store: Path) -> Path:
    """The published build of ``store``."""
    try:
        build_id = (store / CURRENT).read_text().strip()
    except FileNotFoundError as err:
        raise NotFound(f"nothing published in {store}: run `sluice publish`") from err
    return store / BUILDS / build_id


def resolve(artifacts: Path) -> Path:
    """The build to load for an ``artifacts`` setting: the directory itself, or a store's
    current build."""
    return current_build(artifacts) if is_store(artifacts) else artifacts


def first_build(artifacts: Path, poll_s: float = 1.0) -> Path:
    """The build a service starts with: ``artifacts`` itself, a store's current build, or,
    while the store is still empty or absent (a fresh volume before the first build Job
    ran), the first build published to it, waited for."""
    waited = 0.0
    while True:
        if (artifacts / MANIFEST).exists() or (artifacts / CURRENT).is_file():
            return resolve(artifacts)
        if artifacts.is_dir() and any(artifacts.iterdir()) and not is_store(artifacts):
            raise NotFound(
                f"{artifacts} is neither a build (no {MANIFEST}) nor a build store: run "
                "`sluice build`"
            )
        if waited % 30 < poll_s:
            log.warning("no build published yet: waiting", extra={"artifacts": str(artifacts)})
        time.sleep(poll_s)  # a file that does not exist yet has nothing to watch
        waited += poll_s


def publish(store: Path, build_id: str) -> Path:
    """Make ``build_id`` the store's current build (an atomic rename of ``CURRENT``)."""
    build = store / BUILDS / build_id
    if not (build / MANIFEST).is_file():
        raise NotFound(f"no complete build {build_id!r} in {store / BUILDS}")
    if build_id_of(build) != build_id:
        raise InvalidArgument(f"{build} names itself {build_id_of(build)!r}", "build_id")
    tmp = store / f".{CURRENT}.{os.getpid()}.tmp"
    tmp.write_text(build_id + "\n")
    with tmp.open() as f:
        os.fsync(f.fileno())
    tmp.replace(store / CURRENT)
    return build


@dataclass
class _Loaded(Generic[T]):
    value: T
    closers: Closers = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)


class LoadedBuilds(Generic[T]):
    """The builds one process holds: the current one, and older ones until they retire.

    ``loader(build_dir, closers)`` turns a build into what the process serves (an engine, a
    gateway) and appends what must be closed when that build retires; without one, builds
    are only :meth:`add`-ed.
    """

    def __init__(
        self,
        loader: Callable[[Path, Closers], T] | None = None,
        retain_s: float = 30.0,
        on_change: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._loader = loader
        self._retain_s = retain_s
        self.on_change = on_change or (lambda _id, _loaded: None)
        """Told ``(build_id, loaded)`` when a build is loaded or retired (health reporting)."""
        self._lock = threading.Lock()
        self._builds: dict[str, _Loaded[T]] = {}
        self._current = ""
        self._timers: list[threading.Timer] = []

    @property
    def current_id(self) -> str:
        return self._current

    def loaded_ids(self) -> list[str]:
        with self._lock:
            return list(self._builds)

    @classmethod
    def fixed(cls, value: T, build_id: str = "fixed") -> LoadedBuilds[T]:
        """One build, already loaded, that never changes (tests, tools)."""
        builds: LoadedBuilds[T] = cls()
        builds.add(build_id, value)
        return builds

    def load(self, build_dir: Path) -> str:
        """Load a build (unless it is still loaded) and make it current; the previous one
        retires after ``retain_s``."""
        build_id = build_id_of(build_dir)
        if build_id in self._builds:
            self.add(build_id, None)
            return build_id
        if self._loader is None:
            raise NotFound(f"cannot load {build_dir}: these builds are given, not loaded")
        closers: Closers = []
        try:
            value = self._loader(build_dir, closers)
        except BaseException:
            _close(closers)
            raise
        self.add(build_id, value, closers)
        heap.refreeze()
        return build_id

    def add(self, build_id: str, value: T | None, closers: Closers | None = None) -> None:
        """Make a loaded build current (``value`` None: one still loaded here)."""
        with self._lock:
            if value is not None:
                self._builds[build_id] = _Loaded(value, closers or [])
            elif build_id not in self._builds:
                raise NotFound(f"build {build_id!r} is not loaded")
            previous, self._current = self._current, build_id
        if value is not None:
            self.on_change(build_id, True)
        log.info("build current", extra={"build_id": build_id, "previous": previous})
        if previous and previous != build_id:
            with self._lock:
                if previous in self._builds:
                    self._builds[previous].last_used = time.monotonic()
                    self._schedule_retire(previous, self._retain_s)

    def _schedule_retire(self, build_id: str, delay_s: float) -> None:
        self._timers = [t for t in self._timers if t.is_alive()]
        timer = threading.Timer(delay_s, self._retire, (build_id,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def get(self, build_id: str = "") -> tuple[str, T]:
        """The build a request is pinned to ("": the current one)."""
        current = self._current
        wanted = build_id or current
        loaded = self._builds.get(wanted)
        if loaded is None:
            if not current:
                raise Unavailable("warming up: no build loaded yet")
            raise Unavailable(f"build {build_id!r} is not loaded here (current: {current!r})")
        loaded.last_used = time.monotonic()
        return wanted, loaded.value

    def _retire(self, build_id: str) -> None:
        """Drop a build no longer current once no request has asked for it for ``retain_s``:
        a caller that still pins it (a gateway waiting for another stage to load the new
        build) keeps it loaded, and no request holds an engine that is being closed."""
        with self._lock:
            if build_id == self._current:
                return
            loaded = self._builds.get(build_id)
            if loaded is None:
                return
            idle = time.monotonic() - loaded.last_used
            if idle < self._retain_s:
                self._schedule_retire(build_id, self._retain_s - idle)
                return
            del self._builds[build_id]
        if loaded is not None:
            self.on_change(build_id, False)
            _close(loaded.closers)
            del loaded
            heap.refreeze()  # the retired build's objects were frozen with the rest
            log.info("build retired", extra={"build_id": build_id})

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        with self._lock:
            builds, self._builds, self._current = self._builds, {}, ""
        for loaded in builds.values():
            _close(loaded.closers)


def _close(closers: Closers) -> None:
    for close in reversed(closers):
        try:
            close()
        except Exception:
            log.exception("closing a build's resources failed")


class BuildWatcher(Generic[T]):
    """Loads a store's newly published builds into a :class:`LoadedBuilds`, in the
    background. A build that fails to load is logged, and tried again after ``retry_s``
    (the old build keeps serving meanwhile)."""

    def __init__(
        self,
        store: Path,
        builds: LoadedBuilds[T],
        poll_s: float = 1.0,
        retry_s: float = 30.0,
    ) -> None:
        self.store = store
        self.builds = builds
        self.poll_s = poll_s
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._failed: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="build-watcher", daemon=True)

    def start(self) -> BuildWatcher[T]:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def check(self) -> str | None:
        """Load the published build if it is new; returns its id when it was loaded."""
        try:
            build = current_build(self.store)
            build_id = build_id_of(build)
        except (NotFound, OSError, ValueError) as err:
            log.warning("cannot read the published build", extra={"error": str(err)})
            return None
        if build_id == self.builds.current_id:
            return None
        if time.monotonic() < self._failed.get(build_id, 0.0):
            return None
        try:
            return self.builds.load(build)
        except Exception:
            log.exception("loading a published build failed", extra={"build_id": build_id})
            self._failed[build_id] = time.monotonic() + self.retry_s
            return None

    def _run(self) -> None:
        # The CURRENT file is a few bytes: polling it costs nothing measurable, and works on
        # every volume (inotify does not see changes made through NFS or another node).
        while not self._stop.wait(self.poll_s):
            self.check()
