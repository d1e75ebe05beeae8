"""Reading the LLM's output for every row: what it is (probabilities, logits, log-odds, labels,
draws) said explicitly or inferred only when unambiguous, aligned on the DataFrame's index, and
checked for the tell-tale sign of a coder that saw the labelled rows."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .design import Design

__all__ = ["KINDS", "LLMOutputs", "insample_check", "llm_outputs", "as_array"]

KINDS = ("auto", "probs", "logits", "log_odds", "labels")
RENORM_TOL = 0.05   # probability rows off by less than this are renormalised (with a warning)
EXACT_TOL = 1e-3    # ... by less than this, silently (float32 softmax, rounding to 3 decimals)


@dataclass(frozen=True)
class LLMOutputs:
    """The LLM's output for every row, in the forms the estimators use.

    ``labels`` (N,) coded class indices; ``scores`` (N, K-1) log-odds of each class against the
    first, or None when only labels were given; ``draws`` (S, N, K) posterior predictive
    probabilities, or None; ``probs`` (N, K) predictive probabilities, or None; ``spread`` (N,)
    the posterior spread of the log-odds over the draws, or None.
    """

    labels: np.ndarray
    scores: np.ndarray | None
    draws: np.ndarray | None
    probs: np.ndarray | None = None
    spread: np.ndarray | None = None


def as_array(x, name: str = "predictions") -> np.ndarray:
    """``x`` as a numpy array: a torch tensor (any device or dtype), or a list / tuple of them
    (one per row), is stacked and moved to the CPU. Half precision (``bfloat16``, ``float16``) is
    legal and upcast to float32 with a warning: it keeps about 3 significant digits."""
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        x = torch.stack([t.detach().cpu() for t in x])
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    x = x.detach().cpu()
    if x.dtype in (torch.bfloat16, torch.float16):
        warnings.warn(f"{name} are {str(x.dtype).replace('torch.', '')}: upcast to float32 (half precision "
                      "keeps about 3 significant digits, so probabilities near 0 or 1 are coarse; return "
                      "float32 from the model where you can)", UserWarning, stacklevel=4)
        x = x.float()
    return x.numpy()


def _aligned(predictions, index: pd.Index | None):
    """A pandas Series / DataFrame is aligned on ``index`` (the regression DataFrame's)."""
    if not isinstance(predictions, (pd.Series, pd.DataFrame)) or index is None:
        return predictions
    own = predictions.index
    if own.equals(index):
        return predictions.to_numpy()
    if len(own) == len(index) and own.is_unique and set(own) == set(index):
        return predictions.loc[index].to_numpy()
    raise ValueError("the index of predictions does not match the DataFrame's index (different labels); "
                     "pass predictions with the DataFrame's index, or a plain array in row order")


def _continuous_outputs(arr: np.ndarray, n: int) -> LLMOutputs:
    """A continuous label: (N,) predicted values, or (S, N) posterior predictive draws."""
    if arr.ndim not in (1, 2) or arr.shape[-1] != n:
        raise ValueError(f"predictions of a continuous label must be (N,) values or (S, N) draws with "
                         f"N = {n}; got shape {arr.shape}")
    arr = arr.astype(float)
    if not np.isfinite(arr).all():
        raise ValueError(f"predictions contain {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    values = arr if arr.ndim == 1 else arr.mean(0)
    spread = arr.std(0) if arr.ndim == 2 else None
    return LLMOutputs(values, values[:, None], arr if arr.ndim == 2 else None, None, spread)


def _looks_like_probs(arr: np.ndarray) -> bool:
    return bool((arr >= 0).all() and (arr <= 1).all())


def _as_probs(arr: np.ndarray) -> np.ndarray:
    """Rows of probabilities, renormalised within :data:`RENORM_TOL` (a warning past
    :data:`EXACT_TOL`); anything else is rejected with the row that fails."""
    if not _looks_like_probs(arr):
        raise ValueError("predictions_kind='probs' but some values lie outside [0, 1]; pass "
                         "predictions_kind='logits' if these are logits")
    off = np.abs(arr.sum(-1) - 1)
    worst = float(off.max())
    if worst > RENORM_TOL:
        where = np.unravel_index(int(off.argmax()), off.shape)
        raise ValueError(f"probability rows must sum to 1; row {where[-1]} sums to "
                         f"{float(arr.sum(-1)[where]):.4f} (off by more than {RENORM_TOL}): pass normalised "
                         "probabilities, or predictions_kind='logits' if these are scores")
    if worst > EXACT_TOL:
        warnings.warn(f"probability rows sum to 1 only within {worst:.3g} (rounded?); they were "
                      "renormalised", stacklevel=4)
    return arr / arr.sum(-1, keepdims=True)


def _kind_of(arr: np.ndarray, design: Design) -> str:
    """The kind of a float array when ``predictions_kind='auto'``; ambiguous input is refused."""
    if arr.ndim == 1:
        if _looks_like_probs(arr) and not np.isin(arr, (0, 1)).all():
            raise ValueError("1-d predictions in [0, 1] may be probabilities of the second class or "
                             "log-odds; say which with predictions_kind='probs' or 'log_odds'")
        return "log_odds"
    if not _looks_like_probs(arr):
        return "logits"
    off = float(np.abs(arr.sum(-1) - 1).max())
    if off <= RENORM_TOL:
        return "probs"
    raise ValueError(f"predictions lie in [0, 1] but their rows do not sum to 1 (off by up to {off:.3g}); "
                     "pass predictions_kind='probs' (after normalising) or 'logits'")


def llm_outputs(predictions, design: Design, predictions_kind: str = "auto",
                index: pd.Index | None = None) -> LLMOutputs:
    """Read predictions given as (N,) coded labels (class values or indices), (N,) binary log-odds,
    (N,) probabilities of the second class, (N, K) probabilities or logits, or (S, N, K) posterior
    predictive probabilities or logits. ``predictions_kind`` says which ("auto" infers it only
    when unambiguous); a pandas object is aligned on ``index``."""
    if predictions_kind not in KINDS:
        raise ValueError(f"predictions_kind must be one of {KINDS}, got {predictions_kind!r}")
    n, k = len(design.labelled), design.num_classes
    predictions = _aligned(predictions, index)
    arr = as_array(predictions)
    if design.kind == "continuous":
        return _continuous_outputs(arr, n)
    if arr.ndim == 0 or arr.ndim > 3 or arr.shape[-2 if arr.ndim > 1 else 0] != n:
        raise ValueError(f"predictions must have one row per DataFrame row ({n}); got shape {arr.shape}")
    as_labels = predictions_kind == "labels" or (
        predictions_kind == "auto" and arr.ndim == 1
        and (arr.dtype.kind in "OUSb" or set(pd.unique(arr)) <= set(design.classes)))
    if as_labels:
        if arr.ndim != 1:
            raise ValueError(f"predictions_kind='labels' needs (N,) coded labels; got shape {arr.shape}")
        unknown = set(pd.unique(arr)) - set(design.classes)
        if unknown:
            raise ValueError(f"predicted labels {sorted(map(str, unknown))[:5]} are not among the "
                             f"classes {list(design.classes)}")
        return LLMOutputs(np.array([design.classes.index(v) for v in arr]), None, None)
    try:
        arr = arr.astype(float)
    except (TypeError, ValueError):
        raise ValueError(f"predictions of dtype {arr.dtype} are neither labels among {list(design.classes)} "
                         "nor numbers") from None
    if not np.isfinite(arr).all():
        raise ValueError(f"predictions contain {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    kind = _kind_of(arr, design) if predictions_kind == "auto" else predictions_kind
    if arr.ndim == 1:
        if k != 2:
            raise ValueError(f"a single score per row fits a binary label; {design.label!r} has {k} classes "
                             "- pass (N, K) logits or probabilities")
        if kind == "probs":
            arr = np.stack([1 - arr, arr], -1)
        elif kind in ("log_odds", "logits"):
            arr, kind = np.stack([np.zeros(n), arr], -1), "logits"
    elif kind == "log_odds":
        raise ValueError("predictions_kind='log_odds' needs (N,) values for a binary label")
    if arr.shape[-1] != k:
        raise ValueError(f"predictions have {arr.shape[-1]} columns but {design.label!r} has {k} classes "
                         f"{list(design.classes)}")
    probs = _as_probs(arr) if kind == "probs" else np.exp(arr - np.logaddexp.reduce(arr, -1, keepdims=True))
    draws = spread = None
    if arr.ndim == 3:
        draws = probs
        logp = np.log(np.clip(draws, 1e-12, None))
        spread = (logp[..., 1:] - logp[..., :1]).std(0).mean(-1)
        probs = draws.mean(0)
    logp = np.log(np.clip(probs, 1e-12, None))
    return LLMOutputs(logp.argmax(-1), logp[:, 1:] - logp[:, :1], draws, probs, spread)


def insample_check(out: LLMOutputs, labelled: np.ndarray, alpha: float = 1e-4) -> float | None:
    """p-value of a randomisation check: when the labelled rows are a random subset and each row
    was coded by a model that did not see its label, the LLM's confidence has the same
    distribution on labelled and unlabelled rows. A coder fine-tuned on the labelled rows is more
    confident on them. Warns when the labelled rows are more confident at level ``alpha``."""
    from scipy.stats import mannwhitneyu

    if out.probs is None or labelled.sum() < 20 or (~labelled).sum() < 20:
        return None
    conf = out.probs.max(-1)
    p = float(mannwhitneyu(conf[labelled], conf[~labelled], alternative="greater").pvalue)
    if p < alpha:
        warnings.warn(
            f"the LLM is more confident on the labelled rows (median top probability "
            f"{np.median(conf[labelled]):.3f}) than on the unlabelled rows "
            f"({np.median(conf[~labelled]):.3f}; "
            f"p = {p:.1e}): the predictions look like those of a model fine-tuned on these labels. Every "
            "estimator that learns the coding errors from the labelled rows is then misled - code each "
            "row with a model that did not see it (regress(model=..., folds=5), or crossfit())",
            stacklevel=3)
    return p
