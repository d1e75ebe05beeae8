"""The cross-fitted completion model ``p(z | LLM output, posterior spread, W)`` of the doubly
robust estimator (:mod:`.dr`).

It is fitted *directly* on labelled rows - a multinomial logistic model for a categorical z, a
Gaussian linear model for a continuous one - never on the rows it is applied to: the labelled
rows are split into folds and the rows of fold k (labelled and unlabelled) get the probabilities
of the model fitted on the other folds' labelled rows. The split is repeated ``splits`` times
and the probabilities averaged; each split's model still never saw the row it is applied to, so
the average is a cross-fitted prediction as well, with less split-to-split noise.

Features (:func:`features`): a restricted cubic spline of each LLM score (its log-odds against
the reference class; indicator columns when only coded labels are given), the log of the
posterior spread, the regression's other variables W (covariates Q, and Y in the covariate
role) and their products with the score (the LLM's errors may depend on them) and, in the
covariate role, Y times the covariates (interactions of the target formula). Columns are
standardised; a ``Normal(0, prior_sd**2)`` prior (ridge) on every coefficient but the intercept
keeps near-separation at bay. None of this has to be right for validity: the correction term of
the doubly robust estimator removes the bias of a wrong completion model; a better one narrows
the interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .crossfit import assign_folds

__all__ = ["Completion", "crossfit_completion", "features", "fit_gaussian", "fit_multinomial",
           "fold_split", "hermite_nodes", "spline_basis"]

HERMITE_NODES = 9


@dataclass(frozen=True)
class Completion:
    """A discrete law for every row's z: ``values`` (N, J) and ``probs`` (N, J), rows summing to 1.

    A categorical z has J = K nodes (the class indices 0..K-1 in every row); a continuous z the
    Gauss-Hermite nodes of its Gaussian completion ``N(mean_i, sd²)``, exact for scores at most
    quadratic in z (a linear target) and accurate for smooth ones (a logistic target).
    """

    values: np.ndarray
    probs: np.ndarray
    info: dict


def spline_basis(x: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Restricted (natural) cubic spline basis of ``x`` without the linear term: (N, len(knots) - 2)
    columns, linear beyond the outer knots (Harrell's parametrisation)."""
    k = np.asarray(knots, dtype=float)
    if len(k) < 3:
        return np.zeros((len(x), 0))
    scale = (k[-1] - k[0]) ** 2 or 1.0

    def cube(u):
        return np.clip(u, 0, None) ** 3

    last, prev = k[-1], k[-2]
    cols = [(cube(x - kj) - cube(x - prev) * (last - kj) / (last - prev)
             + cube(x - last) * (prev - kj) / (last - prev)) / scale for kj in k[:-2]]
    return np.column_stack(cols)


def _spline(x: np.ndarray, fit_rows: np.ndarray, num_knots: int) -> np.ndarray:
    knots = np.unique(np.quantile(x[fit_rows], np.linspace(0.05, 0.95, num_knots)))
    return np.column_stack([x, spline_basis(x, knots)])


def features(scores: np.ndarray | None, labels: np.ndarray | None, spread: np.ndarray | None,
             W: np.ndarray, y: np.ndarray | None, labelled: np.ndarray, num_knots: int = 4,
             max_products: int = 40) -> np.ndarray:
    """The completion model's design (N, f), intercept first, other columns standardised.

    ``scores`` (N, d) LLM log-odds (or None), ``labels`` (N,) coded class indices used when there
    are no scores, ``spread`` (N,) posterior spread or None, ``W`` (N, q) the regression's other
    variables without intercept, ``y`` (N,) the outcome in the covariate role (or None)."""
    n = len(W)
    llm = []
    if scores is not None:
        for col in np.asarray(scores, float).reshape(n, -1).T:
            llm.append(_spline(col, labelled, num_knots))
    elif labels is not None:
        levels = np.unique(labels[labelled])
        llm.append((labels[:, None] == levels[None, 1:]).astype(float))
    llm = np.column_stack(llm) if llm else np.zeros((n, 0))
    lin = llm[:, :1] if scores is not None else llm
    others = [W] + ([y[:, None]] if y is not None else [])
    others = np.column_stack(others) if any(o.shape[1] for o in others) else np.zeros((n, 0))
    cols = [llm, others]
    if spread is not None and np.ptp(spread) > 0:
        s = np.log(np.asarray(spread, float) + 1e-3 * max(np.median(spread), 1e-6))
        cols += [s[:, None], s[:, None] * lin]
    products = [lin[:, [a]] * others[:, [b]] for a in range(lin.shape[1]) for b in range(others.shape[1])]
    if y is not None and W.shape[1]:
        products += [y[:, None] * W]
    prod = np.column_stack(products) if products else np.zeros((n, 0))
    cols.append(prod[:, :max_products])
    X = np.column_stack(cols)
    X = X[:, np.ptp(X, axis=0) > 0]
    sd = X.std(0)
    return np.column_stack([np.ones(n), (X - X.mean(0)) / sd])


def fit_multinomial(F: np.ndarray, z: np.ndarray, num_classes: int, prior_sd: float = 2.5,
                    weights: np.ndarray | None = None, max_iter: int = 100) -> np.ndarray:
    """Ridge-penalised multinomial logistic regression by Newton: (f, K-1) coefficients, class 0
    the reference; the intercept (column 0) is not penalised. ``prior_sd=np.inf`` is the MLE."""
    n, f = F.shape
    k = num_classes - 1
    w = np.ones(n) if weights is None else np.asarray(weights, float)
    Y = (z[:, None] == np.arange(1, num_classes)[None]).astype(float)
    prec = np.full(f, 0.0 if np.isinf(prior_sd) else prior_sd ** -2.0)
    prec[0] = 0.0
    P = np.kron(np.eye(k), np.diag(prec))                       # column-major over classes
    beta = np.zeros((f, k))
    for _ in range(max_iter):
        eta = np.column_stack([np.zeros(n), F @ beta])
        p = np.exp(eta - eta.max(1, keepdims=True))
        p = (p / p.sum(1, keepdims=True))[:, 1:]
        grad = (F.T @ (w[:, None] * (Y - p))).T.reshape(-1) - P @ beta.T.reshape(-1)
        H = np.empty((k * f, k * f))
        for a in range(k):
            for b in range(k):
                v = p[:, a] * ((a == b) - p[:, b]) * w
                H[a * f:(a + 1) * f, b * f:(b + 1) * f] = F.T @ (v[:, None] * F)
        H += P + 1e-10 * np.eye(k * f)
        step = np.linalg.solve(H, grad)
        beta = beta + step.reshape(k, f).T
        if np.max(np.abs(step)) < 1e-10 * max(1.0, np.max(np.abs(beta))):
            break
    return beta


def multinomial_probs(F: np.ndarray, beta: np.ndarray) -> np.ndarray:
    eta = np.column_stack([np.zeros(len(F)), F @ beta])
    p = np.exp(eta - eta.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def fit_gaussian(F: np.ndarray, z: np.ndarray, prior_sd: float = 2.5,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Ridge linear regression of a continuous z (standardised inside): coefficients and residual sd."""
    w = np.ones(len(z)) if weights is None else np.asarray(weights, float)
    mu, sd = np.average(z, weights=w), np.sqrt(np.average((z - np.average(z, weights=w)) ** 2, weights=w))
    sd = sd if sd > 0 else 1.0
    t = (z - mu) / sd
    prec = np.full(F.shape[1], 0.0 if np.isinf(prior_sd) else prior_sd ** -2.0)
    prec[0] = 0.0
    beta = np.linalg.solve(F.T @ (w[:, None] * F) + np.diag(prec) + 1e-10 * np.eye(F.shape[1]),
                           F.T @ (w * t))
    resid = np.sqrt(np.average((t - F @ beta) ** 2, weights=w) * len(z) / max(len(z) - F.shape[1], 1))
    return np.concatenate([[mu, sd], beta]), float(resid * sd)


def hermite_nodes(mean: np.ndarray, sd: np.ndarray | float, num: int = HERMITE_NODES):
    """Nodes (N, J) and weights (N, J) of ``N(mean, sd²)`` by Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(num)
    w = w / w.sum()
    sd = np.broadcast_to(np.asarray(sd, float), mean.shape)
    return mean[:, None] + sd[:, None] * x[None], np.broadcast_to(w, (len(mean), num)).copy()


def fold_split(labelled: np.ndarray, folds: int, rng, groups: np.ndarray | None = None) -> np.ndarray:
    """A fold per row: labelled rows in near-equal random folds and unlabelled rows at random, or,
    with ``groups`` (cluster codes), whole clusters to folds so that a cluster's rows are never
    on both sides of a split."""
    if groups is not None:
        codes, inv = np.unique(groups, return_inverse=True)
        return rng.permutation(np.arange(len(codes)) % folds)[inv]
    return assign_folds(labelled, folds, rng)


def crossfit_completion(F: np.ndarray, z: np.ndarray, labelled: np.ndarray, *, num_classes: int,
                        continuous: bool = False, folds: int = 5, splits: int = 5, prior_sd: float = 2.5,
                        weights: np.ndarray | None = None, seed: int = 0, crossfit: bool = True,
                        groups: np.ndarray | None = None) -> Completion:
    """Cross-fitted completion law of every row, averaged over ``splits`` random fold splits (the
    doubly robust estimator combines single splits itself, see :func:`.dr.fit_dr`).

    ``F`` (N, f) from :func:`features`; ``z`` (N,) gold class indices (or values) where
    ``labelled``; ``weights`` optional per-row weights of the labelled rows' fit (e.g. 1/π so
    that the fit targets the corpus). ``crossfit=False`` fits once on all labelled rows and
    applies it everywhere (for tests of the algebra only: the correction term is then not free
    of the rows' own labels). ``groups``: cluster codes; folds then hold whole clusters. Also
    returns, in ``info``, the held-out log-loss of the labelled
    rows (their cross-fitted probabilities) and that of the marginal class frequencies."""
    labelled = np.asarray(labelled, bool)
    n_lab = int(labelled.sum())
    if crossfit and n_lab < 2 * folds:
        raise ValueError(f"{n_lab} labelled rows are too few for {folds} completion folds; label more rows "
                         "or pass completion_folds=2")
    rng = np.random.default_rng(seed)
    w = np.ones(len(z)) if weights is None else np.asarray(weights, float)
    acc_mean = np.zeros(len(z)) if continuous else np.zeros((len(z), num_classes))
    acc_var = np.zeros(len(z))
    plans = ([np.zeros(len(z), int)] if not crossfit
             else [fold_split(labelled, folds, rng, groups) for _ in range(splits)])
    for ids in plans:
        for k in np.unique(ids):
            train = labelled & (ids != k) if crossfit else labelled
            if crossfit and not train.any():
                raise ValueError(f"completion fold {k} leaves no labelled rows to fit on; use fewer folds")
            rows = ids == k
            zt = z[train] if continuous else z[train].astype(int)
            if continuous:
                beta, resid = fit_gaussian(F[train], zt, prior_sd, w[train])
                acc_mean[rows] += beta[0] + beta[1] * (F[rows] @ beta[2:])
                acc_var[rows] += resid ** 2
            else:
                seen = np.unique(zt)
                if len(seen) < num_classes:
                    raise ValueError(f"the completion model's training rows of fold {k} miss class(es) "
                                     f"{sorted(set(range(num_classes)) - set(seen.tolist()))}; every class "
                                     "needs labelled rows in every fold - label more rows of the rare class "
                                     "or use fewer completion folds")
                beta = fit_multinomial(F[train], zt, num_classes, prior_sd, w[train])
                acc_mean[rows] += multinomial_probs(F[rows], beta)
    acc_mean /= len(plans)
    info = {"completion_folds": folds if crossfit else 1, "completion_splits": len(plans),
            "completion_features": F.shape[1]}
    if continuous:
        sd = np.sqrt(acc_var / len(plans))
        values, probs = hermite_nodes(acc_mean, sd)
        resid = z[labelled] - acc_mean[labelled]
        info.update(completion_rmse=float(np.sqrt(np.mean(resid ** 2))),
                    completion_r2=float(1 - np.var(resid) / max(np.var(z[labelled]), 1e-300)))
        return Completion(values, probs, info)
    zl = z[labelled].astype(int)
    p_lab = np.clip(acc_mean[labelled, zl], 1e-12, None)
    freq = np.bincount(zl, minlength=num_classes) / n_lab
    info.update(completion_log_loss=float(-np.mean(np.log(p_lab))),
                marginal_log_loss=float(-np.mean(np.log(np.clip(freq[zl], 1e-12, None)))),
                completion_brier=float(np.mean(np.sum((acc_mean[labelled]
                                                       - np.eye(num_classes)[zl]) ** 2, 1))))
    values = np.broadcast_to(np.arange(num_classes), acc_mean.shape).copy()
    return Completion(values, acc_mean, info)
