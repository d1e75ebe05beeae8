"""``regress``: the researcher's one call, from a DataFrame and a formula to a coefficient table."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import estimators as est
from .design import Design, build_design
from .joint import completion_expectations, joint_draws
from .result import RegressionResult

__all__ = ["METHODS", "LLMOutputs", "llm_outputs", "regress"]

METHODS = ("joint", "joint_dr", "naive", "labelled_only", "ptd", "mi")


@dataclass(frozen=True)
class LLMOutputs:
    """The LLM's output for every row, in the forms the estimators use.

    ``labels`` (N,) coded class indices; ``scores`` (N, K-1) log-odds of each class against the
    first, or None when only labels were given; ``draws`` (S, N, K) posterior predictive
    probabilities, or None.
    """

    labels: np.ndarray
    scores: np.ndarray | None
    draws: np.ndarray | None


def _continuous_outputs(arr: np.ndarray, n: int) -> LLMOutputs:
    """A continuous label: (N,) predicted values, or (S, N) posterior predictive draws."""
    if arr.ndim not in (1, 2) or arr.shape[-1] != n:
        raise ValueError(f"predictions of a continuous label must be (N,) values or (S, N) draws with "
                         f"N = {n}; got shape {arr.shape}")
    arr = arr.astype(float)
    if not np.isfinite(arr).all():
        raise ValueError(f"predictions contain {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    values = arr if arr.ndim == 1 else arr.mean(0)
    return LLMOutputs(values, values[:, None], arr if arr.ndim == 2 else None)


def _log_probs(p: np.ndarray) -> np.ndarray:
    if (p >= 0).all() and (p <= 1).all() and np.allclose(p.sum(-1), 1, atol=1e-4):
        return np.log(np.clip(p, 1e-12, None))
    return p - np.logaddexp.reduce(p, axis=-1, keepdims=True)  # logits


def llm_outputs(predictions, design: Design) -> LLMOutputs:
    """Read predictions given as (N,) coded labels (class values or indices), (N,) binary log-odds,
    (N, K) probabilities or logits, or (S, N, K) posterior predictive probabilities."""
    n, k = len(design.z), design.num_classes
    if isinstance(predictions, torch.Tensor):
        predictions = predictions.detach().cpu().numpy()
    if isinstance(predictions, pd.Series):
        predictions = predictions.to_numpy()
    arr = np.asarray(predictions)
    if design.kind == "continuous":
        return _continuous_outputs(arr, n)
    if arr.ndim == 0 or arr.shape[-2 if arr.ndim > 1 else 0] != n:
        raise ValueError(f"predictions must have one row per DataFrame row ({n}); got shape {arr.shape}")
    if arr.ndim == 1 and (arr.dtype.kind in "OUS" or set(pd.unique(arr)) <= set(design.classes)):
        unknown = set(pd.unique(arr)) - set(design.classes)
        if unknown:
            raise ValueError(f"predicted labels {sorted(map(str, unknown))[:5]} are not among the "
                             f"classes {list(design.classes)}")
        return LLMOutputs(np.array([design.classes.index(v) for v in arr]), None, None)
    arr = arr.astype(float)
    if not np.isfinite(arr).all():
        raise ValueError(f"predictions contain {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    if arr.ndim == 1:
        if k != 2:
            raise ValueError(f"a single score per row fits a binary label; {design.label!r} has {k} classes "
                             "- pass (N, K) logits or probabilities")
        arr = np.stack([np.zeros(n), arr], -1)
    if arr.shape[-1] != k:
        raise ValueError(f"predictions have {arr.shape[-1]} columns but {design.label!r} has {k} classes "
                         f"{list(design.classes)}")
    draws = None
    if arr.ndim == 3:
        draws = np.exp(_log_probs(arr))
        arr = np.log(draws.mean(0))
    logp = _log_probs(arr)
    return LLMOutputs(logp.argmax(-1), logp[:, 1:] - logp[:, :1], draws)


def _measurement(out: LLMOutputs, design: Design, measurement: str | None, bins: int):
    """The completion model's measurement: its kind, the tensor and the number of bins."""
    if design.kind == "continuous":
        if measurement not in (None, "continuous"):
            raise ValueError("a continuous label is measured by the LLM's value; "
                             f"measurement={measurement!r} "
                             "does not apply")
        return torch.as_tensor(out.scores[:, 0]), "continuous", None
    if measurement is None:
        measurement = "ordinal" if out.scores is not None and design.num_classes == 2 else "label"
    if measurement == "label":
        return torch.as_tensor(out.labels), measurement, None
    if out.scores is None:
        raise ValueError(f"measurement={measurement!r} needs scores (logits or probabilities), "
                         "not coded labels")
    if measurement == "score":
        return torch.as_tensor(out.scores), measurement, None
    if measurement != "ordinal":
        raise ValueError(f"measurement must be 'ordinal', 'label' or 'score', got {measurement!r}")
    if design.num_classes != 2:
        raise ValueError("measurement='ordinal' bins a binary label's log-odds; use 'label' or 'score' "
                         f"for the {design.num_classes} classes of {design.label!r}")
    if not 2 <= bins <= 100:
        raise ValueError(f"bins must be between 2 and 100, got {bins}")
    score = out.scores[:, 0]
    edges = np.unique(np.quantile(score, np.linspace(0, 1, bins + 1)[1:-1]))
    return torch.as_tensor(np.searchsorted(edges, score, side="right")), measurement, len(edges) + 1


def _frequentist(design: Design, Xh: np.ndarray, yh: np.ndarray, method: str, family: str,
                 coord=None) -> est.Estimate:
    """A baseline from the gold labelled rows and the predicted design ``Xh`` / response ``yh``."""
    lab = design.labelled
    X_gold, y_gold = design.gold()
    if method == "labelled_only":
        return est.labelled_only(X_gold, y_gold, family=family)
    if method == "naive":
        return est.naive(X_gold, y_gold, Xh[lab], yh[lab], Xh[~lab], yh[~lab], family=family)
    return est.ptd(X_gold, y_gold, Xh[lab], yh[lab], Xh[~lab], yh[~lab], family=family, coord=coord)


def _multiple_imputation(design: Design, draws: np.ndarray, family: str, seed: int):
    """Rubin's rules over completed data sets, one per posterior predictive draw of the LLM."""
    rng = np.random.default_rng(seed)
    unl = ~design.labelled
    coefs, within = [], []
    for probs in draws:
        z = design.z_filled.copy()
        if design.kind == "continuous":   # a draw of the LLM's predicted value
            z[unl] = probs[unl]
        else:
            u = rng.random(unl.sum())[:, None]
            z[unl] = (probs[unl].cumsum(-1) < u).sum(-1).clip(max=design.num_classes - 1)
        fit = (est.ols if family == "gaussian" else est.logistic)(design.X(z), design.response(z))
        coefs.append(fit.coef)
        within.append(fit.cov)
    coefs = np.array(coefs)
    s = len(coefs)
    between = np.cov(coefs.T, ddof=1).reshape(len(design.coef_names), -1) if s > 1 else 0.0
    return coefs.mean(0), np.mean(within, 0) + (1 + 1 / s) * between


def regress(df: pd.DataFrame, formula: str, *, label: str, role: str = "covariate", predictions=None,
            llm: Callable | None = None, text: str | None = None, method: str = "ptd",
            family: str = "gaussian", measurement: str | None = None, bins: int = 10, classes=None,
            kind: str = "auto",
            level: float = 0.95, num_draws: int = 1000, tune_for: str | None = None,
            importance: bool = False, seed: int = 0) -> RegressionResult:
    """Regress with an LLM-coded variable as a covariate or as the outcome.

    Parameters
    ----------
    df, formula:
        The data and a formulaic formula, e.g. ``"y ~ stance + age + C(region)"`` (covariate role)
        or ``"stance ~ age + C(region)"`` (outcome role).
    label, kind, classes:
        The column with the gold value of the coded variable; missing values mark the rows the LLM
        codes. The labelled rows should be a random sample of the corpus. ``kind="auto"`` treats a
        numeric label with more than 10 distinct values as continuous (an LLM regression output;
        predictions are then (N,) values or (S, N) draws), anything else as categorical;
        ``classes`` orders the categories (the first is the reference).
    predictions or llm + text:
        The LLM's output for every row: (N,) coded labels, (N,) binary log-odds, (N, K)
        probabilities or logits, or (S, N, K) posterior predictive draws (needed by ``"mi"``); or
        a callable ``llm(list_of_texts)`` returning one of those, applied to ``df[text]``.
        Predictions for the labelled rows must come from a model that did not see them
        (cross-fitting, :func:`pyro_llm.regression.crossfit`), or every method that compares
        predictions with gold labels is misled.
    method:
        ``"ptd"`` (default: PPI++ / predict-then-debias, the one method that covered in every
        scenario of the coverage benchmark), ``"joint"`` (the completion model with multiple
        imputation, see :mod:`pyro_llm.regression.joint`: narrower when its completion model
        holds, invalid when it does not), ``"naive"`` (plug-in), ``"labelled_only"``, ``"mi"``
        (multiple imputation from the LLM's posterior predictive draws, assuming they are
        calibrated and the LLM's errors independent of the rest),
        ``"joint_dr"`` (doubly robust: the completion model's expected z for every row as the
        prediction of PPI++ / predict-then-debias, meant to stay valid when the completion model is
        wrong; it under-covered in one variant of the coverage benchmark, see the README).
    family:
        ``"gaussian"`` (least squares) or ``"binomial"`` (logistic) for the target regression.
    measurement, bins:
        For ``"joint"``, how the LLM's output enters the completion model
        (:func:`~pyro_llm.regression.completion.measurement_log_prob`): ``"ordinal"`` (default for
        a binary label with scores: the log-odds cut into ``bins`` quantile bins, binormal model
        per gold class), ``"label"`` (the coded labels; the default when only labels are given or
        the label has more than two classes) or ``"score"`` (Gaussian log-odds).
    tune_for:
        For ``"ptd"``: the coefficient whose variance the power-tuning parameter minimises
        (default: the trace over all coefficients).
    num_draws, importance:
        For ``"joint"``: posterior draws, and whether to correct the completion model's Laplace
        approximation by importance resampling (see :func:`~pyro_llm.regression.joint.joint_draws`).
    level:
        Interval coverage (0.95).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if family not in ("gaussian", "binomial"):
        raise ValueError(f"family must be 'gaussian' or 'binomial', got {family!r}")
    design = build_design(df, formula, label=label, role=role, classes=classes, text=text, kind=kind)
    if (predictions is None) == (llm is None):
        raise ValueError("pass exactly one of predictions= (the LLM's outputs) or llm= with text=")
    if llm is not None:
        if text is None:
            raise ValueError("llm= needs text= naming the column of texts to code")
        predictions = llm(df[text].astype(str).tolist())
    out = llm_outputs(predictions, design)
    info = {"n_labelled": int(design.labelled.sum()), "n": len(design.z), "role": role,
            "classes": design.classes, "kind": design.kind, "family": family}
    if method == "joint":
        m, measurement, dim = _measurement(out, design, measurement, bins)
        draws, post, ess = joint_draws(design, m, measurement=measurement, dim=dim, family=family,
                                       num_draws=num_draws, seed=seed, importance=importance)
        info.update(measurement=measurement, completion_features=design.feature_names,
                    neg_log_joint=post.neg_log_joint, importance_ess=ess)
        if importance and ess < 0.05 * num_draws:
            warnings.warn(f"the completion model's Laplace approximation is poor here (importance ESS "
                          f"{ess:.0f} of {num_draws} draws); the interval rests on few distinct draws - "
                          "raise num_draws, or use measurement='label' or fewer bins", stacklevel=2)
        return RegressionResult("joint", design.coef_names, draws.mean(0), np.atleast_2d(np.cov(draws.T)),
                                level, draws, info)
    coord = None
    if tune_for is not None:
        if tune_for not in design.coef_names:
            raise ValueError(f"tune_for={tune_for!r} is not a coefficient; "
                             f"they are {list(design.coef_names)}")
        coord = design.coef_names.index(tune_for)
    if method == "joint_dr":
        m, measurement, dim = _measurement(out, design, measurement, bins)
        Xh, yh = completion_expectations(design, m, measurement=measurement, dim=dim)
        fit = _frequentist(design, Xh, yh, "ptd", family, coord)
        info.update(fit.extra, measurement=measurement)
        return RegressionResult("joint_dr", design.coef_names, fit.coef, fit.cov, level, None, info)
    if method == "mi":
        if out.draws is None:
            raise ValueError("method='mi' needs posterior predictive draws: predictions of shape (S, N, K)")
        coef, cov = _multiple_imputation(design, out.draws, family, seed)
        return RegressionResult("mi", design.coef_names, coef, cov, level, None, info)
    fit = _frequentist(design, design.X(out.labels), design.response(out.labels), method, family, coord)
    info.update(fit.extra)
    return RegressionResult(method, design.coef_names, fit.coef, fit.cov, level, None, info)

