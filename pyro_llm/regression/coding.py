"""Cross-fitted coding of a text column by a fine-tuned LoRA classifier.

:func:`code_crossfit` splits the labelled rows into folds; fold k's coder is a fresh LoRA
adapter fine-tuned *only* on the labelled rows of the other folds (:mod:`.finetune`), and it
codes every row of fold k, labelled or not. No row is coded by a model that saw its label, which
is what keeps the downstream doubly robust estimator valid (see ``shared/INFERENCE.md``).

Posteriors (``posterior=``):

* ``"map"`` -- the fine-tuned adapter; ``spread`` is 0;
* ``"laplace"`` -- last-layer Laplace (:func:`pyro_llm.fit_laplace` over the classification head
  of the MAP adapter, dense curvature, prior precision by marginal likelihood) and its linearised
  (GLM) predictive with ``max(num_samples, 100)`` Monte Carlo draws of the logits (the draws are
  nearly free; 16 left 1-2 points of accuracy to Monte Carlo noise). On MiniLM with 120 reviews per
  fold it kept the MAP accuracy (0.70 vs 0.71) and halved the log-loss (0.57 vs 1.18); Laplace
  over every LoRA matrix (KFAC) was wider and less accurate there (0.62-0.67) and twice as slow;
* ``"ensemble"`` -- :data:`ENSEMBLE_MEMBERS` adapters fine-tuned from different seeds (the first
  is the MAP adapter), each member's probabilities one draw;
* ``"svi"`` -- Bayesian LoRA: LoRA B random around the MAP adapter (prior N(0, 0.1^2)), a
  mean-field Normal guide fitted by :func:`pyro_llm.fit_svi` (2 epochs, as
  :mod:`pyro_llm.demo`), ``num_samples`` draws.

Cost (all-MiniLM-L6-v2, LoRA on every block, one busy thread, ``max_length=64``, MAP): each
fold's fine-tuning ~50 s with 150 labelled rows and ~75 s with 500 (5 folds); coding ~130
reviews/s (texts are sorted by length, which saves ~25%). N = 2,000 took 260 s (150 labelled)
and 390 s (500 labelled); N = 10,000 with 500 labelled is estimated at 380 s of fine-tuning +
77 s of coding = ~7.6 min. ``"laplace"`` adds ~5 s per fold of 400 rows; ``"ensemble"``
multiplies the fine-tuning by 3; ``"svi"`` adds 2 epochs and ``num_samples`` forwards per row.

Cache (``cache_dir``): ``key.json`` holds a fingerprint of everything the result depends on
(base model weights, adapter configuration, tokenizer, texts, labels, fold ids, posterior,
fine-tuning settings, ``max_length``, ``num_samples``, ``seed``). A rerun with the same
``cache_dir`` and the same key skips finished folds and resumes unfinished coding (shard by
shard); a rerun with a different key is *refused* with an error naming what differs (use a new
``cache_dir``, or delete the old one). Per fold, ``fold_{k}/`` holds ``adapter/`` (peft
``save_pretrained`` of the fine-tuned adapter) and ``fit.json``, the posterior
(``laplace/``, ``ensemble/`` or ``svi/``), ``coded/`` (:func:`pyro_llm.code_corpus` shards)
and, once done, ``fold.json``. A fold interrupted while fine-tuning starts its fine-tuning
again (so that a resumed run equals an uninterrupted one); one interrupted while coding, or
finished but missing a coded shard, resumes from its saved adapter and posterior. A damaged
cache file is an error naming it (:func:`.coding_cache.read_record`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.util
import torch
from tqdm.auto import tqdm

from .._io import FileFormatError, write_json
from ..stream import code_corpus, load_coded
from . import coding_cache as cache
from . import coding_inputs as inputs
from . import finetune as ft
from .crossfit import fold_ids as assign_folds
from .finetune import FineTune
from .fold_posterior import ENSEMBLE_MEMBERS, laplace_draws, predictor_for

__all__ = ["CrossFitCoding", "FineTune", "code_crossfit", "posterior_spread", "POSTERIORS",
           "DEGENERATE_MARGIN", "ENSEMBLE_MEMBERS"]

POSTERIORS = ("map", "laplace", "ensemble", "svi")
# a fold's held-out accuracy must beat the majority-class rate (the most common class's share of
# all labelled rows: a fold's own 20-100 held-out rows give too noisy a rate) by this much
DEGENERATE_MARGIN = 0.05
SHARD_ROWS = 512  # rows per coded shard: the unit a resumed coding restarts from
CODE_BATCH = 32  # texts per forward when coding (sorted by length, so little padding)
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
        ``best_epoch`` per fold, ``seconds`` per fold (fine-tuning, posterior and coding, each
        stage counted once across resumed runs), ``total_seconds`` (this call), ``cache_dir`` (``None``
        for a temporary one), ``resumed_folds``, ``warnings`` (their messages), ``majority_rate``
        (the most common class's share of the labelled rows, which each fold's accuracy is checked
        against), and ``folds_detail`` (each fold's full record).
    """

    probs: np.ndarray
    spread: np.ndarray
    fold_ids: np.ndarray
    fitted_on: tuple
    fold_accuracy: np.ndarray
    classes: tuple
    info: dict


# ---------------------------------------------------------------------------- inputs
# ---------------------------------------------------------------------------- outputs
def posterior_spread(draws: torch.Tensor, mean: np.ndarray) -> np.ndarray:
    """Per row, the sd over posterior draws of a log-odds: of class 1 against class 0 (K = 2), of
    the row's top class (by the mean ``mean``, ``(N, K)``) against the rest (K > 2).

    ``draws`` is ``(S, N, K)`` probabilities (clamped at 1e-12 before the logarithm); zeros for
    a single draw.
    """
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
        what.append(f"is not more accurate than the majority class by {DEGENERATE_MARGIN}")
    if not what:
        return None
    return (f"code_crossfit: fold {k}'s coder " + " and ".join(what) + f" (held-out accuracy {acc:.3f}, "
            f"majority-class rate {majority:.3f}). The downstream estimate stays valid but gains little "
            "from this coder; label more rows, train longer (FineTune(epochs=...)), or try another "
            "learning rate (FineTune(lr=...))")


# ---------------------------------------------------------------------------- main
def code_crossfit(texts: Sequence[str], labels, *, model, tokenizer=None, posterior: str = "map",
                  folds: int = 5, fold_ids=None, seed: int = 0, cache_dir=None,
                  train: FineTune | None = None, max_length: int = 128, num_samples: int = 16,
                  progress: bool = True, downstream=None) -> CrossFitCoding:
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
    texts = inputs.check_texts(texts)
    y = inputs.check_labels(labels, len(texts))
    labelled = y >= 0
    if labelled.sum() < max(folds, 2):
        raise ValueError(f"{int(labelled.sum())} labelled rows cannot be split into {folds} folds "
                         "with rows to train on; label more rows or use fewer folds")
    if fold_ids is None:
        ids = assign_folds(labelled, folds, seed)
    else:
        ids = inputs.check_fold_ids(fold_ids, labelled, folds)
    num_seen = int(y[labelled].max()) + 1
    base, tok = inputs.resolve_model(model, tokenizer, num_seen)
    num_labels = inputs.num_labels_of(base)
    if num_labels is None:
        raise ValueError(f"{type(base).__name__} has no config.num_labels: model must be a sequence "
                         "classifier (AutoModelForSequenceClassification) with a LoRA adapter")
    inputs.check_classes(y, num_labels, ids, folds)
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
    model_hash, adapter_cfg = cache.model_fingerprint(base)
    key = {"format": "pyro_llm.crossfit", "version": _VERSION, "model": model_hash,
           "adapter_config": adapter_cfg, "tokenizer": cache.tokenizer_fingerprint(tok),
           "texts": cache.texts_fingerprint(texts), "labels": cache.array_fingerprint(y),
           "fold_ids": cache.array_fingerprint(ids), "folds": int(folds), "posterior": posterior,
           "train": train.to_dict(), "max_length": int(max_length), "num_samples": int(num_samples),
           "seed": int(seed)}
    if downstream is not None:   # fine-tuning for the downstream task: its data and weight are inputs too
        key["downstream"] = {"weight": downstream.weight, "family": downstream.family,
                             "X": cache.array_fingerprint(downstream.X_by_class.numpy()),
                             "y": cache.array_fingerprint(downstream.y.numpy())}
    temporary = cache_dir is None
    root = Path(tempfile.mkdtemp(prefix="pyro_llm_crossfit_")) if temporary else Path(cache_dir)
    rng_state = pyro.util.get_rng_state()
    try:
        cache.open_cache(root, key)
        run = _Run(texts, y, ids, base, tok, posterior, train, num_labels, max_length, num_samples,
                   seed, progress)
        run.downstream = downstream
        recs, probs, spread = [], np.zeros((len(texts), num_labels)), np.zeros(len(texts))
        majority = float(np.bincount(y[labelled], minlength=num_labels).max() / labelled.sum())
        for k in tqdm(range(folds), desc="cross-fit folds", disable=not progress):
            rec, p, s = run.fold(k, root / f"fold_{k}")
            rows = np.flatnonzero(ids == k)
            probs[rows], spread[rows] = p, s
            recs.append(rec)
            msg = _degenerate(k, rec["accuracy"], majority, rec["one_class"])
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
            "majority_rate": majority, "warnings": caught,
            "max_length": max_length, "num_samples": {"map": 1, "ensemble": ENSEMBLE_MEMBERS,
                                                        "laplace": laplace_draws(num_samples)
                                                        }.get(posterior, num_samples),
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

    downstream = None

    def fold_seed(self, k: int) -> int:
        return int(self.seed) * 1000 + k

    def fold(self, k: int, d: Path):
        done = d / "fold.json"
        rows = np.flatnonzero(self.ids == k)
        if done.exists() and (d / "coded").exists():
            rec = cache.read_record(done, "cross-fitting fold record", cache.FOLD_FIELDS,
                                    f"delete {d} and run again (the other folds are kept)")
            if rec["fold"] != k:
                raise FileFormatError(f"{done}: field 'fold' is {rec['fold']}, expected {k}; the fold "
                                      f"record is damaged: delete {d} and run again")
            try:
                probs, spread = self._read(d, rows)
                return {**rec, "resumed": True}, probs, spread
            except (FileNotFoundError, FileFormatError) as e:  # a shard lost: code it again
                warnings.warn(f"code_crossfit: {e}; fold {k} is coded again from its saved adapter and "
                              "posterior (its other shards are kept)", UserWarning, stacklevel=3)
        train_rows = np.flatnonzero((self.y >= 0) & (self.ids != k))
        texts = [self.texts[i] for i in train_rows]
        labels = self.y[train_rows]
        s = self.fold_seed(k)
        model = ft.fresh_adapter(self.base, s)
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "pad_token_id", 0) is None:
            cfg.pad_token_id = self.tok.pad_token_id  # decoder classifiers find the last token by it
        extra = None
        if self.downstream is not None:   # the other folds' unlabelled rows, with their outcomes
            unl = np.flatnonzero((self.y < 0) & (self.ids != k))
            extra = (self.downstream.for_rows(train_rows), [self.texts[i] for i in unl], unl)
        fit = _fit_or_load(model, self.tok, texts, labels, self.train, d, K=self.K,
                           max_length=self.max_length, seed=s, progress=self.progress, downstream=extra)
        predict, keep, post_rec = predictor_for(self.posterior, model, self.tok, texts, labels,
                                                self.train, d, K=self.K, max_length=self.max_length,
                                                num_samples=self.num_samples, seed=s,
                                                progress=self.progress)
        t_code = time.perf_counter()
        order = rows[np.argsort([len(self.texts[i]) for i in rows], kind="stable")]
        code_corpus([self.texts[i] for i in order], predict, d / "coded", ids=order.tolist(),
                    batch_size=CODE_BATCH, shard_size=SHARD_ROWS, keep=keep, progress=self.progress)
        probs, spread = self._read(d, rows)
        code_seconds = time.perf_counter() - t_code
        post_seconds = post_rec.get("seconds", sum(m.get("seconds", 0.0)
                                                   for m in post_rec.get("members", [])))
        held = rows[self.y[rows] >= 0]
        pred = probs[np.searchsorted(rows, held)].argmax(-1)
        acc = float((pred == self.y[held]).mean())
        heldout_majority = float(np.bincount(self.y[held], minlength=self.K).max() / len(held))
        rec = {"fold": k, "seed": s, "fit": fit, "posterior": post_rec, "accuracy": acc,
               "heldout_majority_rate": heldout_majority,
               "one_class": bool(len(np.unique(probs.argmax(-1))) == 1),
               "rows": int(len(rows)), "heldout_labelled": int(len(held)),
               "fit_seconds": fit.get("seconds", 0.0), "posterior_seconds": post_seconds,
               "code_seconds": code_seconds,
               # the work the fold took; a stage finished by an earlier, interrupted run counts once
               "seconds": fit.get("seconds", 0.0) + post_seconds + code_seconds}
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
            spread[pos] = posterior_spread(coded.draws, p)
        return probs, spread


def _fit_or_load(model, tok, texts, labels, train, d: Path, *, K, max_length, seed, progress,
                 downstream=None) -> dict:
    """Fine-tune ``model`` and save its adapter under ``d``, or load the adapter saved there."""
    f = d / "fit.json"
    if f.exists() and (d / "adapter").exists():
        rec = cache.read_record(f, "fine-tuning record", cache.FIT_FIELDS, f"delete {d} and run again")
        cache.load_adapter(model, d / "adapter")
        return {**rec, "resumed": True}
    rec = ft.finetune(model, tok, texts, labels, train, num_classes=K, max_length=max_length,
                      seed=seed, progress=progress, downstream=downstream)
    cache.save_adapter(model, d / "adapter")
    write_json(f, rec)
    return rec


