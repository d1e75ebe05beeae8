"""benchmarks/growth.py: the slope fit, the Laplace memory sweep on real MiniLM (exact in the
structure's sizes), the figures and the docs table, and the main loop's atomic, per-part JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import growth, growth_plots  # noqa: E402


def test_slope_recovers_lines_and_power_laws():
    x = [1, 2, 4, 8]
    fit = growth.slope(x, [3 + 0.5 * v for v in x])
    assert fit["slope"] == pytest.approx(0.5) and fit["intercept"] == pytest.approx(3)
    assert fit["max_abs_residual"] < 1e-9
    power = growth.slope(x, [7 * v**1.5 for v in x], log=True)
    assert power["slope"] == pytest.approx(1.5) and np.exp(power["intercept"]) == pytest.approx(7)
    with pytest.raises(ValueError, match="at least 2 points"):
        growth.slope([1], [1])


def test_memory_sweep_matches_the_structures_sizes():
    res = growth.part_memory(dict(blocks=[1, 2], ranks=[2, 4], batches=1))
    blocks, rank = res["blocks"], res["rank"]
    # MiniLM, r = 8 on query and value: 2 adapters per block, A (8 x 384) and B (384 x 8) each
    assert blocks["parameters"] == [2 * 2 * 8 * 384, 2 * 2 * 2 * 8 * 384]
    assert rank["parameters"] == [6 * 2 * 2 * r * 384 for r in (2, 4)]
    for axis in (blocks, rank):  # the diagonal is one float64 per parameter
        assert axis["bytes"]["diag"] == [8 * p for p in axis["parameters"]]
        assert axis["full_float64_bytes"] == [8.0 * p * p for p in axis["parameters"]]
    # Kronecker factors are per adapted matrix: twice the blocks, twice the bytes
    assert blocks["bytes"]["kfac"][1] == 2 * blocks["bytes"]["kfac"][0]
    assert blocks["fit"]["kfac"]["slope"] == pytest.approx(1.0)
    assert rank["fit"]["diag"]["slope"] == pytest.approx(1.0)
    # the 384 x 384 factors dominate KFAC, so its memory barely moves with the rank
    assert abs(rank["fit"]["kfac"]["slope"]) < 0.01


def _fake(parts):
    fit = {"intercept": 0.1, "slope": 2.0, "log": False, "max_abs_residual": 0.0}
    logfit = dict(fit, log=True, slope=1.0)
    res = {
        "predictive": {"map_forward_s": 0.05, "series": {"top1": {
            "draws": [1, 2, 4], "seconds": [0.1, 0.12, 0.15], "map_forwards": [2, 2.4, 3],
            "fit": fit, "floor_per_draw": 1 / 6}}},
        "memory": {axis: {"values": [1, 2], "bytes": {"kfac": [2**20, 2**21], "diag": [8, 16]},
                          "parameters": [1, 2], "adapter_float32_bytes": [4, 8],
                          "full_float64_bytes": [8, 32], "fit": {"kfac": logfit, "diag": logfit}}
                   for axis in ("blocks", "rank")},
        "corpus": {"fit": {"docs": [250, 500], "seconds": [5, 10], "map_step_s": 0.1,
                           "floor_seconds": [3.125, 6.25], "fit": fit},
                   "code_map": {"docs": [1000, 2000], "seconds": [8, 16], "fit": fit},
                   "code_s16": {"docs": [1000, 2000], "seconds": [20, 40], "fit": fit},
                   "map_forward_s": 0.08, "code_floor_seconds": [10, 20]},
        "regress": {"labelled": 200,
                    "docs": {"values": [1000, 2000], "folds": 5, "seconds": [60, 80], "fit": fit},
                    "folds": {"values": [2, 5], "docs": 2000, "seconds": [40, 80], "fit": fit}},
    }
    return {k: res[k] for k in parts}


def test_figures_and_table(tmp_path):
    res = _fake(growth_plots.PLOTS)
    for name, part in res.items():
        growth_plots.plot(name, part, tmp_path / f"growth_{name}.png")
        assert (tmp_path / f"growth_{name}.png").stat().st_size > 10_000
    path = tmp_path / "growth.json"
    path.write_text(json.dumps(res))
    table = growth_plots.table(path).splitlines()
    assert table[0].startswith("| what grows |")
    assert len(table) == 2 + 1 + 4 + 3 + 2  # header; predictive; memory 2 x 2; corpus 3; regress 2
    assert "| 2.000 MAP forwards / draw | 1 pass + 0.167 / draw (the blocks at every position) |" in table[2]
    assert any("| 10.0 s / 1k (MAP forwards) |" in row for row in table)  # 0.08 s per batch of 8


def test_main_replaces_one_part_and_keeps_the_others(tmp_path, monkeypatch):
    out = tmp_path / "growth.json"
    out.write_text(json.dumps({"memory": {"old": True}, "regress": {"kept": True}}))
    monkeypatch.setattr(growth, "PARTS", dict(growth.PARTS, memory=lambda cfg: {"new": cfg["blocks"]}))
    res = growth.main(["--parts", "memory", "--quick", "--out", str(out), "--figures", ""])
    saved = json.loads(out.read_text())
    assert saved == res
    assert saved["regress"] == {"kept": True}
    assert saved["memory"]["new"] == growth.QUICK["memory"]["blocks"] and saved["memory"]["quick"]
    assert not list(tmp_path.glob("*.json.tmp")) and len(list(tmp_path.iterdir())) == 1
