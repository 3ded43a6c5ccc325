"""The contracts: buf lint is clean, and the public v1 API stays wire-compatible."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"


def _buf(*args: str) -> subprocess.CompletedProcess[str]:
    if not BUF.exists() and shutil.which("buf") is None:
        pytest.skip("buf is not installed (the dev extra brings it)")
    exe = str(BUF) if BUF.exists() else "buf"
    return subprocess.run(
        [exe, *args], cwd=ROOT / "protos", capture_output=True, text=True, timeout=120
    )


def test_buf_lint_is_clean() -> None:
    out = _buf("lint")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_public_v1_contract_is_wire_compatible() -> None:
    ref = re.search(r"^BREAKING_AGAINST \?= (\w+)$", (ROOT / "Makefile").read_text(), re.M)
    assert ref, "the Makefile names the commit the public contract is checked against"
    have = subprocess.run(["git", "cat-file", "-e", f"{ref[1]}^{{commit}}"], cwd=ROOT)
    if have.returncode != 0:
        pytest.skip(f"commit {ref[1]} is not in this clone's history (a shallow clone)")
    # buf clones 50 commits deep by default; the reference commit may lie further back
    against = f"../.git#ref={ref[1]},subdir=protos,depth=100000"
    out = _buf(
        "breaking", "--against", against, "--path", "sluice/v1", "--path", "sluice/common/v1"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # and the check has teeth: the internal v1 stage protos were deleted, which it reports
    whole = _buf("breaking", "--against", against)
    assert whole.returncode != 0 and "deleted" in whole.stdout.lower()
