"""Predictive metrics as plain tensor functions.

Every function takes class probabilities ``probs`` of shape ``(N, C)`` (or, for the
decomposition into aleatoric and epistemic parts, per-sample probabilities of shape
``(S, N, C)``) and integer labels ``y`` of shape ``(N,)``. They return 0-dim tensors
(or ``(N,)`` tensors for the per-example uncertainty measures), so they compose with
torch code and with each other.

Example
-------
>>> import torch
>>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
>>> y = torch.tensor([0, 1])
>>> float(accuracy(probs, y))
1.0
"""

from __future__ import annotations

import torch

__all__ = [
    "accuracy",
    "nll",
    "brier",
    "ece",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "reliability_bins",
    "summarize",
]

_EPS = 1e-12


def _check(probs: torch.Tensor, y: torch.Tensor | None = None) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, C), got {tuple(probs.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("probs is empty: there is nothing to score")
    if not torch.isfinite(probs).all():
        raise ValueError("probs contains NaN or inf; check the model's outputs")
    if y is not None:
        if y.dim() != 1 or y.shape[0] != probs.shape[0]:
            raise ValueError(
                f"labels must have shape ({probs.shape[0]},) to match probs, got {tuple(y.shape)}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= probs.shape[1]):
            raise ValueError(
                f"labels must lie in [0, {probs.shape[1] - 1}], got range "
                f"[{int(y.min())}, {int(y.max())}]"
            )


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose most probable class is the label."""
    _check(probs, y)
    return (probs.argmax(-1) == y).float().mean()


def nll(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean negative log predictive probability of the labels (nats)."""
    _check(probs, y)
    p = probs.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
    return -(p.clamp_min(_EPS).log()).mean()


def brier(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the squared distance between ``probs`` and the one-hot label."""
    _check(probs, y)
    onehot = torch.nn.functional.one_hot(y.long(), probs.shape[-1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1).mean()


def reliability_bins(
    probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equal-width confidence bins: ``(mean confidence, accuracy, count)`` per bin.

    Empty bins have count 0 and confidence/accuracy 0.
    """
    _check(probs, y)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = probs.max(-1)
    correct = (pred == y).to(probs.dtype)
    # bin k holds confidences in (k/n, (k+1)/n]; a confidence of exactly 0 goes to bin 0
    idx = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    count = torch.zeros(n_bins, dtype=probs.dtype).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=probs.dtype).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=probs.dtype).index_add_(0, idx, correct)
    denom = count.clamp_min(1)
    return conf_sum / denom, acc_sum / denom, count


def ece(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Expected calibration error with ``n_bins`` equal-width bins on the top-class confidence."""
    conf, acc, count = reliability_bins(probs, y, n_bins)
    return (count / count.sum() * (conf - acc).abs()).sum()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each predictive distribution, shape ``(N,)`` (nats)."""
    return -(probs * probs.clamp_min(_EPS).log()).sum(-1)


def expected_entropy(sample_probs: torch.Tensor) -> torch.Tensor:
    """Aleatoric part: the mean over samples of each sample's entropy, shape ``(N,)``.

    ``sample_probs`` has shape ``(S, N, C)``: S posterior samples (or ensemble members).
    """
    if sample_probs.dim() != 3:
        raise ValueError(f"sample_probs must have shape (S, N, C), got {tuple(sample_probs.shape)}")
    return entropy(sample_probs).mean(0)


def mutual_information(sample_probs: torch.Tensor) -> torch.Tensor:
    """Epistemic part: entropy of the mean minus the mean entropy, shape ``(N,)``.

    Total predictive entropy = expected entropy + mutual information, exactly.
    """
    if sample_probs.dim() != 3:
        raise ValueError(f"sample_probs must have shape (S, N, C), got {tuple(sample_probs.shape)}")
    return (entropy(sample_probs.mean(0)) - expected_entropy(sample_probs)).clamp_min(0.0)


def summarize(
    probs: torch.Tensor,
    y: torch.Tensor,
    sample_probs: torch.Tensor | None = None,
    n_bins: int = 15,
) -> dict[str, float]:
    """All metrics at once, as plain floats (``mutual_information`` only when samples are given)."""
    out = {
        "accuracy": float(accuracy(probs, y)),
        "ece": float(ece(probs, y, n_bins)),
        "nll": float(nll(probs, y)),
        "brier": float(brier(probs, y)),
        "entropy": float(entropy(probs).mean()),
    }
    if sample_probs is not None:
        out["mutual_information"] = float(mutual_information(sample_probs).mean())
    return out
