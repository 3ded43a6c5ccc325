"""Make the ``tritonserver`` binary shipped in ``nvidia-pytriton`` runnable.

The wheel carries the server, the python backend and one backend stub per
Python version. The python backend looks for ``triton_python_backend_stub``
next to ``libtriton_python.so``; this places the stub for the running
interpreter there. :func:`triton_env` gives the environment the server needs:
the venv's ``bin`` first on ``PATH`` (the stub finds site-packages through
``python3``) and the interpreter's own ``libpython`` on ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path


def triton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def tritonserver_binary() -> Path:
    return triton_root() / "bin" / "tritonserver"


def backend_dir() -> Path:
    return triton_root() / "backends"


def install_stub() -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton_root() / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"nvidia-pytriton has no python backend stub for Python {version}")
    target = backend_dir() / "python" / "triton_python_backend_stub"
    if not target.exists() or target.stat().st_size != stub.stat().st_size:
        shutil.copy2(stub, target)
    target.chmod(0o755)
    return target


def triton_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    libdirs = [
        sysconfig.get_config_var("LIBDIR") or "",
        str(triton_root().parent.parent / "nvidia_pytriton.libs"),
    ]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [d for d in libdirs if d] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
    )
    return env


def main() -> int:
    print(f"triton python backend stub: {install_stub()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
