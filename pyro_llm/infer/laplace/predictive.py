"""Predictives of a Laplace posterior: linearised (GLM) over the logits, or sampled weights.

The GLM predictive linearises the logits at the MAP (Laplace-LoRA eq. 10-12):
``f(x) ~ N(f_MAP(x), J Sigma J^T)``, with ``J`` the per-example Jacobian of the logits with
respect to the sites, taken from C backward passes through the tapped layers (no per-output
``jacrev``). Its class probabilities come from one of three links (appendix A):

* ``"mc"`` -- sampling the joint Gaussian over the C logits (the paper's default, "MC joint");
* ``"probit"`` -- the generalised probit ``softmax(f / sqrt(1 + pi/8 diag(Lambda)))``;
* ``"bridge"`` -- the Laplace bridge to a Dirichlet, whose mean is returned.

``pred_type="nn"`` instead draws the weights and runs the network under each draw
(:func:`pyro_llm.predict_probs` through the ``BayesianLoRA``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ...posterior import predict_probs
from .capture import check_logits, default_labels, default_logits, tapped

__all__ = ["laplace_predict", "glm_logit_moments", "probit", "laplace_bridge", "mc_softmax",
           "gridsearch_prior_precision", "LINKS"]

LINKS = ("mc", "probit", "bridge")


def probit(f: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Generalised probit: ``softmax(f / sqrt(1 + pi/8 diag(var)))``; ``var`` is (B, C, C)."""
    return (f / (1 + math.pi / 8 * torch.diagonal(var, dim1=-2, dim2=-1)).sqrt()).softmax(-1)


def laplace_bridge(f: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Mean of the Laplace-bridge Dirichlet (Hobbhahn et al. 2022; Laplace-LoRA eq. 20).

    The softmax ignores a shift of all logits, so the Gaussian is first conditioned on
    ``sum_i f_i = 0`` (the bridge's zero-mean correction); then
    ``alpha_i = (1 - 2/C + e^{f_i}/C^2 sum_j e^{-f_j}) / var_ii`` and the mean is ``alpha / sum alpha``.
    """
    C = f.shape[-1]
    row = var.sum(-1)  # Cov(f, sum f)
    tot = var.sum((-2, -1))[..., None]
    trace = torch.diagonal(var, dim1=-2, dim2=-1).sum(-1, keepdim=True)
    # a Gaussian already on the sum-zero plane (Var(sum f) ~ 0) needs no correction
    w = torch.where(tot > 1e-12 * trace, 1 / tot.clamp_min(1e-300), torch.zeros_like(tot))
    f = f - row * f.sum(-1, keepdim=True) * w
    var = var - row[..., :, None] * row[..., None, :] * w[..., None]
    d = torch.diagonal(var, dim1=-2, dim2=-1).clamp_min(1e-12)
    alpha = (1 - 2 / C + f.exp() / C**2 * (-f).exp().sum(-1, keepdim=True)) / d
    return alpha / alpha.sum(-1, keepdim=True)


def mc_softmax(f: torch.Tensor, var: torch.Tensor, num_samples: int, generator=None) -> torch.Tensor:
    """Softmax of ``num_samples`` joint Gaussian draws of the logits: (S, B, C)."""
    C = f.shape[-1]
    jitter = 1e-10 * torch.eye(C, dtype=var.dtype)
    L = torch.linalg.cholesky(var + jitter * (1 + var.diagonal(dim1=-2, dim2=-1).amax(-1)[:, None, None]))
    e = torch.randn((num_samples, *f.shape), dtype=var.dtype, generator=generator)
    return (f.to(var.dtype) + torch.einsum("bcd,sbd->sbc", L, e)).softmax(-1)


@contextlib.contextmanager
def _at_map(la):
    """The peft model with the posterior's MAP weights in place (restored afterwards)."""
    if la.lora is None:
        raise ValueError("this Laplace posterior has no model attached; load it with "
                         "load_laplace(path, lora=BayesianLoRA(peft_model, select=...))")
    peft = la.lora.peft_model
    names = [la.lora.peft_name(s) for s in la.site_names]
    before = {n: peft.get_parameter(n).detach().clone() for n in names}
    la.lora.write_to_peft(la.map)
    try:
        yield peft, names
    finally:
        la.lora.write_to_peft(before)


def glm_logit_moments(la, tap, logits: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """``J Sigma J^T`` (B, C, C) for logits computed under ``tap`` (C backward passes)."""
    B, C = logits.shape
    eye = torch.eye(C, dtype=logits.dtype, device=logits.device)
    per_c = []
    for c in range(C):
        g = tap.output_grads(logits, eye[c].expand(B, C))
        per_c.append({n: tap.per_example(n, g) for n in names})
    J = {site: torch.stack([pc[n] for pc in per_c], 1).cpu()
         for site, n in zip(la.site_names, names, strict=True)}
    return la.functional_variance(J)


def _glm(la, data, link, num_samples, logits_fn, progress, gen) -> torch.Tensor:
    chunks = []
    total = len(data) if hasattr(data, "__len__") else None
    with _at_map(la) as (peft, names), tapped(peft, names) as tap:
        for batch in tqdm(data, total=total, disable=not progress, desc=f"glm {link}", leave=False):
            tap.clear()
            logits = logits_fn(peft, batch)
            check_logits(logits, None)
            var = glm_logit_moments(la, tap, logits, names)
            f = logits.detach().double().cpu()
            if link == "mc":
                chunks.append(mc_softmax(f, var, num_samples, gen))
            else:
                chunks.append((probit if link == "probit" else laplace_bridge)(f, var)[None])
    if not chunks:
        raise ValueError("the data yielded no batch: nothing to predict")
    return torch.cat(chunks, 1).float()


def laplace_predict(la, data, *, pred_type: str = "glm", link: str = "mc", num_samples: int = 100,
                    logits_fn=None, progress: bool = True, seed: int | None = 0) -> torch.Tensor:
    """Class probabilities ``(S, N, C)`` under the Laplace posterior ``la``.

    ``logits_fn`` defaults to the one the posterior was fitted with. ``pred_type="glm"`` linearises
    the logits (``link``: ``"mc"`` gives S = ``num_samples`` draws,
    ``"probit"`` and ``"bridge"`` one closed-form row, S = 1); ``pred_type="nn"`` runs the network
    under ``num_samples`` weight draws. The mean over the first axis is the predictive.
    """
    if pred_type not in ("glm", "nn"):
        raise ValueError(f"pred_type must be 'glm' or 'nn', got {pred_type!r}")
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; choose one of {LINKS}")
    logits_fn = logits_fn or getattr(la, "logits_fn", None) or default_logits
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if pred_type == "glm":
        return _glm(la, data, link, num_samples, logits_fn, progress, gen)
    if la.lora is None:
        raise ValueError("pred_type='nn' needs the model: load_laplace(path, lora=...)")
    lora = la.lora

    def fn(*args, **batch):
        return logits_fn(lora, batch if batch else (args[0] if len(args) == 1 else args)).softmax(-1)

    draws = la.sample(num_samples, generator=gen)
    with _at_map(la):
        return predict_probs(fn, data, draws, progress=progress, seed=seed)


def gridsearch_prior_precision(la, val_data, *, grid=None, pred_type: str = "glm", link: str = "probit",
                               num_samples: int = 30, logits_fn=None, labels_fn=None,
                               progress: bool = False) -> torch.Tensor:
    """The prior precision (one value) with the lowest validation NLL over ``grid``; sets it.

    The alternative to the marginal likelihood when a validation set exists. ``grid`` defaults to
    21 log-spaced values from 1e-4 to 1e4.
    """
    labels_fn = labels_fn or default_labels
    y = torch.cat([torch.as_tensor(labels_fn(b)).long() for b in val_data])
    grid = np.logspace(-4, 4, 21) if grid is None else np.asarray(grid, dtype=float)
    if grid.ndim != 1 or grid.size == 0 or (grid <= 0).any():
        raise ValueError(f"grid must be a non-empty 1-D list of positive values, got {grid!r}")
    best, best_nll = None, math.inf
    for delta in grid:
        la.prior_precision = float(delta)
        p = laplace_predict(la, val_data, pred_type=pred_type, link=link, num_samples=num_samples,
                            logits_fn=logits_fn, progress=progress).mean(0)
        nll = float(-p.clamp_min(1e-12).log().gather(1, y[:, None]).mean())
        if nll < best_nll:
            best, best_nll = float(delta), nll
    la.prior_precision = best
    la.meta["gridsearch_nll"] = best_nll
    return la.prior_precision
