"""benchmarks/gpu_check.py on the CPU with the toy Llama: every item measured or its error recorded,
the JSON written, and the distributed item run through launch() with world size 1 over gloo."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_check  # noqa: E402


def test_toy_cpu_run_writes_every_item(tmp_path):
    out = tmp_path / "gpu_check.json"
    returned = gpu_check.main(["--device", "cpu", "--toy", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["items"].keys() == set(gpu_check.ITEMS)
    assert saved["device"]["kind"] == "cpu" and saved["dtype"] == "float32"
    assert saved["device"]["name"] and saved["versions"]["torch"] and saved["versions"]["transformers"]
    for name, item in saved["items"].items():
        if "error" in item:  # a failure is recorded, not raised, and the others still ran
            assert isinstance(item["error"], str) and item["error"], name
            continue
        assert math.isfinite(item["ratio"]) and item["ratio"] > 0, (name, item["ratio"])
        assert math.isfinite(item["seconds"]) and item["seconds"] > 0, name
        if name != "distributed_fit_map":
            assert item["peak_mb"] is None, name  # GPU memory is measured on CUDA only
    errors = {k: v["error"] for k, v in saved["items"].items() if "error" in v}
    assert not errors, errors  # on the toy model on a CPU every item should run
    dist = saved["items"]["distributed_fit_map"]
    assert dist["world_size"] == 1 and dist["backend"] == "gloo" and dist["is_distributed"] is False
    assert dist["steps"] == 2 and len(dist["losses"]) == 2 and dist["all_reduce"] == 1.0
    assert returned["items"].keys() == saved["items"].keys()


def test_failing_item_is_recorded_and_budget_skips(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("planted failure")

    monkeypatch.setitem(gpu_check.BUILDERS, "svi_step", (broken, "map_step"))
    out = tmp_path / "partial.json"
    gpu_check.main(["--device", "cpu", "--toy", "--out", str(out), "--items", "map_step", "svi_step",
                    "map_forward"])
    items = json.loads(out.read_text())["items"]
    assert items["svi_step"]["error"] == "RuntimeError: planted failure"
    assert items["map_step"]["ratio"] == 1.0 and items["map_forward"]["ratio"] == 1.0
    gpu_check.main(["--device", "cpu", "--toy", "--out", str(out), "--budget-s", "0",
                    "--items", "map_step"])
    assert json.loads(out.read_text())["items"]["map_step"]["error"].startswith("skipped")
