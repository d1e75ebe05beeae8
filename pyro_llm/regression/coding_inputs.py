"""Input checks of :func:`pyro_llm.regression.coding.code_crossfit`: texts, labels, fold ids, the
model (a peft classifier, or a model folder that :func:`pyro_llm.models.lora_classifier` adapts)
and the classes every fold must be able to learn. Each error names the row or value at fault and
what to do about it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["check_texts", "check_labels", "check_fold_ids", "num_labels_of", "resolve_model",
           "check_classes"]


def check_texts(texts) -> list[str]:
    """``texts`` as a list of non-empty strings, or a ``ValueError`` naming the first bad row."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts is a single string; pass a sequence of texts (e.g. a list or a "
                        "DataFrame column)")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}") from None
    if not texts:
        raise ValueError("texts is empty: there is nothing to code")
    for i, t in enumerate(texts):
        if isinstance(t, float) and math.isnan(t):
            raise ValueError(f"text at row {i} is NaN (a missing value); drop the row or fill it "
                             "with the text, then call again")
        if not isinstance(t, str):
            raise ValueError(f"text at row {i} is a {type(t).__name__} ({t!r:.40}), not a string; "
                             "convert the column to str or drop the row")
        if not t.strip():
            raise ValueError(f"text at row {i} is empty ({t!r:.20}); drop the row or fill it")
    return texts


def check_labels(labels, n: int) -> np.ndarray:
    """``labels`` as ``(n,)`` int64 class indices with -1 for unlabelled rows; NaN, missing
    values, fractions, strings and values below -1 raise a ``ValueError``."""
    import pandas as pd

    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have one entry per text: shape ({n},), got {y.shape}")
    if y.dtype.kind == "O":  # e.g. a pandas nullable integer column: numbers and NA
        missing = np.flatnonzero(pd.isna(y))
        if missing.size:
            raise ValueError(f"labels contain missing values (NaN / None / NA) at rows "
                             f"{missing[:5].tolist()}; mark unlabelled rows with -1, e.g. "
                             "labels.fillna(-1).astype(int)")
        try:
            y = y.astype(float)
        except (TypeError, ValueError):
            pass
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels must be integer class indices 0..K-1 (-1 where unlabelled), got "
                         f"dtype {y.dtype}; map class names to indices first")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:
            raise ValueError(f"labels contain {y[bad[0]]} at rows {bad[:5].tolist()}; mark "
                             "unlabelled rows with -1, not NaN, e.g. labels.fillna(-1).astype(int)")
        frac = np.flatnonzero(y != np.round(y))
        if frac.size:
            raise ValueError(f"labels must be integer class indices; row {frac[0]} holds "
                             f"{y[frac[0]]}")
    y = y.astype(np.int64)
    low = np.flatnonzero(y < -1)
    if low.size:
        raise ValueError(f"label {y[low[0]]} at row {low[0]} is invalid: use 0..K-1 for classes "
                         "and -1 for unlabelled rows")
    return y


def check_fold_ids(ids, labelled: np.ndarray, folds: int) -> np.ndarray:
    """User-given fold ids as ``(N,)`` int64 in ``0..folds-1``, each fold holding labelled rows."""
    n = len(labelled)
    arr = np.asarray(ids)
    if arr.shape != (n,):
        raise ValueError(f"fold_ids must have one entry per text: shape ({n},), got {arr.shape}")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.isfinite(arr).all()
                                           and (arr == np.round(arr)).all()):
        raise ValueError(f"fold_ids must be integers 0..{folds - 1}, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = np.flatnonzero((arr < 0) | (arr >= folds))
    if bad.size:
        raise ValueError(f"fold_ids must lie in 0..{folds - 1} (folds={folds}); row {bad[0]} has "
                         f"{arr[bad[0]]}: pass folds= to match")
    empty = [k for k in range(folds) if not (labelled & (arr == k)).any()]
    if empty:
        raise ValueError(f"fold(s) {empty} have no labelled rows: every fold needs labelled rows to "
                         "measure its coder; reassign them or use fewer folds")
    return arr


def num_labels_of(model) -> int | None:
    """``model.config.num_labels`` (a peft model forwards ``config``), or ``None``."""
    cfg = getattr(model, "config", None)
    k = getattr(cfg, "num_labels", None)
    return int(k) if k is not None else None


def _lora_targets(path: Path) -> tuple[str, ...]:
    """peft's default LoRA target modules for the folder's ``model_type`` (query and value
    projections), or a clear error for an architecture peft does not know."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets

    from .._io import read_json

    kind = read_json(path / "config.json", what="Hugging Face model config",
                     fields={"model_type": "str"})["model_type"]
    extra = {"distilbert": ["q_lin", "v_lin"]}
    found = targets.get(kind) or extra.get(kind)
    if not found:
        raise ValueError(f"no default LoRA target modules for model_type {kind!r} (from {path}); "
                         "build the adapter yourself, e.g. pyro_llm.models.lora_classifier(path, "
                         "num_labels=K, target_modules=(...)), and pass that model with its tokenizer")
    return tuple(found)


def resolve_model(model, tokenizer, num_classes: int):
    """``(peft model, tokenizer)`` from a peft model with a LoRA adapter (tokenizer given, or found
    in the model's folder) or from a local Hugging Face classifier folder, adapted by
    :func:`pyro_llm.models.lora_classifier` with ``num_labels=num_classes``."""
    if isinstance(model, (str, os.PathLike)):
        from ..models import lora_classifier

        path = Path(model)
        if not (path / "config.json").exists():
            raise ValueError(f"model={str(model)!r} is not a local Hugging Face model folder (no "
                             "config.json there)")
        peft_model, tok = lora_classifier(path, num_labels=num_classes,
                                          target_modules=_lora_targets(path))
        tok = tokenizer if tokenizer is not None else tok
        if getattr(tok, "pad_token_id", None) is None and getattr(tok, "eos_token", None):
            tok.pad_token = tok.eos_token  # decoders ship without one; the last real token is read
        if getattr(peft_model.config, "pad_token_id", None) is None:
            peft_model.config.pad_token_id = tok.pad_token_id
        return peft_model, tok
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a peft model with a LoRA adapter or a model folder path, "
                        f"got {type(model).__name__}")
    from peft.tuners.lora import LoraLayer

    if not any(isinstance(m, LoraLayer) for m in model.modules()) or not hasattr(model, "peft_config"):
        raise ValueError(
            f"model ({type(model).__name__}) has no LoRA adapter; add one with "
            "peft.get_peft_model(model, peft.LoraConfig(task_type='SEQ_CLS', r=8, "
            "target_modules=['query', 'value'])), or pass the model folder's path as model= "
            "(pyro_llm.models.lora_classifier then builds one)")
    if tokenizer is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if name and (Path(name) / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name)
        else:
            raise ValueError("tokenizer= is needed with a model object (none found in its folder "
                             f"{name!r}); pass the tokenizer the model was built with")
    return model, tokenizer


def check_classes(y: np.ndarray, num_labels: int, ids: np.ndarray, folds: int) -> None:
    """Every labelled class lies in ``0..num_labels-1``, all of them are labelled, and every fold's
    training rows (the labelled rows of the other folds) hold every class."""
    lab = y >= 0
    out = np.flatnonzero(lab & (y >= num_labels))
    if out.size:
        raise ValueError(f"label {y[out[0]]} at row {out[0]} is out of range: the model has "
                         f"{num_labels} labels (classes 0..{num_labels - 1})")
    seen = np.unique(y[lab])
    if len(seen) != num_labels:
        missing = sorted(set(range(num_labels)) - set(seen.tolist()))
        raise ValueError(f"the model has {num_labels} labels but the labelled rows hold classes "
                         f"{seen.tolist()} (none of {missing}); label rows of every class, or build "
                         f"the model with num_labels={len(seen)} and renumber the classes")
    for k in range(folds):
        present = set(np.unique(y[lab & (ids != k)]).tolist())
        for c in range(num_labels):
            if c not in present:
                raise ValueError(f"fold {k}'s training rows (the labelled rows of the other folds) "
                                 f"hold no row of class {c}, so its coder could never predict it; "
                                 f"label more rows of class {c}, use fewer folds, or pass fold_ids= "
                                 f"that spread class {c} over the folds")


