"""Fine-tuning "for the downstream task", made valid by a cut.

Seed 000 trains the adapter with the regression's likelihood as an extra term, so that the
outcome informs the coder. Over all rows that has no cut: Y on the rows a model then codes
trains the adapter, which learns whatever part of the outcome's noise leaks into the text. Here
the term is used *inside the folds*: fold k's coder is trained on the other folds' rows only -
cross-entropy on their labelled rows plus, on their unlabelled rows, the negative log of the
regression likelihood with z summed out,

    −log Σ_k p_θ(z = k | text_i) · p(y_i | X_i(k); β, σ),

with (β, log σ) held at the least-squares (or logistic) fit on those labelled rows. Fold k's
rows - their labels and outcomes - never reach fold k's coder, so the doubly robust estimator
that follows stays valid; whether the extra term narrows its interval is an empirical question
(measured in the coverage benchmark's B3, see docs/inference.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .design import Design

__all__ = ["DownstreamTerm", "downstream_term", "mixture_nll", "start_values"]


def mixture_nll(logits: torch.Tensor, X_by_class: torch.Tensor, y: torch.Tensor, beta: torch.Tensor,
                log_sigma: torch.Tensor | None = None, family: str = "gaussian") -> torch.Tensor:
    """Mean over rows of ``−log Σ_k softmax(logits)_k p(y | X(k) β)``.

    ``logits`` (B, K) the coder's class logits, ``X_by_class`` (K, B, p) the design with each
    class, ``y`` (B,) the outcome, ``beta`` (p,), ``log_sigma`` the Gaussian noise's log sd."""
    eta = torch.einsum("kbp,p->bk", X_by_class, beta)                        # (B, K)
    if family == "gaussian":
        sigma = log_sigma.exp()
        ll = -0.5 * ((y[:, None] - eta) / sigma) ** 2 - log_sigma - 0.5 * math.log(2 * math.pi)
    elif family == "binomial":
        ll = -torch.nn.functional.binary_cross_entropy_with_logits(
            eta, y[:, None].expand_as(eta), reduction="none")
    else:
        raise ValueError(f"family must be 'gaussian' or 'binomial', got {family!r}")
    return -(logits.log_softmax(-1) + ll).logsumexp(-1).mean()


@dataclass
class DownstreamTerm:
    """What a fold's fine-tuning needs for the downstream term: the design per class
    ``X_by_class`` (K, N, p), the outcome ``y`` (N,), the family, the weight of the term against
    the cross-entropy, and the regression parameters (held fixed by the library's fine-tuning)."""

    X_by_class: torch.Tensor
    y: torch.Tensor
    family: str
    weight: float
    beta: torch.Tensor
    log_sigma: torch.Tensor
    z: np.ndarray | None = None          # (N,) gold class index, -1 where unlabelled

    def for_rows(self, rows: np.ndarray) -> DownstreamTerm:
        """The term with (β, σ) refitted on the labelled rows ``rows`` only: a fold's coder must
        not see the other fold's labels or outcomes, through the regression's parameters either."""
        rows = np.asarray(rows)
        rows = rows[self.z[rows] >= 0]
        X = self.X_by_class.numpy()[self.z[rows], rows]
        beta, log_sigma = start_values(X, self.y.numpy()[rows], self.family)
        return DownstreamTerm(self.X_by_class, self.y, self.family, self.weight, beta, log_sigma, self.z)

    def loss(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The term on the rows ``rows`` (indices into the corpus) given their logits (B, K)."""
        X = self.X_by_class[:, rows].to(logits.dtype)
        return self.weight * mixture_nll(logits, X, self.y[rows].to(logits.dtype), self.beta,
                                         self.log_sigma, self.family)

    def parameters(self) -> list[torch.Tensor]:
        return [self.beta, self.log_sigma] if self.family == "gaussian" else [self.beta]


def downstream_term(design: Design, family: str = "gaussian", weight: float = 1.0) -> DownstreamTerm:
    """The term for a covariate-role design, started at the labelled rows' least-squares (or
    logistic) fit. The outcome role has no Y beyond z: there the regression likelihood *is* the
    class prior given Q, and the term adds nothing the cross-entropy lacks."""
    if design.role != "covariate":
        raise ValueError("fine-tuning for the downstream task needs z as a covariate (role='covariate'): "
                         "in the outcome role the regression has no outcome besides z")
    if design.kind == "continuous":
        raise ValueError("fine-tuning for the downstream task needs a categorical z")
    if not np.isfinite(weight) or weight <= 0:
        raise ValueError(f"the downstream term's weight must be a positive number, got {weight!r}")
    X, y = design.gold()
    beta, log_sigma = start_values(X, y, family)
    return DownstreamTerm(torch.tensor(np.array(design.X_by_class), dtype=torch.float32),
                          torch.tensor(np.array(design.y), dtype=torch.float32), family, float(weight),
                          beta, log_sigma, np.where(design.labelled, design.z, -1))


def start_values(X: np.ndarray, y: np.ndarray, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(β, log σ) of the least-squares (or logistic) fit of ``y`` on ``X``."""
    if family == "gaussian":
        beta = np.linalg.lstsq(X, y, rcond=None)[0]
        sigma = float(np.std(y - X @ beta)) or 1.0
    else:
        from .estimators import logistic

        beta, sigma = logistic(X, y).coef, 1.0
    return (torch.tensor(beta, dtype=torch.float32, requires_grad=True),
            torch.tensor(math.log(sigma), dtype=torch.float32, requires_grad=True))
