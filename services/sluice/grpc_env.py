"""grpcio's process-wide settings for Sluice's processes, set before grpcio loads.

grpcio reads ``GRPC_EXPERIMENTS`` once, when it is imported, so the ``sluice`` command
imports this module before anything that imports grpc (a test holds it to that order).

Sluice turns off two of grpcio's experiments: the EventEngine client and listener, which
grpcio 1.85 enables by default and which hand each call's reads and writes to EventEngine
threads. Without them a call's I/O runs on the threads that poll the completion queue, as in
grpcio before the EventEngine. Measured on this project's 2-core hosts
(docs/benchmarks.md, "grpcio's EventEngine off"): a round trip to the bootstrap's sync
server takes 0.27-0.30 ms instead of 0.40-0.42 ms, with about a quarter less CPU on each
side, and the one-machine gateway spends 0.3-0.4 ms (about 5%) less CPU per request.

An operator's own ``GRPC_EXPERIMENTS`` wins, the empty string included (grpcio's defaults).
A later grpcio that no longer knows these names logs ``Unknown experiment`` once at start and
runs with its own defaults.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set Sluice's ``GRPC_EXPERIMENTS`` unless ``environ`` already has one."""
    environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)


apply()
