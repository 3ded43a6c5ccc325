"""Shared fixtures: a real Redis, and a tiny but real build of the generated shop."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sluice.artifacts import Artifacts
from sluice.launch import ClusterTls

if TYPE_CHECKING:
    from sluice.build.pipeline import BuildOptions

pytest_plugins = ["tests.redis_fixture"]

ROOT = Path(__file__).resolve().parents[1]


def tiny_build(out: Path, model_repository: Path, **options: Any) -> BuildOptions:
    """The options of the small generated shop the tests build (``options`` override)."""
    from sluice.build.pipeline import BuildOptions
    from sluice.data.synthetic import ShopSpec
    from sluice.fine.model import RankerConfig

    fields: dict[str, Any] = {
        "shop": ShopSpec(num_items=800, num_users=600, mean_events_per_user=12, seed=3),
        "epochs": 30,
        "ranker": RankerConfig(dim=64, layers=2, patience=3),
        "coarse_users": 300,
        "cache_dir": ROOT / "var" / "cache",
        "progress": False,
        **options,
    }
    return BuildOptions(out=out, model_repository=model_repository, **fields)


@pytest.fixture(autouse=True)
def _thread_pools_restored() -> Iterator[None]:
    """Set the process's thread pools back after each test to what they were before it.

    Code under test sets them for the whole process, as a service does at start
    (``sluice.bench.compare.local_gateway``: ``torch.set_num_threads`` and
    ``threadpool_limits(limits=1)``). Left so, every later test ran on one BLAS thread, and
    results that depend on the BLAS's summation order moved: ``sluice build --refit`` fitted
    other coarse weights than ``tiny_artifacts``, built on the default pools, after
    ``test_vectorized``'s pages benchmark. (Pools of libraries first loaded during the test
    have no "before" and are left as they are.)
    """
    from threadpoolctl import ThreadpoolController

    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    with ThreadpoolController().limit(limits=None):
        yield
    if torch is not None:
        torch.set_num_threads(torch_threads)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """A complete `sluice build` of a small generated shop (real MiniLM, FAISS, ranker)."""
    from sluice.build.pipeline import build

    root = tmp_path_factory.mktemp("build")
    return build(tiny_build(root / "artifacts", root / "model_repository"))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> ClusterTls:
    """A private CA and the cluster's certificates, made for this run (trustme)."""
    import trustme

    root = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    files: dict[str, Path] = {"ca": root / "ca.pem"}
    for name, identities in (
        ("server", ("127.0.0.1", "localhost")),
        ("gateway_client", ("sluice-gateway",)),
        ("fine_client", ("sluice-fine",)),
        ("intruder", ("someone-else",)),
    ):
        issued = ca.issue_cert(*identities)
        issued.cert_chain_pems[0].write_to_path(str(root / f"{name}.pem"))
        issued.private_key_pem.write_to_path(str(root / f"{name}.key"))
        files[f"{name}_cert"] = root / f"{name}.pem"
        files[f"{name}_key"] = root / f"{name}.key"
    return ClusterTls(
        ca=files["ca"],
        server_cert=files["server_cert"],
        server_key=files["server_key"],
        gateway_client_cert=files["gateway_client_cert"],
        gateway_client_key=files["gateway_client_key"],
        fine_client_cert=files["fine_client_cert"],
        fine_client_key=files["fine_client_key"],
    )
