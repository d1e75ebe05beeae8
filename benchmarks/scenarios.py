"""Data-generating processes of the coverage benchmark (``BENCHMARKS.md`` section 1).

Each scenario is a function ``(seed, **variant) -> Replicate``: one simulated corpus, the
formula and target coefficient, and the ``regress`` calls to compare (method label -> keyword
arguments). Q ~ N(0, 1), ε ~ N(0, 1) throughout.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.special import ndtr

from benchmarks.common import (
    N_CORPUS,
    Oracle,
    Replicate,
    cached_calibrator,
    expit,
    fitted_oracle,
    labelled_mask,
    normal_score_posterior,
)
from benchmarks.scenarios_more import MORE

__all__ = ["N_CORPUS", "Oracle", "Replicate", "SCENARIOS", "b1", "b2", "b2_truth", "b3", "expit", "s1"]

_labelled = labelled_mask


COEF = "z"  # the coefficient PPI++ tunes for in B1


def b1_draw(rng, N: int, a: float = 2.5, leak: float = 0.5) -> dict:
    """One B1 corpus: Q, ε, z, Y and the LLM's log-odds-like score s."""
    q, eps = rng.normal(size=N), rng.normal(size=N)
    z = (rng.random(N) < expit(-0.5 + 0.8 * q)).astype(int)
    y = 1 + 1.0 * z + 0.5 * q + eps
    s = a * (2 * z - 1) + 0.6 * q + leak * eps + rng.normal(size=N)
    return {"q": q, "eps": eps, "z": z, "y": y, "s": s}


def b1_oracle_probs(s, q, y, a: float = 2.5, leak: float = 0.5) -> np.ndarray:
    """The true ``p(z | s, Q, Y)`` of B1, (N, 2): Bayes' rule on ``p(z | Q) p(Y | z, Q) p(s | z, Q, Y)``
    with ε = Y − 1 − z − 0.5 Q (so ``s | z, Q, Y ~ N(a(2z − 1) + 0.6 Q + leak·ε, 1)``)."""
    p1 = expit(-0.5 + 0.8 * q)
    k = np.arange(2)
    return normal_score_posterior(np.log(np.column_stack([1 - p1, p1])), y, 1 + k + 0.5 * q[:, None], s,
                                  a * (2 * k - 1) + 0.6 * q[:, None], leak)


def b1(seed: int, a: float = 2.5, leak: float = 0.5, n: int = 500, N: int = N_CORPUS) -> Replicate:
    """Coded binary covariate whose coding errors depend on Q (and on ε when leak > 0)."""
    rng = np.random.default_rng(seed)
    d = b1_draw(rng, N, a, leak)
    q, z, y, s = d["q"], d["z"], d["y"], d["s"]
    zhat = (s > 0).astype(int)
    lab = _labelled(rng, N, n)
    calib = cached_calibrator(("B1", a, leak),
                              lambda r, m: (lambda x: (x["z"], x["s"]))(b1_draw(r, m, a, leak)))
    df = pd.DataFrame({"y": y, "q": q, "z": np.where(lab, z, np.nan)})
    runs = {
        "dr": {"method": "dr", "predictions": s},
        "naive": {"method": "naive", "predictions": zhat},
        "labelled_only": {"method": "labelled_only", "predictions": zhat},
        "ppi++": {"method": "ptd", "predictions": calib(s), "tune_for": COEF},
        "ppi++ (labels)": {"method": "ptd", "predictions": zhat, "tune_for": COEF},
        "joint": {"method": "joint", "predictions": s},
    }
    if leak > 0:  # the same information as PPI++: the coded labels only
        runs["joint (labels)"] = {"method": "joint", "predictions": zhat}
    return Replicate(df, "y ~ z + q", "z", "covariate", "z", 1.0, runs,
                     info={"accuracy": float((zhat == z).mean())},
                     oracle=Oracle(z, b1_oracle_probs(s, q, y, a, leak)))


def _b2_draw(rng, N):
    q1, q2, eps = rng.normal(size=N), (rng.random(N) < 0.4).astype(float), rng.normal(size=N)
    z = (0.5 * q1 - 0.3 * q2 + eps > 0).astype(int)
    flip = np.where(z == 0, rng.random(N) < expit(-4 + 0.8 * q2), rng.random(N) < expit(-3.5 - 0.8 * q1))
    return q1, q2, z, np.where(flip, 1 - z, z)


@lru_cache(maxsize=1)
def b2_truth(rows: int = 2_000_000, seed: int = 20261122) -> float:
    """The linear-probability coefficient of Q2, from one large draw."""
    q1, q2, z, _ = _b2_draw(np.random.default_rng(seed), rows)
    X = np.column_stack([np.ones(rows), q1, q2])
    return float(np.linalg.lstsq(X, z, rcond=None)[0][2])


def b2_oracle_probs(q1, q2, zhat) -> np.ndarray:
    """The true ``p(z | ẑ, Q1, Q2)`` of B2, (N, 2): prior ``p(z = 1 | Q) = Φ(0.5 Q1 − 0.3 Q2)``,
    false positives ``expit(−4 + 0.8 Q2)``, false negatives ``expit(−3.5 − 0.8 Q1)``."""
    p1 = ndtr(0.5 * q1 - 0.3 * q2)
    fp, fn = expit(-4 + 0.8 * q2), expit(-3.5 - 0.8 * q1)
    like0 = np.where(zhat == 1, fp, 1 - fp)
    like1 = np.where(zhat == 1, 1 - fn, fn)
    joint = np.column_stack([(1 - p1) * like0, p1 * like1])
    return joint / joint.sum(1, keepdims=True)


def b2(seed: int, n: int = 500, N: int = N_CORPUS) -> Replicate:
    """Coded binary outcome; false positives depend on Q2, false negatives on Q1."""
    rng = np.random.default_rng(seed)
    q1, q2, z, zhat = _b2_draw(rng, N)
    lab = _labelled(rng, N, n)
    df = pd.DataFrame({"q1": q1, "q2": q2, "z": np.where(lab, z, np.nan)})
    runs = {
        "dr": {"method": "dr", "predictions": zhat},
        "naive": {"method": "naive", "predictions": zhat},
        "labelled_only": {"method": "labelled_only", "predictions": zhat},
        "ppi++": {"method": "ptd", "predictions": zhat, "tune_for": "q2"},
        "joint": {"method": "joint", "predictions": zhat},
    }
    return Replicate(df, "z ~ q1 + q2", "z", "outcome", "q2", b2_truth(), runs,
                     info={"accuracy": float((zhat == z).mean())},
                     oracle=Oracle(z, b2_oracle_probs(q1, q2, zhat)))


# ---------------------------------------------------------------- B3: a peft LoRA classifier
B3_DIM, B3_HIDDEN, B3_RANK = 100, 32, 4
E2E_EVERY = 4    # the end-to-end LoRA model runs on every fourth replication (about 9 s CPU each)
NOCF_EVERY = 2   # the joint model on the in-sample (not cross-fitted) codes on every second (about 3 s)


def _b3_base():
    """The "pretrained" network: the same fixed random MLP in every replication."""
    import torch

    gen = torch.Generator().manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(B3_DIM, B3_HIDDEN), torch.nn.Tanh(),
                              torch.nn.Linear(B3_HIDDEN, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return net


def lora_mlp_codes(x, labels, train_rows, predict_rows, seed: int, samples: int = 16,
                   map_steps: int = 200, svi_steps: int = 150, return_lora: bool = False):
    """Fine-tune a peft LoRA adapter on ``train_rows`` (MAP, then Bayesian LoRA with B random by
    SVI around it, as the demo does) and return (S, len(predict_rows), 2) posterior predictive
    probabilities (and the MAP-initialised BayesianLoRA with ``return_lora``)."""
    import peft
    import pyro
    import torch

    import pyro_llm

    pyro.clear_param_store()
    torch.manual_seed(seed)
    model = peft.get_peft_model(_b3_base(), peft.LoraConfig(r=B3_RANK, lora_alpha=2 * B3_RANK,
                                                            target_modules=["0", "2"]))
    xt = torch.as_tensor(x[train_rows], dtype=torch.float32)
    yt = torch.as_tensor(labels[train_rows], dtype=torch.long)
    batch = [(xt, yt)]
    pyro_llm.fit_map(model, batch, epochs=map_steps, lr=1e-2, progress=False, seed=seed,
                     loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    lora = pyro_llm.BayesianLoRA(model, prior=0.5, select="B")
    if return_lora:
        return lora

    def svi_model(xb, yb):
        pyro_llm.likelihoods.categorical("z", lora(xb), yb, len(yb), torch.arange(len(yb)))

    fit = pyro_llm.fit_svi(svi_model, "normal", batch, epochs=svi_steps, lr=pyro_llm.scale_lr(1e-3, 3e-2),
                           init_values=lora, init_scale=1e-2, progress=False, seed=seed)
    xp = torch.as_tensor(x[predict_rows], dtype=torch.float32)
    return pyro_llm.predict_probs(lambda xb: lora(xb).softmax(-1), [xp],
                                  pyro_llm.GuidePosterior(fit.guide), samples, progress=False,
                                  seed=seed).numpy()


def lora_runs(full, oof, z, lab, fold_ids=None, no_crossfit_joint: bool = False) -> tuple[dict, dict]:
    """The methods of B3 and S1, from the all-labelled model's draws ``full`` (S, N, 2), the
    cross-fitted probabilities ``oof`` (N, 2) and the fold that coded each row; and the coder's
    accuracies. The default ``dr`` and the reference ``ppi++`` get the cross-fitted probabilities."""
    zhat, zhat_cf = full.mean(0).argmax(-1), oof.argmax(-1)
    runs = {
        "dr": {"method": "dr", "predictions": oof, "fold_ids": fold_ids},
        "naive": {"method": "naive", "predictions": zhat},
        "labelled_only": {"method": "labelled_only", "predictions": zhat},
        "ppi++": {"method": "ptd", "predictions": oof, "tune_for": "z"},
        "ppi++ (cross-fit labels)": {"method": "ptd", "predictions": zhat_cf, "tune_for": "z"},
        "ppi++ (reuse)": {"method": "ptd", "predictions": zhat, "tune_for": "z"},
        "mi (LoRA draws)": {"method": "mi", "predictions": full},
    }
    if no_crossfit_joint:
        runs["joint (no cross-fit)"] = {"method": "joint", "predictions": full.mean(0)}
    runs["joint"] = {"method": "joint", "predictions": oof}
    info = {"accuracy_in_sample": float((zhat == z)[lab].mean()),
            "accuracy_out_of_sample": float((zhat == z)[~lab].mean()),
            "accuracy_cross_fit": float((zhat_cf == z).mean())}
    return runs, info


def lora_oracle(z, oof, q, y) -> Oracle:
    """The oracle given this (cross-fitted) coder: ``p(z | s, Q, Y)`` from a multinomial logistic
    fit of the true z on a spline of the cross-fitted log-odds, Q, Y and their products, on all N
    rows (no analytic law exists for a fine-tuned classifier)."""
    p = np.clip(oof[:, 1], 1e-6, 1 - 1e-6)
    return Oracle(z, fitted_oracle(z, np.log(p / (1 - p)), np.column_stack([q, y])), "fitted on all rows")


def b3(seed: int, n: int = 300, N: int = N_CORPUS, folds: int = 5) -> Replicate:
    """The classifier is a peft LoRA model fine-tuned on the same labelled rows."""
    from pyro_llm.regression.crossfit import crossfit, fold_ids

    rng = np.random.default_rng(seed)
    q, eps = rng.normal(size=N), rng.normal(size=N)
    z = (rng.random(N) < expit(-0.5 + 0.8 * q)).astype(int)
    y = 1 + 1.0 * z + 0.5 * q + eps
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(B3_DIM, 2)))[0].T  # fixed directions
    x = (np.outer(1.5 * (2 * z - 1) + 0.5 * q + 0.3 * eps, basis[0]) + np.outer(q, basis[1])
         + rng.normal(size=(N, B3_DIM)))
    lab = _labelled(rng, N, n)
    start = time.perf_counter()
    full = lora_mlp_codes(x, z, np.flatnonzero(lab), np.arange(N), seed)           # (S, N, 2)
    oof = crossfit(lambda tr, rows: lora_mlp_codes(x, z, tr, rows, seed + 1).mean(0), lab, folds, seed)
    llm_s = time.perf_counter() - start
    df = pd.DataFrame({"y": y, "q": q, "z": np.where(lab, z, np.nan)})

    def end_to_end():
        import torch

        from pyro_llm.regression.structural import fit_joint_lora

        lora = lora_mlp_codes(x, z, np.flatnonzero(lab), None, seed, return_lora=True)
        return fit_joint_lora(df, "y ~ z + q", label="z", lora=lora,
                              inputs=torch.as_tensor(x, dtype=torch.float32), steps=400, batch_size=2500,
                              seed=seed)

    runs, info = lora_runs(full, oof, z, lab, fold_ids(lab, folds, seed),
                           no_crossfit_joint=seed % NOCF_EVERY == 0)
    if seed % E2E_EVERY == 0:  # the two known failures run on a subset: they cost most of the methods' time
        runs["joint (end-to-end LoRA)"] = end_to_end
    return Replicate(df, "y ~ z + q", "z", "covariate", "z", 1.0, runs, llm_s, info,
                     oracle=lora_oracle(z, oof, q, y))


def s1(seed: int, **variant) -> Replicate:
    """Real reviews with MiniLM (``benchmarks/s1.py``; imported only when S1 runs)."""
    from benchmarks.s1 import s1 as run

    return run(seed, **variant)


def b3_downstream(seed: int, **variant) -> Replicate:
    """B3's corpus, MAP coders with and without the downstream term
    (``benchmarks/downstream_finetune.py``)."""
    from benchmarks.downstream_finetune import b3_downstream as run

    return run(seed, **variant)


# Replication r of the i-th scenario here uses seed 1000 i + r: append new scenarios at the end.
SCENARIOS = {
    "B1": (b1, [{"a": 2.5, "leak": 0.5}, {"a": 2.0, "leak": 0.0}]),
    "B2": (b2, [{}]),
    "B3": (b3, [{"n": 150}, {"n": 300}, {"n": 1000}]),
    "S1": (s1, [{}]),
    **MORE,
    "B3_downstream": (b3_downstream, [{}]),
}


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def reps(name: str, quick: bool, quick_r: int, full_r: int) -> int:
    """Replications per scenario (each variant): the spec's R, fewer for S1 and B3, which fine-tune
    six LoRA models per replication (one on all labelled rows, five cross-fitting folds). Measured
    CPU seconds per replication (one thread): B3 about 16 (10-13 of them the LoRA fits), S1 about
    95 (six fits of MiniLM's last layer), plus 47 once per process for S1's frozen prefix."""
    small = {"S1": (6, 100), "B3": (80, 200)}
    if name in small:
        return small[name][0 if quick else 1]
    return quick_r if quick else full_r
