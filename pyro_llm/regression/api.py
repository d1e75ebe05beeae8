"""``regress``: the researcher's one call, from a DataFrame and a formula (and a text column and a
LoRA model, or the LLM's predictions) to a coefficient table with valid intervals."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from .design import Design, build_design
from .dr import labelling_probabilities
from .methods import run_baseline, run_dr, run_joint, run_mi
from .outputs import LLMOutputs, as_array, insample_check, llm_outputs
from .result import RegressionResult

__all__ = ["METHODS", "llm_outputs", "measurement_input", "regress"]

METHODS = ("dr", "ptd", "labelled_only", "naive", "mi", "joint")
INTERVALS = ("sandwich", "bootstrap")


def measurement_input(out: LLMOutputs, design: Design, measurement: str | None, bins: int):
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




def _cluster(df: pd.DataFrame, cluster) -> np.ndarray | None:
    if cluster is None:
        return None
    values = df[cluster] if isinstance(cluster, str) else pd.Series(np.asarray(cluster))
    if isinstance(cluster, str) and cluster not in df.columns:
        raise ValueError(f"cluster column {cluster!r} is not in the DataFrame")
    if len(values) != len(df) or values.isna().any():
        raise ValueError(f"cluster= must give a cluster for every row ({len(df)}), with no missing values")
    codes = pd.factorize(values)[0]
    if codes.max() + 1 < 2:
        raise ValueError("cluster= puts every row in one cluster; clustered standard errors need many "
                         "clusters")
    if codes.max() + 1 < 30:
        warnings.warn(f"only {codes.max() + 1} clusters: clustered standard errors are unreliable with "
                      "fewer than ~30-50 clusters", stacklevel=3)
    return codes


def _spread(df: pd.DataFrame, spread, out: LLMOutputs) -> LLMOutputs:
    if spread is None:
        return out
    values = as_array(df[spread] if isinstance(spread, str) else spread, "spread=").astype(float).reshape(-1)
    if values.shape != (len(df),) or not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"spread= must give one finite non-negative posterior spread per row ({len(df)})")
    return LLMOutputs(out.labels, out.scores, out.draws, out.probs, values)


def _code_with_model(df, design: Design, *, text, model, tokenizer, posterior, folds, fold_ids, cache_dir,
                     train, seed, progress, options, downstream, family):
    """Cross-fitted coding of ``df[text]`` by a fresh LoRA fine-tune per fold
    (:func:`~pyro_llm.regression.coding.code_crossfit`)."""
    from .coding import code_crossfit

    if text is None:
        raise ValueError("model= needs text= naming the DataFrame's column of texts to code")
    if design.kind == "continuous":
        raise ValueError("model= fine-tunes a classifier; a continuous label needs predictions= from a "
                         "regression model (cross-fitted)")
    term = None
    if downstream:
        from .downstream import downstream_term

        term = downstream_term(design, family, 1.0 if downstream is True else float(downstream))
    coded = code_crossfit(df[text].astype(str).tolist(), design.z, model=model, tokenizer=tokenizer,
                          posterior=posterior, folds=folds, fold_ids=fold_ids, seed=seed,
                          cache_dir=cache_dir, train=train, progress=progress, downstream=term,
                          **(options or {}))
    info = {"posterior": posterior, "fold_accuracy": np.asarray(coded.fold_accuracy),
            "majority_rate": coded.info.get("majority_rate"), "coder": coded.info,
            "coded": {"probs": coded.probs, "spread": coded.spread, "fold_ids": coded.fold_ids}}
    return coded.probs, coded.spread, coded.fold_ids, info


def regress(df: pd.DataFrame, formula: str, *, label: str, role: str = "covariate", text: str | None = None,
            model=None, tokenizer=None, posterior: str = "map", folds: int = 5, cache_dir=None, train=None,
            coder: dict | None = None, downstream: bool | float = False,
            predictions=None, predictions_kind: str = "auto", fold_ids=None, spread=None,
            llm: Callable | None = None, method: str = "dr", family: str = "gaussian", prob=None,
            cluster=None, interval: str = "sandwich", splits: int = 5, completion_prior: float = 2.5,
            classes=None, kind: str = "auto", level: float = 0.95, num_draws: int = 1000,
            tune_for: str | None = None, measurement: str | None = None, bins: int = 10,
            importance: bool = False, seed: int = 0, progress: bool = True) -> RegressionResult:
    """Regress with an LLM-coded variable as a covariate or as the outcome, with valid intervals.

    Validity comes from the design: the labelled rows are a random subset (known probabilities),
    every row is coded by a model that saw neither its label nor its outcome (cross-fitting), and
    the default estimator (``method="dr"``) corrects the LLM-based prediction on the labelled rows.

    Parameters
    ----------
    df, formula:
        The data and a formulaic formula, e.g. ``"y ~ stance + age + C(region)"`` (covariate role)
        or ``"stance ~ age + C(region)"`` (outcome role). Formulas are evaluated as Python code by
        formulaic: never pass an untrusted formula string.
    label, kind, classes:
        The column with the gold value of the coded variable; missing values mark the rows the LLM
        codes. ``kind="auto"`` treats a numeric label with more than 10 distinct values as
        continuous, anything else as categorical; ``classes`` orders the categories.
    text, model, tokenizer, posterior, folds, cache_dir, train, coder:
        The one call from text: ``model`` (a peft LoRA sequence classifier, or a local model
        folder) is fine-tuned ``folds`` times, each time on the other folds' labelled rows only,
        with the chosen ``posterior`` (``"map"``, ``"laplace"``, ``"ensemble"``, ``"svi"``); every row
        of ``df[text]`` is coded by the model of its fold
        (:func:`~pyro_llm.regression.coding.code_crossfit`). ``train`` is a
        :class:`~pyro_llm.regression.finetune.FineTune` (epochs, learning rates, early stopping);
        ``coder`` more options of ``code_crossfit`` (``max_length``, ``num_samples``). Coded outputs
        and fold adapters are cached in ``cache_dir``: an interrupted call resumes.
    downstream:
        Fine-tune "for the downstream task" (covariate role): each fold's coder is also trained on
        the regression's likelihood (z summed out) over the other folds' unlabelled rows, with
        this weight (``True`` = 1). Inside the folds, so fold k's labels and outcomes never reach
        fold k's coder; see :mod:`pyro_llm.regression.downstream`.
    predictions, predictions_kind, fold_ids, spread:
        Or the LLM's outputs computed elsewhere (cross-fitted!): (N,) coded labels, (N,) binary
        log-odds, (N,) probabilities of the second class, (N, K) probabilities or logits, or
        (S, N, K) posterior predictive draws; ``predictions_kind`` ("auto", "probs", "logits",
        "log_odds", "labels") says which. A pandas object is aligned on ``df``'s index.
        ``spread`` (a column name or array): each row's posterior spread (derived from draws).
    llm:
        A callable ``llm(texts)`` applied to ``df[text]``: one model codes every row, which is
        valid only if it never saw these labels or outcomes (a warning says so).
    method:
        ``"dr"`` (default, cut and cross-fitted doubly robust), ``"ptd"`` (PPI++), ``"labelled_only"``,
        ``"naive"``, ``"mi"`` (imputation from the completion model), ``"joint"`` (the generative
        model, opt-in; compared with ``dr`` by a Hausman-type check). See :mod:`.methods`.
    family:
        ``"gaussian"`` (least squares) or ``"binomial"`` (logistic) target regression.
    prob, cluster:
        Known labelling probability of each row (a column name or an array; default: equal) and a
        cluster column for clustered standard errors (``"dr"`` only).
    interval, num_draws, splits, completion_prior:
        ``"sandwich"`` (default) or ``"bootstrap"`` (Bayesian bootstrap quantiles) intervals for ``dr``;
        the bootstrap draws (``to_arviz`` exports them); repeated completion-model splits; the
        completion model's prior sd.
    tune_for, measurement, bins, importance:
        PPI++'s tuned coefficient; the joint model's measurement form and options.
    level, seed, progress:
        Interval coverage, random seed, progress bars.
    """
    if method == "joint_dr":
        raise ValueError("method='joint_dr' was replaced by method='dr' (cross-fitted doubly robust)")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if family not in ("gaussian", "binomial"):
        raise ValueError(f"family must be 'gaussian' or 'binomial', got {family!r}")
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {INTERVALS}, got {interval!r}")
    sources = sum(x is not None for x in (predictions, llm, model))
    if sources != 1:
        raise ValueError("pass exactly one of model= (with text=: fine-tuned and cross-fitted here), "
                         "predictions= (the LLM's outputs), or llm= with text=")
    design = build_design(df, formula, label=label, role=role, classes=classes, text=text, kind=kind)
    info = {"n_labelled": int(design.labelled.sum()), "n": len(design.z), "role": role,
            "classes": design.classes, "kind": design.kind, "family": family}
    pi = labelling_probabilities(prob, df, design)
    clusters = _cluster(df, cluster)
    if method != "dr" and (prob is not None or cluster is not None):
        raise ValueError(f"prob= and cluster= are supported by method='dr' only, not {method!r}")
    kind_ = predictions_kind
    if downstream and model is None:
        raise ValueError("downstream= fine-tunes the coder: it needs model= and text=")
    if model is not None:
        predictions, spread, fold_ids, coder = _code_with_model(
            df, design, text=text, model=model, tokenizer=tokenizer, posterior=posterior, folds=folds,
            fold_ids=fold_ids, cache_dir=cache_dir, train=train, seed=seed, progress=progress, options=coder,
            downstream=downstream, family=family)
        info.update(coder)
        kind_ = "probs"
    elif llm is not None:
        if text is None:
            raise ValueError("llm= needs text= naming the column of texts to code")
        warnings.warn("llm= codes every row with one model: the interval is valid only if that model never "
                      "saw this DataFrame's labels or outcomes; to fine-tune on these labels, pass model= "
                      "(cross-fitted) instead", stacklevel=2)
        predictions = llm(df[text].astype(str).tolist())
    out = _spread(df, spread, llm_outputs(predictions, design, kind_, index=df.index))
    if fold_ids is not None:
        info["fold_ids"] = np.asarray(fold_ids)
    if prob is None and design.kind != "continuous":
        info["insample_p"] = insample_check(out, design.labelled)
    common = {"level": level, "info": info}
    if method == "dr" or method == "joint":
        dr = run_dr(design, out, pi=pi, family=family, cluster=clusters,
                    interval=interval if method == "dr" else "sandwich",
                    num_draws=num_draws if method == "dr" else 0, folds=folds, splits=splits,
                    prior_sd=completion_prior, seed=seed, **common)
        if method == "dr":
            return dr
        m, measurement, dim = measurement_input(out, design, measurement, bins)
        return run_joint(design, out, m, measurement=measurement, dim=dim, family=family, num_draws=num_draws,
                         importance=importance, seed=seed, dr=dr, **common)
    if method == "mi":
        return run_mi(design, out, pi=pi, family=family, folds=folds, splits=splits,
                      prior_sd=completion_prior, seed=seed, **common)
    coord = None
    if tune_for is not None:
        if tune_for not in design.coef_names:
            raise ValueError(f"tune_for={tune_for!r} is not a coefficient; they are "
                             f"{list(design.coef_names)}")
        coord = design.coef_names.index(tune_for)
    return run_baseline(design, out, method, family=family, coord=coord, **common)
