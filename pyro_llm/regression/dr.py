"""The cut, cross-fitted, doubly robust (AIPW) estimator of a regression with an LLM-coded variable.

With ψ(z, W; θ) the target regression's score (least squares or logistic; W = Q, Y, ...),
π_i the known probability that row i was labelled and R_i whether it was, θ̂ solves

    Σ_all m̂_i(θ)  +  Σ_i (R_i / π_i) [ψ(z_i, W_i; θ) − m̂_i(θ)]  =  0,
    m̂_i(θ) = Σ_j p̂_ij ψ(v_ij, W_i; θ),

where (v_ij, p̂_ij) is row i's completion law (:class:`.calibration.Completion`: the classes of a
categorical z with their probabilities, or Gauss-Hermite nodes of a continuous one) from a model
fitted on other folds' labelled rows. Averaging ψ over the values of z (rather than plugging
E[z] into it) keeps interactions and logistic targets exact. If p̂ is right the correction term
has mean zero and the estimator reaches the efficiency bound; if it is wrong, the correction
term - whose expectation is zero because the labelled rows are a random subset with known π
and p̂ never saw them - removes the bias. Validity comes from the design; the LLM and the
completion model buy efficiency.

Each row contributes an influence term ``φ_i = Σ_j c_ij ψ(v_ij) + (R_i/π_i) ψ(z_i)`` with
``c_ij = p̂_ij (1 − R_i/π_i)``; the sandwich is ``H⁻¹ (Σ_g φ_g φ_gᵀ) H⁻¹`` (φ summed within
clusters g, with the factor G/(G−1)). The Bayesian bootstrap re-solves the same equation with
Dirichlet row weights (stratified by labelled status, or per cluster), holding p̂ fixed.

References: Robins, Rotnitzky & Zhao (1994), "Estimation of regression coefficients when some
regressors are not always observed"; Egami, Hinck, Stewart & Wei (2023), "Using imperfect
surrogates for downstream inference: design-based supervised learning for social science
applications of large language models"; Chernozhukov et al. (2018), "Double/debiased machine
learning for treatment and structural parameters"; Rubin (1981), "The Bayesian bootstrap".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .calibration import Completion, hermite_nodes
from .design import Design, build_design
from .outputs import as_array

__all__ = ["DRFit", "bootstrap_draws", "combine_splits", "dr_solve", "efficiency_bound", "fit_dr",
           "labelling_probabilities", "node_design"]


@dataclass(frozen=True)
class DRFit:
    """θ̂ (p,), its sandwich covariance (p, p), per-row influence terms φ (N, p) and the Jacobian H."""

    coef: np.ndarray
    cov: np.ndarray
    phi: np.ndarray
    H: np.ndarray
    extra: dict = field(default_factory=dict)


def node_design(design: Design, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Design rows (N, J, p) and responses (N, J) with row i's coded variable set to ``values[i, j]``."""
    n = values.shape[0]
    if design.kind == "continuous":
        X0, X1 = design.X_by_class
        X = X0[:, None] + values[..., None] * (X1 - X0)[:, None]
        yv = values.astype(float)
    else:
        X = design.X_by_class[values, np.arange(n)[:, None]]
        yv = design.class_values[values]
    y = np.broadcast_to(design.y[:, None], values.shape) if design.role == "covariate" else yv
    return X, y


def _expit(x):
    return 0.5 * (1 + np.tanh(x / 2))


def _augmented(design: Design, comp: Completion, pi: np.ndarray, use_completion: bool = True):
    """All (row, node) pairs plus the labelled rows' gold values: design (N, J+1, p), response
    (N, J+1) and weights (N, J+1) of the doubly robust equation."""
    Xn, yn = node_design(design, comp.values)
    r = design.labelled.astype(float) / pi
    c = comp.probs * (1 - r)[:, None] if use_completion else np.zeros_like(comp.probs)
    z = design.z_filled if design.kind != "continuous" else np.where(design.labelled, design.z, 0.0)
    Xg, yg = design.X(z), design.response(z)
    X = np.concatenate([Xn, Xg[:, None]], 1)
    y = np.concatenate([yn, np.broadcast_to(yg, (len(yg),))[:, None]], 1)
    return X, y, np.concatenate([c, r[:, None]], 1)


def _psi_and_curv(X, y, theta, family):
    """Score ψ = x (y − μ) per (row, node) (N, J, p) and the curvature weights (N, J)."""
    eta = X @ theta
    if family == "gaussian":
        return X * (y - eta)[..., None], np.ones_like(eta)
    mu = _expit(eta)
    return X * (y - mu)[..., None], mu * (1 - mu)


def _solve(X, y, w, family, max_iter=50):
    """θ solving Σ w ψ = 0 (weights may be negative) and the Jacobian H = Σ w v x xᵀ."""
    p = X.shape[-1]
    Xf, yf, wf = X.reshape(-1, p), y.reshape(-1), w.reshape(-1)
    keep = wf != 0
    Xf, yf, wf = Xf[keep], yf[keep], wf[keep]
    theta = np.zeros(p)
    for _ in range(1 if family == "gaussian" else max_iter):
        psi, v = _psi_and_curv(Xf, yf, theta, family)
        H = Xf.T @ ((wf * v)[:, None] * Xf)
        step = _safe_solve(H, (wf[:, None] * psi).sum(0))
        theta = theta + step
        if family == "gaussian" or np.max(np.abs(step)) < 1e-11 * max(1.0, np.max(np.abs(theta))):
            break
    else:
        raise ValueError("the doubly robust logistic equation did not converge; the labelled rows may "
                         "separate the outcome perfectly - check the formula")
    _, v = _psi_and_curv(Xf, yf, theta, family)
    return theta, Xf.T @ ((wf * v)[:, None] * Xf)


def _safe_solve(H, g):
    try:
        return np.linalg.solve(H, g)
    except np.linalg.LinAlgError:
        raise ValueError("the regression's design is singular on these data (collinear columns, or a "
                         "level of a factor that never occurs); drop or merge the offending terms") from None


def _meat(phi: np.ndarray, cluster: np.ndarray | None) -> np.ndarray:
    if cluster is None:
        return phi.T @ phi
    codes, groups = np.unique(cluster, return_inverse=True)
    g = np.zeros((len(codes), phi.shape[1]))
    np.add.at(g, groups, phi)
    G = len(codes)
    return g.T @ g * (G / (G - 1) if G > 1 else 1.0)


def dr_solve(design: Design, comp: Completion, pi: np.ndarray, family: str = "gaussian",
             cluster: np.ndarray | None = None, use_completion: bool = True) -> DRFit:
    """Solve the doubly robust estimating equation; sandwich covariance (clustered if asked).

    ``use_completion=False`` drops m̂: the inverse-probability-weighted labelled-only fit."""
    X, y, w = _augmented(design, comp, pi, use_completion)
    theta, H = _solve(X, y, w, family)
    psi, _ = _psi_and_curv(X, y, theta, family)
    phi = np.einsum("nj,njp->np", w, psi)
    Hinv = np.linalg.inv(H)
    return DRFit(theta, Hinv @ _meat(phi, cluster) @ Hinv.T, phi, H)


def bootstrap_draws(design: Design, comp: Completion, pi: np.ndarray, fit: DRFit, *,
                    family: str = "gaussian", cluster: np.ndarray | None = None, num_draws: int = 1000,
                    seed: int = 0, chunk: int = 100) -> np.ndarray:
    """Bayesian bootstrap of the doubly robust equation: (S, p) draws of θ.

    Row weights are Dirichlet(1, ..., 1) within the labelled rows and within the unlabelled rows
    (each group keeping its size), or per cluster when ``cluster`` is given; the completion law is
    held fixed. Logistic targets take Newton steps from θ̂ until converged."""
    rng = np.random.default_rng(seed)
    X, y, w = _augmented(design, comp, pi)
    n, p = X.shape[0], X.shape[-1]
    if cluster is not None:
        _, groups = np.unique(cluster, return_inverse=True)
        G = groups.max() + 1
    out = []
    for start in range(0, num_draws, chunk):
        s = min(chunk, num_draws - start)
        if cluster is None:
            b = np.empty((s, n))
            for mask in (design.labelled, ~design.labelled):
                e = rng.standard_exponential((s, int(mask.sum())))
                b[:, mask] = e / e.mean(1, keepdims=True)
        else:
            e = rng.standard_exponential((s, G))
            b = (e / e.mean(1, keepdims=True))[:, groups]
        out.append(_weighted_solves(X, y, w, b, family, fit.coef))
    draws = np.concatenate(out)
    if not np.isfinite(draws).all():
        raise ValueError("some Bayesian bootstrap draws did not converge; use interval='sandwich'")
    return draws.reshape(num_draws, p)


def _weighted_solves(X, y, w, b, family, theta0, iters=25):
    """Batched: θ_s solving Σ_i b_si Σ_j w_ij ψ_ij(θ_s) = 0 for each row-weight vector b_s (BLAS
    matrix products over the (row, node) pairs; the outer products x xᵀ are formed once)."""
    s, p = b.shape[0], X.shape[-1]
    J = X.shape[1]
    Xf, yf, wf = X.reshape(-1, p), y.reshape(-1), w.reshape(-1)
    keep = wf != 0
    Xf, yf, wf = Xf[keep], yf[keep], wf[keep]
    bE = np.repeat(b, J, axis=1)[:, keep]                                  # (s, M)
    XX = (Xf[:, :, None] * Xf[:, None, :]).reshape(len(Xf), p * p)
    if family == "gaussian":
        H = (bE * wf) @ XX
        g = (bE * wf) @ (Xf * yf[:, None])
        return np.linalg.solve(H.reshape(s, p, p), g[..., None])[..., 0]
    theta = np.broadcast_to(theta0, (s, p)).copy()
    for _ in range(iters):
        mu = _expit(theta @ Xf.T)                                          # (s, M)
        bw = bE * wf
        g = (bw * (yf - mu)) @ Xf
        H = ((bw * mu * (1 - mu)) @ XX).reshape(s, p, p)
        step = np.linalg.solve(H, g[..., None])[..., 0]
        theta = theta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta


def efficiency_bound(df, formula: str, *, label: str, truth, probs, role: str = "covariate",
                     family: str = "gaussian", prob=None, cluster=None, kind: str = "auto",
                     classes=None) -> dict[str, float]:
    """The semiparametric efficiency bound's standard error of each coefficient, for this corpus.

    With labelling probabilities π_i and the true conditional law ``probs`` of z given the LLM's
    output and W (categorical: (N, K); continuous: (N, 2) = conditional mean and sd), the
    efficient influence function is ``φ = m + (R/π)(ψ − m)`` with ``m = E[ψ | s, W]``; its
    variance, summed over rows (within clusters if given) and averaged over R, is

        Σ_g Ψ_g Ψ_gᵀ + Σ_i (1/π_i − 1) Var(ψ_i | s_i, W_i),

    with Ψ_g the cluster's summed score at the truth, sandwiched by H⁻¹. ``truth`` (N,) is the
    true z of every row (a simulation); θ is taken as the fit on the true data. For benchmarks:
    no estimator that uses only the LLM's output and W can be narrower, asymptotically."""
    design = build_design(df, formula, label=label, role=role, kind=kind, classes=classes)
    truth = np.asarray(truth)
    full_lab = np.ones(len(truth), bool)
    if design.kind == "continuous":
        z_true = truth.astype(float)
        mean, sd = np.asarray(probs, float).T
        values, weights = hermite_nodes(mean, sd)
    else:
        z_true = np.array([design.classes.index(v) if v in design.classes else int(v) for v in truth])
        weights = np.asarray(probs, float)
        values = np.broadcast_to(np.arange(weights.shape[1]), weights.shape).copy()
    oracle = Design(design.role, design.label, design.classes, design.coef_names, full_lab, z_true,
                    design.X_by_class, design.y, design.class_values, design.F, design.feature_names,
                    design.kind)
    pi = labelling_probabilities(prob, df, design)
    gold = Completion(values, weights, {})
    theta, H = _solve(*_augmented(oracle, gold, np.ones(len(truth)), use_completion=False), family)
    Xn, yn = node_design(oracle, values)
    psi_n, _ = _psi_and_curv(Xn, yn, theta, family)                       # (N, J, p)
    m = np.einsum("nj,njp->np", weights, psi_n)
    dev = psi_n - m[:, None]
    cond_var = np.einsum("nj,njp,njq->npq", weights, dev, dev)
    Xg, yg = oracle.X(z_true), oracle.response(z_true)
    psi, _ = _psi_and_curv(Xg, yg, theta, family)
    meat = _meat(psi, None if cluster is None else np.asarray(df[cluster] if isinstance(cluster, str)
                                                             else cluster))
    meat = meat + np.einsum("n,npq->pq", 1 / pi - 1, cond_var)
    Hinv = np.linalg.inv(H)
    sd = np.sqrt(np.diag(Hinv @ meat @ Hinv.T))
    return dict(zip(design.coef_names, map(float, sd), strict=True))


def labelling_probabilities(prob, df, design: Design) -> np.ndarray:
    """Labelling probabilities: a column name, an array, or None (n/N for every row)."""
    n = len(design.labelled)
    if prob is None:
        return np.full(n, design.labelled.mean())
    p = as_array(df[prob] if isinstance(prob, str) else prob, "prob=").astype(float).reshape(-1)
    if p.shape != (n,):
        raise ValueError(f"prob= must give one labelling probability per row ({n}); got shape {p.shape}")
    bad = ~np.isfinite(p) | (p <= 0) | (p > 1)
    if bad.any():
        raise ValueError(f"labelling probabilities must lie in (0, 1]; {int(bad.sum())} do not "
                         f"(first at row {int(np.flatnonzero(bad)[0])}: {p[bad][0]!r})")
    return p



def fit_dr(design: Design, *, scores: np.ndarray | None, labels: np.ndarray | None,
           spread: np.ndarray | None = None, pi: np.ndarray | None = None, family: str = "gaussian",
           cluster: np.ndarray | None = None, folds: int = 5, splits: int = 5, prior_sd: float = 2.5,
           num_draws: int = 1000, seed: int = 0, crossfit: bool = True
           ) -> tuple[DRFit, np.ndarray | None, Completion]:
    """The default estimator end to end: completion features from the LLM's output and W; for each
    of ``splits`` random fold splits, the cross-fitted completion law and the doubly robust solve
    with its sandwich; the splits combined as double/debiased machine learning and DSL do
    (coordinate-wise median estimate; covariance the element-wise median of
    ``V_s + (θ_s − θ)(θ_s − θ)ᵀ``, so that the split-to-split spread counts); and, with
    ``num_draws`` > 0, Bayesian bootstrap draws pooled evenly over the splits. Returns the fit,
    the draws and the completion law averaged over the splits. ``extra`` holds the completion
    model's held-out calibration, the inverse-probability-weighted labelled-only fit's standard
    errors and the effective number of labelled rows (n × Var(labelled only) / Var(dr))."""
    from .calibration import crossfit_completion, features

    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    pi = np.full(len(design.labelled), design.labelled.mean()) if pi is None else pi
    names = design.feature_names
    has_y = design.role == "covariate" and names[-1] == "<y>"
    W = design.F[:, 1:-1] if has_y else design.F[:, 1:]
    y = design.F[:, -1] if has_y else None
    F = features(scores, labels, spread, W, y, design.labelled)
    continuous = design.kind == "continuous"
    z = np.where(design.labelled, design.z, 0.0) if continuous else design.z_filled
    comps, fits, draws = [], [], []
    rng = np.random.default_rng(seed)
    for _ in range(splits if crossfit else 1):
        comp = crossfit_completion(F, z, design.labelled, num_classes=max(design.num_classes, 1),
                                   continuous=continuous, folds=folds, splits=1, prior_sd=prior_sd,
                                   weights=1 / pi, seed=int(rng.integers(2 ** 31)), crossfit=crossfit,
                                   groups=cluster)
        fit = dr_solve(design, comp, pi, family, cluster)
        comps.append(comp)
        fits.append(fit)
    coef, cov = combine_splits([f.coef for f in fits], [f.cov for f in fits])
    for i, (comp, fit) in enumerate(zip(comps, fits, strict=True)):
        share = num_draws // len(fits) + (i < num_draws % len(fits))
        if share:
            draws.append(bootstrap_draws(design, comp, pi, fit, family=family, cluster=cluster,
                                         num_draws=share, seed=seed * 1009 + i))
    mean_comp = Completion(comps[0].values, np.mean([c.probs for c in comps], 0),
                           {k: float(np.mean([c.info[k] for c in comps])) for k in comps[0].info})
    ipw = dr_solve(design, comps[0], pi, family, cluster, use_completion=False)
    n_lab = int(design.labelled.sum())
    var, var_lab = np.diag(cov), np.diag(ipw.cov)
    extra = dict(mean_comp.info, splits=len(fits), labelled_only_se=np.sqrt(var_lab),
                 labelled_only_coef=ipw.coef, split_coefs=np.array([f.coef for f in fits]),
                 effective_labelled=n_lab * var_lab / np.where(var > 0, var, np.nan))
    phi = np.mean([f.phi for f in fits], 0)
    fit = DRFit(coef, cov, phi, np.mean([f.H for f in fits], 0), extra)
    return fit, (np.concatenate(draws) if draws else None), mean_comp


def combine_splits(coefs: list[np.ndarray], covs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Median aggregation over sample splits (Chernozhukov et al. 2018; DSL): θ = median θ_s and
    V = median_s [V_s + (θ_s − θ)(θ_s − θ)ᵀ] element-wise, symmetrised and, if needed, lifted to
    the nearest positive semi-definite matrix with the same diagonal."""
    coefs = np.asarray(coefs)
    theta = np.median(coefs, 0)
    dev = coefs - theta
    V = np.median(np.asarray(covs) + dev[:, :, None] * dev[:, None, :], 0)
    V = (V + V.T) / 2
    w, U = np.linalg.eigh(V)
    if w.min() < 0:
        d = np.sqrt(np.diag(V))
        V = (U * np.clip(w, 0, None)) @ U.T
        s = np.sqrt(np.clip(np.diag(V), 1e-300, None))
        V = V * np.outer(d / s, d / s)
    return theta, V
