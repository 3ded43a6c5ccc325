"""The container images, built here with podman, serving the whole cascade.

`make test-containers` (marker ``container``, outside the default run: building the images
and training the small shop take minutes). The images are the ones an operator ships:
deploy/images/build.sh builds them, the build image writes a published build into a podman
volume, and Triton and the five services each run in their own container from it, with
read-only root file systems. The storefront is called from this host over a published
loopback port. Then the same pods run from the Kubernetes manifests (the podman overlay)
with `podman kube play`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml  # type: ignore[import-untyped]

from sluice.client import StorefrontClient
from sluice.common.v1 import common_pb2
from sluice.v1 import storefront_pb2, storefront_pb2_grpc
from tests.container.conftest import (
    ROOT,
    SOURCE_LABEL,
    STAGES,
    VERSION,
    Images,
    Running,
    Store,
    container_logs,
    container_state,
    podman,
    start_cascade,
    stop_pod,
)

pytestmark = pytest.mark.container

CASCADE = [
    common_pb2.STAGE_RECALL,
    common_pb2.STAGE_COARSE_RANK,
    common_pb2.STAGE_FINE_RANK,
    common_pb2.STAGE_RERANK,
]


def run_python(image: str, code: str) -> object:
    """Run ``code`` with the image's own interpreter; it prints one JSON value."""
    out = podman("run", "--rm", "--entrypoint", "python3", image, "-c", code).stdout
    return json.loads(out.strip().splitlines()[-1])


FIND = (
    "import importlib.util, json, sys; "
    "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))"
)


def modules(image: str, *names: str) -> dict[str, bool]:
    out = podman("run", "--rm", "--entrypoint", "python3", image, "-c", FIND, *names).stdout
    found: dict[str, bool] = json.loads(out.strip().splitlines()[-1])
    return found


def test_images_are_tagged_and_run_as_uid_10001(images: Images) -> None:
    for image in (images.stage, images.build, images.triton, images.redis):
        inspect = podman("image", "inspect", "--format", "{{json .Config}}", image)
        config = json.loads(inspect.stdout)
        assert config["User"] == "10001:10001", image
        labels = config.get("Labels") or {}
        assert labels["org.opencontainers.image.version"] == VERSION
        assert labels[SOURCE_LABEL] == images.source
        assert image.endswith(f":{VERSION}")
        # and the process really runs as that user
        uid = podman("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip()
        assert uid == "10001", image


def test_each_image_carries_only_what_it_serves(images: Images) -> None:
    stage = modules(
        images.stage,
        "sluice.v1.storefront_pb2_grpc",
        "faiss",
        "onnxruntime",
        "tritonclient",
        "torch",
        "matplotlib",
        "pytriton",
        "sentence_transformers",
        "sklearn",
    )
    assert stage == {
        "sluice.v1.storefront_pb2_grpc": True,  # generated into the wheel at build time
        "faiss": True,
        "onnxruntime": True,
        "tritonclient": True,
        "torch": False,
        "matplotlib": False,
        "pytriton": False,
        "sentence_transformers": False,
        "sklearn": False,
    }
    build = modules(images.build, "torch", "sentence_transformers", "onnx", "faiss", "matplotlib")
    assert build == {
        "torch": True,
        "sentence_transformers": True,
        "onnx": True,
        "faiss": True,
        "matplotlib": False,
    }
    torch_version = run_python(
        images.build, "import json, torch; print(json.dumps(torch.__version__))"
    )
    assert isinstance(torch_version, str) and torch_version.endswith("+cpu")
    triton = modules(images.triton, "onnxruntime", "numpy", "sluice", "torch")
    assert triton == {"onnxruntime": True, "numpy": True, "sluice": False, "torch": False}


# -- the cascade from the images ----------------------------------------------------------
@pytest.fixture(scope="class")
def cascade(images: Images, store: Store) -> Iterator[Running]:
    pod = f"sluice-test-{secrets.token_hex(4)}"
    try:
        running = start_cascade(images, store, pod)
        running.wait_ready()
        yield running
    finally:
        stop_pod(pod)


@pytest.fixture(scope="class")
def client(cascade: Running) -> Iterator[StorefrontClient]:
    client = StorefrontClient(cascade.gateway)
    yield client
    client.close()


def assert_served_page(resp: object, store: Store, page_size: int) -> None:
    """A full page of real catalog items, every stage run and none degraded, one build."""
    page = resp.page  # type: ignore[attr-defined]
    catalog = store.artifacts.catalog
    assert len(page.item_ids) == page_size
    assert len(set(page.item_ids)) == page_size
    for item, title in zip(page.item_ids, page.titles, strict=True):
        assert catalog.contains(item)
        assert title == catalog.titles[catalog.row(item)]
    assert [s.stage for s in resp.stages] == CASCADE  # type: ignore[attr-defined]
    degraded = [s.degraded_reason for s in resp.stages if s.degraded]  # type: ignore[attr-defined]
    assert not degraded, degraded
    # the fine stage's scores came from Triton's ranker, not a fallback
    assert len(page.fine_scores) == page_size and np.all(np.isfinite(page.fine_scores))
    assert resp.build_id == store.build_id  # type: ignore[attr-defined]


class TestCascadeFromImages:
    def test_search(self, client: StorefrontClient, store: Store) -> None:
        catalog = store.artifacts.catalog
        row = int(np.flatnonzero(catalog.in_stock)[7])
        resp = client.search(catalog.titles[row], page_size=10, timeout_s=10)
        assert_served_page(resp, store, 10)
        assert catalog.titles[row] in list(resp.page.titles)[:3]

    def test_recommend(self, client: StorefrontClient, store: Store) -> None:
        ids, histories = store.artifacts.users()
        best = max(range(len(ids)), key=lambda i: len(histories[i]))
        resp = client.recommend(ids[best], page_size=10, timeout_s=10)
        assert_served_page(resp, store, 10)
        assert not set(resp.page.item_ids) & set(histories[best].tolist()), (
            "recommended an item the user already has"
        )


# -- the same pods from the Kubernetes manifests ------------------------------------------
PODMAN_OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "podman"


def render_podman_overlay() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # an opt-in run does all of it or says what it could not do
        pytest.fail(
            "kubectl (with kustomize v5+) is not on PATH: install the `kubectl` package from "
            "the Kubernetes apt repository (tests/unit/test_manifests.py says more)"
        )
    return subprocess.run(
        [kubectl, "kustomize", str(PODMAN_OVERLAY)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout


# The podman overlay's fixed names (deploy/k8s/overlays/podman/kustomization.yaml): volumes
# filled before the play, the one the play creates, and the pods it starts.
KUBE_VOLUMES = ("sluice-artifacts", "sluice-tls", "redis-data")
KUBE_SERVICES = ("redis", "triton", *STAGES, "gateway")
CREATES_VOLUMES = ("ConfigMap", "PersistentVolumeClaim")
SERVER_NAMES = (*(f"{s}-pod-0" for s in ("gateway", *STAGES, "triton")), "localhost", "127.0.0.1")


@dataclass(frozen=True)
class KubeDeployment:
    gateway: str
    """host:port where the gateway's storefront port is published"""
    ca: bytes
    api_key: str


def kube_objects(rendered: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def storefront_access(objects: list[dict[str, Any]]) -> tuple[str, str]:
    """The gateway's published address and a storefront API key, as the overlay sets them."""
    gateway = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway"
    )
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    port = next(p for p in container["ports"] if p.get("containerPort") == 50051)
    key_ref = next(e for e in container["env"] if e["name"] == "SLUICE_GATEWAY_API_KEYS")
    ref = key_ref["valueFrom"]["configMapKeyRef"]
    config = next(
        o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ref["name"]
    )
    keys = json.loads(config["data"][ref["key"]])
    return f"{port.get('hostIP', '127.0.0.1')}:{port['hostPort']}", str(keys[0])


def fill_tls_volume(volume: str) -> bytes:
    """The certificates the overlay reads from the sluice-tls volume, made for this run."""
    import trustme

    ca = trustme.CA()
    server = ca.issue_cert(*SERVER_NAMES)
    files = {
        "ca.crt": ca.cert_pem.bytes(),
        "tls.crt": b"".join(p.bytes() for p in server.cert_chain_pems),
        "tls.key": server.private_key_pem.bytes(),
    }
    for name, identity in (("gateway-client", "sluice-gateway"), ("fine-client", "sluice-fine")):
        issued = ca.issue_cert(identity)
        files[f"{name}.crt"] = issued.cert_chain_pems[0].bytes()
        files[f"{name}.key"] = issued.private_key_pem.bytes()
    root = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())
    for name, data in files.items():
        path = root / name
        path.write_bytes(data)
        os.chown(path, 10001, 10001)  # the images' user reads them; nobody else
        path.chmod(0o400)
    return files["ca.crt"]


def wait_healthy(containers: list[str], timeout_s: float = 900.0) -> None:
    """Until every container's health check (the overlay's liveness probe) passes."""
    deadline = time.monotonic() + timeout_s
    pending = list(containers)
    delay = 1.0
    while pending:
        for name in list(pending):
            state = container_state(name)
            if state not in ("running", "created", "configured", "initialized"):
                raise AssertionError(f"{name} is {state}:\n{container_logs(name)}")
            if podman("healthcheck", "run", name, check=False).returncode == 0:
                pending.remove(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            name = pending[0]
            raise AssertionError(f"{pending} not healthy in time:\n{container_logs(name)}")
        # podman schedules no health checks without systemd: they run when asked, so poll
        time.sleep(delay)
        delay = min(5.0, delay * 1.5)


@pytest.fixture(scope="class")
def kube_deployment(
    images: Images, store: Store, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KubeDeployment]:
    rendered = render_podman_overlay()
    objects = kube_objects(rendered)
    busy = [v for v in KUBE_VOLUMES if podman("volume", "exists", v, check=False).returncode == 0]
    busy += [
        f"{s}-pod-0"
        for s in KUBE_SERVICES
        if podman("pod", "exists", f"{s}-pod-0", check=False).returncode == 0
    ]
    if busy:
        pytest.fail(
            f"{busy} already exist: the podman overlay's names are fixed, so only one of its "
            "deployments runs on a machine; take the other down first (podman kube down)"
        )
    work = tmp_path_factory.mktemp("kube")
    manifest = work / "sluice-podman.yaml"
    manifest.write_text(rendered)
    try:
        # the build the first pods served, copied into the overlay's artifacts volume
        podman("volume", "create", "sluice-artifacts")
        podman("volume", "export", "--output", str(work / "store.tar"), store.volume, timeout=600)
        podman("volume", "import", "sluice-artifacts", str(work / "store.tar"), timeout=600)
        (work / "store.tar").unlink()
        podman("volume", "create", "sluice-tls")
        ca = fill_tls_volume("sluice-tls")
        podman("kube", "play", str(manifest), timeout=600)
        wait_healthy([f"{s}-pod-0-{s}" for s in KUBE_SERVICES])
        gateway, api_key = storefront_access(objects)
        yield KubeDeployment(gateway=gateway, ca=ca, api_key=api_key)
    finally:
        podman("kube", "down", str(manifest), check=False, timeout=600)
        for s in KUBE_SERVICES:  # whatever `kube down` left
            stop_pod(f"{s}-pod-0")
        # podman 4.3 makes a volume of each ConfigMap and claim, and `kube down` keeps them
        made = [o["metadata"]["name"] for o in objects if o["kind"] in CREATES_VOLUMES]
        podman("volume", "rm", "--force", *KUBE_VOLUMES, *made, check=False)


class TestKubePlay:
    def test_search_through_the_podman_overlay(
        self, kube_deployment: KubeDeployment, store: Store
    ) -> None:
        catalog = store.artifacts.catalog
        row = int(np.flatnonzero(catalog.in_stock)[7])
        credentials = grpc.ssl_channel_credentials(kube_deployment.ca)
        with grpc.secure_channel(kube_deployment.gateway, credentials) as channel:
            stub = storefront_pb2_grpc.StorefrontServiceStub(channel)
            request = storefront_pb2.SearchRequest(query=catalog.titles[row], page_size=10)
            with pytest.raises(grpc.RpcError) as refused:  # production profile: keys required
                stub.Search(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            resp = stub.Search(
                request, timeout=10, metadata=[("x-api-key", kube_deployment.api_key)]
            )
        assert_served_page(resp, store, 10)
        assert catalog.titles[row] in list(resp.page.titles)[:3]
