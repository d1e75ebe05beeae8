"""The estimators behind :func:`~pyro_llm.regression.regress`, one function per method, each
returning a :class:`~.result.RegressionResult`.

* ``dr`` (default): the cut, cross-fitted, doubly robust estimator (:mod:`.dr`); valid by design.
* ``ptd``: PPI++ / predict-then-debias (:func:`.estimators.ptd`), fed the LLM's probabilities when it
  has them (the expected design ``Σ_k p_k X(k)``), its coded labels otherwise.
* ``labelled_only``, ``naive``: the two ends.
* ``mi``: multiple imputation from the cross-fitted completion model ``p(z | LLM output, Q, Y)``
  (Rubin's rules); it conditions on Y, unlike imputation from ``p(z | text)`` alone, but its
  validity rests on the completion model being right.
* ``joint``: the generative completion model over all rows (:mod:`.completion`, :mod:`.joint`);
  narrow when its measurement model's form is right, biased when it is not - opt-in, with a
  Hausman-type comparison against ``dr`` that warns when they disagree.
"""

from __future__ import annotations

import warnings
from statistics import NormalDist

import numpy as np
import torch

from . import estimators as est
from .design import Design
from .dr import fit_dr
from .joint import joint_draws
from .outputs import LLMOutputs
from .result import RegressionResult

__all__ = ["HAUSMAN_ALPHA", "expected_design", "hausman", "run_baseline", "run_dr", "run_joint", "run_mi"]

HAUSMAN_ALPHA = 0.01


def run_dr(design: Design, out: LLMOutputs, *, pi, family, cluster, level, interval, num_draws, folds,
           splits, prior_sd, seed, info) -> RegressionResult:
    if interval == "bootstrap" and not num_draws:
        raise ValueError("interval='bootstrap' needs num_draws > 0 (the Bayesian bootstrap draws)")
    fit, draws, _ = fit_dr(design, scores=out.scores, labels=out.labels, spread=out.spread, pi=pi,
                           family=family, cluster=cluster, folds=folds, splits=splits, prior_sd=prior_sd,
                           num_draws=num_draws, seed=seed)
    info = dict(info, **fit.extra, interval=interval)
    return RegressionResult("dr", design.coef_names, fit.coef, fit.cov, level, draws, info,
                            interval_kind="quantile" if interval == "bootstrap" else "normal")


def expected_design(design: Design, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``E[X(z)]`` and ``E[y(z)]`` under per-row class probabilities (N, K)."""
    Xh = np.einsum("nk,knp->np", probs, design.X_by_class)
    yh = design.y if design.role == "covariate" else probs @ design.class_values
    return Xh, yh


def run_baseline(design: Design, out: LLMOutputs, method: str, *, family, coord, level, info):
    """``labelled_only``, ``naive`` or ``ptd`` on the coded labels or, with probabilities, the
    expected design."""
    if out.probs is not None and design.kind != "continuous":
        Xh, yh = expected_design(design, out.probs)
    else:
        Xh, yh = design.X(out.labels), design.response(out.labels)
    lab = design.labelled
    X_gold, y_gold = design.gold()
    try:
        if method == "labelled_only":
            fit = est.labelled_only(X_gold, y_gold, family=family)
        elif method == "naive":
            fit = est.naive(X_gold, y_gold, Xh[lab], yh[lab], Xh[~lab], yh[~lab], family=family)
        else:
            fit = est.ptd(X_gold, y_gold, Xh[lab], yh[lab], Xh[~lab], yh[~lab], family=family, coord=coord)
    except ValueError as err:
        if "rank deficient" in str(err) and "Xh" in str(err):
            raise ValueError(f"method={method!r}: the design with the LLM's codes is rank deficient - the "
                             "LLM coded (nearly) every row as one class, so its codes carry no information; "
                             "check the coder (its accuracy per fold), or use method='dr', which stays "
                             "valid with a useless coder") from None
        raise
    info = dict(info, **fit.extra, predictions_used="probabilities" if out.probs is not None else "labels")
    return RegressionResult(method, design.coef_names, fit.coef, fit.cov, level, None, info)


def run_mi(design: Design, out: LLMOutputs, *, pi, family, level, folds, splits, prior_sd, seed, info,
           num_imputations: int = 50) -> RegressionResult:
    """Rubin's rules over data sets completed from the cross-fitted completion model."""
    _, _, comp = fit_dr(design, scores=out.scores, labels=out.labels, spread=out.spread, pi=pi,
                        family=family, folds=folds, splits=splits, prior_sd=prior_sd, num_draws=0, seed=seed)
    rng = np.random.default_rng(seed)
    unl = ~design.labelled
    continuous = design.kind == "continuous"
    coefs, within = [], []
    for _ in range(num_imputations):
        if continuous:
            mean = (comp.probs * comp.values).sum(1)
            sd = np.sqrt((comp.probs * (comp.values - mean[:, None]) ** 2).sum(1))
            z = np.where(design.labelled, design.z, 0.0)
            z[unl] = rng.normal(mean[unl], sd[unl])
        else:
            z = design.z_filled.copy()
            u = rng.random(int(unl.sum()))[:, None]
            z[unl] = (comp.probs[unl].cumsum(-1) < u).sum(-1).clip(max=design.num_classes - 1)
        fit = (est.ols if family == "gaussian" else est.logistic)(design.X(z), design.response(z))
        coefs.append(fit.coef)
        within.append(fit.cov)
    coefs = np.array(coefs)
    between = np.atleast_2d(np.cov(coefs.T, ddof=1))
    cov = np.mean(within, 0) + (1 + 1 / num_imputations) * between
    return RegressionResult("mi", design.coef_names, coefs.mean(0), cov, level, None,
                            dict(info, imputations=num_imputations, **comp.info))


def run_joint(design: Design, out: LLMOutputs, m: torch.Tensor, *, measurement, dim, family, num_draws,
              importance, seed, level, info, dr: RegressionResult | None) -> RegressionResult:
    """The generative joint model, compared with the doubly robust estimate ``dr`` (Hausman)."""
    draws, post, ess = joint_draws(design, m, measurement=measurement, dim=dim, family=family,
                                   num_draws=num_draws, seed=seed, importance=importance)
    info = dict(info, measurement=measurement, completion_features=design.feature_names,
                neg_log_joint=post.neg_log_joint, importance_ess=ess)
    if importance and ess < 0.05 * num_draws:
        warnings.warn(f"the completion model's Laplace approximation is poor here (importance ESS "
                      f"{ess:.0f} of {num_draws} draws); the interval rests on few distinct draws - "
                      "raise num_draws, or use measurement='label' or fewer bins", stacklevel=3)
    res = RegressionResult("joint", design.coef_names, draws.mean(0), np.atleast_2d(np.cov(draws.T)),
                           level, draws, info, interval_kind="quantile")
    if dr is not None:
        res.info.update(hausman(res, dr))
    return res


def hausman(joint: RegressionResult, dr: RegressionResult) -> dict:
    """Per-coefficient Hausman-type statistics of the joint estimate against the doubly robust one
    (the difference over the square root of the difference of variances, or of their sum where
    the joint model is not the narrower); warns on a disagreement at :data:`HAUSMAN_ALPHA`."""
    diff = joint.coef - dr.coef
    vj, vd = np.diag(joint.cov), np.diag(dr.cov)
    var = np.where(vd > vj, vd - vj, vd + vj)
    z = diff / np.sqrt(var)
    p = 2 * (1 - np.vectorize(NormalDist().cdf)(np.abs(z)))
    worst = int(np.argmin(p))
    if p[worst] < HAUSMAN_ALPHA:
        warnings.warn(f"the generative joint model disagrees with the doubly robust estimate on "
                      f"{joint.coef_names[worst]!r} ({joint.coef[worst]:.4g} vs {dr.coef[worst]:.4g}, "
                      f"Hausman p = {p[worst]:.2g}): its measurement model's form is probably wrong here; "
                      "report method='dr'", stacklevel=3)
    return {"hausman_z": z, "hausman_p": p, "dr_coef": dr.coef}


