"""What the swap and replica tests share: a build store with a second build held back, and
a steady storefront load whose every answer is recorded."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sluice.artifacts import MANIFEST, Artifacts
from sluice.builds import BUILDS, build_id_of, new_build_id, publish
from sluice.common.v1 import common_pb2
from sluice.v1 import storefront_pb2, storefront_pb2_grpc
from tests.conftest import tiny_build

# a restarted process is dialled again within half a second, not after gRPC's 2 min back-off
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass(frozen=True)
class Store:
    """A build store holding the session's tiny build (published) with its own copy of the
    model repository, where a later build exports its ranker and Triton loads it."""

    root: Path
    first: str
    repository: Path

    @classmethod
    def of(cls, tiny_artifacts: Artifacts, root: Path) -> Store:
        repository = root / "model_repository"
        shutil.copytree(tiny_artifacts.model_repository, repository)
        first = build_id_of(tiny_artifacts.root)
        build = root / BUILDS / first
        shutil.copytree(tiny_artifacts.root, build)
        manifest = json.loads((build / MANIFEST).read_text())
        manifest["fine_ranker"]["repository"] = str(repository)
        (build / MANIFEST).write_text(json.dumps(manifest))
        publish(root, first)
        return cls(root, first, repository)


@dataclass(frozen=True)
class HeldBuild:
    """A second build of the same shop (other models), its ranker version held back from
    Triton until :meth:`release` replays the build's last step (a rename into place)."""

    build_id: str
    ranker_dir: Path
    staged: Path

    @classmethod
    def make(cls, store: Store) -> HeldBuild:
        from sluice.build.pipeline import build, next_version

        new = new_build_id()
        staged = store.root / f"staged-{new}"
        # built against a private repository that numbers versions like the served one: a
        # Triton polling the served repository must not see the version before release()
        # (it would start loading a directory that then vanishes, and not try it again)
        private = store.root / f"repository-{new}"
        for version in range(1, next_version(store.repository)):
            (private / "fine_ranker" / str(version)).mkdir(parents=True)
        made = build(
            tiny_build(store.root / BUILDS / new, private, build_id=new, seed=11, epochs=4)
        )
        made.ranker_dir.rename(staged)
        manifest = made.root / MANIFEST
        data = json.loads(manifest.read_text())
        data["fine_ranker"]["repository"] = str(store.repository.resolve())
        manifest.write_text(json.dumps(data, indent=2))
        shutil.rmtree(private)
        made = Artifacts(made.root)
        return cls(new, made.ranker_dir, staged)

    def hold(self) -> None:
        if self.ranker_dir.exists():
            self.ranker_dir.rename(self.staged)

    def release(self) -> None:
        self.staged.rename(self.ranker_dir)


def stage_name(stage: int) -> str:
    """``recall``, ``coarse_rank``, ``fine_rank``, ``rerank`` from a StageReport's stage."""
    return common_pb2.Stage.Name(stage).removeprefix("STAGE_").lower()


@dataclass
class Answer:
    started: float
    ended: float
    code: grpc.StatusCode
    degraded: dict[str, str] = field(default_factory=dict)
    """Stage name -> reason, for the stages that degraded."""
    build_id: str = ""
    stage_builds: list[str] = field(default_factory=list)
    """The build each stage that answered names."""


class Load:
    """Search and Recommend at ``rate`` calls a second in all from ``threads`` threads, through
    one address, each with no deadline; every answer recorded."""

    def __init__(
        self, address: str, users: Sequence[str], rate: float = 20.0, threads: int = 4
    ) -> None:
        self.answers: list[Answer] = []
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._users = users
        self._rate = rate
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = storefront_pb2_grpc.StorefrontServiceStub(self._channel)
        self._threads = [
            threading.Thread(target=self._run, args=(i, threads), daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        self._channel.close()

    def _run(self, worker: int, threads: int) -> None:
        start = time.monotonic()
        n = 0
        while True:
            # this thread's share of an even schedule; a slow call only delays its own thread
            due = start + (n * threads + worker) / self._rate
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            n += 1
            user = self._users[(n * threads + worker) % len(self._users)]
            started = time.monotonic()
            try:
                if n % 2:
                    resp = self._stub.Search(
                        storefront_pb2.SearchRequest(query="shoes", user_id=user, page_size=10)
                    )
                else:
                    resp = self._stub.Recommend(
                        storefront_pb2.RecommendRequest(user_id=user, page_size=10)
                    )
                answer = Answer(
                    started,
                    time.monotonic(),
                    grpc.StatusCode.OK,
                    {stage_name(s.stage): s.degraded_reason for s in resp.stages if s.degraded},
                    resp.build_id,
                    [s.build_id for s in resp.stages if not s.degraded],
                )
            except grpc.RpcError as err:
                answer = Answer(started, time.monotonic(), err.code())
            except Exception as exc:  # a bug here must fail the test, not end the thread
                answer = Answer(started, time.monotonic(), grpc.StatusCode.UNKNOWN, {"": repr(exc)})
            with self.changed:
                self.answers.append(answer)
                self.changed.notify_all()

    def wait_until(
        self, condition: Callable[[list[Answer]], bool], what: str, timeout_s: float = 120.0
    ) -> None:
        """Until ``condition`` holds of the answers so far (checked at each answer)."""
        with self.changed:
            ok = self.changed.wait_for(lambda: condition(self.answers), timeout_s)
        assert ok, f"{what}: not within {timeout_s:.0f} s"

    def wait_for(self, count: int, after: float = 0.0, timeout_s: float = 120.0) -> None:
        """Until ``count`` calls that started after ``after`` have answered."""
        self.wait_until(
            lambda answers: sum(a.started >= after for a in answers) >= count,
            f"{count} answers",
            timeout_s,
        )

    def wait_for_build(self, build_id: str, count: int, timeout_s: float = 180.0) -> None:
        self.wait_until(
            lambda answers: sum(a.build_id == build_id for a in answers) >= count,
            f"{count} answers from build {build_id}",
            timeout_s,
        )

    def between(self, start: float, end: float) -> list[Answer]:
        with self.changed:
            return [a for a in self.answers if start <= a.started <= end]


def assert_swapped_cleanly(
    answers: list[Answer], old: str, new: str, one_gateway: bool = True
) -> None:
    """No call failed, every page came from one build, and (``one_gateway``) once the new
    build answered, every later call did; several gateways each switch on their own."""
    failed = [a.code for a in answers if a.code is not grpc.StatusCode.OK]
    assert not failed, f"{len(failed)} of {len(answers)} calls failed: {set(failed)}"
    assert {a.build_id for a in answers} == {old, new}
    # every stage that answered names its build (the degraded ones did not answer)
    assert all(len(a.stage_builds) + len(a.degraded) == 4 for a in answers)
    assert sum(len(a.stage_builds) for a in answers) >= 3 * len(answers)
    mixed = [a for a in answers if any(b != a.build_id for b in a.stage_builds)]
    assert not mixed, f"{len(mixed)} pages mixed builds, e.g. {mixed[0]}"
    assert not [r for a in answers for r in a.degraded.values() if "build" in r]
    if not one_gateway:
        return
    first_new = min(a.ended for a in answers if a.build_id == new)
    late_old = [a for a in answers if a.started > first_new and a.build_id == old]
    assert not late_old, f"{len(late_old)} calls went to the old build after the swap"
