"""Variational Bayesian last layers (VBLL; Harrison, Willes & Snoek, ICLR 2024).

A VBLL head is a linear last layer ``z = W phi`` over any features ``phi`` (``(B, D)``) whose
weights have a Gaussian variational posterior, one per output row ``j``:
``q(w_j) = N(mu_j, Sigma_j)``, prior ``N(0, prior_scale**2 I)``. Its training loss is minus a
*closed-form* lower bound on the log marginal likelihood, per datum (no sampling):

``loss = -(1/B) sum_i E_q[log p(y_i | W phi_i)] + regularization_weight * KL(q || p)``

with ``regularization_weight = 1 / N`` (N = training set size) giving the ELBO divided by N.

* :class:`VBLLRegression`: Gaussian noise; the expected log-likelihood is exact, so with the
  full batch the bound is tight at the exact Bayesian linear-regression posterior.
* :class:`VBLLClassification`: the paper's discriminative model with the Jensen bound
  ``E_q[log softmax(z)_y] >= m_y - logsumexp_k(m_k + v_k / 2)`` (``m``, ``v``: logit means and
  variances under q).

Covariance of each ``q(w_j)`` (``cov=``): ``"dense"`` (``Sigma = L L^T``, L lower triangular with
a positive diagonal ``exp(log_diag)``), ``"diag"``, or ``"lowrank"`` (``diag(exp(2 log_diag)) +
F F^T``, F of rank ``cov_rank``). Heads depend on torch only and save with safetensors + JSON.

``prior_scale="auto"``: the prior scale ``s`` by type-II maximum likelihood (:meth:`prior_variance`).
``offset=`` (classification): a fixed per-datum logit offset ``b`` (``(B, C)``, e.g. a language
model's own answer-token logits), so that the logits are ``b + W phi`` and the head learns a
correction around them; the offset is data, not a parameter of the head.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ._io import FileFormatError, atomic_folder, read_json, read_safetensors, save_safetensors, write_json

__all__ = ["VBLLRegression", "VBLLClassification", "save_head", "load_head"]

_COVS = ("dense", "diag", "lowrank")


class _Covariance(nn.Module):
    """The covariances ``Sigma_j`` of the ``out`` weight rows, each ``(D, D)``."""

    def __init__(self, out: int, dim: int, kind: str, rank: int, g: torch.Generator):
        super().__init__()
        if kind not in _COVS:
            raise ValueError(f"cov must be one of {_COVS}, got {kind!r}")
        self.kind, self.dim = kind, dim
        self.log_diag = nn.Parameter(torch.full((out, dim), -0.5 * math.log(dim)))
        if kind == "dense":
            self.off = nn.Parameter(torch.zeros(out, dim, dim))
        elif kind == "lowrank":
            if rank < 1:
                raise ValueError(f"cov_rank must be >= 1 for cov='lowrank', got {rank}")
            self.factor = nn.Parameter(1e-3 * torch.randn(out, dim, rank, generator=g) / dim)

    def scale_tril(self) -> torch.Tensor:
        """``L`` with ``Sigma = L L^T`` (dense, diag); ``(out, D, D)``."""
        diag = torch.diag_embed(self.log_diag.exp())
        return diag + torch.tril(self.off, -1) if self.kind == "dense" else diag

    def matrix(self) -> torch.Tensor:
        if self.kind == "lowrank":
            f = self.factor
            return torch.diag_embed(self.log_diag.exp() ** 2) + f @ f.transpose(-1, -2)
        L = self.scale_tril()
        return L @ L.transpose(-1, -2)

    def quad(self, phi: torch.Tensor) -> torch.Tensor:
        """``phi_i^T Sigma_j phi_i`` for every row i and output j: ``(B, out)``."""
        if self.kind == "diag":
            return (phi.pow(2) @ (2 * self.log_diag).exp().T)
        if self.kind == "lowrank":
            low = torch.einsum("bd,odk->bok", phi, self.factor).pow(2).sum(-1)
            return phi.pow(2) @ (2 * self.log_diag).exp().T + low
        return torch.einsum("bd,odk->bok", phi, self.scale_tril()).pow(2).sum(-1)

    def trace(self) -> torch.Tensor:
        t = (2 * self.log_diag).exp().sum(-1)
        if self.kind == "dense":
            t = t + torch.tril(self.off, -1).pow(2).sum((-1, -2))
        elif self.kind == "lowrank":
            t = t + self.factor.pow(2).sum((-1, -2))
        return t

    def logdet(self) -> torch.Tensor:
        ld = 2 * self.log_diag.sum(-1)
        if self.kind == "lowrank":  # matrix determinant lemma
            g = self.factor / self.log_diag.exp().unsqueeze(-1)
            eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
            ld = ld + torch.logdet(eye + g.transpose(-1, -2) @ g)
        return ld

    def noise(self, num_samples: int, g: torch.Generator | None) -> torch.Tensor:
        """Draws of ``Sigma^{1/2} eps``: ``(S, out, D)``."""
        out, d = self.log_diag.shape
        kw = dict(generator=g, dtype=self.log_diag.dtype, device=self.log_diag.device)
        eps = torch.randn(num_samples, out, d, **kw)
        if self.kind == "lowrank":
            e2 = torch.randn(num_samples, out, self.factor.shape[-1], **kw)
            return self.log_diag.exp() * eps + torch.einsum("odk,sok->sod", self.factor, e2)
        return torch.einsum("ode,soe->sod", self.scale_tril(), eps)


class _VBLLHead(nn.Module):
    """Shared by both heads: the weight posterior, its KL, draws, checks and the config."""

    task = ""

    def __init__(self, in_features: int, out: int, *, prior_scale: float | str, cov: str, cov_rank: int,
                 regularization_weight: float | None, num_data: int | None, seed: int):
        super().__init__()
        if in_features < 1 or out < 1:
            raise ValueError(f"in_features and outputs must be >= 1, got {in_features}, {out}")
        self.auto_prior = isinstance(prior_scale, str) and prior_scale == "auto"
        if not self.auto_prior and not (isinstance(prior_scale, (int, float)) and prior_scale > 0):
            raise ValueError(f"prior_scale must be > 0 or 'auto', got {prior_scale!r}")
        if regularization_weight is None:
            if num_data is None or num_data < 1:
                raise ValueError("pass num_data=N (the training set size, weight 1/N on the KL) or "
                                 f"regularization_weight, got num_data={num_data}")
            regularization_weight = 1.0 / num_data
        if regularization_weight < 0:
            raise ValueError(f"regularization_weight must be >= 0, got {regularization_weight}")
        g = torch.Generator().manual_seed(seed)
        self.in_features, self.out, self.cov_kind, self.cov_rank = in_features, out, cov, cov_rank
        self.prior_scale = "auto" if self.auto_prior else float(prior_scale)
        self.regularization_weight, self.seed = float(regularization_weight), seed
        self.mean = nn.Parameter(torch.randn(out, in_features, generator=g) / math.sqrt(in_features))
        self.cov = _Covariance(out, in_features, cov, cov_rank, g)

    def _phi(self, features: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(features) or features.dim() != 2 or features.shape[1] != self.in_features:
            shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise ValueError(f"features must be a (batch, {self.in_features}) tensor, got {shape}")
        return features.to(self.mean)

    def _shift(self, z: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
        """``z + offset`` (``offset``: ``(B, out)`` like ``z``, or ``None``: ``z`` itself)."""
        if offset is None:
            return z
        if not torch.is_tensor(offset) or offset.shape != z.shape[-2:]:
            shape = tuple(offset.shape) if torch.is_tensor(offset) else type(offset).__name__
            raise ValueError(f"offset must be a {tuple(z.shape[-2:])} tensor, got {shape}")
        return z + offset.to(self.mean)

    def logit_moments(self, features: torch.Tensor, offset: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``offset + mu_j . phi`` and variance ``phi^T Sigma_j phi`` of ``offset + W phi``:
        two ``(B, out)`` (``offset``: ``(B, out)`` or ``None`` for none)."""
        phi = self._phi(features)
        return self._shift(phi @ self.mean.T, offset), self.cov.quad(phi)

    def covariance(self) -> torch.Tensor:
        """``Sigma_j`` for every output: ``(out, D, D)``."""
        return self.cov.matrix()

    def prior_variance(self) -> torch.Tensor:
        """The prior variance ``s^2`` per weight (a scalar tensor).

        With ``prior_scale="auto"``, ``s`` by type-II maximum likelihood on the bound: the loss is
        minus an ELBO ``L(q, s) <= log p(y | s)``, and its maximiser over ``s`` for the current ``q``
        is closed-form, ``s^2 = sum_j (tr Sigma_j + |mu_j|^2) / (out D)`` (where ``dKL/ds = 0``).
        Putting it in the KL profiles ``s`` out: every step on ``q`` of ``L(q, s(q))`` is a step on
        ``max_s L(q, s)`` (``dL/ds = 0`` there, so the gradient in ``q`` is the one at fixed ``s``),
        i.e. variational EM with an exact M-step after every step, with no learning rate and no
        starting value for ``s``. A feature that does not help the likelihood lets ``q`` and ``s``
        shrink together (the KL is 0 whenever ``q = N(0, s^2 I)``), one that helps grows them.
        """
        if not self.auto_prior:
            return self.mean.new_tensor(self.prior_scale ** 2)
        total = (self.cov.trace() + self.mean.pow(2).sum(-1)).sum()
        return total / (self.out * self.in_features)

    def kl(self) -> torch.Tensor:
        """``KL(q(W) || N(0, s^2 I))`` in closed form, summed over outputs (a scalar); ``s^2`` is
        :meth:`prior_variance` (``prior_scale^2``, or its type-II ML value under ``"auto"``)."""
        d = self.in_features
        s2 = self.prior_variance() if self.auto_prior else self.prior_scale ** 2
        log_s2 = s2.log() if self.auto_prior else math.log(s2)
        per = (self.cov.trace() + self.mean.pow(2).sum(-1)) / s2 - d + d * log_s2 - self.cov.logdet()
        return 0.5 * per.sum()

    def sample_weights(self, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_samples`` draws of W from q: ``(S, out, D)``."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        return self.mean + self.cov.noise(num_samples, generator)

    def config(self) -> dict:
        """The constructor arguments (JSON-ready), for :func:`load_head`."""
        return dict(task=self.task, in_features=self.in_features, out=self.out,
                    prior_scale=self.prior_scale, cov=self.cov_kind, cov_rank=self.cov_rank,
                    regularization_weight=self.regularization_weight, seed=self.seed)


class VBLLRegression(_VBLLHead):
    """Variational Bayesian linear regression head: ``y = W phi + eps``, ``eps ~ N(0, noise^2)``.

    Parameters
    ----------
    in_features, out_features: feature dimension D and number of regression outputs.
    prior_scale: prior standard deviation of every weight, ``W ~ N(0, prior_scale^2 I)``, or
        ``"auto"`` for its type-II maximum-likelihood value (:meth:`prior_variance`).
    noise: the noise standard deviation (known, or the starting value with ``learn_noise``).
    learn_noise: fit ``log noise`` as a point estimate on the same bound (type-II ML).
    cov: ``"dense"``, ``"diag"`` or ``"lowrank"`` (with ``cov_rank``).
    regularization_weight: weight on the KL; default ``1 / num_data``.

    Example
    -------
    >>> head = VBLLRegression(8, num_data=100)
    >>> loss = head.loss(torch.randn(16, 8), torch.randn(16))   # minus the ELBO / N
    >>> head.predictive(torch.randn(4, 8)).mean.shape
    torch.Size([4, 1])
    """

    task = "regression"

    def __init__(self, in_features: int, out_features: int = 1, *, prior_scale: float | str = 1.0,
                 noise: float = 1.0, learn_noise: bool = False, cov: str = "dense", cov_rank: int = 0,
                 regularization_weight: float | None = None, num_data: int | None = None, seed: int = 0):
        super().__init__(in_features, out_features, prior_scale=prior_scale, cov=cov, cov_rank=cov_rank,
                         regularization_weight=regularization_weight, num_data=num_data, seed=seed)
        if not noise > 0:
            raise ValueError(f"noise must be > 0, got {noise}")
        self.learn_noise = bool(learn_noise)
        self.log_noise = nn.Parameter(torch.full((out_features,), math.log(noise)),
                                      requires_grad=self.learn_noise)

    def _targets(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        y = torch.as_tensor(y)
        if y.dim() == 1 and self.out == 1:
            y = y.unsqueeze(-1)
        if y.shape != (batch, self.out):
            alt = f" or ({batch},)" if self.out == 1 else ""
            raise ValueError(f"y must have shape ({batch}, {self.out}){alt}, got {tuple(y.shape)}")
        return y.to(self.mean)

    def expected_log_likelihood(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``E_q[log N(y_i | W phi_i, noise^2)]`` per datum, exact: ``(B,)``."""
        m, v = self.logit_moments(features)
        y = self._targets(y, m.shape[0])
        var = (2 * self.log_noise).exp()
        ll = -0.5 * (math.log(2 * math.pi) + 2 * self.log_noise + ((y - m).pow(2) + v) / var)
        return ll.sum(-1)

    def loss(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Minus the closed-form ELBO per datum (a scalar to minimise)."""
        return -self.expected_log_likelihood(features, y).mean() + self.regularization_weight * self.kl()

    def predictive(self, features: torch.Tensor) -> torch.distributions.Normal:
        """Sampling-free posterior predictive ``N(mu phi, phi^T Sigma phi + noise^2)``, ``(B, out)``."""
        m, v = self.logit_moments(features)
        return torch.distributions.Normal(m, (v + (2 * self.log_noise).exp()).sqrt())

    def config(self) -> dict:
        return dict(super().config(), noise=float(self.log_noise.detach().exp()[0]),
                    learn_noise=self.learn_noise)


class VBLLClassification(_VBLLHead):
    """Discriminative VBLL classifier head: ``p(y | phi, W) = softmax(W phi)_y``.

    The loss is minus the paper's Jensen bound per datum plus ``regularization_weight * KL``.
    Predictive (:meth:`predict_probs`): ``num_samples=None`` is sampling-free: the mean-field
    (probit-type) approximation ``softmax(m / sqrt(1 + pi v / 8))`` of ``E_q[softmax(W phi)]``;
    an integer draws that many logit vectors from their exact Gaussian (the paper's predictive,
    as in the reference code; W rows are independent under q, so the logits of one datum are
    independent Gaussians). Normalising ``exp`` of the Jensen bound itself would give
    ``softmax(m)``, the plug-in, since its log-sum-exp term is shared by all classes.

    Example
    -------
    >>> head = VBLLClassification(8, 3, num_data=100)
    >>> loss = head.loss(torch.randn(16, 8), torch.randint(0, 3, (16,)))
    >>> torch.allclose(head.predict_probs(torch.randn(4, 8)).sum(-1), torch.ones(4))
    True
    """

    task = "classification"

    def __init__(self, in_features: int, num_classes: int, *, prior_scale: float | str = 1.0,
                 cov: str = "dense", cov_rank: int = 0, regularization_weight: float | None = None,
                 num_data: int | None = None, seed: int = 0):
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        super().__init__(in_features, num_classes, prior_scale=prior_scale, cov=cov, cov_rank=cov_rank,
                         regularization_weight=regularization_weight, num_data=num_data, seed=seed)

    @property
    def num_classes(self) -> int:
        return self.out

    def _labels(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        y = torch.as_tensor(y)
        if y.shape != (batch,) or y.is_floating_point():
            raise ValueError(f"y must be ({batch},) integer class labels, got {tuple(y.shape)} {y.dtype}")
        if batch and (int(y.min()) < 0 or int(y.max()) >= self.out):
            raise ValueError(f"labels must lie in [0, {self.out}), got range "
                             f"[{int(y.min())}, {int(y.max())}]")
        return y.to(self.mean.device)

    def logits_mean(self, features: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at the posterior mean, ``offset + mu phi``: ``(B, C)``."""
        return self._shift(self._phi(features) @ self.mean.T, offset)

    def jensen_bound(self, features: torch.Tensor, y: torch.Tensor, offset: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """``m_y - logsumexp(m + v / 2) <= E_q[log softmax(W phi)_y]`` per datum: ``(B,)``."""
        m, v = self.logit_moments(features, offset)
        y = self._labels(y, m.shape[0])
        return m.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(m + 0.5 * v, dim=-1)

    def loss(self, features: torch.Tensor, y: torch.Tensor, offset: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Minus the Jensen-bound ELBO per datum (a scalar to minimise)."""
        return -self.jensen_bound(features, y, offset).mean() + self.regularization_weight * self.kl()

    def predict_probs(self, features: torch.Tensor, num_samples: int | None = None,
                      generator: torch.Generator | None = None, offset: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Posterior predictive class probabilities ``(B, C)`` (see the class docstring)."""
        m, v = self.logit_moments(features, offset)
        if num_samples is None:
            return torch.softmax(m / (1 + math.pi / 8 * v).sqrt(), dim=-1)
        if num_samples < 1:
            raise ValueError(f"num_samples must be None or >= 1, got {num_samples}")
        eps = torch.randn((num_samples, *m.shape), generator=generator, dtype=m.dtype, device=m.device)
        return torch.softmax(m + v.sqrt() * eps, dim=-1).mean(0)

    def sample_probs(self, features: torch.Tensor, weights: torch.Tensor,
                     offset: torch.Tensor | None = None) -> torch.Tensor:
        """Probabilities under given weight draws ``(S, C, D)`` (:meth:`sample_weights`): ``(S, B, C)``."""
        z = torch.einsum("bd,scd->sbc", self._phi(features), weights.to(self.mean))
        return torch.softmax(self._shift(z, offset), -1)


_HEADS = {"regression": VBLLRegression, "classification": VBLLClassification}
_FILES = ("vbll.safetensors", "vbll.json")


_FIELDS = {"task": "str", "in_features": "int", "out": "int", "prior_scale": "float|str", "cov": "str",
           "cov_rank": "int>=0", "regularization_weight": "float>=0", "seed": "int"}
_TASK_FIELDS = {"regression": {"noise": "float", "learn_noise": "bool"}, "classification": {}}


def save_head(head: _VBLLHead, path) -> Path:
    """Write a head's ``state_dict`` (``vbll.safetensors``) and config (``vbll.json``) to a folder,
    atomically as a pair (other files in the folder are kept)."""
    with atomic_folder(path, owned=lambda name: name in _FILES) as tmp:
        save_safetensors(tmp / _FILES[0], {k: v.detach().contiguous() for k, v in head.state_dict().items()})
        write_json(tmp / _FILES[1], head.config())
    return Path(path)


def load_head(path, device=None) -> _VBLLHead:
    """Read a :func:`save_head` folder back into a new head (same class, same tensors).

    ``vbll.json`` is checked field by field and the tensors against the head it describes
    (names, shapes, NaN / inf): a damaged file is a :class:`~pyro_llm._io.FileFormatError`.
    """
    path = Path(path)
    missing = [f for f in _FILES if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a saved VBLL head: {missing} missing")
    jf, tf = path / _FILES[1], path / _FILES[0]
    cfg = read_json(jf, what="VBLL head", fields=_FIELDS)
    if cfg["task"] not in _HEADS:
        raise FileFormatError(f"{jf}: field 'task' is {cfg['task']!r}, expected one of {sorted(_HEADS)}")
    fields = {**_FIELDS, **_TASK_FIELDS[cfg["task"]]}
    cfg = read_json(jf, what="VBLL head", fields=fields)
    kw = {k: cfg[k] for k in fields if k not in ("task", "in_features", "out")}
    try:
        head = _HEADS[cfg["task"]](cfg["in_features"], cfg["out"], **kw)
    except ValueError as e:
        raise FileFormatError(f"{jf} describes no valid head ({e}); the file is damaged") from None
    expect = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    tensors, _ = read_safetensors(tf, what="VBLL head", expect=expect)
    if set(tensors) != set(expect):
        raise FileFormatError(f"{tf} holds tensors {sorted(set(tensors) - set(expect))[:3]} that a "
                              f"{cfg['task']} head of {jf} does not have; the file is damaged")
    head.load_state_dict(tensors)
    return head.to(device) if device is not None else head
