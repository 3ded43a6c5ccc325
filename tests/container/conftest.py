"""Fixtures for the container tests: the images, a build in a podman volume, running pods.

Everything runs through podman with the project's settings (deploy/images/env.sh: runc
with cgroupfs, ulimits below the host's, no registry). The images are built by
deploy/images/build.sh, which reuses podman's layer cache, so an unchanged tree rebuilds in
seconds. With ``SLUICE_CONTAINER_REUSE=1`` nothing is built: the images that
``make images`` left are used, and only if their ``io.sluice.source`` label matches the
sources as they are now (a stale image fails the run instead of testing old code).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.artifacts import Artifacts

ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = ROOT / "deploy" / "images"
BUILD_SH = IMAGES_DIR / "build.sh"
REUSE_ENV = "SLUICE_CONTAINER_REUSE"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SOURCE_LABEL = "io.sluice.source"

# Where the shared volume is mounted in every container (SLUICE_HOME in the images, and in
# deploy/k8s): the build store under artifacts/, Triton's model repository beside it.
HOME = "/var/lib/sluice"
STORE = f"{HOME}/artifacts"
MODEL_REPOSITORY = f"{HOME}/model_repository"

# The build the tests serve: small enough to train in a few minutes on two cores.
BUILD_ARGS = ("--items", "2000", "--users", "1000", "--epochs", "20")

STAGES = ("recall", "coarse", "fine", "rerank")
SERVICE_PORTS = {"gateway": 50051, "recall": 50061, "coarse": 50062, "fine": 50063, "rerank": 50064}
TRITON_HTTP = 8000


def podman_env() -> dict[str, str]:
    """The environment podman runs with: deploy/images/env.sh's settings files."""
    return {
        **os.environ,
        "CONTAINERS_CONF": str(IMAGES_DIR / "containers.conf"),
        "CONTAINERS_REGISTRIES_CONF": str(IMAGES_DIR / "registries.conf"),
        "CONTAINERS_STORAGE_CONF": str(IMAGES_DIR / "storage.conf"),
    }


class PodmanError(RuntimeError):
    pass


def podman(
    *args: str, timeout: float = 120, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["podman", *args],
        env=podman_env(),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise PodmanError(
            f"podman {' '.join(args)} exited with {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def image_name(name: str) -> str:
    return f"localhost/{name}:{VERSION}"


@dataclass(frozen=True)
class Images:
    stage: str
    build: str
    triton: str
    redis: str
    """Redis for the podman overlay."""
    source: str
    """The sources' fingerprint the images were built from (their io.sluice.source label)."""


def source_fingerprint() -> str:
    out = subprocess.run(
        [str(BUILD_SH), "--fingerprint"], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout.strip().splitlines()[-1]


def image_label(image: str, label: str) -> str:
    out = podman("image", "inspect", "--format", "{{json .Labels}}", image).stdout
    labels: dict[str, str] = json.loads(out) or {}
    return labels.get(label, "")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    """The stage, build and Triton images, built from this tree (or checked fresh)."""
    names = {
        "stage": "sluice",
        "build": "sluice-build",
        "triton": "sluice-triton",
        "redis": "sluice-redis",
    }
    if os.environ.get(REUSE_ENV) != "1":
        log = tmp_path_factory.mktemp("images") / "build.log"
        with log.open("w") as out:
            proc = subprocess.run(
                [str(BUILD_SH), *names.values()],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=3600,
            )
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
            pytest.fail(f"deploy/images/build.sh failed ({log}):\n{tail}")
        # what this build staged (files may change while it runs; the images stay consistent)
        source = image_label(image_name(names["stage"]), SOURCE_LABEL)
    else:
        source = source_fingerprint()
    for name in names.values():
        image = image_name(name)
        if podman("image", "exists", image, check=False).returncode != 0:
            pytest.fail(f"{image} does not exist: run `make images`, or unset {REUSE_ENV}")
        built_from = image_label(image, SOURCE_LABEL)
        if built_from != source:
            pytest.fail(
                f"{image} was built from other sources ({SOURCE_LABEL}={built_from!r}, not "
                f"{source!r}): run `make images`, or unset {REUSE_ENV}"
            )
    return Images(
        stage=image_name(names["stage"]),
        build=image_name(names["build"]),
        triton=image_name(names["triton"]),
        redis=image_name(names["redis"]),
        source=source,
    )


@dataclass(frozen=True)
class Store:
    """A podman volume holding a build store (``sluice build --store --publish``) and the
    Triton model repository, written by the build image."""

    volume: str
    path: Path
    """The volume's directory on this host (read by the test for the catalog and users)."""

    @property
    def artifacts(self) -> Artifacts:
        from sluice.builds import current_build

        return Artifacts(current_build(self.path / "artifacts"))

    @property
    def build_id(self) -> str:
        from sluice.builds import build_id_of

        return build_id_of(self.artifacts.root)


def run_build(images: Images, volume: str, name: str) -> None:
    """`sluice build` in the build image, into ``volume``: a published build of a small shop."""
    try:
        podman(
            "run",
            "--rm",
            "--name",
            name,
            "--volume",
            f"{volume}:{HOME}",
            images.build,
            "build",
            "--store",
            STORE,
            "--publish",
            "--model-repository",
            MODEL_REPOSITORY,
            *BUILD_ARGS,
            timeout=3000,
        )
    finally:
        podman("rm", "--force", "--ignore", name, check=False)


@pytest.fixture(scope="session")
def store(images: Images) -> Iterator[Store]:
    volume = f"sluice-test-{secrets.token_hex(4)}"
    podman("volume", "create", volume)
    try:
        run_build(images, volume, f"{volume}-build")
        path = podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip()
        yield Store(volume=volume, path=Path(path))
    finally:
        podman("volume", "rm", "--force", volume, check=False)


# -- pods ---------------------------------------------------------------------------------
def container_state(name: str) -> str:
    proc = podman("container", "inspect", "--format", "{{.State.Status}}", name, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "missing"


def container_logs(name: str, lines: int = 60) -> str:
    proc = podman("logs", "--tail", str(lines), name, check=False)
    return (proc.stdout + proc.stderr)[-6000:]


@dataclass
class Running:
    """Containers serving the cascade, reachable from this host on loopback ports."""

    pod: str
    ports: dict[str, int]
    """Host port of each service (``gateway``, the stages) and of Triton's HTTP (``triton``)."""
    containers: dict[str, str] = field(default_factory=dict)
    """Container name of each service and of ``triton``."""

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.ports['gateway']}"

    def _alive(self, service: str) -> None:
        name = self.containers[service]
        state = container_state(name)
        if state not in ("running", "created", "configured", "initialized"):
            raise AssertionError(f"{name} is {state}:\n{container_logs(name)}")

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Triton serves the ranker and every service reports SERVING, or fail with logs."""
        deadline = time.monotonic() + timeout_s
        self._poll("triton", self._triton_ready, deadline)
        for service in (*STAGES, "gateway"):
            self._poll(service, lambda s=service: self._serving(s), deadline)

    def _poll(self, service: str, ready: object, deadline: float) -> None:
        assert callable(ready)
        delay = 0.2
        while not ready():
            self._alive(service)
            if time.monotonic() > deadline:
                name = self.containers[service]
                raise AssertionError(f"{name} not ready in time:\n{container_logs(name)}")
            # a container has no readiness push; poll with a growing back-off
            time.sleep(delay)
            delay = min(2.0, delay * 1.5)

    def _triton_ready(self) -> bool:
        url = f"http://127.0.0.1:{self.ports['triton']}/v2/models/fine_ranker/ready"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def _serving(self, service: str) -> bool:
        with grpc.insecure_channel(f"127.0.0.1:{self.ports[service]}") as channel:
            try:
                resp = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2.0
                )
            except grpc.RpcError:
                return False
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)


def host_ports(count: int) -> list[int]:
    from sluice.launch import free_ports

    return free_ports(count)


def start_cascade(
    images: Images, store: Store, pod: str, env: Mapping[str, str] | None = None
) -> Running:
    """Triton and the five services, one container each, in one podman pod.

    The containers share the pod's network namespace, so the gateway reaches the stages and
    fine reaches Triton on the images' default loopback addresses; only the published ports
    (127.0.0.1 on this host) are reachable from outside. Every container runs with a
    read-only root file system, and the volume is mounted read-only, as in deploy/k8s."""
    targets = {**SERVICE_PORTS, "triton": TRITON_HTTP}
    ports = dict(zip(targets, host_ports(len(targets)), strict=True))
    publish = [f"--publish=127.0.0.1:{ports[k]}:{targets[k]}" for k in targets]
    podman("pod", "create", "--name", pod, *publish)
    running = Running(pod=pod, ports=ports)
    common = ["--detach", "--pod", pod, "--read-only", "--volume", f"{store.volume}:{HOME}:ro"]
    running.containers["triton"] = f"{pod}-triton"
    podman(
        "run",
        *common,
        "--name",
        f"{pod}-triton",
        images.triton,
        f"--model-repository={MODEL_REPOSITORY}",
        # tritonserver from the nvidia-pytriton wheel has no onnxruntime backend: the same
        # model.onnx through the python backend (model_repository/fine_ranker/configs/local.pbtxt)
        "--model-config-name=local",
        "--log-verbose=0",
    )
    for service in (*STAGES, "gateway"):
        prefix = f"SLUICE_{service.upper()}_"
        service_env = {prefix + "ARTIFACTS": STORE, **(env or {})}
        if service == "gateway":  # the durable event log on the container's /tmp (tmpfs)
            service_env[prefix + "EVENT_LOG_DIR"] = "/tmp/events"
        flags = [f"--env={k}={v}" for k, v in service_env.items()]
        name = f"{pod}-{service}"
        podman("run", *common, "--name", name, *flags, images.stage, service)
        running.containers[service] = name
    return running


def stop_pod(pod: str) -> None:
    podman("pod", "rm", "--force", "--ignore", "--time", "15", pod, check=False, timeout=180)
