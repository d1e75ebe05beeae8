"""Laplace rows of the cost benchmark (``/work/shared/BENCHMARKS.md`` section 3).

``benchmarks/cost.py`` loads this file and calls :func:`register_rows` with itself, so the rows
below join its ``REGISTRY`` and run with its harness (interleaved timing, memory probes)::

    .venv/bin/python benchmarks/cost.py [--quick] --rows laplace_fit_over_map_epoch \\
        laplace_fit_ours_over_laplace_torch laplace_glm_predict_over_map_forward

Every setup here takes the cost module as its first argument (bound with ``functools.partial``),
so it uses that module's thread count, seeds and MiniLM helpers (``_minilm_batches``,
``_peft_minilm``, ``_map_step``) rather than copies, and a data-size keyword that the
smoke test (``tests/test_cost_laplace_cli.py``) sets to its smallest.

Shared set-up: MiniLM with peft LoRA r = 8 on query/value, batches of 8 x 64 tokens, as the
other rows. The Laplace sites are the 24 LoRA matrices (``select="AB"``, the default); the
``modules_to_save`` classifier head is frozen (``requires_grad=False``) on the models that are
fitted, so that laplace-torch's ``subset_of_weights="all"`` covers the same 24 matrices. peft
initialises ``lora_B`` to zero, which would make every ``lora_A`` output gradient (and its KFAC
factor) zero; the fitted models therefore get seeded random ``lora_B`` weights as a stand-in
for a fine-tuned MAP (the cost does not depend on the values; the agreement check needs them
non-zero).
"""

from __future__ import annotations

import functools
import itertools
import time
import warnings
from collections.abc import Iterable

# data sizes, in batches of 8: (quick, full)
FIT_BATCHES = (8, 125)  # N = 64 / 1,000 examples (BENCHMARKS.md: one pass over 1,000)
PREDICT_FIT_BATCHES = (4, 16)  # the posterior row 3 predicts with (its size does not change the cost)
NUM_SAMPLES = 16  # S of the MC GLM predictive
N_KFAC = 10  # rank of the low-rank KFAC, as Laplace-LoRA / bayesian-lora
B_STD = 0.05  # std of the seeded lora_B stand-in for fine-tuned weights


def register_rows(cost) -> None:
    """Register this file's rows into ``cost.REGISTRY`` (``cost`` is benchmarks/cost.py)."""
    Sizes = cost.Sizes
    fit_sizes = dict(  # one call is a whole pass over the data: few rounds
        quick=Sizes(warmup=1, min_rounds=3, max_rounds=10, budget_s=30, memory_steps=1),
        full=Sizes(warmup=1, min_rounds=3, max_rounds=10, budget_s=240, memory_steps=1))
    step_sizes = dict(
        quick=Sizes(warmup=2, min_rounds=10, max_rounds=40, budget_s=30, memory_steps=3),
        full=Sizes(warmup=3, min_rounds=20, max_rounds=400, budget_s=180, memory_steps=5))
    cost.register(
        "laplace_fit_over_map_epoch", goal=1.0,
        numerator="fit_laplace(structure='kfac') with its defaults (sampled Fisher, marglik prior), "
                  "one pass over N examples",
        denominator="one peft LoRA MAP training epoch over the same N examples",
        **fit_sizes)(functools.partial(laplace_fit_over_map_epoch, cost))
    cost.register(
        "laplace_fit_ours_over_laplace_torch", goal=0.5,
        numerator="fit_laplace(structure='kfac', curvature='ggn', optimize_prior=None) over N examples",
        denominator="laplace-torch 0.3 Laplace(hessian_structure='kron', CurvlinopsGGN).fit over "
                    "the same N examples",
        **fit_sizes)(functools.partial(laplace_fit_ours_over_laplace_torch, cost))
    cost.register(
        "laplace_glm_predict_over_map_forward", goal=3.0,
        numerator=f"la.predict(batch, pred_type='glm', link='mc', num_samples={NUM_SAMPLES}) of the "
                  "KFAC posterior, one batch",
        denominator="one MAP forward of the same batch (eval mode, no_grad, softmax)",
        **step_sizes)(functools.partial(laplace_glm_predict_over_map_forward, cost))


# ---------------------------------------------------------------------------- helpers
def _size(cost, sizes: tuple[int, int]) -> int:
    return sizes[0] if getattr(cost, "QUICK", False) else sizes[1]


def _fitted_model(cost):
    """A peft MiniLM in eval mode with seeded random ``lora_B`` (a stand-in for fine-tuned LoRA
    weights) and the classifier head frozen, so only the 24 LoRA matrices are trainable."""
    net = cost._seed_lora_b(cost._peft_minilm(), B_STD)
    for name, p in net.named_parameters():
        if ".modules_to_save." in name:
            p.requires_grad_(False)
    return net


def _param_bytes(net) -> dict:
    lora = [p for n, p in net.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    return {"model": sum(p.numel() * p.element_size() for p in net.parameters()),
            "lora": sum(p.numel() * p.element_size() for p in lora),
            "lora_numel": sum(p.numel() for p in lora)}


def _rel(a, b) -> float:
    """``max |a - b| / max |b|`` (as tests/test_laplace_reference.py)."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _common_settings(cost, n_examples: int | None = None) -> dict:
    out = dict(
        model="all-MiniLM-L6-v2 (AutoModelForSequenceClassification, num_labels=2)",
        batch=cost.BATCH, seq_len=cost.SEQ_LEN, lora=cost.LORA, seed=cost.SEED,
        laplace_sites="the 24 LoRA matrices (select='AB'); classifier head frozen on the fitted "
                      "models (requires_grad=False), so it is in neither our fit nor laplace-torch's",
        map_weights=f"seeded lora_B ~ N(0, {B_STD}^2) as a stand-in for fine-tuned weights (peft's zero "
                    "B would zero every lora_A output gradient); lora_A as peft initialises it",
        versions=cost._versions(), library=_git())
    if n_examples is not None:
        out["n_examples"] = n_examples
    return out


def _git() -> dict:
    """The commit the library was imported from, and whether ``pyro_llm/`` differed from it."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        cmds = (["git", "rev-parse", "--short", "HEAD"], ["git", "status", "--porcelain", "pyro_llm"])
        run = [subprocess.run(c, cwd=root, capture_output=True, text=True, check=True).stdout.strip()
               for c in cmds]
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": run[0], "pyro_llm_modified": bool(run[1])}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ---------------------------------------------------------------------------- rows
def laplace_fit_over_map_epoch(cost, sides: Iterable[str], fit_batches: int | None = None):
    """Our KFAC Laplace fit (one pass over N reviews, ``fit_laplace``'s defaults) over one MAP
    training epoch on the same N reviews (``N / 8`` MAP steps as ``fit_map`` takes them).

    In the timing process only (both sides built) it also records, outside the timing, the
    curvature memory of KFAC, low-rank KFAC (``n_kfac=10``) and diagonal relative to the model's
    parameter bytes, the seconds of one low-rank KFAC fit over the same N, and the seconds of
    the marginal-likelihood prior optimisation (part of the timed fit).
    """
    from pyro_llm.infer.laplace import fit_laplace

    sides = set(sides)
    cost._seed_all()
    n_batches = fit_batches or _size(cost, FIT_BATCHES)
    batches = cost._minilm_batches(n_batches)
    settings = _common_settings(cost, cost.BATCH * n_batches)
    settings.update(
        numerator="fit_laplace(net, batches, structure='kfac', progress=False): curvature='fisher' "
                  "(one sampled label per example), kfac_approx='expand', optimize_prior='marglik' "
                  "(L-BFGS), factors accumulated in float64",
        denominator=f"{n_batches} calls of the cost rows' MAP step (peft model in train mode, HF loss, "
                    "backward, clip_grad_norm_, AdamW: fit_map's loop body), one per batch",
        goal_note="no hard goal in BENCHMARKS.md; 1.0 = the fit costs no more than one training epoch, "
                  "i.e. about 10% of the 10-epoch fine-tune of section 2 (the seed reports ~10% extra "
                  "compute)")
    den = num = None
    if "denominator" in sides:
        step = cost._map_step(batches)

        def den():
            return [step() for _ in range(n_batches)]

    if "numerator" in sides:
        net = _fitted_model(cost)

        def num():
            return fit_laplace(net, batches, structure="kfac", progress=False)

        if sides >= {"numerator", "denominator"}:  # the timing process: extras, once, untimed
            settings.update(_memory_extras(net, batches, fit_laplace))
    return cost.Pair(num, den, settings)


def _memory_extras(net, batches, fit_laplace) -> dict:
    pb = _param_bytes(net)
    la, _ = _timed(lambda: fit_laplace(net, batches, structure="kfac", optimize_prior=None, progress=False))
    _, marglik_s = _timed(la.optimize_prior_precision)
    lr, lr_s = _timed(lambda: fit_laplace(net, batches, structure="lowrank_kfac", n_kfac=N_KFAC,
                                          progress=False))
    dg, dg_s = _timed(lambda: fit_laplace(net, batches, structure="diag", progress=False))
    mem = {"kfac": la.memory_bytes, "lowrank_kfac": lr.memory_bytes, "diag": dg.memory_bytes}
    return {
        "param_bytes": pb,
        "curvature_bytes": mem,
        "curvature_over_model_param_bytes": {k: v / pb["model"] for k, v in mem.items()},
        "curvature_over_lora_param_bytes": {k: v / pb["lora"] for k, v in mem.items()},
        "memory_note": "la.memory_bytes (float64 eigenbases and eigenvalues of the factors) over the "
                       "float32 bytes of all model parameters / of the 24 LoRA matrices",
        "once_untimed_s": {"marglik_prior_optimisation": marglik_s,
                           f"lowrank_kfac_fit_n_kfac_{N_KFAC}": lr_s, "diag_fit": dg_s},
        "prior_precision_marglik": {"kfac": float(la.prior_precision[0]),
                                    "lowrank_kfac": float(lr.prior_precision[0]),
                                    "diag": float(dg.prior_precision[0])},
    }


def _dict_logits(model):
    """laplace-torch's Hugging Face pattern: a module taking the dict batch, returning logits."""
    import torch

    class DictLogits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, batch):
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return DictLogits(model)


def laplace_fit_ours_over_laplace_torch(cost, sides: Iterable[str], fit_batches: int | None = None):
    """Our KFAC fit over laplace-torch 0.3's, like for like: exact GGN on both sides
    (``curvature="ggn"``: laplace-torch's CurvlinopsGGN default), KFAC-expand on both, no prior
    optimisation (laplace-torch's ``fit`` does none), the same 24 LoRA matrices, separate identical
    models per side. laplace-torch gets a ``DataLoader`` over per-example dicts (so it reads N from
    ``len(dataset)``) and the wrapper module of its HF pattern; the ``Laplace`` object is built
    inside each timed call, as ``fit_laplace`` builds its own.

    In the timing process only, the agreement is checked once before the timing: per layer
    ``max |ours - kron(G, A)| / max |kron(G, A)|`` over our ``block.dense()`` and laplace-torch's
    ``H_facs.kfacs[i] = [G, A]``, and the training log-likelihoods.
    """
    import torch

    from pyro_llm.infer.laplace import fit_laplace

    sides = set(sides)
    cost._seed_all()
    n_batches = fit_batches or _size(cost, FIT_BATCHES)
    batches = cost._minilm_batches(n_batches)
    settings = _common_settings(cost, cost.BATCH * n_batches)
    settings.update(
        numerator="fit_laplace(net, batches, structure='kfac', curvature='ggn', optimize_prior=None, "
                  "progress=False): exact GGN (C = 2 backward passes per batch), kfac_approx='expand', "
                  "float64 factors",
        denominator="Laplace(DictLogits(net), 'classification', subset_of_weights='all', "
                    "hessian_structure='kron') (default backend CurvlinopsGGN, KFAC-expand, float32) "
                    "then .fit(DataLoader(per-example dicts, batch_size=8)); DictLogits(batch) = "
                    "net(input_ids, attention_mask).logits")
    den = num = None
    if "numerator" in sides:
        net_ours = _fitted_model(cost)

        def num():
            return fit_laplace(net_ours, batches, structure="kfac", curvature="ggn", optimize_prior=None,
                               progress=False)

    if "denominator" in sides:
        from importlib.metadata import version

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from laplace import Laplace

        wrapper = _dict_logits(_fitted_model(cost))
        keys = ("input_ids", "attention_mask", "labels")
        rows = [{k: b[k][i] for k in keys} for b in batches for i in range(len(b["labels"]))]
        loader = torch.utils.data.DataLoader(rows, batch_size=cost.BATCH, shuffle=False)
        settings["versions"] = dict(settings["versions"], laplace_torch=version("laplace-torch"),
                                    curvlinops=version("curvlinops-for-pytorch"))

        def den():
            ref = Laplace(wrapper, "classification", subset_of_weights="all", hessian_structure="kron",
                          dict_key_x="input_ids", dict_key_y="labels")
            ref.fit(loader)
            return ref

    if num is not None and den is not None:  # the timing process: the agreement, once, untimed
        settings["agreement"] = _agreement(num(), den())
    return cost.Pair(num, den, settings)


def _agreement(la, ref) -> dict:
    kfacs = ref.H_facs.kfacs
    if len(kfacs) != len(la.blocks):
        raise RuntimeError(f"laplace-torch has {len(kfacs)} Kronecker layers, ours {len(la.blocks)}")
    import torch

    rel = []
    for block, (G, A) in zip(la.blocks, kfacs, strict=True):
        if tuple(block.shape) != (G.shape[0], A.shape[0]):
            raise RuntimeError(f"layer shapes differ: ours {block.shape}, laplace-torch "
                               f"{(G.shape[0], A.shape[0])}")
        rel.append(_rel(block.dense(), torch.kron(G, A)))
    ll_ref = float(ref.log_likelihood)
    return {
        "kron_max_rel_diff": max(rel),
        "kron_rel_diff_per_layer": rel,
        "kron_rel_diff_definition": "per layer max|ours.dense() - kron(G, A)| / max|kron(G, A)|; "
                                    "ours float64, laplace-torch float32",
        "layers": len(rel),
        "n_data": {"ours": la.n_data, "laplace_torch": int(ref.n_data)},
        "log_likelihood": {"ours": la.log_likelihood, "laplace_torch": ll_ref,
                           "rel_diff": abs(la.log_likelihood - ll_ref) / abs(ll_ref)},
    }


def laplace_glm_predict_over_map_forward(cost, sides: Iterable[str], fit_batches: int | None = None):
    """Linearised (GLM) predictive with MC over S = 16 joint logit draws, one batch per call
    (``la.predict([batch], pred_type="glm", link="mc", num_samples=16)``: a forward with the layers
    tapped, C - 1 = 1 backward pass for the Jacobian of the logit difference ``f_1 - f_0`` (the
    softmax ignores a common shift), its variance from the KFAC blocks, 16 softmax draws) over one
    MAP forward of the same batch (eval mode, ``torch.no_grad``, softmax), both cycling over the
    same 16 batches in step.
    """
    import torch

    from pyro_llm.infer.laplace import fit_laplace

    sides = set(sides)
    cost._seed_all()
    batches = cost._minilm_batches()
    n_fit = fit_batches or _size(cost, PREDICT_FIT_BATCHES)
    settings = _common_settings(cost)
    settings.update(
        posterior=f"fit_laplace(net, first {n_fit} batches, structure='kfac', progress=False) "
                  "(defaults: sampled Fisher, marglik prior), built in set-up",
        numerator=f"la.predict([batch], pred_type='glm', link='mc', num_samples={NUM_SAMPLES}, "
                  "progress=False) -> (16, 8, 2): one forward with the LoRA layers tapped, C - 1 = 1 "
                  "backward pass (the logit difference f_1 - f_0), its KFAC variance, 16 draws of "
                  "softmax([0, d]); the MAP is already in the model, so no weights are written",
        denominator="with torch.no_grad(): net(input_ids, attention_mask).logits.softmax(-1), eval mode",
        predict_batches=f"{cost.N_BATCHES} batches cycled, the same batch on both sides each round")
    den = num = None
    if "numerator" in sides:
        net = _fitted_model(cost)
        la = fit_laplace(net, batches[:n_fit], structure="kfac", progress=False)
        it_num = itertools.cycle(batches)

        def num():
            return la.predict([next(it_num)], pred_type="glm", link="mc", num_samples=NUM_SAMPLES,
                              progress=False)

    if "denominator" in sides:
        net_map = _fitted_model(cost)
        it_den = itertools.cycle(batches)

        def den():
            b = next(it_den)
            with torch.no_grad():
                out = net_map(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            return out.logits.softmax(-1)

    return cost.Pair(num, den, settings)
