"""benchmarks/gpu_check.py --tiny runs on CPU in seconds for every registered method (so CI keeps the GPU
check working) and prints one table row per method."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from tbps_lib.models import list_methods, method_spec

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_tiny(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # the library's methods (other tests may leave toy methods registered in this process)
    methods = [m for m in list_methods() if method_spec(m).model_cls.__module__.startswith("tbps_lib.models.")]
    assert {"baseline", "sew_mcm"} <= set(methods)
    assert module.main(["--tiny", "--methods", *methods]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "smoke" in line]
    assert [r.split("|")[1].strip() for r in rows] == methods
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[5]) > 0  # pairs/s
        start, end = (float(v) for v in cells[8].split("→"))
        assert start == start and end == end  # finite numbers printed (main returns 1 otherwise)
    assert "eval 24 images x 48 captions" in out
