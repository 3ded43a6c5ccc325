"""The frozen heap of a service process (``sluice.core.heap``): what is loaded before warm-up
leaves the collector's passes, and a retired build goes back to it and is freed.

Each case runs in a fresh interpreter: freezing is process-wide, and the test process keeps
CPython's collector as it is."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

PRELUDE = """
import gc, json, sys, tempfile, weakref
from pathlib import Path
from sluice.core import heap

class Engine:
    '''A build's engine with a reference cycle (as real ones have: callbacks, parents).'''
    def __init__(self, name):
        self.name, self.me, self.payload = name, self, [[i] for i in range(50_000)]
"""


def run(body: str) -> dict[str, Any]:
    code = PRELUDE + textwrap.dedent(body)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_refreeze_does_nothing_until_the_entry_point_froze_the_heap() -> None:
    got = run(
        """
        heap.refreeze()  # a library user (tests, eval, bench): the collector is CPython's
        print(json.dumps({"frozen": gc.get_freeze_count()}))
        """
    )
    assert got == {"frozen": 0}


def test_freeze_exempts_what_is_alive_and_a_refreeze_frees_frozen_garbage() -> None:
    got = run(
        """
        engine = Engine("a")
        alive = weakref.ref(engine)
        heap.freeze()
        frozen = gc.get_freeze_count()
        del engine                       # garbage now, but only a cycle keeps it
        gc.collect()
        kept_while_frozen = alive() is not None
        heap.refreeze()
        print(json.dumps({"frozen": frozen, "kept": kept_while_frozen, "freed": alive() is None}))
        """
    )
    assert got["frozen"] > 50_000  # the engine's payload and everything imported
    assert got["kept"] is True  # frozen objects are out of the collector's reach
    assert got["freed"] is True  # refreeze hands them back first


def test_a_retired_build_is_freed_and_a_loaded_one_frozen() -> None:
    got = run(
        """
        from sluice.builds import LoadedBuilds
        store = Path(tempfile.mkdtemp())
        def build(name):
            d = store / name
            d.mkdir()
            (d / "manifest.json").write_text(json.dumps({"build_id": name}))
            return d
        refs = {}
        def load(path, closers):
            engine = Engine(path.name)
            refs[path.name] = weakref.ref(engine)
            return engine
        builds = LoadedBuilds(load, retain_s=3600)
        builds.load(build("a"))
        heap.freeze()                    # the service is warm
        before = gc.get_freeze_count()
        builds.load(build("b"))          # a new build while serving: frozen too
        after_load = gc.get_freeze_count()
        builds._builds["a"].last_used -= 3600
        builds._retire("a")
        gc.collect()
        print(json.dumps({
            "grew": after_load - before, "a_freed": refs["a"]() is None,
            "b_alive": refs["b"]() is not None,
        }))
        """
    )
    assert got["grew"] >= 50_000  # build b's objects joined the frozen heap
    assert got["a_freed"] is True and got["b_alive"] is True
