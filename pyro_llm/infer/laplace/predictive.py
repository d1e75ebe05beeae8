"""Predictives of a Laplace posterior: linearised (GLM) over the logits, or sampled weights.

The GLM predictive linearises the logits at the MAP (Laplace-LoRA eq. 10-12):
``f(x) ~ N(f_MAP(x), J Sigma J^T)``, with ``J`` the per-example Jacobian of the logits with
respect to the sites, taken from backward passes through the tapped layers (no per-output
``jacrev``). Its class probabilities come from one of three links (appendix A):

* ``"mc"`` -- sampling the joint Gaussian over the C logits (the paper's default, "MC joint");
* ``"probit"`` -- a generalised probit, shift-invariant (:func:`probit`);
* ``"bridge"`` -- the Laplace bridge to a Dirichlet, whose mean is returned (:func:`laplace_bridge`),
  on the logits' sum-zero projection.

``"probit_per_logit"`` and ``"bridge_conditioned"`` are the forms laplace-torch computes; they are
not invariant to a common shift of the logits, which label-token logits of a causal LM have.

Cost of one batch: one forward with the layers tapped, then one backward pass per row of a
contrast matrix ``K`` (:func:`logit_contrasts`), each giving every example's ``k J`` at once. The
softmax ignores a common shift of the logits, so ``"mc"`` samples only the ``C - 1`` differences
``d = K f``, ``K = [e_c - e_0]``, from ``N(K f_MAP, K J Sigma J^T K^T)`` and returns
``softmax([0, d])``: the same predictive distribution from ``C - 1`` passes (one for a binary
task). ``"probit"`` and ``"bridge"`` read the per-logit variances and keep ``K = I`` (C passes).
``K J Sigma J^T K^T`` is formed per Kronecker block from the per-example gradients
``sum_t g_t a_t^T`` (B, K, out, in) as ``Q_G^T J Q_A``; transforming the per-token ``a`` and ``g``
instead costs ``B T (in^2 + K out^2)`` against ``B K out in (out + in)``, a loss unless
``K r > T`` for rank-``r`` LoRA factors. Measured on the cost row (MiniLM, batch 8 x 64,
LoRA r = 8 on query/value, KFAC, C = 2, S = 16, one thread), in MAP forwards: tapped forward
1.07, backward 1.09, ``J Sigma J^T`` 0.15 (float64), the rest 0.03; 2.3 in all (3.4 with C passes).

Forward mode does not pay here: an exact ``J Sigma J^T`` needs one tangent per rank of ``Sigma``
(all 73,728 LoRA weights on that row), and sampling the S = 16 logits as ``f + J theta`` needs one
tangent per draw, where reverse mode needs ``C - 1`` passes. Measured on the same batch with
eager attention (CPU scaled-dot-product attention has no forward-mode rule), one
``torch.func.jvp`` took 3.6 and a ``vmap`` over 16 tangents 27 MAP forwards, against 1.9 for
the forward with one backward pass.

``pred_type="nn"`` instead draws the weights and runs the network under each draw
(:func:`pyro_llm.predict_probs` through the ``BayesianLoRA``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ...posterior import predict_probs
from ...readout import default_labels, default_logits
from .capture import check_logits, tapped

__all__ = ["laplace_predict", "glm_logit_moments", "probit", "laplace_bridge", "mc_softmax",
           "probit_per_logit", "laplace_bridge_conditioned",
           "mc_softmax_differences", "logit_contrasts", "gridsearch_prior_precision", "LINKS"]

LINKS = ("mc", "probit", "bridge", "probit_per_logit", "bridge_conditioned")


def _centring(C: int, dtype) -> torch.Tensor:
    """``P = I - 11^T / C``: the projection that removes a common shift of the C logits."""
    return torch.eye(C, dtype=dtype) - 1.0 / C


def probit(f: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Shift-invariant generalised probit; ``f`` is (B, C), ``var`` (B, C, C).

    The softmax ignores a common shift of the logits, and so does this link: each centred logit
    ``f_c - mean(f)`` is tempered by the probit factor of its contrast with the others,
    ``g_c = f_c - mean_{j != c} f_j``: ``softmax((f_c - mean f) / sqrt(1 + pi/8 Var g_c))``. A
    common offset, or a common random component of the logits (label-token logits of a causal
    LM share a large one), changes nothing; for two classes it is the binary probit
    ``sigmoid(d / sqrt(1 + pi/8 Var d))`` of ``d = f_1 - f_0``, so it never flips the MAP's
    decision. :func:`probit_per_logit` is the per-logit form other libraries use.
    """
    C = f.shape[-1]
    P = _centring(C, var.dtype)
    K = P * (C / (C - 1))  # rows: the contrasts g_c
    var_g = torch.einsum("ci,bij,cj->bc", K, var, K)
    centred = f.to(var.dtype) @ P
    return (centred / (1 + math.pi / 8 * var_g.clamp_min(0)).sqrt()).softmax(-1)


def probit_per_logit(f: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``softmax(f / sqrt(1 + pi/8 diag(var)))``, logit by logit (laplace-torch's ``"probit"``).
    Not shift-invariant: a common offset or common-mode variance changes the answer and can flip
    decisions; prefer :func:`probit`."""
    return (f / (1 + math.pi / 8 * torch.diagonal(var, dim1=-2, dim2=-1)).sqrt()).softmax(-1)


def laplace_bridge(f: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Mean of the Laplace-bridge Dirichlet (Hobbhahn et al. 2022; Laplace-LoRA eq. 20), shift-invariant.

    The softmax sees only the logits' projection on the sum-zero plane, ``P f`` with
    ``P = I - 11^T / C``, distributed ``N(P m, P V P)``; the bridge is applied to that:
    ``alpha_i = (1 - 2/C + e^{f_i}/C^2 sum_j e^{-f_j}) / var_ii`` and the mean is
    ``alpha / sum alpha``. A common offset or common-mode variance changes nothing.
    :func:`laplace_bridge_conditioned` is the form that conditions on ``sum f = 0`` instead.
    """
    C = f.shape[-1]
    P = _centring(C, var.dtype)
    return _bridge(f.to(var.dtype) @ P, P @ var @ P)


def laplace_bridge_conditioned(f: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """The bridge after conditioning the Gaussian on ``sum_i f_i = 0`` (laplace-torch's zero-mean
    correction). Not shift-invariant; prefer :func:`laplace_bridge`."""
    row = var.sum(-1)  # Cov(f, sum f)
    tot = var.sum((-2, -1))[..., None]
    trace = torch.diagonal(var, dim1=-2, dim2=-1).sum(-1, keepdim=True)
    # a Gaussian already on the sum-zero plane (Var(sum f) ~ 0) needs no correction
    w = torch.where(tot > 1e-12 * trace, 1 / tot.clamp_min(1e-300), torch.zeros_like(tot))
    f = f - row * f.sum(-1, keepdim=True) * w
    var = var - row[..., :, None] * row[..., None, :] * w[..., None]
    return _bridge(f, var)


def _bridge(f: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    C = f.shape[-1]
    d = torch.diagonal(var, dim1=-2, dim2=-1).clamp_min(1e-12)
    alpha = (1 - 2 / C + f.exp() / C**2 * (-f).exp().sum(-1, keepdim=True)) / d
    return alpha / alpha.sum(-1, keepdim=True)


_CLOSED = {"probit": probit, "bridge": laplace_bridge, "probit_per_logit": probit_per_logit,
           "bridge_conditioned": laplace_bridge_conditioned}


def _gaussian_draws(mean: torch.Tensor, var: torch.Tensor, num_samples: int, generator=None) -> torch.Tensor:
    """``num_samples`` draws of ``N(mean, var)``: (S, B, K) from ``mean`` (B, K) and ``var`` (B, K, K)."""
    K = mean.shape[-1]
    jitter = 1e-10 * torch.eye(K, dtype=var.dtype)
    L = torch.linalg.cholesky(var + jitter * (1 + var.diagonal(dim1=-2, dim2=-1).amax(-1)[:, None, None]))
    half = torch.randn(((num_samples + 1) // 2, *mean.shape), dtype=var.dtype, generator=generator)
    e = torch.cat([half, -half])[:num_samples]  # antithetic pairs: see mc_softmax_differences
    return mean.to(var.dtype) + torch.einsum("bcd,sbd->sbc", L, e)


def mc_softmax(f: torch.Tensor, var: torch.Tensor, num_samples: int, generator=None) -> torch.Tensor:
    """Softmax of ``num_samples`` joint Gaussian draws of the logits: (S, B, C)."""
    return _gaussian_draws(f, var, num_samples, generator).softmax(-1)


def mc_softmax_differences(d: torch.Tensor, var_d: torch.Tensor, num_samples: int,
                           generator=None) -> torch.Tensor:
    """``softmax([0, d])`` for joint Gaussian draws of the logit differences ``d_c = f_c - f_0``.

    The softmax ignores a common shift of the logits, so with ``f ~ N(m, V)`` and
    ``d = K f`` (``K = [e_c - e_0]_{c=1..C-1}``, (C-1) x C), ``softmax(f) = softmax([0, d])``
    with ``d ~ N(K m, K V K^T)``: the same predictive distribution as :func:`mc_softmax`
    from ``C - 1`` rather than ``C`` dimensions. ``d`` is (B, C-1), ``var_d`` (B, C-1, C-1);
    returns (S, B, C).

    The draws come in antithetic pairs ``m + e``, ``m - e`` (an odd ``S`` drops the last one's
    twin): each draw is still ``N(m, V)``, the mean is unbiased with a smaller variance, and for
    two classes the mean of an even number of draws keeps the MAP's decision exactly
    (``sigmoid(m + a) + sigmoid(m - a) > 1`` iff ``m > 0``), as the exact predictive does; with
    independent draws, 100 of them flip decisions near the boundary by Monte Carlo error alone.
    """
    draws = _gaussian_draws(d, var_d, num_samples, generator)
    return torch.cat([torch.zeros_like(draws[..., :1]), draws], -1).softmax(-1)


def logit_contrasts(C: int, link: str) -> torch.Tensor:
    """The (K, C) output directions backpropagated for ``link``: one backward pass per row.

    ``"mc"`` needs only the ``C - 1`` differences ``e_c - e_0`` (one pass for a binary task);
    ``"probit"`` and ``"bridge"`` read the per-logit variances, so all ``C`` unit vectors.
    """
    eye = torch.eye(C, dtype=torch.float64)
    return eye[1:] - eye[:1] if link == "mc" else eye


def _parameters(model: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Parameter]:
    """The named parameters, from one walk of the module tree (``get_parameter`` walks once per name)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"the model has no parameters {missing[:3]}; was the posterior fitted on this "
                         "model (same adapter, same select=)?")
    return [params[n] for n in names]


@torch.no_grad()
def _copy_into(params, values) -> None:
    for p, v in zip(params, values, strict=True):
        p.copy_(v.to(device=p.device, dtype=p.dtype))


@contextlib.contextmanager
def _at_map(la):
    """The peft model with the posterior's MAP weights in place (restored afterwards).

    When the model already holds the MAP (the usual case: the posterior was fitted on it), nothing
    is written or restored.
    """
    if la.lora is None:
        raise ValueError("this Laplace posterior has no model attached; load it with "
                         "load_laplace(path, lora=BayesianLoRA(peft_model, select=...))")
    peft = la.lora.peft_model
    names = [la.lora.peft_name(s) for s in la.site_names]
    params = _parameters(peft, names)
    values = [la.map[s] for s in la.site_names]
    if all(torch.equal(p.detach(), v.to(device=p.device, dtype=p.dtype))
           for p, v in zip(params, values, strict=True)):
        yield peft, names
        return
    before = [p.detach().clone() for p in params]
    _copy_into(params, values)
    try:
        yield peft, names
    finally:
        _copy_into(params, before)


def glm_logit_moments(la, tap, logits: torch.Tensor, names: Sequence[str],
                      contrasts: torch.Tensor | None = None, retain_graph: bool = False,
                      split: bool = False):
    """``K J Sigma J^T K^T`` (B, K, K) for logits computed under ``tap``: one backward pass per row of K.

    ``contrasts`` ``K`` (K x C) defaults to the identity (the C x C covariance of the logits, C
    passes); ``logit_contrasts(C, "mc")`` gives the covariance of the differences ``f_c - f_0``
    (C - 1 passes). Backpropagating ``k`` (broadcast over the batch) gives each example's gradient
    of ``k . f``, i.e. the row ``k J`` of its Jacobian, at every tapped layer. The autograd graph is
    freed after the last pass unless ``retain_graph``. With ``split``, also the prior-ruled part
    (:meth:`~.posterior.LaplacePosterior.functional_variance`).
    """
    B, C = logits.shape
    K = torch.eye(C) if contrasts is None else torch.as_tensor(contrasts)
    if K.dim() != 2 or K.shape[1] != C:
        raise ValueError(f"contrasts must be (K, {C}) for {C} logits, got {tuple(K.shape)}")
    K = K.to(device=logits.device, dtype=logits.dtype)
    rows = []
    for k in range(K.shape[0]):
        g = tap.output_grads(logits, K[k].expand(B, C), retain_graph=retain_graph or k < K.shape[0] - 1)
        rows.append([tap.per_example(n, g) for n in names])
    J = {site: torch.stack([r[i] for r in rows], 1).cpu() for i, site in enumerate(la.site_names)}
    return la.functional_variance(J, split=split)


PRIOR_SHARE_WARN = 0.9  # the GLM predictive warns when this share of its variance is prior-ruled
SPREAD_WARN = 3.0  # ... and its median spread (sd over |margin|) exceeds this multiple of the MAP margin


def _shift_free(var: torch.Tensor, f: torch.Tensor, K: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the summed variance of the logits' shift-free part and that part's squared
    norm at the MAP: differences ``K f`` as they are; for ``K = I`` the centred logits (``P var P``
    with ``P = I - 11^T / C``): a common shift of the logits is no signal."""
    if K.shape[0] == K.shape[1]:
        C = K.shape[1]
        fc = f - f.mean(-1, keepdim=True)
        return var.diagonal(dim1=-2, dim2=-1).sum(-1) - var.sum((-2, -1)) / C, fc.square().sum(-1)
    return var.diagonal(dim1=-2, dim2=-1).sum(-1), (f @ K.T).square().sum(-1)


def _glm(la, data, link, num_samples, logits_fn, progress, gen) -> torch.Tensor:
    chunks, total_var, prior_var, ratios = [], 0.0, 0.0, []
    total = len(data) if hasattr(data, "__len__") else None
    with _at_map(la) as (peft, names), tapped(peft, names) as tap:
        for batch in tqdm(data, total=total, disable=not progress, desc=f"glm {link}", leave=False):
            tap.clear()
            logits = logits_fn(peft, batch)
            check_logits(logits, None)
            tap.check_ran()
            K = logit_contrasts(logits.shape[-1], link)
            var, from_prior = glm_logit_moments(la, tap, logits, names, K, split=True)
            f = logits.detach().double().cpu()
            v, margin = _shift_free(var, f, K)
            total_var += float(v.sum())
            prior_var += float(_shift_free(from_prior, f, K)[0].sum())
            ratios.append((v.clamp_min(0) / margin.clamp_min(1e-300)).sqrt())
            del logits  # the graph was freed by the last backward pass; drop the rest before the next forward
            if link == "mc":
                chunks.append(mc_softmax_differences(f @ K.T, var, num_samples, gen))
            else:
                chunks.append(_CLOSED[link](f, var)[None])
        tap.clear()
    if not chunks:
        raise ValueError("the data yielded no batch: nothing to predict")
    _diagnose(la, prior_var / total_var if total_var > 0 else float("nan"), float(torch.cat(ratios).median()))
    return torch.cat(chunks, 1).float()


def _diagnose(la, share: float, spread: float) -> None:
    """Keep the prior-ruled share of the predictive variance and the median ratio of its spread
    to the MAP logits' margin in ``la.meta``; warn when the prior rules a spread that swamps the
    margin: then the predictive is set by the prior, not by the data."""
    la.meta["prior_variance_share"], la.meta["spread_over_margin"] = share, spread
    if share > PRIOR_SHARE_WARN and spread > SPREAD_WARN:
        delta = la.prior_precision.unique().tolist()
        warnings.warn(
            f"{share:.0%} of the Laplace predictive's variance (of the logit differences) comes from "
            f"directions where the data's curvature is below the prior precision {delta}, and its "
            f"median spread is {spread:.1f} x the MAP margin: the predictions are set by the prior, "
            "not by the data. Check the calibration on held-out data; a prior centred where "
            "fine-tuning started (prior_mean='init'), separate precisions (prior_groups='AB'), more "
            "training data or a validation grid (gridsearch_prior_precision) may help.",
            UserWarning, stacklevel=5)  # the caller of la.predict


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
        with warnings.catch_warnings():  # small precisions on the grid are prior-ruled by design
            warnings.filterwarnings("ignore", message=r".* of the Laplace predictive's variance")
            p = laplace_predict(la, val_data, pred_type=pred_type, link=link, num_samples=num_samples,
                                logits_fn=logits_fn, progress=progress).mean(0)
        nll = float(-p.clamp_min(1e-12).log().gather(1, y[:, None]).mean())
        if nll < best_nll:
            best, best_nll = float(delta), nll
    la.prior_precision = best
    la.meta["gridsearch_nll"] = best_nll
    for key in ("prior_variance_share", "spread_over_margin"):  # they were the last grid value's
        la.meta.pop(key, None)
    return la.prior_precision
