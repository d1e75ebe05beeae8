"""benchmarks/calibration.py: a tiny real run (MiniLM, every method), the spec's JSON fields, resume."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

CAL = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration.py"
SPEC_KEYS = {"task", "model", "n_train", "seed", "method", "accuracy", "ece", "nll", "brier",
             "auroc_ood", "fit_s", "predict_s", "peak_mb"}
TINY = ["--quick", "--n-train", "16", "--n-test", "32", "--epochs", "1", "--samples", "5",
        "--mc-samples", "3", "--n-val", "16", "--n-ood", "16", "--no-progress"]


@pytest.fixture(scope="module")
def cal():
    spec = importlib.util.spec_from_file_location("pyro_llm_bench_calibration", CAL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _main(cal, *args):
    return cal.main([*TINY, "--threads", str(torch.get_num_threads()), *args])


def test_calibration_cli_rows_and_resume(cal, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cal.json"
    _main(cal, "--out", str(out))
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == cal.DEFAULT_METHODS
    by = {r["method"]: r for r in rows}
    for r in rows:
        assert SPEC_KEYS <= set(r)
        assert (r["task"], r["model"], r["n_train"], r["seed"], r["n_test"]) == (
            "rotten_tomatoes", "all-MiniLM-L6-v2", 16, 0, 32)
        assert 0 <= r["auroc_ood"] <= 1  # every method scores the out-of-distribution speeches
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and 0 <= r["brier"] <= 2
        assert all(math.isfinite(r[k]) for k in ("nll", "fit_s", "predict_s", "peak_mb"))
        if r["method"].startswith("laplace"):
            delta = r["prior_precision"] if isinstance(r["prior_precision"], list) else [r["prior_precision"]]
            assert min(delta) > 0 and r["memory_bytes"] > 0
            assert r["laplace"]["prior_mean"] == "init"  # the model builders record the start
            assert r["base_fit_s"] == rows[0]["fit_s"]  # every Laplace row starts from the same MAP fit
        # methods with draws report the MI-based AUROC as well; point predictions do not
        assert (r["auroc_ood_mi"] is None) == (r["method"] in ("map", "temperature"))
        # the Monte Carlo error of the metrics where there are draws; the paired NLL gap to MAP
        assert ("mc_error" in r) == (r["auroc_ood_mi"] is not None)
        assert all(v >= 0 for v in r.get("mc_error", {}).values())
        if r["method"] != "map":
            assert r["nll_minus_map"] == pytest.approx(r["nll"] - by["map"]["nll"], abs=1e-5)
    assert by["temperature"]["temperature"] > 0 and by["temperature"]["n_val"] == 16
    assert by["ensemble_m5"]["members"] == 5 and by["ensemble_m5"]["fit_s"] > by["map"]["fit_s"]
    # the same MAP model: temperature scaling changes no argmax, so the accuracy is MAP's
    assert by["temperature"]["accuracy"] == by["map"]["accuracy"]
    printed = capsys.readouterr().out
    assert "laplace_kfac" in printed and "a Bayesian method halves MAP's ECE" in printed

    # everything done: --resume keeps the rows and builds no model
    def no_fit(*a, **k):
        raise AssertionError("--resume re-ran a setting that is complete")

    monkeypatch.setattr(cal, "build_setting", no_fit)
    _main(cal, "--out", str(out), "--resume")
    assert json.loads(out.read_text()) == rows
    assert "kept from --out" in capsys.readouterr().out
    monkeypatch.undo()

    # one row missing: only that one is run again, the others are kept as they were
    out.write_text(json.dumps(rows[:-1]))
    _main(cal, "--out", str(out), "--resume", "--methods", "map", rows[-1]["method"])
    again = json.loads(out.read_text())
    assert again[:-1] == rows[:-1] and again[-1]["method"] == rows[-1]["method"]
    assert again[-1]["ece"] == pytest.approx(rows[-1]["ece"], abs=1e-6)  # seeded: the same numbers


def test_markdown_and_goal_verdict(cal, capsys, tmp_path):
    def row(method, seed, acc, ece):
        return {"task": "rotten_tomatoes", "model": "m", "n_train": 200, "n_test": 2000, "seed": seed,
                "method": method, "accuracy": acc, "ece": ece, "nll": 0.5, "brier": 0.3,
                "fit_s": 1.0, "predict_s": 1.0, "peak_mb": 100.0}

    rows = [row("map", 0, 0.80, 0.10), row("map", 1, 0.80, 0.12),
            row("laplace_kfac", 0, 0.792, 0.05), row("laplace_kfac", 1, 0.80, 0.05),
            row("laplace_diag", 0, 0.70, 0.01), row("laplace_diag", 1, 0.70, 0.01),
            row("temperature", 0, 0.80, 0.01), row("temperature", 1, 0.80, 0.01)]
    v = cal.verdicts(cal.aggregate(rows))[("m", 200, 2000)]
    assert v["met"] and v["method"] == "laplace_kfac"  # diag is better calibrated but 10 points worse
    # temperature scaling is better still at equal accuracy, but it is no Bayesian method
    assert cal.aggregate(rows)[("m", 200, 2000, "map")]["ece"][0] == pytest.approx(0.11)
    f = tmp_path / "rows.json"
    f.write_text(json.dumps(rows))
    cal.main(["--markdown", str(f)])
    md = capsys.readouterr().out
    assert "| m | 200 | 2000 | laplace_kfac | 2 | 0.796 ± 0.006 |" in md
