"""The speed-and-scale rows of benchmarks/cost.py (benchmarks/cost_scale.py), each built once
and run once on real MiniLM: they compute what they claim (the batched predictive equals the
loop), not how fast (timings live in the benchmark, never in tests)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

COST = Path(__file__).resolve().parents[1] / "benchmarks" / "cost.py"
ROWS = {"predict_s16_top1_over_map_forward": 3.0, "predict_s16_loop_top1_over_map_forward": 16.0,
        "predict_s16_all_over_map_forward": 16.0, "svi_step_top1_cached_over_map_step": 1.0,
        "coding_bayes_s16_over_map": 3.0}


@pytest.fixture(scope="module")
def cost():
    try:
        import pyro_llm

        pyro_llm.data.minilm_path()
        pyro_llm.data.rotten_tomatoes(seed=0)
    except (FileNotFoundError, ImportError, OSError):
        pytest.skip("needs the MiniLM and Rotten Tomatoes demo packages")
    spec = importlib.util.spec_from_file_location("pyro_llm_bench_cost_scale", COST)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        mod.THREADS = 1
        mod.N_BATCHES = 2  # the smallest data: two batches of eight reviews
        yield mod
    finally:
        for k in [k for k in sys.modules if k.startswith(spec.name)]:
            sys.modules.pop(k, None)


def _pair(cost, name, **kw):
    pair = cost.REGISTRY[name].setup.func(cost, cost.SIDES, **cost.REGISTRY[name].setup.keywords,
                                          **kw)
    json.dumps(pair.settings)
    return pair


def test_rows_are_registered_with_their_goals(cost):
    assert {n: cost.REGISTRY[n].goal for n in ROWS} == ROWS


def test_sample_batched_predictive_equals_the_loop_on_minilm(cost):
    fast = _pair(cost, "predict_s16_top1_over_map_forward")
    slow = _pair(cost, "predict_s16_loop_top1_over_map_forward")
    p_fast, p_slow = fast.numerator(), slow.numerator()
    assert p_fast.shape == (16, cost.BATCH, 2)
    torch.testing.assert_close(p_fast, p_slow, rtol=1e-4, atol=1e-5)
    assert p_fast.std(0).max() > 1e-4  # the draws differ
    p_map = fast.denominator()
    assert (p_fast.mean(0) - p_map).abs().max() < 0.1  # draws are small perturbations of the MAP
    every = _pair(cost, "predict_s16_all_over_map_forward").numerator()
    assert every.shape == (16, cost.BATCH, 2) and torch.isfinite(every).all()


def test_cached_svi_step_and_coding_rows_run(cost):
    svi = _pair(cost, "svi_step_top1_cached_over_map_step")
    assert all(math.isfinite(svi.numerator()) for _ in range(3))
    assert math.isfinite(svi.denominator())
    coding = _pair(cost, "coding_bayes_s16_over_map", docs=12)
    bayes, point = coding.numerator(), coding.denominator()
    assert bayes.shape == point.shape == (12, 2)
    assert (bayes - point).abs().max() < 0.1
