"""What every scenario of the coverage benchmark shares: the :class:`Replicate` record, the oracle
record for the efficiency bound, labelled-row sampling, the B1-family Bayes rule and a small
multinomial-logistic fitter (used for calibrators and for the "oracle given this coder")."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

N_CORPUS = 10_000


def expit(x):
    return 1.0 / (1.0 + np.exp(-x))


def log_norm(x, sd=1.0):
    """log N(x; 0, sd²)."""
    return -0.5 * (x / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


@dataclass
class Oracle:
    """What the efficiency bound needs: every row's true label and its true conditional law
    ``p(z = k | LLM output, W)`` (N, K) (continuous z: (N, 2) mean and sd).

    ``kind`` is ``"analytic"`` (Bayes' rule on the data-generating process) or ``"fitted on all
    rows"`` (a flexible model of the true z fitted on all N rows: an oracle given this coder).
    ``prob`` (a column name or (N,) array of labelling probabilities) and ``cluster`` (a column
    name) as ``regress`` takes them."""

    truth: np.ndarray
    probs: np.ndarray
    kind: str = "analytic"
    prob: object = None
    cluster: str | None = None


@dataclass
class Replicate:
    df: pd.DataFrame
    formula: str
    label: str
    role: str
    coef: str
    truth: float
    runs: dict[str, dict]
    llm_s: float = 0.0          # seconds spent fitting and running the replicate's LLM
    info: dict = field(default_factory=dict)
    oracle: Oracle | None = None
    family: str = "gaussian"
    reference: str = "ppi++"    # the run the widths are compared with ("width_over_ppi")
    default: str = "dr"         # the library's default estimator


def labelled_mask(rng, n_rows: int, n: int) -> np.ndarray:
    """n rows drawn at random without replacement."""
    mask = np.zeros(n_rows, bool)
    mask[rng.choice(n_rows, n, replace=False)] = True
    return mask


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


def normal_score_posterior(log_prior: np.ndarray, y: np.ndarray, mu_y: np.ndarray, s: np.ndarray,
                           s_mean: np.ndarray, leak: float, s_sd=1.0, y_sd: float = 1.0) -> np.ndarray:
    """``p(z = k | s, W, Y)`` for the B1 family, (N, K): ``z ~ log_prior`` (N, K),
    ``Y = mu_y[:, k] + ε`` with ε ~ N(0, y_sd²) and ``s = s_mean[:, k] + leak·ε + s_sd·e`` with e ~
    N(0, 1) (``s_sd`` a number or (N, K)). Given z = k and Y, ε is known, so
    ``s | z, Q, Y ~ N(s_mean_k + leak·(Y − mu_y_k), s_sd_k²)``."""
    eps = y[:, None] - mu_y
    logp = (log_prior + log_norm(eps, y_sd) + log_norm(s[:, None] - s_mean - leak * eps, s_sd))
    return softmax_rows(logp)


def mlogit_fit(X: np.ndarray, z: np.ndarray, K: int, ridge: float = 1e-3, iters: int = 50) -> np.ndarray:
    """Multinomial logistic regression of class indices ``z`` on ``X`` (an intercept column is
    expected in X) by Newton's method with a small ridge; returns (p, K-1) coefficients."""
    n, p = X.shape
    B = np.zeros((p, K - 1))
    Y = np.eye(K)[z][:, 1:]
    for _ in range(iters):
        P = softmax_rows(np.column_stack([np.zeros(n), X @ B]))[:, 1:]
        grad = (X.T @ (Y - P)).T.reshape(-1) - ridge * n * B.T.reshape(-1)
        H = np.zeros(((K - 1) * p, (K - 1) * p))
        for a in range(K - 1):
            for b in range(K - 1):
                w = P[:, a] * ((a == b) - P[:, b])
                H[a * p:(a + 1) * p, b * p:(b + 1) * p] = X.T @ (w[:, None] * X)
        H += ridge * n * np.eye(len(H))
        step = np.linalg.solve(H, grad)
        B = B + step.reshape(K - 1, p).T
        if np.max(np.abs(step)) < 1e-8:
            break
    return B


def mlogit_probs(X: np.ndarray, B: np.ndarray) -> np.ndarray:
    return softmax_rows(np.column_stack([np.zeros(len(X)), X @ B]))


def spline_basis(t: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Natural-ish cubic spline basis of t: t, and truncated cubes (t − κ)³₊ scaled, per knot."""
    scale = max(float(np.ptp(knots)), 1e-6)
    cols = [t] + [np.clip((t - k) / scale, 0, None) ** 3 for k in knots]
    return np.column_stack(cols)


def score_features(score: np.ndarray, knots=None) -> tuple[np.ndarray, np.ndarray]:
    """Spline features of a 1-d score (knots at its 10/30/50/70/90% quantiles unless given)."""
    if knots is None:
        knots = np.quantile(score, [0.1, 0.3, 0.5, 0.7, 0.9])
    return spline_basis(score, knots), knots


def fitted_oracle(z: np.ndarray, score: np.ndarray, W: np.ndarray, K: int = 2) -> np.ndarray:
    """The "oracle given this coder": a multinomial logistic model of the true z (every row) on a
    spline of the LLM's score (a 1-d log-odds, or (N, K-1) logits), W, the products of the score
    with W and the pairwise products of W; fitted on all N rows, its fitted probabilities."""
    score = np.asarray(score, float)
    S = score_features(score)[0] if score.ndim == 1 else score
    W = np.asarray(W, float).reshape(len(z), -1)
    W = (W - W.mean(0)) / np.where(W.std(0) > 0, W.std(0), 1)
    S1 = S[:, :1] if score.ndim == 1 else S
    prods = [S1[:, i] * W[:, j] for i in range(S1.shape[1]) for j in range(W.shape[1])]
    prods += [W[:, i] * W[:, j] for i in range(W.shape[1]) for j in range(i, W.shape[1])]
    X = np.column_stack([np.ones(len(z)), S, W] + prods)
    sd = X[:, 1:].std(0)
    X[:, 1:] = (X[:, 1:] - X[:, 1:].mean(0)) / np.where(sd > 0, sd, 1)
    return mlogit_probs(X, mlogit_fit(X, np.asarray(z, int), K, ridge=1e-4))


def calibrator(z: np.ndarray, score: np.ndarray, K: int = 2):
    """A calibration map of the LLM's score alone, ``p(z | score)``: multinomial logistic on a
    spline of a 1-d score (or linear in (N, K-1) logits), fitted on a large external draw.
    Returns ``f(score) -> (N, K) probabilities``."""
    score = np.asarray(score, float)
    if score.ndim == 1:
        S, knots = score_features(score)
    else:
        S, knots = score, None
    mean, sd = S.mean(0), S.std(0)
    X = np.column_stack([np.ones(len(S)), (S - mean) / sd])
    B = mlogit_fit(X, np.asarray(z, int), K, ridge=1e-6)

    def apply(new):
        new = np.asarray(new, float)
        Sn = score_features(new, knots)[0] if new.ndim == 1 else new
        return mlogit_probs(np.column_stack([np.ones(len(Sn)), (Sn - mean) / sd]), B)

    return apply


_CALIBRATORS: dict = {}
CALIBRATION_ROWS, CALIBRATION_SEED = 200_000, 4242


def cached_calibrator(key, draw, K: int = 2):
    """The vendor's calibration of the LLM's score, ``p(z | score)``, learned once per process on
    a large external draw: ``draw(rng, rows) -> (z, score)`` from the scenario's process. The LLM
    is fixed (not fitted on the benchmark's labels), so this calibration is honest for every row."""
    if key not in _CALIBRATORS:
        z, score = draw(np.random.default_rng(CALIBRATION_SEED), CALIBRATION_ROWS)
        _CALIBRATORS[key] = calibrator(z, score, K)
    return _CALIBRATORS[key]
