"""Classical (frequentist) baselines for a regression with an LLM-coded variable z.

Covariate role: ``Y = z·γ + Q·β + ε``; outcome role: ``z = Q·β + ε``. ``n`` labelled rows carry
the gold z, every row carries the prediction ẑ. All estimators take design matrices that are
already built (intercept included as a column if wanted):

* ``X_lab, y_lab``   (n×p, n): gold design/response on the labelled rows;
* ``Xh_lab, yh_lab`` (n×p, n): the same rows with ẑ in place of z;
* ``Xh_unl, yh_unl`` (m×p, m): the unlabelled rows with ẑ.

Covariances are sandwich (influence-function) estimates with 1/n normalisation: each fit gives
per-row contributions ``ψ_i = H⁻¹ x_i r_i`` with ``H = Σ_i w_i x_i x_i'`` (OLS) or
``Σ_i w_i μ_i(1-μ_i) x_i x_i'`` (logistic) and ``r_i`` the residual, so that ``θ̂ - θ ≈ Σ_i ψ_i``
and ``cov = Σ_i ψ_i ψ_i'`` (= HC0).

References
----------
* Angelopoulos, Bates, Fannjiang, Jordan, Zrnic (2023). Prediction-powered inference. Science.
* Angelopoulos, Duchi, Zrnic (2023). PPI++: Efficient prediction-powered inference. arXiv:2311.01453.
* Kluger, Lu, Zrnic, Wang, Bates (2025). Prediction-powered inference with imputed covariates
  and nonuniform sampling (predict-then-debias). arXiv:2501.18577.
* White (1980); MacKinnon & White (1985) for HC0/HC1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

__all__ = ["Estimate", "ols", "logistic", "naive", "labelled_only", "ptd", "ppi_mean", "fit_glm"]

FAMILIES = ("gaussian", "binomial")


@dataclass(frozen=True)
class Estimate:
    """A point estimate ``coef`` (p,) with covariance ``cov`` (p×p)."""

    coef: np.ndarray
    cov: np.ndarray
    method: str
    extra: dict = field(default_factory=dict)

    def se(self) -> np.ndarray:
        return np.sqrt(np.diag(self.cov))

    def ci(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Normal-approximation interval ``coef ± z_{(1+level)/2} · se``."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        half = NormalDist().inv_cdf(0.5 + level / 2) * self.se()
        return self.coef - half, self.coef + half


# ---------------------------------------------------------------- input checks
def _arr(a, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    bad = int(np.size(a) - np.isfinite(a).sum())
    if bad:
        raise ValueError(f"{name} has {bad} NaN/inf value(s); drop or impute those rows first")
    return a


def _xy(X, y, nx: str, ny: str, w=None):
    X, y = _arr(X, nx, 2), _arr(y, ny, 1)
    n, p = X.shape
    if y.shape[0] != n:
        raise ValueError(f"{nx} has {n} rows but {ny} has {y.shape[0]}; they must describe the same rows")
    if n < p + 1:
        raise ValueError(f"{nx} has n={n} rows for p={p} columns; need n >= p+1 (more rows or fewer columns)")
    if w is not None:
        w = _arr(w, "weights", 1)
        if w.shape[0] != n or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"weights must be {n} non-negative numbers with a positive sum")
    if np.linalg.matrix_rank(X if w is None else X[w > 0]) < p:
        raise ValueError(f"{nx} is rank deficient (collinear columns); drop redundant columns")
    return X, y, w


def _family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _binary(y: np.ndarray, name: str, soft: bool = False) -> None:
    ok = ((y >= 0) & (y <= 1)) if soft else ((y == 0) | (y == 1))
    if not ok.all():
        kind = "in [0, 1]" if soft else "0 or 1"
        raise ValueError(f"family='binomial' needs {name} {kind}; {int((~ok).sum())} value(s) are not")


# ---------------------------------------------------------------- single fits
def fit_glm(X, y, family, w=None, max_iter=50, tol=1e-10):
    """Return ``(coef, H⁻¹, psi)``: coefficients, inverse Hessian, per-row contributions ψ_i."""
    w = np.ones(len(y)) if w is None else w
    if family == "gaussian":
        Hinv = np.linalg.inv(X.T @ (w[:, None] * X))
        coef = Hinv @ (X.T @ (w * y))
        return coef, Hinv, (X * (y - X @ coef)[:, None]) @ Hinv
    coef = np.zeros(X.shape[1])
    for _ in range(max_iter):
        eta = X @ coef
        mu = 0.5 * (1 + np.tanh(eta / 2))  # stable expit
        H = X.T @ ((w * mu * (1 - mu))[:, None] * X)
        try:
            step = np.linalg.solve(H, X.T @ (w * (y - mu)))
        except np.linalg.LinAlgError:
            break
        if not np.all(np.isfinite(step)):
            break
        coef = coef + step
        if np.max(np.abs(step)) < tol * max(1.0, np.max(np.abs(coef))):
            mu = 0.5 * (1 + np.tanh(X @ coef / 2))
            Hinv = np.linalg.inv(X.T @ ((w * mu * (1 - mu))[:, None] * X))
            return coef, Hinv, (X * (y - mu)[:, None]) @ Hinv
    if np.max(np.abs(X @ coef)) > 15:
        raise ValueError("logistic: perfect or quasi-perfect separation (fitted probabilities reach 0 or 1, "
                         "coefficients diverge); drop or merge the separating column(s) or use penalised fit")
    raise ValueError(f"logistic: IRLS did not converge in max_iter={max_iter} iterations; raise max_iter")


def ols(X, y, weights=None, cov_type: str = "HC0") -> Estimate:
    """Least squares ``β̂ = (X'WX)⁻¹X'Wy`` with frequency weights W (a weight k = k copies of the row).

    ``"HC0"``: ``H⁻¹ (Σ w x x' r²) H⁻¹``, ``H = X'WX``; ``"HC1"``: HC0·N/(N-p), ``N = Σ w``;
    ``"nonrobust"``: ``σ̂² H⁻¹``, ``σ̂² = Σ w r² / (N-p)``.
    """
    X, y, w = _xy(X, y, "X", "y", weights)
    if cov_type not in ("HC0", "HC1", "nonrobust"):
        raise ValueError(f"cov_type must be 'HC0', 'HC1' or 'nonrobust', got {cov_type!r}")
    w = np.ones(len(y)) if w is None else w
    coef, Hinv, psi = fit_glm(X, y, "gaussian", w)
    N, p = w.sum(), X.shape[1]
    cov = psi.T @ (w[:, None] * psi)
    if cov_type == "HC1":
        cov = cov * N / (N - p)
    elif cov_type == "nonrobust":
        cov = Hinv * (w @ (y - X @ coef) ** 2) / (N - p)
    return Estimate(coef, cov, f"ols[{cov_type}]", {"n": len(y)})


def logistic(X, y, weights=None, max_iter: int = 50, tol: float = 1e-10) -> Estimate:
    """Logistic regression by Newton/IRLS (frequency weights).

    HC0 sandwich ``H⁻¹ (Σ w x x' (y-μ)²) H⁻¹`` with ``H = Σ w μ(1-μ) x x'``."""
    X, y, w = _xy(X, y, "X", "y", weights)
    _binary(y, "y")
    w = np.ones(len(y)) if w is None else w
    coef, _, psi = fit_glm(X, y, "binomial", w, max_iter, tol)
    return Estimate(coef, psi.T @ (w[:, None] * psi), "logistic[HC0]", {"n": len(y)})


def _one(X, y, family, method, nx="X", ny="y"):
    _family(family)
    X, y, _ = _xy(X, y, nx, ny)
    if family == "binomial":
        _binary(y, ny, soft=ny.startswith("yh"))
    coef, _, psi = fit_glm(X, y, family)
    return Estimate(coef, psi.T @ psi, method, {"n": len(y)})


def labelled_only(X_lab, y_lab, family: str = "gaussian") -> Estimate:
    """The gold fit on the n labelled rows only (HC0)."""
    return _one(X_lab, y_lab, family, "labelled_only", "X_lab", "y_lab")


def naive(X_lab, y_lab, Xh_lab, yh_lab, Xh_unl, yh_unl, family: str = "gaussian") -> Estimate:
    """Plug-in: fit on all n+m rows with the predictions everywhere (gold values ignored; HC0).

    ``X_lab, y_lab`` are accepted for a uniform interface and only validated."""
    _xy(X_lab, y_lab, "X_lab", "y_lab")
    X = np.vstack([_arr(Xh_lab, "Xh_lab", 2), _arr(Xh_unl, "Xh_unl", 2)])
    y = np.concatenate([_arr(yh_lab, "yh_lab", 1), _arr(yh_unl, "yh_unl", 1)])
    return _one(X, y, family, "naive", "Xh_lab/Xh_unl stacked", "yh_lab/yh_unl stacked")


def ptd(X_lab, y_lab, Xh_lab, yh_lab, Xh_unl, yh_unl, family: str = "gaussian", lam="tuned",
        coord: int | None = None, impute_on: str = "unlabelled") -> Estimate:
    """Prediction-powered / predict-then-debias estimate (difference of M-estimators).

    ``θ̂ = θ̂(X_lab, y_lab) - λ·[θ̂(Xh_lab, yh_lab) - θ̂_imp]`` with ``θ̂_imp = θ̂(Xh_unl, yh_unl)``
    (PPI/PPI++, ``impute_on="unlabelled"``) or the fit on all n+m rows with predictions
    (Kluger et al.'s PTD, ``impute_on="all"``). Treating the n+m rows as independent, the
    per-row contributions are ``a_i = ψ_i^gold`` (0 on unlabelled rows) and
    ``b_i = ψ_i^pred - ψ_i^imp`` (labelled) / ``-ψ_j^imp`` (unlabelled), so
    ``θ̂ - θ ≈ Σ (a_i - λ b_i)`` and ``cov(λ) = Σ (a_i - λb_i)(a_i - λb_i)'``: the gold and
    prediction fits on the same labelled rows are correlated and that covariance counts.
    ``lam="tuned"`` minimises ``tr cov(λ)`` (or ``cov(λ)[coord, coord]``):
    ``λ* = Σ a·b / Σ |b|²`` clipped to [0, 1] (PPI++ power tuning); ``lam=1`` is plain PPI,
    ``lam=0`` the labelled-only fit. ``family="binomial"`` uses logistic fits (gold y in {0,1},
    predicted y may be probabilities in [0, 1]).
    """
    _family(family)
    if impute_on not in ("unlabelled", "all"):
        raise ValueError(f"impute_on must be 'unlabelled' or 'all', got {impute_on!r}")
    X, y, _ = _xy(X_lab, y_lab, "X_lab", "y_lab")
    Xh, yh, _ = _xy(Xh_lab, yh_lab, "Xh_lab", "yh_lab")
    Xu, yu, _ = _xy(Xh_unl, yh_unl, "Xh_unl", "yh_unl")
    if Xh.shape != X.shape or Xu.shape[1] != X.shape[1]:
        raise ValueError(f"shapes disagree: X_lab {X.shape}, Xh_lab {Xh.shape}, Xh_unl {Xu.shape}; "
                         "all need the same columns and X_lab/Xh_lab the same rows")
    if family == "binomial":
        _binary(y, "y_lab")
        _binary(yh, "yh_lab", soft=True)
        _binary(yu, "yh_unl", soft=True)
    n = len(y)
    coef_g, _, a = fit_glm(X, y, family)
    coef_p, _, b = fit_glm(Xh, yh, family)
    if impute_on == "all":
        coef_i, _, c = fit_glm(np.vstack([Xh, Xu]), np.concatenate([yh, yu]), family)
    else:
        coef_i, _, c = fit_glm(Xu, yu, family)
        c = np.vstack([np.zeros_like(b), c])
    a = np.vstack([a, np.zeros((len(yu), len(coef_g)))])
    b = np.vstack([b, np.zeros((len(yu), len(coef_g)))]) - c
    if isinstance(lam, str):
        if lam != "tuned":
            raise ValueError(f"lam must be 'tuned' or a float, got {lam!r}")
        if coord is not None and not 0 <= coord < X.shape[1]:
            raise ValueError(f"coord must index one of the {X.shape[1]} coefficients, got {coord}")
        k = slice(None) if coord is None else [coord]
        den = np.sum(b[:, k] ** 2)
        lam = float(np.clip(np.sum(a[:, k] * b[:, k]) / den, 0.0, 1.0)) if den > 0 else 0.0
    lam = float(lam)
    coef = coef_g - lam * (coef_p - coef_i)
    d = a - lam * b
    extra = {"lam": lam, "n": n, "m": len(yu), "impute_on": impute_on,
             "coef_gold": coef_g, "coef_pred_lab": coef_p, "coef_imputed": coef_i}
    return Estimate(coef, d.T @ d, "ptd", extra)


def ppi_mean(y_lab, yh_lab, yh_unl, lam="tuned") -> Estimate:
    """PPI++ mean: ``ȳ_lab - λ(ŷ̄_lab - ŷ̄_unl)`` = :func:`ptd` with a one-column X of ones."""
    n, m = len(_arr(y_lab, "y_lab", 1)), len(_arr(yh_unl, "yh_unl", 1))
    est = ptd(np.ones((n, 1)), y_lab, np.ones((n, 1)), yh_lab, np.ones((m, 1)), yh_unl, lam=lam)
    return Estimate(est.coef, est.cov, "ppi_mean", est.extra)
