"""Likelihoods with minibatch scaling through ``pyro.plate(..., subsample=...)``.

Call these inside a Pyro model *after* the LLM forward (global sites are drawn outside the
plate). ``size`` is the number of data points in the full data set and ``index`` the
indices of the current minibatch, so the log-likelihood is scaled by ``size / len(index)``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from .metrics import as_labels
from .runtime import draw_plates

__all__ = ["categorical", "gaussian_regression"]


def _check_index(index: torch.Tensor, n: int, size: int, name: str) -> None:
    if index.dim() != 1 or index.shape[0] != n:
        raise ValueError(f"{name}: index must have shape ({n},) to match the batch, "
                         f"got {tuple(index.shape)}")
    if n and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ValueError(f"{name}: index must lie in [0, {size}), got "
                         f"[{int(index.min())}, {int(index.max())}]")


def categorical(name: str, logits: torch.Tensor, obs: torch.Tensor | None,
                size: int, index: torch.Tensor) -> torch.Tensor:
    """``obs[i] ~ Categorical(logits[i])`` for the minibatch ``index`` of ``size`` points.

    ``logits`` is ``(batch, classes)``, or ``(particles, batch, classes)`` under Pyro's
    vectorised particles (the draws' dimension sits left of the data plate).
    """
    if not 2 <= logits.dim() <= 2 + draw_plates():
        raise ValueError(f"{name}: logits must be (batch, classes), got {tuple(logits.shape)}")
    n, c = logits.shape[-2:]
    _check_index(index, n, size, name)
    if obs is not None:
        if obs.shape != (n,):
            raise ValueError(f"{name}: labels must have shape ({n},), got {tuple(obs.shape)}")
        if obs.is_floating_point():
            as_labels(obs, f"{name}: labels")  # NaN or fractions: an error naming the rows
        if obs.numel() and (int(obs.min()) < 0 or int(obs.max()) >= c):
            raise ValueError(f"{name}: labels must lie in [0, {c - 1}], got "
                             f"[{int(obs.min())}, {int(obs.max())}]")
    if logits.dtype in (torch.float16, torch.bfloat16):  # a half-precision backbone's logits:
        logits = logits.float()  # the likelihood (and the posterior) in float32
    with pyro.plate(f"{name}_data", size=size, subsample=index):
        return pyro.sample(name, dist.Categorical(logits=logits), obs=obs)


def gaussian_regression(name: str, features: torch.Tensor, obs: torch.Tensor | None,
                        size: int, index: torch.Tensor, coef_scale: float = 1.0,
                        noise_scale: float = 1.0) -> torch.Tensor:
    """A Bayesian linear regression head ``obs ~ Normal(features @ coef + intercept, sigma)``.

    Global sites ``{name}.coef`` (shape ``(H,)``), ``{name}.intercept`` and ``{name}.sigma``
    (HalfNormal prior) are drawn before the data plate. Returns the mean.
    """
    if features.dim() != 2:
        raise ValueError(f"{name}: features must be (batch, dim), got {tuple(features.shape)}")
    _check_index(index, features.shape[0], size, name)
    h = features.shape[1]
    zero = features.new_zeros(())
    coef = pyro.sample(f"{name}.coef", dist.Normal(zero, coef_scale).expand([h]).to_event(1))
    intercept = pyro.sample(f"{name}.intercept", dist.Normal(zero, 10.0 * coef_scale))
    sigma = pyro.sample(f"{name}.sigma", dist.HalfNormal(zero + noise_scale))
    mean = features @ coef + intercept
    if obs is not None and obs.shape != mean.shape:
        raise ValueError(f"{name}: outcomes must have shape {tuple(mean.shape)}, got {tuple(obs.shape)}")
    with pyro.plate(f"{name}_data", size=size, subsample=index):
        pyro.sample(name, dist.Normal(mean, sigma), obs=obs)
    return mean
