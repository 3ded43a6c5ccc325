"""Run as ``python tests/import_probe.py SERVICE``: build and warm the service exactly as
``sluice serve SERVICE`` does (settings from the environment), then print the top-level
modules the process imported, as JSON. A warm-up that fails (the fine stage without a
Triton to wait for) still shows what the service's code path imported up to there."""

from __future__ import annotations

import json
import sys

from sluice.serve import service_spec

if __name__ == "__main__":
    _, spec = service_spec(sys.argv[1])
    try:
        spec.warmup()
        warm = "ok"
    except Exception as err:
        warm = f"{type(err).__name__}: {err}"
    finally:
        spec.shutdown()
    print(json.dumps({"warm": warm, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
