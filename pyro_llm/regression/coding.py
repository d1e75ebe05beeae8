"""Cross-fitted coding of a text column by a fine-tuned LoRA classifier.

:func:`code_crossfit` splits the labelled rows into folds; fold k's coder is a fresh LoRA
adapter fine-tuned *only* on the labelled rows of the other folds (:mod:`.finetune`), and it
codes every row of fold k, labelled or not. No row is coded by a model that saw its label, which
is what keeps the downstream doubly robust estimator valid (see ``shared/INFERENCE.md``).

Posteriors (``posterior=``):

* ``"map"`` -- the fine-tuned adapter; ``spread`` is 0;
* ``"laplace"`` -- Laplace-LoRA (:func:`pyro_llm.fit_laplace`, KFAC over every LoRA A and B,
  prior precision by marginal likelihood) on the MAP adapter, its linearised (GLM) predictive
  with ``num_samples`` Monte Carlo draws of the logits;
* ``"ensemble"`` -- :data:`ENSEMBLE_MEMBERS` adapters fine-tuned from different seeds (the first
  is the MAP adapter), each member's probabilities one draw;
* ``"svi"`` -- Bayesian LoRA: LoRA B random around the MAP adapter (prior N(0, 0.1^2)), a
  mean-field Normal guide fitted by :func:`pyro_llm.fit_svi` (2 epochs, as
  :mod:`pyro_llm.demo`), ``num_samples`` draws.

Cache (``cache_dir``): ``key.json`` holds a fingerprint of everything the result depends on
(base model weights, adapter configuration, tokenizer, texts, labels, fold ids, posterior,
fine-tuning settings, ``max_length``, ``num_samples``, ``seed``). A rerun with the same
``cache_dir`` and the same key skips finished folds and resumes unfinished coding (shard by
shard); a rerun with a different key is *refused* with an error naming what differs (use a new
``cache_dir``, or delete the old one). Per fold, ``fold_{k}/`` holds ``adapter/`` (peft
``save_pretrained`` of the fine-tuned adapter) and ``fit.json``, the posterior
(``laplace/``, ``ensemble/`` or ``svi/``), ``coded/`` (:func:`pyro_llm.code_corpus` shards)
and, once done, ``fold.json``. A fold interrupted while fine-tuning starts its fine-tuning
again (so that a resumed run equals an uninterrupted one); one interrupted while coding
resumes at its last finished shard.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import write_json
from ..stream import code_corpus, load_coded
from . import finetune as ft
from .crossfit import fold_ids as assign_folds
from .finetune import FineTune
from .fold_posterior import ENSEMBLE_MEMBERS, predictor_for

__all__ = ["CrossFitCoding", "FineTune", "code_crossfit", "POSTERIORS", "DEGENERATE_MARGIN",
           "ENSEMBLE_MEMBERS", "save_adapter", "load_adapter"]

POSTERIORS = ("map", "laplace", "ensemble", "svi")
DEGENERATE_MARGIN = 0.05  # held-out accuracy must beat the majority-class rate by this much
_SHARD_ROWS = 512
_CODE_BATCH = 32
_VERSION = 1


@dataclass(frozen=True, eq=False)
class CrossFitCoding:
    """The cross-fitted coding of every row.

    Attributes
    ----------
    probs:
        ``(N, K)`` float64 posterior-mean predictive class probabilities; row ``i`` from the model
        of fold ``fold_ids[i]``.
    spread:
        ``(N,)`` float64 posterior spread per row: the sd over posterior draws of the log-odds of
        the row's top class against the rest (K > 2), of class 1 against class 0 (K = 2); zeros
        for ``posterior="map"``.
    fold_ids:
        ``(N,)`` int: which fold's model coded the row.
    fitted_on:
        Per fold, the sorted int row indices the model was fine-tuned on (the labelled rows of
        the other folds, early-stopping rows included).
    fold_accuracy:
        ``(folds,)`` accuracy of each fold's model on its own held-out labelled rows.
    classes:
        The class indices ``(0, ..., K-1)``.
    info:
        ``posterior``, ``train`` (the :class:`FineTune` settings), ``lr``, ``epochs_run`` and
        ``best_epoch`` per fold, ``seconds`` per fold, ``total_seconds``, ``cache_dir`` (``None``
        for a temporary one), ``resumed_folds``, ``warnings`` (their messages), ``majority_rate``
        per fold, and ``folds_detail`` (each fold's full record).
    """

    probs: np.ndarray
    spread: np.ndarray
    fold_ids: np.ndarray
    fitted_on: tuple
    fold_accuracy: np.ndarray
    classes: tuple
    info: dict


# ---------------------------------------------------------------------------- inputs
def _check_texts(texts) -> list[str]:
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


def _check_labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have one entry per text: shape ({n},), got {y.shape}")
    if y.dtype.kind not in "biuf":
        raise ValueError(f"labels must be integer class indices 0..K-1 (-1 where unlabelled), got "
                         f"dtype {y.dtype}; map class names to indices first")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:
            raise ValueError(f"labels contain {y[bad[0]]} at rows {bad[:5].tolist()}; mark "
                             "unlabelled rows with -1, not NaN")
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


def _check_fold_ids(ids, labelled: np.ndarray, folds: int) -> np.ndarray:
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


def _num_labels(model) -> int | None:
    cfg = getattr(model, "config", None)
    k = getattr(cfg, "num_labels", None)
    return int(k) if k is not None else None


def _resolve_model(model, tokenizer, num_classes: int):
    """``(peft model, tokenizer)`` from a peft model or a local model folder."""
    if isinstance(model, (str, os.PathLike)):
        from ..models import lora_classifier

        path = Path(model)
        if not (path / "config.json").exists():
            raise ValueError(f"model={str(model)!r} is not a local Hugging Face model folder (no "
                             "config.json there)")
        peft_model, tok = lora_classifier(path, num_labels=num_classes)
        return peft_model, tokenizer if tokenizer is not None else tok
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


def _check_classes(y: np.ndarray, num_labels: int, ids: np.ndarray, folds: int) -> None:
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


# ---------------------------------------------------------------------------- cache key
def _hash_bytes(h, b: bytes) -> None:
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)


def _hash_tensors(named) -> str:
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().cpu().contiguous()
        _hash_bytes(h, f"{name}{tuple(t.shape)}{t.dtype}".encode())
        _hash_bytes(h, t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _is_adapter(name: str) -> bool:
    return "lora_" in name or ".modules_to_save." in name


def _model_key(model) -> tuple[str, dict]:
    base = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if not _is_adapter(n)]
    cfg = model.peft_config[model.active_adapter]
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    adapter = json.loads(json.dumps(raw, sort_keys=True, default=lambda v: sorted(v) if isinstance(
        v, (set, frozenset)) else repr(v)))
    return _hash_tensors(base), adapter


def _tokenizer_key(tok) -> str:
    h = hashlib.sha256(type(tok).__name__.encode())
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    _hash_bytes(h, json.dumps(sorted(vocab.items())).encode())
    _hash_bytes(h, json.dumps([getattr(tok, "pad_token_id", None), getattr(tok, "padding_side", None),
                               getattr(tok, "truncation_side", None)]).encode())
    probe = tok(["The quick brown fox, 1999."])["input_ids"]  # normalisation and special tokens
    _hash_bytes(h, json.dumps(probe).encode())
    return h.hexdigest()[:32]


def _texts_key(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        _hash_bytes(h, t.encode("utf-8"))
    return h.hexdigest()[:32]


def _array_key(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:32]


def _open_cache(root: Path, key: dict) -> None:
    f = root / "key.json"
    if f.exists():
        old = json.loads(f.read_text())
        diff = [k for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k)]
        if diff:
            said = "; ".join(f"{k}: cached {old.get(k)!r:.80} vs now {key.get(k)!r:.80}" for k in diff)
            raise ValueError(f"cache_dir {root} holds a cross-fitting run with other inputs or settings "
                             f"(differing: {', '.join(diff)}; {said}); pass a new cache_dir, or delete "
                             f"{root} to start over")
        return
    if root.exists() and any(root.glob("fold_*")):
        raise ValueError(f"cache_dir {root} holds fold folders but no key.json; pass a new cache_dir "
                         "or delete it")
    write_json(f, key)


# ---------------------------------------------------------------------------- outputs
def _spread(draws: torch.Tensor, mean: np.ndarray) -> np.ndarray:
    """sd over draws of the log-odds of class 1 vs 0 (K = 2) or of the top class vs the rest."""
    p = draws.double().clamp(1e-12, 1.0).numpy()
    if p.shape[0] < 2:
        return np.zeros(p.shape[1])
    if p.shape[2] == 2:
        lo = np.log(p[..., 1]) - np.log(p[..., 0])
    else:
        top = mean.argmax(-1)
        pt = np.take_along_axis(p, top[None, :, None], 2)[..., 0]
        lo = np.log(pt) - np.log(np.clip(1 - pt, 1e-12, None))
    return lo.std(0, ddof=1)


def _degenerate(k: int, acc: float, majority: float, one_class: bool) -> str | None:
    what = []
    if one_class:
        what.append("predicts a single class for every row")
    if acc < majority + DEGENERATE_MARGIN:
        what.append(f"its held-out accuracy {acc:.3f} is not above the majority-class rate "
                    f"{majority:.3f} by {DEGENERATE_MARGIN}")
    if not what:
        return None
    return (f"code_crossfit: fold {k}'s coder " + " and ".join(what) + " (held-out accuracy "
            f"{acc:.3f}, majority-class rate {majority:.3f}). The downstream estimate stays valid but "
            "gains little from this coder; label more rows, train longer (FineTune(epochs=...)), or "
            "try another learning rate (FineTune(lr=...))")


# ---------------------------------------------------------------------------- main
def code_crossfit(texts: Sequence[str], labels, *, model, tokenizer=None, posterior: str = "map",
                  folds: int = 5, fold_ids=None, seed: int = 0, cache_dir=None,
                  train: FineTune | None = None, max_length: int = 128, num_samples: int = 16,
                  progress: bool = True) -> CrossFitCoding:
    """Code every text with a LoRA classifier that never saw the row's label.

    Parameters
    ----------
    texts:
        N non-empty strings.
    labels:
        ``(N,)`` integer class indices 0..K-1, -1 where unlabelled. K is the model's number of
        labels and every class must be labelled in every fold's training rows.
    model:
        A peft model with a LoRA adapter on a sequence classifier
        (:func:`pyro_llm.models.lora_classifier` builds one), or the path of a local Hugging Face
        classifier folder (built with ``lora_classifier(path, num_labels=K)``). It is not changed:
        each fold fine-tunes a copy with a fresh adapter (a trained adapter passed in is
        discarded, with a warning).
    tokenizer:
        The model's tokenizer; optional with a folder path (read from the folder).
    posterior:
        ``"map"``, ``"laplace"``, ``"ensemble"`` or ``"svi"`` (see the module docs).
    folds, fold_ids:
        Number of folds; fold of each row (default
        :func:`pyro_llm.regression.crossfit.fold_ids` of the labelled rows with ``seed``).
    seed:
        Seeds the fold assignment, each fold's adapter initialisation, data order, early-stopping
        split and posterior draws.
    cache_dir:
        Folder that keeps each fold's adapter, posterior and coded rows, so a rerun resumes (see
        the module docs); ``None`` uses a temporary folder, deleted at the end.
    train:
        Fine-tuning settings, a :class:`FineTune` (default ``FineTune()``).
    max_length:
        Tokens per text (longer texts are truncated).
    num_samples:
        Posterior predictive draws per row (``"laplace"``, ``"svi"``).
    progress:
        Show tqdm progress bars.

    Returns
    -------
    CrossFitCoding

    Example
    -------
    >>> coding = code_crossfit(df.text, df.label.fillna(-1).astype(int),     # doctest: +SKIP
    ...                        model=pyro_llm.data.minilm_path(), cache_dir="coding_cache")
    >>> coding.fold_accuracy                                                 # doctest: +SKIP
    """
    t_start = time.perf_counter()
    if posterior not in POSTERIORS:
        raise ValueError(f"unknown posterior {posterior!r}; choose one of {POSTERIORS} "
                         "(PoLAR-VBLL is not offered for cross-fitted coding)")
    train = FineTune() if train is None else train
    if not isinstance(train, FineTune):
        raise TypeError(f"train must be a FineTune(...), got {type(train).__name__}")
    for name, v in (("folds", folds), ("max_length", max_length), ("num_samples", num_samples)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if posterior == "svi" and num_samples < 2 or posterior == "laplace" and num_samples < 2:
        raise ValueError(f"posterior={posterior!r} needs num_samples >= 2 to measure a spread")
    texts = _check_texts(texts)
    y = _check_labels(labels, len(texts))
    labelled = y >= 0
    if labelled.sum() < max(folds, 2):
        raise ValueError(f"{int(labelled.sum())} labelled rows cannot be split into {folds} folds "
                         "with rows to train on; label more rows or use fewer folds")
    if fold_ids is None:
        ids = assign_folds(labelled, folds, seed)
    else:
        ids = _check_fold_ids(fold_ids, labelled, folds)
    num_seen = int(y[labelled].max()) + 1
    base, tok = _resolve_model(model, tokenizer, num_seen)
    num_labels = _num_labels(base)
    if num_labels is None:
        raise ValueError(f"{type(base).__name__} has no config.num_labels: model must be a sequence "
                         "classifier (AutoModelForSequenceClassification) with a LoRA adapter")
    _check_classes(y, num_labels, ids, folds)
    if getattr(tok, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token, needed to batch texts; set one, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token")
    caught: list[str] = []
    if ft.adapter_is_trained(base):
        msg = ("code_crossfit: the model's LoRA adapter (or head) is already trained; each fold "
               "starts from a fresh adapter instead, so that no label reaches a fold's coder through "
               "it (its training is not used)")
        warnings.warn(msg, UserWarning, stacklevel=2)
        caught.append(msg)
    model_hash, adapter_cfg = _model_key(base)
    key = {"format": "pyro_llm.crossfit", "version": _VERSION, "model": model_hash,
           "adapter_config": adapter_cfg, "tokenizer": _tokenizer_key(tok), "texts": _texts_key(texts),
           "labels": _array_key(y), "fold_ids": _array_key(ids), "folds": int(folds),
           "posterior": posterior, "train": train.to_dict(), "max_length": int(max_length),
           "num_samples": int(num_samples), "seed": int(seed)}
    temporary = cache_dir is None
    root = Path(tempfile.mkdtemp(prefix="pyro_llm_crossfit_")) if temporary else Path(cache_dir)
    import pyro

    rng_state = pyro.util.get_rng_state()
    try:
        _open_cache(root, key)
        run = _Run(texts, y, ids, base, tok, posterior, train, num_labels, max_length, num_samples,
                   seed, progress)
        recs, probs, spread = [], np.zeros((len(texts), num_labels)), np.zeros(len(texts))
        for k in tqdm(range(folds), desc="cross-fit folds", disable=not progress):
            rec, p, s = run.fold(k, root / f"fold_{k}")
            rows = np.flatnonzero(ids == k)
            probs[rows], spread[rows] = p, s
            recs.append(rec)
            msg = _degenerate(k, rec["accuracy"], rec["majority_rate"], rec["one_class"])
            if msg:
                warnings.warn(msg, UserWarning, stacklevel=2)
                caught.append(msg)
    finally:
        pyro.util.set_rng_state(rng_state)
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    fitted_on = tuple(np.flatnonzero(labelled & (ids != k)) for k in range(folds))
    info = {"posterior": posterior, "train": train.to_dict(), "lr": train.lr,
            "epochs_run": [r["fit"]["epochs_run"] for r in recs],
            "best_epoch": [r["fit"]["best_epoch"] for r in recs],
            "seconds": [r["seconds"] for r in recs], "total_seconds": time.perf_counter() - t_start,
            "cache_dir": None if temporary else str(root),
            "resumed_folds": [k for k, r in enumerate(recs) if r.get("resumed")],
            "majority_rate": [r["majority_rate"] for r in recs], "warnings": caught,
            "max_length": max_length, "num_samples": num_samples if posterior != "map" else 1,
            "folds_detail": recs}
    return CrossFitCoding(probs=probs, spread=spread, fold_ids=ids, fitted_on=fitted_on,
                          fold_accuracy=np.array([r["accuracy"] for r in recs]),
                          classes=tuple(range(num_labels)), info=info)


class _Run:
    """One cross-fitting run's shared inputs; :meth:`fold` fits (or reloads) and codes fold k."""

    def __init__(self, texts, y, ids, base, tok, posterior, train, num_labels, max_length,
                 num_samples, seed, progress):
        self.texts, self.y, self.ids, self.base, self.tok = texts, y, ids, base, tok
        self.posterior, self.train, self.K = posterior, train, num_labels
        self.max_length, self.num_samples, self.seed, self.progress = (max_length, num_samples,
                                                                       seed, progress)

    def fold_seed(self, k: int) -> int:
        return int(self.seed) * 1000 + k

    def fold(self, k: int, d: Path):
        done = d / "fold.json"
        rows = np.flatnonzero(self.ids == k)
        if done.exists() and (d / "coded").exists():
            rec = {**json.loads(done.read_text()), "resumed": True}
            probs, spread = self._read(d, rows)
            return rec, probs, spread
        t0 = time.perf_counter()
        train_rows = np.flatnonzero((self.y >= 0) & (self.ids != k))
        texts = [self.texts[i] for i in train_rows]
        labels = self.y[train_rows]
        s = self.fold_seed(k)
        model = ft.fresh_adapter(self.base, s)
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "pad_token_id", 0) is None:
            cfg.pad_token_id = self.tok.pad_token_id  # decoder classifiers find the last token by it
        fit = _fit_or_load(model, self.tok, texts, labels, self.train, d, K=self.K,
                           max_length=self.max_length, seed=s, progress=self.progress)
        predict, keep, post_rec = predictor_for(self.posterior, model, self.tok, texts, labels,
                                                self.train, d, K=self.K, max_length=self.max_length,
                                                num_samples=self.num_samples, seed=s,
                                                progress=self.progress)
        order = rows[np.argsort([len(self.texts[i]) for i in rows], kind="stable")]
        code_corpus([self.texts[i] for i in order], predict, d / "coded", ids=order.tolist(),
                    batch_size=_CODE_BATCH, shard_size=_SHARD_ROWS, keep=keep, progress=self.progress)
        probs, spread = self._read(d, rows)
        held = rows[self.y[rows] >= 0]
        pred = probs[np.searchsorted(rows, held)].argmax(-1)
        acc = float((pred == self.y[held]).mean())
        majority = float(np.bincount(self.y[held], minlength=self.K).max() / len(held))
        rec = {"fold": k, "seed": s, "fit": fit, "posterior": post_rec, "accuracy": acc,
               "majority_rate": majority, "one_class": bool(len(np.unique(probs.argmax(-1))) == 1),
               "rows": int(len(rows)), "heldout_labelled": int(len(held)),
               "seconds": time.perf_counter() - t0}
        write_json(done, rec)
        return rec, probs, spread

    def _read(self, d: Path, rows: np.ndarray):
        coded = load_coded(d / "coded")
        pos = np.searchsorted(rows, np.asarray(coded.ids, dtype=np.int64))
        if len(pos) != len(rows) or not np.array_equal(rows[pos], np.asarray(coded.ids)):
            raise ValueError(f"{d / 'coded'} holds other rows than fold {d.name}'s; delete {d} and "
                             "run again")
        probs = np.zeros((len(rows), self.K))
        p = coded.probs.double().numpy()
        probs[pos] = p / p.sum(-1, keepdims=True)
        spread = np.zeros(len(rows))
        if coded.draws is not None and coded.draws.shape[0] > 1:
            spread[pos] = _spread(coded.draws, p)
        return probs, spread


def _fit_or_load(model, tok, texts, labels, train, d: Path, *, K, max_length, seed, progress) -> dict:
    """Fine-tune ``model`` and save its adapter under ``d``, or load the adapter saved there."""
    f = d / "fit.json"
    if f.exists() and (d / "adapter").exists():
        load_adapter(model, d / "adapter")
        return {**json.loads(f.read_text()), "resumed": True}
    rec = ft.finetune(model, tok, texts, labels, train, num_classes=K, max_length=max_length,
                      seed=seed, progress=progress)
    save_adapter(model, d / "adapter")
    write_json(f, rec)
    return rec


def save_adapter(model, path: Path) -> None:
    """peft ``save_pretrained`` into ``path``, replacing it only once the new one is complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_adapter(model, path: Path) -> None:
    """Load a :func:`save_adapter` folder's weights into ``model`` (same adapter config)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("adapter_model.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no adapter_model.safetensors; delete its fold folder "
                                "and run again")
    out = set_peft_model_state_dict(model, load_file(str(files[0])))
    missing = [n for n in getattr(out, "unexpected_keys", [])]
    if missing:
        raise ValueError(f"the adapter in {path} does not fit the model (unexpected {missing[:3]})")
