"""The fully joint model of seed 000 (eqs. 3-6): the LoRA adapter informed by the regression too.

One Pyro model over the corpus::

    θ                ~ the adapter prior                          (BayesianLoRA sites)
    coef, σ          ~ N(0, 10²), HalfNormal(10)                  (``coef``, ``sigma``)
    z_i | x_i, θ     ~ Categorical(LLM logits(x_i; θ))            observed where labelled
    Y_i | z_i, Q_i   ~ N(X_i(z_i) · coef, σ²)                     (the formula's design)

z is marginalised by parallel enumeration where unlabelled; θ, coef and σ are fitted together
by SVI (``TraceEnum_ELBO``), so the unlabelled rows' outcomes inform the adapter as well. The
model is valid when the LLM's posterior predictive is calibrated on the corpus *and* Y is
independent of the text given z and Q (no "leak" of ε into the text) - the coverage
benchmark tests how much that matters. :func:`fit_joint_lora` returns a
:class:`~pyro_llm.regression.result.RegressionResult` over the coefficient draws.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.ops.indexing import Vindex

from ..infer import fit_svi, scale_lr
from ..posterior import GuidePosterior, stack_draws
from .design import build_design
from .result import RegressionResult

__all__ = ["fit_joint_lora", "joint_lora_model"]


def joint_lora_model(logits_fn: Callable, inputs, X_by_class, y, z, labelled, sizes: tuple[int, int],
                     coef_scale: float = 10.0):
    """``logits_fn(inputs) -> (B, K)`` runs the LLM (drawing its LoRA sites) on a batch of rows:
    ``X_by_class`` (K, B, p), ``y`` (B,), ``z`` (B,) ints (any value where unlabelled), ``labelled``
    (B,) bool; ``sizes`` = (labelled, unlabelled) rows in the corpus, for minibatch scaling."""
    logits = logits_fn(inputs)
    p = X_by_class.shape[-1]
    coef = pyro.sample("coef", dist.Normal(torch.zeros(p), coef_scale).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(coef_scale)))
    for part, rows, size in (("lab", labelled.nonzero().squeeze(-1), sizes[0]),
                             ("unl", (~labelled).nonzero().squeeze(-1), sizes[1])):
        if rows.numel() == 0:
            continue
        with pyro.plate(f"rows_{part}", size=size, subsample=torch.arange(rows.numel())):
            prior = dist.Categorical(logits=logits[rows])
            if part == "lab":
                zi = pyro.sample("z_lab", prior, obs=z[rows])
            else:
                zi = pyro.sample("z_unl", prior, infer={"enumerate": "parallel"})
            mean = (Vindex(X_by_class[:, rows])[zi, torch.arange(rows.numel())] * coef).sum(-1)
            pyro.sample(f"y_{part}", dist.Normal(mean, sigma), obs=y[rows])


def fit_joint_lora(df, formula: str, *, label: str, lora, inputs, steps: int = 500,
                   lr: float = 1e-3, scale_lr_value: float = 3e-2, batch_size: int | None = None,
                   num_draws: int = 1000, level: float = 0.95, seed: int = 0,
                   progress: bool = False) -> RegressionResult:
    """Fit the fully joint model; ``lora`` is a :class:`~pyro_llm.BayesianLoRA` (started at its
    fine-tuned adapter) whose call ``lora(inputs[rows])`` gives (B, K) class logits, and
    ``inputs`` a tensor with one row per DataFrame row. Full batch unless ``batch_size``."""
    if not callable(getattr(lora, "init_values", None)):
        raise TypeError(f"lora must be a pyro_llm.BayesianLoRA, got {type(lora).__name__}; wrap the peft "
                        "model first: BayesianLoRA(peft_model, prior=0.1, select='B')")
    design = build_design(df, formula, label=label, role="covariate")
    N = len(design.z)
    if len(inputs) != N:
        raise ValueError(f"inputs has {len(inputs)} rows but the DataFrame has {N}")
    Xk = torch.as_tensor(design.X_by_class, dtype=torch.float32)
    y = torch.tensor(design.y, dtype=torch.float32)
    z = torch.tensor(design.z_filled)
    lab = torch.tensor(design.labelled)
    g = torch.Generator().manual_seed(seed)
    bs = batch_size or N

    def batches():
        order = torch.randperm(N, generator=g) if bs < N else torch.arange(N)
        for i in range(0, N, bs):
            idx = order[i:i + bs]
            yield (inputs[idx], Xk[:, idx], y[idx], z[idx], lab[idx])

    class Epochs:
        def __iter__(self):
            return batches()

        def __len__(self):
            return -(-N // bs)

    sizes = (int(lab.sum()), int((~lab).sum()))

    def model(x, X, yb, zb, lb):
        joint_lora_model(lora, x, X, yb, zb, lb, sizes)

    init = dict(lora.init_values())
    # start the regression at ordinary least squares on the labelled rows
    X_lab, y_lab = design.gold()
    beta = np.linalg.lstsq(X_lab, y_lab, rcond=None)[0]
    init["coef"] = torch.as_tensor(beta, dtype=torch.float32)
    init["sigma"] = torch.tensor(float(np.std(y_lab - X_lab @ beta)))
    epochs = -(-steps // len(Epochs()))
    fit = fit_svi(model, "normal", Epochs(), epochs=epochs, max_steps=steps, lr=scale_lr(lr, scale_lr_value),
                  init_values=init, init_scale=1e-2, progress=progress, seed=seed,
                  elbo=TraceEnum_ELBO(max_plate_nesting=1))
    draws = stack_draws(GuidePosterior(fit.guide).sample(num_draws))["coef"].double().numpy()
    info = {"n_labelled": int(design.labelled.sum()), "n": N, "role": "covariate", "steps": fit.steps,
            "fit_seconds": fit.fit_seconds, "classes": design.classes}
    return RegressionResult("joint (end-to-end LoRA)", design.coef_names, draws.mean(0), np.cov(draws.T),
                            level, draws, info)
