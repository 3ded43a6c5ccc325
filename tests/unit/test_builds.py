"""The build store and the builds a process holds (``sluice.builds``), without services:
publishing, resolving, loading in the background, pinning, retiring, rolling back."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from sluice.builds import (
    BUILDS,
    CURRENT,
    BuildWatcher,
    LoadedBuilds,
    build_id_of,
    first_build,
    is_store,
    publish,
    resolve,
)
from sluice.core.errors import InvalidArgument, NotFound, Unavailable


def make_build(store: Path, build_id: str) -> Path:
    build = store / BUILDS / build_id
    build.mkdir(parents=True)
    (build / "manifest.json").write_text(json.dumps({"build_id": build_id}))
    return build


class Recorder:
    """A loader that records what it loaded and what was closed; ``on_change`` events."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.changes: list[tuple[str, bool]] = []
        self.changed = threading.Condition()

    def load(self, build: Path, closers: list) -> str:  # type: ignore[type-arg]
        closers.append(lambda: self.closed.append(build.name))
        return f"engine of {build.name}"

    def on_change(self, build_id: str, loaded: bool) -> None:
        with self.changed:
            self.changes.append((build_id, loaded))
            self.changed.notify_all()


def test_publish_points_current_at_a_complete_build_and_resolve_follows(tmp_path: Path) -> None:
    a, b = make_build(tmp_path, "a"), make_build(tmp_path, "b")
    assert is_store(tmp_path) and not is_store(a)
    publish(tmp_path, "a")
    assert resolve(tmp_path) == a
    publish(tmp_path, "b")
    assert resolve(tmp_path) == b and (tmp_path / CURRENT).read_text().strip() == "b"
    assert resolve(a) == a  # a build directory is served as it is
    assert not list(tmp_path.glob(".CURRENT*"))  # no temporary file left behind


def test_publish_refuses_a_missing_incomplete_or_misnamed_build(tmp_path: Path) -> None:
    (tmp_path / BUILDS / "half").mkdir(parents=True)  # being written: no manifest yet
    with pytest.raises(NotFound):
        publish(tmp_path, "half")
    with pytest.raises(NotFound):
        publish(tmp_path, "nothing")
    wrong = make_build(tmp_path, "x")
    (wrong / "manifest.json").write_text(json.dumps({"build_id": "y"}))
    with pytest.raises(InvalidArgument):
        publish(tmp_path, "x")
    assert not (tmp_path / CURRENT).exists()


def test_a_build_without_an_id_is_named_by_its_directory(tmp_path: Path) -> None:
    build = tmp_path / "old-build"
    build.mkdir()
    (build / "manifest.json").write_text("{}")
    assert build_id_of(build) == "old-build"


def test_requests_are_pinned_and_the_old_build_retires_after_the_swap(tmp_path: Path) -> None:
    rec = Recorder()
    builds: LoadedBuilds[str] = LoadedBuilds(rec.load, retain_s=0.0, on_change=rec.on_change)
    with pytest.raises(Unavailable, match="warming up"):
        builds.get()
    builds.load(make_build(tmp_path, "a"))
    assert builds.get() == ("a", "engine of a")
    builds.load(make_build(tmp_path, "b"))
    assert builds.get() == ("b", "engine of b")
    # the old build retires after retain_s (0 here), and its resources are closed
    with rec.changed:
        retired = rec.changed.wait_for(lambda: ("a", False) in rec.changes, timeout=10)
    assert retired and rec.closed == ["a"]
    with pytest.raises(Unavailable, match="not loaded here"):
        builds.get("a")
    assert builds.get("b") == ("b", "engine of b")
    assert rec.changes == [("a", True), ("b", True), ("a", False)]


def test_rolling_back_within_the_retention_reuses_the_loaded_build(tmp_path: Path) -> None:
    loads: list[str] = []

    def load(build: Path, closers: list) -> str:  # type: ignore[type-arg]
        loads.append(build.name)
        return build.name

    builds: LoadedBuilds[str] = LoadedBuilds(load, retain_s=3600)
    a, b = make_build(tmp_path, "a"), make_build(tmp_path, "b")
    builds.load(a)
    builds.load(b)
    builds.load(a)  # published again before it retired
    assert builds.get() == ("a", "a") and builds.get("b") == ("b", "b")
    assert loads == ["a", "b"]
    builds.close()


def test_a_build_that_fails_to_load_leaves_the_current_one_serving(tmp_path: Path) -> None:
    closed: list[str] = []

    def load(build: Path, closers: list) -> str:  # type: ignore[type-arg]
        closers.append(lambda: closed.append(build.name))
        if build.name == "broken":
            raise OSError("index file truncated")
        return build.name

    builds: LoadedBuilds[str] = LoadedBuilds(load)
    make_build(tmp_path, "a")
    make_build(tmp_path, "broken")
    publish(tmp_path, "a")
    builds.load(resolve(tmp_path))
    watcher = BuildWatcher(tmp_path, builds, retry_s=3600)
    publish(tmp_path, "broken")
    assert watcher.check() is None
    assert builds.get() == ("a", "a") and closed == ["broken"]  # its partial resources closed
    assert watcher.check() is None  # not tried again before retry_s
    make_build(tmp_path, "c")
    publish(tmp_path, "c")
    assert watcher.check() == "c" and builds.get() == ("c", "c")
    builds.close()


def test_a_service_on_an_empty_store_waits_for_the_first_publish(tmp_path: Path) -> None:
    store = tmp_path / "store"  # not even created yet: a fresh volume
    found: list[Path] = []
    waiter = threading.Thread(target=lambda: found.append(first_build(store, poll_s=0.05)))
    waiter.start()
    make_build(store, "first")
    publish(store, "first")
    waiter.join(timeout=30)
    assert found == [store / BUILDS / "first"]


def test_a_directory_that_is_neither_build_nor_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a build")
    with pytest.raises(NotFound, match="neither a build"):
        first_build(tmp_path)


def test_an_old_build_still_asked_for_is_kept_until_it_has_been_idle(tmp_path: Path) -> None:
    """A gateway that still pins the old build (waiting for another stage to load the new
    one) keeps it loaded here: retirement counts from the last request for it."""
    rec = Recorder()
    builds: LoadedBuilds[str] = LoadedBuilds(rec.load, retain_s=3600, on_change=rec.on_change)
    builds.load(make_build(tmp_path, "a"))
    builds.load(make_build(tmp_path, "b"))
    assert builds.get("a") == ("a", "engine of a")  # a request pinned to the old build
    builds._retire("a")  # its timer fires: asked for just now, so it stays
    assert builds.get("a") == ("a", "engine of a") and rec.closed == []
    builds._builds["a"].last_used -= 3600  # an hour without a request for it
    builds._retire("a")
    assert rec.closed == ["a"] and ("a", False) in rec.changes
    with pytest.raises(Unavailable):
        builds.get("a")
    builds.close()
