"""Keep the cyclic garbage collector's full passes off the serving path.

A service loads its build (catalog, tokenizers, indexes, protobuf descriptors, a torch or
ONNX session) once, and those objects live as long as the process. CPython's collector
still walks all of them in every generation-2 pass, and a pass triggered by request
garbage then stops the process for the whole walk: 50 to 200 ms measured in the gateway
and the stage services on a busy 2-core machine (``docs/benchmarks.md``), far beyond a
request's p99. :func:`freeze` moves everything alive once the service is warm into the
permanent generation (:func:`gc.freeze`), so later passes walk only what came after.

Frozen objects are never collected, so a build that retires must be handed back first:
:func:`refreeze` does that (one full pass, at a build change only). Both do nothing until
the process's entry point has called :func:`freeze` once, so a library user (tests, eval,
bench) keeps the collector as CPython sets it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger(__name__)

_lock = threading.Lock()
_enabled = False


def freeze() -> None:
    """Collect once, then exempt everything alive now from later passes (turns the
    behaviour on for this process: :func:`refreeze` acts from now on)."""
    global _enabled
    with _lock:
        _enabled = True
        _collect_and_freeze(unfreeze=False)


def refreeze() -> None:
    """After a build is loaded or retired: collect what the change left (the retired
    build's cycles too) and freeze the rest again. A no-op unless :func:`freeze` ran."""
    with _lock:
        if _enabled:
            _collect_and_freeze(unfreeze=True)


def _collect_and_freeze(*, unfreeze: bool) -> None:
    started = time.perf_counter()
    if unfreeze:
        gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    log.info(
        "heap frozen",
        extra={
            "frozen_objects": gc.get_freeze_count(),
            "collected": collected,
            "pause_ms": round((time.perf_counter() - started) * 1000, 1),
        },
    )
