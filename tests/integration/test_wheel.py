"""The package an operator installs: a wheel that serves from any directory.

The wheel is built from this checkout as ``pip wheel .`` builds it (its build generates the
protobuf code and the model templates), installed into a fresh virtual environment outside
the tree, and run from an unrelated directory. The fresh environment takes the third-party
packages from this one (a path entry, so that the test downloads nothing); ``pip check``
then proves the wheel's declared requirements are what is there, and the test proves that
``sluice`` itself comes from the wheel, not from the checkout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.artifacts import Artifacts
from sluice.launch import free_ports

REPO = Path(__file__).resolve().parents[2]
GENERATED = (
    "sluice/v1/storefront_pb2.py",
    "sluice/v1/storefront_pb2_grpc.py",
    "sluice/common/v1/common_pb2.py",
    "sluice/recall/v2/recall_pb2_grpc.py",
    "sluice/rerank/v2/rerank_pb2_grpc.py",
    "sluice/model_templates/fine_ranker/config.pbtxt",
)


def run(*argv: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, f"{argv} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, REPO, cwd=out)
    (built,) = out.glob("sluice-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "env"
    # no pip or setuptools of its own: those come with the rest from this environment
    run(sys.executable, "-m", "venv", "--without-pip", root, cwd=root.parent)
    py = root / "bin" / "python"
    site = run(py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root)
    # third-party packages from this environment; `sluice` from this one is an editable
    # install whose finder a plain path entry does not activate
    Path(site.strip(), "dev-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=root)
    return root


def test_the_wheel_carries_the_generated_code(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(GENERATED) <= names
    assert not any(n.startswith(("protos/", "services/", "tests/")) for n in names)


def test_the_installed_package_declares_what_it_needs(venv: Path, tmp_path: Path) -> None:
    py = venv / "bin" / "python"
    where = run(py, "-c", "import sluice; print(sluice.__file__)", cwd=tmp_path).strip()
    assert Path(where).is_relative_to(venv), where
    run(py, "-m", "pip", "check", cwd=tmp_path)
    # the build finds its Triton templates in the package, and writes them into a new
    # repository the way `sluice build` exports a ranker
    script = (
        "from pathlib import Path; from sluice.build.pipeline import export_ranker; "
        "d, v = export_ranker(lambda p: p.mkdir(parents=True), Path('repo')); print(v)"
    )
    assert run(py, "-c", script, cwd=tmp_path).strip() == "1"
    assert (tmp_path / "repo" / "fine_ranker" / "config.pbtxt").is_file()
    assert (tmp_path / "repo" / "fine_ranker" / "1" / "model.py").is_file()


@pytest.fixture
def served(venv: Path, tiny_artifacts: Artifacts, tmp_path: Path) -> Iterator[int]:
    port, health_port = free_ports(2)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLUICE_", "PYTHON"))},
        "SLUICE_RERANK_ARTIFACTS": str(tiny_artifacts.root),
        "SLUICE_RERANK_PORT": str(port),
        "SLUICE_RERANK_HEALTH_PORT": str(health_port),
    }
    log = (tmp_path / "rerank.log").open("w")
    proc = subprocess.Popen(
        [venv / "bin" / "sluice", "serve", "rerank"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield health_port
        assert proc.poll() is None, (tmp_path / "rerank.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def test_a_service_runs_from_the_wheel_outside_the_tree(served: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{served}") as channel:
        statuses = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120, wait_for_ready=True
        )
        for update in statuses:
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                break
        statuses.cancel()
        assert update.status == health_pb2.HealthCheckResponse.SERVING
