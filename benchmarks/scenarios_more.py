"""More scenarios of the coverage benchmark, each with an analytic oracle law ``p(z | s, W)`` for the
efficiency bound (:mod:`benchmarks.bound`). N = 10,000 and n = 500 unless stated; Q ~ N(0, 1),
ε ~ N(0, 1); the "LLM" is fixed (not fitted on the benchmark's labels), so no cross-fitting is
needed and its vendor calibration ``p(z | s)`` (learned once on a 200k-row external draw,
:func:`benchmarks.common.cached_calibrator`) is what PPI++ gets as probabilities.

* ``interaction``: B1 with ``Y = 1 + z + 0.5 Q + 0.5 z·Q + ε``, ``y ~ z * q``, target ``z:q`` (0.5).
* ``logistic``: binary ``Y ~ Bern(expit(−0.5 + z + 0.5 Q))``, logistic target, coefficient of z (1.0);
  the score leaks Y.
* ``three_class``: z ∈ {0, 1, 2} (multinomial logit in Q), ``Y = 1 + 0.8·[z=1] + 1.5·[z=2] + 0.5 Q + ε``,
  (N, 3) logits whose errors depend on Q and leak ε; target ``C(z)[T.2.0]`` (1.5).
* ``outcome_leak``: the outcome role, z as in B2 (``1[0.5 Q1 − 0.3 Q2 + ε > 0]``), a score that leaks
  the outcome's latent ε; target the linear-probability coefficient of Q2 (B2's truth).
* ``unequal_pi``: labelling probability ``π = 0.02 + 0.08 expit(2Q − 0.5)``, rows labelled
  independently; Y has z·Q and Q² terms the formula omits (z's effect grows with Q, and so does
  π), so the target (the population projection of z in ``y ~ z + q``, from a 2M-row draw, about
  1.11) is not the labelled rows' projection (about 1.26).
* ``clustered``: 200 clusters of 50 rows; Q, z, Y and the score have cluster effects; ``cluster="g"``.
* ``stress_unequal_var``: class-specific score sds ``exp(±0.8 tanh(Q·Y))``: the generative joint
  model's binormal measurement model is wrong.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.special import log_ndtr

from benchmarks.common import (
    N_CORPUS,
    Oracle,
    Replicate,
    cached_calibrator,
    expit,
    labelled_mask,
    log_norm,
    normal_score_posterior,
    softmax_rows,
)


def _prior_z(q):
    p1 = expit(-0.5 + 0.8 * q)
    return p1, np.log(np.column_stack([1 - p1, p1]))


def _calibrated(key, draw, s, K: int = 2):
    return cached_calibrator(key, lambda rng, rows: (lambda d: (d["z"], d["s"]))(draw(rng, rows)), K)(s)


def _binary_runs(s, zhat, coef: str, family: str = "gaussian", joint: bool = True, probs=None, **dr) -> dict:
    fam = {} if family == "gaussian" else {"family": family}
    runs = {
        "dr": {"method": "dr", "predictions": s, **fam, **dr},
        "naive": {"method": "naive", "predictions": zhat, **fam},
        "labelled_only": {"method": "labelled_only", "predictions": zhat, **fam},
        "ppi++": {"method": "ptd", "predictions": probs, "predictions_kind": "probs", "tune_for": coef,
                  **fam},
    }
    if joint:
        runs["joint"] = {"method": "joint", "predictions": s}
    return runs


# ---------------------------------------------------------------- interaction
def interaction_draw(rng, N: int, a: float = 2.0, leak: float = 0.3) -> dict:
    q, eps = rng.normal(size=N), rng.normal(size=N)
    z = (rng.random(N) < expit(-0.5 + 0.8 * q)).astype(int)
    y = 1 + z + 0.5 * q + 0.5 * z * q + eps
    s = a * (2 * z - 1) + 0.6 * q + leak * eps + rng.normal(size=N)
    return {"q": q, "z": z, "y": y, "s": s}


def interaction_oracle(s, q, y, a: float = 2.0, leak: float = 0.3) -> np.ndarray:
    k = np.arange(2)
    mu = 1 + k + 0.5 * q[:, None] + 0.5 * k * q[:, None]
    return normal_score_posterior(_prior_z(q)[1], y, mu, s, a * (2 * k - 1) + 0.6 * q[:, None], leak)


def interaction(seed: int, a: float = 2.0, leak: float = 0.3, n: int = 500, N: int = N_CORPUS) -> Replicate:
    rng = np.random.default_rng(seed)
    d = interaction_draw(rng, N, a, leak)
    lab = labelled_mask(rng, N, n)
    zhat = (d["s"] > 0).astype(int)
    probs = _calibrated(("interaction", a, leak), lambda r, m: interaction_draw(r, m, a, leak), d["s"])
    df = pd.DataFrame({"y": d["y"], "q": d["q"], "z": np.where(lab, d["z"], np.nan)})
    return Replicate(df, "y ~ z * q", "z", "covariate", "z:q", 0.5,
                     _binary_runs(d["s"], zhat, "z:q", probs=probs),
                     info={"accuracy": float((zhat == d["z"]).mean())},
                     oracle=Oracle(d["z"], interaction_oracle(d["s"], d["q"], d["y"], a, leak)))


# ---------------------------------------------------------------- logistic target
LOGIT_COEF = (-0.5, 1.0, 0.5)   # intercept, z, Q of the outcome's logistic model


def logistic_draw(rng, N: int, a: float = 2.0, leak: float = 0.5) -> dict:
    q = rng.normal(size=N)
    z = (rng.random(N) < expit(-0.5 + 0.8 * q)).astype(int)
    b0, b1, b2 = LOGIT_COEF
    y = (rng.random(N) < expit(b0 + b1 * z + b2 * q)).astype(int)
    s = a * (2 * z - 1) + 0.6 * q + leak * (2 * y - 1) + rng.normal(size=N)
    return {"q": q, "z": z, "y": y, "s": s}


def logistic_oracle(s, q, y, a: float = 2.0, leak: float = 0.5) -> np.ndarray:
    k = np.arange(2)
    b0, b1, b2 = LOGIT_COEF
    py = expit(b0 + b1 * k + b2 * q[:, None])                                   # (N, 2)
    log_y = np.where(y[:, None] == 1, np.log(py), np.log1p(-py))
    s_mean = a * (2 * k - 1) + 0.6 * q[:, None] + leak * (2 * y[:, None] - 1)
    return softmax_rows(_prior_z(q)[1] + log_y + log_norm(s[:, None] - s_mean))


def logistic(seed: int, a: float = 2.0, leak: float = 0.5, n: int = 500, N: int = N_CORPUS) -> Replicate:
    """The target model is the true logistic model, so the truth is its coefficient of z (1.0)."""
    rng = np.random.default_rng(seed)
    d = logistic_draw(rng, N, a, leak)
    lab = labelled_mask(rng, N, n)
    zhat = (d["s"] > 0).astype(int)
    probs = _calibrated(("logistic", a, leak), lambda r, m: logistic_draw(r, m, a, leak), d["s"])
    df = pd.DataFrame({"y": d["y"], "q": d["q"], "z": np.where(lab, d["z"], np.nan)})
    return Replicate(df, "y ~ z + q", "z", "covariate", "z", LOGIT_COEF[1],
                     _binary_runs(d["s"], zhat, "z", family="binomial", joint=False, probs=probs),
                     info={"accuracy": float((zhat == d["z"]).mean()), "mean_y": float(d["y"].mean())},
                     oracle=Oracle(d["z"], logistic_oracle(d["s"], d["q"], d["y"], a, leak)),
                     family="binomial")


# ---------------------------------------------------------------- three classes
Y3 = np.array([0.0, 0.8, 1.5])            # class effects on Y


def _z3_logits(q):
    return np.column_stack([np.zeros_like(q), -0.2 + 0.8 * q, -0.6 - 0.7 * q])


def three_class_draw(rng, N: int, a: float = 2.5, leak: float = 0.3) -> dict:
    q, eps = rng.normal(size=N), rng.normal(size=N)
    pz = softmax_rows(_z3_logits(q))
    z = (pz.cumsum(1) < rng.random(N)[:, None]).sum(1).clip(max=2)
    y = 1 + Y3[z] + 0.5 * q + eps
    base = np.column_stack([np.zeros(N), 0.6 * q + leak * eps, -0.6 * q])
    s = a * np.eye(3)[z] + base + rng.normal(size=(N, 3))
    return {"q": q, "z": z, "y": y, "s": s}


def three_class_oracle(s, q, y, a: float = 2.5, leak: float = 0.3) -> np.ndarray:
    logp = np.log(softmax_rows(_z3_logits(q)))
    for k in range(3):
        eps = y - 1 - Y3[k] - 0.5 * q
        mean = a * np.eye(3)[k] + np.column_stack([np.zeros_like(q), 0.6 * q + leak * eps, -0.6 * q])
        logp[:, k] += log_norm(eps) + log_norm(s - mean).sum(1)
    return softmax_rows(logp)


def three_class(seed: int, a: float = 2.5, leak: float = 0.3, n: int = 500, N: int = N_CORPUS) -> Replicate:
    rng = np.random.default_rng(seed)
    d = three_class_draw(rng, N, a, leak)
    lab = labelled_mask(rng, N, n)
    zhat = d["s"].argmax(1)
    coef = "C(z)[T.2.0]"
    probs = cached_calibrator(("three_class", a, leak),
                              lambda r, m: (lambda x: (x["z"], x["s"][:, 1:] - x["s"][:, :1]))(
                                  three_class_draw(r, m, a, leak)), 3)(d["s"][:, 1:] - d["s"][:, :1])
    df = pd.DataFrame({"y": d["y"], "q": d["q"], "z": np.where(lab, d["z"], np.nan)})
    runs = {
        "dr": {"method": "dr", "predictions": d["s"], "predictions_kind": "logits"},
        "naive": {"method": "naive", "predictions": zhat},
        "labelled_only": {"method": "labelled_only", "predictions": zhat},
        "ppi++": {"method": "ptd", "predictions": probs, "predictions_kind": "probs", "tune_for": coef},
    }
    return Replicate(df, "y ~ C(z) + q", "z", "covariate", coef, float(Y3[2]), runs,
                     info={"accuracy": float((zhat == d["z"]).mean())},
                     oracle=Oracle(d["z"], three_class_oracle(d["s"], d["q"], d["y"], a, leak)))


# ---------------------------------------------------------------- outcome role, score leaks ε
def outcome_leak_draw(rng, N: int, a: float = 1.5, leak: float = 0.8) -> dict:
    q1, q2, eps = rng.normal(size=N), (rng.random(N) < 0.4).astype(float), rng.normal(size=N)
    z = (0.5 * q1 - 0.3 * q2 + eps > 0).astype(int)
    s = a * (2 * z - 1) + 0.4 * q1 + leak * eps + rng.normal(size=N)
    return {"q1": q1, "q2": q2, "z": z, "s": s}


def outcome_leak_oracle(s, q1, q2, a: float = 1.5, leak: float = 0.8) -> np.ndarray:
    """``p(z | s, Q1, Q2)`` with z = 1[η + ε > 0], η = 0.5 Q1 − 0.3 Q2, s = a(2z−1) + 0.4 Q1 + c ε + e:
    given z = k, t = s − a(2k−1) − 0.4 Q1 = c ε + e ~ N(0, v = c² + 1) before conditioning on z, and
    ε | t ~ N(c t / v, 1 / v); so p(z = 1, s) = φ_v(t₁) Φ((η + c t₁/v)√v) and
    p(z = 0, s) = φ_v(t₀) Φ(−(η + c t₀/v)√v)."""
    eta, v = 0.5 * q1 - 0.3 * q2, leak ** 2 + 1
    logp = []
    for k, sign in ((0, -1.0), (1, 1.0)):
        t = s - a * (2 * k - 1) - 0.4 * q1
        logp.append(log_norm(t, np.sqrt(v)) + log_ndtr(sign * (eta + leak * t / v) * np.sqrt(v)))
    return softmax_rows(np.column_stack(logp))


def outcome_leak(seed: int, a: float = 1.5, leak: float = 0.8, n: int = 500, N: int = N_CORPUS) -> Replicate:
    from benchmarks.scenarios import b2_truth  # z has B2's law, so B2's target

    rng = np.random.default_rng(seed)
    d = outcome_leak_draw(rng, N, a, leak)
    lab = labelled_mask(rng, N, n)
    zhat = (d["s"] > 0).astype(int)
    probs = _calibrated(("outcome_leak", a, leak), lambda r, m: outcome_leak_draw(r, m, a, leak), d["s"])
    df = pd.DataFrame({"q1": d["q1"], "q2": d["q2"], "z": np.where(lab, d["z"], np.nan)})
    return Replicate(df, "z ~ q1 + q2", "z", "outcome", "q2", b2_truth(),
                     _binary_runs(d["s"], zhat, "q2", probs=probs),
                     info={"accuracy": float((zhat == d["z"]).mean())},
                     oracle=Oracle(d["z"], outcome_leak_oracle(d["s"], d["q1"], d["q2"], a, leak)))


# ---------------------------------------------------------------- unequal labelling probabilities
def unequal_pi_draw(rng, N: int, a: float = 2.0, leak: float = 0.5) -> dict:
    q, eps = rng.normal(size=N), rng.normal(size=N)
    z = (rng.random(N) < expit(-0.5 + 0.8 * q)).astype(int)
    y = 1 + z + 0.5 * q + 0.5 * z * q + 0.3 * (q ** 2 - 1) + eps   # y ~ z + q omits z·Q and Q²
    s = a * (2 * z - 1) + 0.6 * q + leak * eps + rng.normal(size=N)
    pi = 0.02 + 0.08 * expit(2 * q - 0.5)
    return {"q": q, "z": z, "y": y, "s": s, "pi": pi}


@lru_cache(maxsize=4)
def unequal_pi_truth(rows: int = 2_000_000, seed: int = 20261123) -> float:
    """The population least-squares coefficient of z in ``y ~ z + q`` (one large draw)."""
    d = unequal_pi_draw(np.random.default_rng(seed), rows)
    X = np.column_stack([np.ones(rows), d["z"], d["q"]])
    return float(np.linalg.lstsq(X, d["y"], rcond=None)[0][1])


def unequal_pi_oracle(s, q, y, a: float = 2.0, leak: float = 0.5) -> np.ndarray:
    k = np.arange(2)
    mu = 1 + k + 0.5 * q[:, None] + 0.5 * k * q[:, None] + 0.3 * (q[:, None] ** 2 - 1)
    return normal_score_posterior(_prior_z(q)[1], y, mu, s, a * (2 * k - 1) + 0.6 * q[:, None], leak)


def unequal_pi(seed: int, a: float = 2.0, leak: float = 0.5, N: int = N_CORPUS) -> Replicate:
    """Labelled with known, unequal probabilities (mean about 0.054, so n is about 540 and random)."""
    rng = np.random.default_rng(seed)
    d = unequal_pi_draw(rng, N, a, leak)
    lab = rng.random(N) < d["pi"]
    zhat = (d["s"] > 0).astype(int)
    probs = _calibrated(("unequal_pi", a, leak), lambda r, m: unequal_pi_draw(r, m, a, leak), d["s"])
    df = pd.DataFrame({"y": d["y"], "q": d["q"], "pi": d["pi"], "z": np.where(lab, d["z"], np.nan)})
    runs = _binary_runs(d["s"], zhat, "z", probs=probs, prob="pi")
    runs["dr (π ignored)"] = {"method": "dr", "predictions": d["s"]}
    return Replicate(df, "y ~ z + q", "z", "covariate", "z", unequal_pi_truth(), runs,
                     info={"accuracy": float((zhat == d["z"]).mean()), "n_labelled": float(lab.sum())},
                     oracle=Oracle(d["z"], unequal_pi_oracle(d["s"], d["q"], d["y"], a, leak), prob="pi"))


# ---------------------------------------------------------------- clusters
CLUSTER_U_Y, CLUSTER_U_S, CLUSTER_W_Z = 1.0, 0.5, 1.0   # loadings of the cluster effects
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(40)
_GH_W = _GH_W / _GH_W.sum()


def clustered_draw(rng, N: int, a: float = 2.0, leak: float = 0.3, size: int = 50) -> dict:
    """Clusters of ``size`` rows with three effects: v_g in Q, w_g in z (beyond Q) and u_g in Y and
    in the LLM's score, so that the z coefficient's scores are correlated within clusters."""
    g = np.arange(N) // size
    G = g.max() + 1
    v, w, u = rng.normal(size=G), rng.normal(size=G), rng.normal(size=G)
    q = 0.6 * v[g] + 0.8 * rng.normal(size=N)
    eps = rng.normal(size=N)
    z = (rng.random(N) < expit(-0.5 + 0.8 * q + CLUSTER_W_Z * w[g])).astype(int)
    y = 1 + z + 0.5 * q + CLUSTER_U_Y * u[g] + eps
    s = a * (2 * z - 1) + 0.6 * q + CLUSTER_U_S * u[g] + leak * eps + rng.normal(size=N)
    return {"g": g, "q": q, "z": z, "y": y, "s": s}


def clustered_oracle(s, q, y, a: float = 2.0, leak: float = 0.3) -> np.ndarray:
    """The row-wise law ``p(z | s, Q, Y)`` (the other rows of the cluster ignored): p(z = 1 | Q) =
    E_w expit(−0.5 + 0.8 Q + w) (Gauss-Hermite); with r = Y − μ_z = u + ε ~ N(0, 2), the score's
    error 0.5 u + leak ε + e given r is N(β r, σ²)."""
    p1 = (expit(-0.5 + 0.8 * q[:, None] + CLUSTER_W_Z * _GH_X) * _GH_W).sum(1)
    var_r = CLUSTER_U_Y ** 2 + 1
    cov = CLUSTER_U_S * CLUSTER_U_Y + leak
    beta = cov / var_r
    sd_s = np.sqrt(CLUSTER_U_S ** 2 + leak ** 2 - cov ** 2 / var_r + 1)
    k = np.arange(2)
    return normal_score_posterior(np.log(np.column_stack([1 - p1, p1])), y, 1 + k + 0.5 * q[:, None], s,
                                  a * (2 * k - 1) + 0.6 * q[:, None], beta, sd_s, np.sqrt(var_r))


def clustered(seed: int, a: float = 2.0, leak: float = 0.3, n: int = 500, N: int = N_CORPUS) -> Replicate:
    """200 clusters of 50 rows; labels at n random rows."""
    rng = np.random.default_rng(seed)
    d = clustered_draw(rng, N, a, leak)
    lab = labelled_mask(rng, N, n)
    zhat = (d["s"] > 0).astype(int)
    probs = _calibrated(("clustered", a, leak), lambda r, m: clustered_draw(r, m, a, leak), d["s"])
    df = pd.DataFrame({"y": d["y"], "q": d["q"], "g": d["g"], "z": np.where(lab, d["z"], np.nan)})
    runs = _binary_runs(d["s"], zhat, "z", probs=probs, cluster="g")
    runs["dr (clusters ignored)"] = {"method": "dr", "predictions": d["s"]}
    return Replicate(df, "y ~ z + q", "z", "covariate", "z", 1.0, runs,
                     info={"accuracy": float((zhat == d["z"]).mean())},
                     oracle=Oracle(d["z"], clustered_oracle(d["s"], d["q"], d["y"], a, leak), cluster="g"))


# ---------------------------------------------------------------- stress: unequal, non-linear score variances
def _stress_sd(q, y, scale):
    """(N, 2): the score's sd by true class, exp(∓scale·tanh(Q·Y))."""
    t = np.tanh(q * y)
    return np.exp(np.column_stack([-scale * t, scale * t]))


def stress_draw(rng, N: int, a: float = 1.5, scale: float = 0.8) -> dict:
    q, eps = rng.normal(size=N), rng.normal(size=N)
    z = (rng.random(N) < expit(-0.5 + 0.8 * q)).astype(int)
    y = 1 + z + 0.5 * q + eps
    sd = _stress_sd(q, y, scale)[np.arange(N), z]
    s = a * (2 * z - 1) + 0.6 * q + sd * rng.normal(size=N)
    return {"q": q, "z": z, "y": y, "s": s}


def stress_oracle(s, q, y, a: float = 1.5, scale: float = 0.8) -> np.ndarray:
    k = np.arange(2)
    return normal_score_posterior(_prior_z(q)[1], y, 1 + k + 0.5 * q[:, None], s,
                                  a * (2 * k - 1) + 0.6 * q[:, None], 0.0, _stress_sd(q, y, scale))


def stress_unequal_var(seed: int, a: float = 1.5, scale: float = 0.8, n: int = 500,
                       N: int = N_CORPUS) -> Replicate:
    rng = np.random.default_rng(seed)
    d = stress_draw(rng, N, a, scale)
    lab = labelled_mask(rng, N, n)
    zhat = (d["s"] > 0).astype(int)
    probs = _calibrated(("stress_unequal_var", a, scale), lambda r, m: stress_draw(r, m, a, scale), d["s"])
    df = pd.DataFrame({"y": d["y"], "q": d["q"], "z": np.where(lab, d["z"], np.nan)})
    return Replicate(df, "y ~ z + q", "z", "covariate", "z", 1.0,
                     _binary_runs(d["s"], zhat, "z", probs=probs),
                     info={"accuracy": float((zhat == d["z"]).mean())},
                     oracle=Oracle(d["z"], stress_oracle(d["s"], d["q"], d["y"], a, scale)))


MORE = {
    "interaction": (interaction, [{}]),
    "logistic": (logistic, [{}]),
    "three_class": (three_class, [{}]),
    "outcome_leak": (outcome_leak, [{}]),
    "unequal_pi": (unequal_pi, [{}]),
    "clustered": (clustered, [{}]),
    "stress_unequal_var": (stress_unequal_var, [{}]),
}
