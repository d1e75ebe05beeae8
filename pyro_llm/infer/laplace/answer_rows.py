"""Last-layer Laplace over a causal LM's answer rows: the LM's label-token logits plus a
Gaussian correction of the LM head's rows for those tokens.

*Bayesian low-rank adaptation for large language models* (Yang, Robeyns, Wang, Aitchison) puts
LoRA on the LM head restricted to the answer tokens' rows and runs its last-layer Laplace there.
Post hoc, on a fine-tuned model with frozen weights, that is Bayesian multinomial logistic
regression with the model's answer as offset: for a batch, ``features_fn(model, batch)`` gives
``(phi, offset)`` (:func:`~pyro_llm.infer.answer_head.answer_readout`: the final hidden state at
the answer slot and the LM's own logits of the label tokens) and the logits are

    f = offset + Delta phi,    Delta (C x D) ~ N(0, I / delta),

so ``Delta = 0`` is the LM itself. :func:`fit_answer_laplace` reads the features once, finds
the MAP ``Delta`` by Newton's method (the problem is convex), the exact Hessian
``H = sum_n (diag p_n - p_n p_n^T) (x) phi_n phi_n^T`` there, and ``delta`` by the Laplace
marginal likelihood (MAP refitted at every ``delta``). Predictions are the linearised (here
exact: the logits are linear in ``Delta``) Gaussian over the logits, through the MC-over-
differences or the shift-invariant probit link of :mod:`.predictive`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from tqdm.auto import tqdm

from ..._io import atomic_folder, read_json, read_safetensors, save_safetensors, write_json
from ...posterior import Posterior
from ...readout import default_labels
from ..answer_head import split_output
from .predictive import logit_contrasts, mc_softmax_differences, probit

__all__ = ["AnswerRowsLaplace", "fit_answer_laplace", "load_answer_laplace"]

DTYPE = torch.float64
SITE = "answer_rows"
_FILES = ("answer_rows.safetensors", "answer_rows.json")


@torch.no_grad()
def _read(model, data: Iterable, features_fn: Callable, labels_fn: Callable | None, progress: bool):
    """``(phi, offset, y)`` over ``data`` (``y`` None without labels), float64 on the CPU."""
    phis, offsets, ys = [], [], []
    total = len(data) if hasattr(data, "__len__") else None
    for batch in tqdm(data, total=total, disable=not progress, desc="answer features", leave=False):
        phi, offset = split_output(features_fn(model, batch))
        phis.append(phi.detach().to("cpu", DTYPE))
        offsets.append(torch.zeros(len(phi), 0) if offset is None else offset.detach().to("cpu", DTYPE))
        if labels_fn is not None:
            y = labels_fn(batch)
            if y is None:
                raise ValueError("a batch has no labels (batch['labels']); pass labels_fn=")
            ys.append(torch.as_tensor(y).long().cpu())
    if not phis:
        raise ValueError("the data yielded no batch")
    return torch.cat(phis), torch.cat(offsets), (torch.cat(ys) if ys else None)


def _offset(offset: torch.Tensor, n: int, C: int) -> torch.Tensor:
    return offset if offset.shape[1] == C else torch.zeros(n, C, dtype=DTYPE)


def _objective(phi, offset, Y, W, delta: float) -> float:
    f = offset + phi @ W.T
    return float(-(f.log_softmax(-1) * Y).sum() + 0.5 * delta * W.square().sum())


def _newton(phi, offset, y, C: int, delta: float, start: torch.Tensor, steps: int = 100):
    """MAP ``Delta`` under ``N(0, I / delta)`` (Newton's method with a backtracking line search:
    the objective is convex), the data Hessian there and the log-likelihood."""
    N, D = phi.shape
    W, Y = start.clone(), torch.nn.functional.one_hot(y, C).to(DTYPE)
    obj = _objective(phi, offset, Y, W, delta)
    for _ in range(steps):
        p = (offset + phi @ W.T).softmax(-1)
        g = ((p - Y).T @ phi + delta * W).reshape(-1)
        step = torch.linalg.solve(_hessian(phi, p) + delta * torch.eye(C * D, dtype=DTYPE), g).reshape(C, D)
        t = 1.0
        while t > 1e-8:
            new = _objective(phi, offset, Y, W - t * step, delta)
            if new <= obj:
                break
            t /= 2
        W, decrease, obj = W - t * step, obj - new, new
        if decrease <= 1e-10 * (1 + abs(obj)):
            break
    f = offset + phi @ W.T
    loglik = float(f.log_softmax(-1).gather(1, y[:, None]).sum())
    return W, _hessian(phi, f.softmax(-1)), loglik


def _hessian(phi: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sum_n (diag p_n - p_n p_n^T) (x) phi_n phi_n^T`` as a (C D x C D) matrix, class-major."""
    N, C = p.shape
    D = phi.shape[1]
    H = torch.empty(C, D, C, D, dtype=DTYPE)
    for c in range(C):
        for k in range(C):
            w = p[:, c] * (float(c == k) - p[:, k])
            H[c, :, k, :] = (phi * w[:, None]).T @ phi
    return H.reshape(C * D, C * D)


def _evidence(loglik: float, W: torch.Tensor, H: torch.Tensor, delta: float) -> float:
    P = W.numel()
    lam = torch.linalg.eigvalsh(H).clamp_min(0)
    return loglik - 0.5 * delta * float(W.square().sum()) + 0.5 * P * math.log(delta) \
        - 0.5 * float(torch.log(lam + delta).sum())


class AnswerRowsLaplace(Posterior):
    """A Gaussian over the answer rows' correction ``Delta`` (one site, ``"answer_rows"``, of
    shape ``(C, D)``); ``predict`` runs ``features_fn(model, batch)``."""

    def __init__(self, delta_map: torch.Tensor, hessian: torch.Tensor, prior_precision: float,
                 log_likelihood: float, n_data: int, meta: dict | None = None, model=None,
                 features_fn: Callable | None = None):
        self.map = delta_map.to(DTYPE)
        C, D = self.map.shape
        if hessian.shape != (C * D, C * D):
            raise ValueError(f"the Hessian must be ({C * D}, {C * D}) for a ({C}, {D}) Delta, "
                             f"got {tuple(hessian.shape)}")
        if not (math.isfinite(prior_precision) and prior_precision > 0):
            raise ValueError(f"prior_precision must be finite and > 0, got {prior_precision}")
        self.H, self.prior_precision = hessian.to(DTYPE), float(prior_precision)
        self.log_likelihood, self.n_data, self.meta = float(log_likelihood), int(n_data), dict(meta or {})
        self.model, self.features_fn = model, features_fn
        lam, Q = torch.linalg.eigh(self.H)
        self._lam, self._Q = lam.clamp_min(0), Q

    @property
    def site_names(self) -> list[str]:
        return [SITE]

    def _root(self) -> torch.Tensor:
        """``Sigma^(1/2)`` (C D x C D): ``Q diag(1 / sqrt(lam + delta))``."""
        return self._Q / (self._lam + self.prior_precision).sqrt()

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> list[dict]:
        e = torch.randn(self.map.numel(), num_samples, dtype=DTYPE, generator=generator)
        x = (self._root() @ e).T.reshape(num_samples, *self.map.shape) + self.map
        return [{SITE: xi} for xi in x]

    def mean(self) -> dict:
        return {SITE: self.map.clone()}

    def _normal(self) -> dist.MultivariateNormal:
        prec = self._Q @ torch.diag(self._lam + self.prior_precision) @ self._Q.T
        return dist.MultivariateNormal(self.map.reshape(-1), precision_matrix=(prec + prec.T) / 2)

    def log_prob(self, draw) -> torch.Tensor:
        return self._normal().log_prob(torch.as_tensor(draw[SITE], dtype=DTYPE).reshape(-1))

    def as_guide(self):
        def guide(*args, **kwargs):
            flat = pyro.sample(SITE, self._normal())
            return {SITE: flat.reshape(self.map.shape)}
        return guide

    def log_marginal_likelihood(self) -> float:
        return _evidence(self.log_likelihood, self.map, self.H, self.prior_precision)

    def logit_moments(self, phi: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(B, C)`` and covariance ``(B, C, C)`` of the logits for features ``phi``."""
        C, D = self.map.shape
        phi = phi.to(DTYPE)
        f = _offset(offset.to(DTYPE), len(phi), C) + phi @ self.map.T
        R = self._root().reshape(C, D, -1)  # the logit c's loadings: phi . R[c]
        L = torch.einsum("bd,cdk->bck", phi, R)
        return f, L @ L.transpose(1, 2)

    @torch.no_grad()
    def predict(self, data: Iterable, num_samples: int = 100, *, link: str = "mc", progress: bool = True,
                seed: int | None = 0, **_) -> torch.Tensor:
        """Class probabilities ``(S, N, C)``: ``link="mc"`` draws the C - 1 logit differences
        jointly (S = ``num_samples``), ``"probit"`` is one closed-form row (S = 1)."""
        if link not in ("mc", "probit"):
            raise ValueError(f"link must be 'mc' or 'probit', got {link!r}")
        if self.model is None or self.features_fn is None:
            raise ValueError("predict needs the model and its features_fn: "
                             "load_answer_laplace(path, model, features_fn)")
        phi, offset, _ = _read(self.model, data, self.features_fn, None, progress)
        f, var = self.logit_moments(phi, offset)
        if link == "probit":
            return probit(f, var)[None].float()
        K = logit_contrasts(f.shape[1], "mc")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return mc_softmax_differences(f @ K.T, K @ var @ K.T, num_samples, gen).float()

    def save(self, path) -> Path:
        """``answer_rows.safetensors`` and ``answer_rows.json`` in the folder ``path``, atomically."""
        info = dict(shape=list(self.map.shape), prior_precision=self.prior_precision,
                    log_likelihood=self.log_likelihood, n_data=self.n_data, meta=self.meta)
        with atomic_folder(path, owned=lambda name: name in _FILES) as tmp:
            save_safetensors(tmp / _FILES[0], {"map": self.map.contiguous(), "hessian": self.H.contiguous()})
            write_json(tmp / _FILES[1], info)
        return Path(path)


def load_answer_laplace(path, model=None, features_fn: Callable | None = None) -> AnswerRowsLaplace:
    """The :class:`AnswerRowsLaplace` saved in the folder ``path``; ``model`` and ``features_fn``
    (what it was fitted with) are needed by ``predict`` only."""
    path = Path(path)
    info = read_json(path / _FILES[1], what="answer-rows Laplace",
                     fields={"shape": "list", "prior_precision": "float>=0", "log_likelihood": "float",
                             "n_data": "int>=0", "meta": "dict"})
    C, D = (int(s) for s in info["shape"])
    t, _ = read_safetensors(path / _FILES[0], what="answer-rows Laplace",
                            expect={"map": (C, D), "hessian": (C * D, C * D)})
    return AnswerRowsLaplace(t["map"], t["hessian"], info["prior_precision"], info["log_likelihood"],
                             info["n_data"], info["meta"], model=model, features_fn=features_fn)


def fit_answer_laplace(model, data: Iterable, features_fn: Callable, *, labels_fn: Callable | None = None,
                       prior_precision: float | str = "marglik", progress: bool = True) -> AnswerRowsLaplace:
    """Last-layer Laplace over a correction of the answer rows (see the module's text).

    Parameters
    ----------
    model: what ``features_fn`` runs (a fine-tuned peft causal LM); its weights stay as they are.
    data: labelled batches (``batch["labels"]``, or ``labels_fn``), read once without gradients.
    features_fn: ``(model, batch) -> (phi, offset)``, e.g. ``answer_readout(prompt.token_ids)``;
        a plain ``phi`` means no offset (Bayesian logistic regression on the features).
    prior_precision: ``"marglik"`` (the Laplace evidence, maximised over ``log delta`` on a grid
        from 1e-4 m to 1e6 m, m the features' mean squared norm, and refined; the MAP is refitted
        at each value; ``meta["evidence_at_edge"]`` says when the best value is an end of the
        grid: at the upper end the data ask for no correction) or a number.

    Example
    -------
    >>> la = fit_answer_laplace(peft_lm, train_loader, answer_readout(prompt.token_ids))  # doctest: +SKIP
    >>> probs = la.predict(test_loader)                                                  # doctest: +SKIP
    """
    phi, offset, y = _read(model, data, features_fn, labels_fn or default_labels, progress)
    if not (torch.isfinite(phi).all() and torch.isfinite(offset).all()):
        raise ValueError("features_fn returned NaN or infinite features or offsets; check the model")
    if int(y.min()) < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(y.min())}")
    C = offset.shape[1] if offset.shape[1] else int(y.max()) + 1
    if offset.shape[1] and int(y.max()) >= C:
        raise ValueError(f"labels go up to {int(y.max())} but the offset has {C} logits")
    offset = _offset(offset, len(phi), C)
    zero = torch.zeros(C, phi.shape[1], dtype=DTYPE)
    m = float(phi.square().sum(1).mean())
    if isinstance(prior_precision, str):
        if prior_precision != "marglik":
            raise ValueError(f"prior_precision must be 'marglik' or a number, got {prior_precision!r}")
        best = (math.inf,)  # (minus the evidence, delta, W, H, loglik) of the best value evaluated

        def neg_evidence(log_delta: float) -> float:
            nonlocal best
            d = math.exp(log_delta)
            W, H, ll = _newton(phi, offset, y, C, d, zero)
            value = -_evidence(ll, W, H, d)
            if value < best[0]:  # keep one (C D)^2 Hessian, not one per evaluation
                best = (value, d, W, H, ll)
            return value

        # in units of the features' mean squared norm m: the prior sd of a logit is about
        # sqrt(m / delta), from 100 (delta = 1e-4 m) to 1e-3 (delta = 1e6 m)
        grid = np.linspace(math.log(1e-4 * m), math.log(1e6 * m), 21)
        i = int(np.argmin([neg_evidence(float(g)) for g in grid]))
        lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
        from scipy.optimize import minimize_scalar

        minimize_scalar(neg_evidence, bounds=(lo, hi), method="bounded", options={"xatol": 1e-3})
        _, delta, W, H, ll = best
        edge = "lower" if i == 0 else "upper" if i == len(grid) - 1 else None
    else:
        delta, edge = float(prior_precision), None
        W, H, ll = _newton(phi, offset, y, C, delta, zero)
    # the evidence at the upper edge: the data ask for no correction (the model's own answer)
    meta = dict(features=phi.shape[1], classes=C, offset=bool(offset.abs().sum() > 0), evidence_at_edge=edge,
                logit_prior_sd=math.sqrt(m / delta),
                train_accuracy=float(((offset + phi @ W.T).argmax(-1) == y).double().mean()),
                lm_train_accuracy=float((offset.argmax(-1) == y).double().mean()))
    return AnswerRowsLaplace(W, H, delta, ll, len(phi), meta, model=model, features_fn=features_fn)
