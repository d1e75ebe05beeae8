"""The Laplace rows of benchmarks/cost.py (benchmarks/cost_laplace.py), at their smallest: each
row's pair is built with one batch of data and each callable runs once (real MiniLM, ~1 min)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

COST = Path(__file__).resolve().parents[1] / "benchmarks" / "cost.py"
ROWS = ("laplace_fit_over_map_epoch", "laplace_fit_ours_over_laplace_torch",
        "laplace_glm_predict_over_map_forward")

pytest.importorskip("laplace", reason="laplace-torch 0.3 is the reference of one row")


@pytest.fixture(scope="module")
def cost():
    spec = importlib.util.spec_from_file_location("pyro_llm_bench_cost_laplace", COST)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    try:
        spec.loader.exec_module(mod)
        mod.THREADS = 1  # torch.set_num_threads in the setups: steady on a shared machine
        mod.pyro_llm_data_ok = _data_ok()
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
        sys.modules.pop(f"{spec.name}.cost_laplace", None)


def _data_ok() -> bool:
    try:
        import pyro_llm

        pyro_llm.data.minilm_path()
        pyro_llm.data.rotten_tomatoes(seed=0)
    except (FileNotFoundError, ImportError, OSError):
        return False
    return True


def _build(cost, name):
    if not cost.pyro_llm_data_ok:
        pytest.skip("needs the MiniLM and Rotten Tomatoes demo packages")
    bench = cost.REGISTRY[name]
    # the registered setup is functools.partial(row, cost): call the row with its smallest data
    pair = bench.setup.func(cost, cost.SIDES, fit_batches=1)
    assert callable(pair.numerator) and callable(pair.denominator)
    json.dumps(pair.settings)  # the settings go into the JSON rows
    return pair


def test_rows_are_registered_with_their_goals(cost):
    goals = {name: cost.REGISTRY[name].goal for name in ROWS}
    assert goals == {"laplace_fit_over_map_epoch": 1.0, "laplace_fit_ours_over_laplace_torch": 0.5,
                     "laplace_glm_predict_over_map_forward": 3.0}
    args = cost.build_parser().parse_args(["--quick", "--rows", *ROWS])
    assert args.rows == list(ROWS)


def test_fit_over_map_epoch(cost):
    pair = _build(cost, "laplace_fit_over_map_epoch")
    la = pair.numerator()
    assert la.n_data == cost.BATCH and len(la.blocks) == 24 and la.meta["structure"] == "kfac"
    assert float(la.prior_precision[0]) > 0
    losses = pair.denominator()
    assert len(losses) == 1 and all(math.isfinite(v) for v in losses)
    st = pair.settings
    frac = st["curvature_over_model_param_bytes"]
    assert frac["lowrank_kfac"] < frac["kfac"] < 1.0 and frac["diag"] < frac["kfac"]
    assert st["curvature_bytes"]["kfac"] == la.memory_bytes
    assert st["param_bytes"]["lora_numel"] == 24 * 8 * 384


def test_fit_ours_over_laplace_torch_agrees(cost):
    pair = _build(cost, "laplace_fit_ours_over_laplace_torch")
    agree = pair.settings["agreement"]
    assert agree["layers"] == 24 and agree["kron_max_rel_diff"] < 1e-4
    assert agree["n_data"] == {"ours": cost.BATCH, "laplace_torch": cost.BATCH}
    assert agree["log_likelihood"]["rel_diff"] < 1e-5
    la, ref = pair.numerator(), pair.denominator()
    assert la.n_data == ref.n_data == cost.BATCH and len(ref.H_facs.kfacs) == 24


def test_glm_predict_over_map_forward(cost):
    import torch

    pair = _build(cost, "laplace_glm_predict_over_map_forward")
    probs = pair.numerator()
    assert probs.shape == (16, cost.BATCH, 2)
    assert torch.allclose(probs.sum(-1), torch.ones(16, cost.BATCH), atol=1e-5)
    p_map = pair.denominator()
    assert p_map.shape == (cost.BATCH, 2) and torch.isfinite(p_map).all()
    # the GLM predictive is centred near the MAP: its mean is a blurred version of the same probs
    assert (probs.mean(0) - p_map).abs().max() < 0.5
