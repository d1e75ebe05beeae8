"""benchmarks/coverage.py: the JSON the spec asks for, resume, and the scenarios' ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"bias", "rmse", "coverage", "coverage_mcse", "width", "sec_per_rep"}


def _run(*args):
    return subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / "coverage.py"), *args],
                          capture_output=True, text=True, timeout=600, check=True, cwd=ROOT)


def test_coverage_cli_writes_the_spec_json_and_resumes(tmp_path):
    out = tmp_path / "cov.json"
    first = _run("--reps", "3", "--scenarios", "B2", "--workers", "1", "--out", str(out))
    rows = json.loads(out.read_text())
    assert [r["scenario"] for r in rows] == ["B2"] and rows[0]["R"] == 3 and rows[0]["variant"] == {}
    methods = rows[0]["methods"]
    assert set(methods) == {"naive", "labelled_only", "ppi++", "joint", "joint_dr"}
    for m in methods.values():
        assert KEYS <= set(m) and 0 <= m["coverage"] <= 1 and m["width"] > 0
    assert "joint" in first.stdout and "coverage" in first.stdout
    again = _run("--reps", "3", "--scenarios", "B2", "--workers", "1", "--out", str(out), "--resume")
    assert "kept from --out" in again.stdout
    assert json.loads(out.read_text()) == rows


def test_b2_truth_is_the_linear_probability_coefficient():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import scenarios
    finally:
        sys.path.remove(str(ROOT))
    truth = scenarios.b2_truth(rows=400_000, seed=1)
    assert abs(truth - scenarios.b2_truth()) < 0.005      # the 2M-row value, within MC error
    assert -0.12 < scenarios.b2_truth() < -0.09          # BENCHMARKS.md: about -0.106
    rep = scenarios.b1(0)
    assert 0.97 < rep.info["accuracy"] < 0.995          # "accuracy about 98%"
    assert np.isnan(rep.df["z"]).sum() == 10_000 - 500
