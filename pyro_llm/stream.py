"""Code a large corpus in bounded memory, shard by shard, with progress and resume.

:func:`code_corpus` pulls texts lazily from any iterable (a generator over 100,000+ documents
is never materialised), calls ``predict_fn(texts) -> probabilities`` on one batch at a time and
writes the results as safetensors shards of ``shard_size`` rows, each atomically (a temporary
file, then :func:`os.replace`), followed by ``manifest.json`` (also atomic). Only one batch of
texts and one shard of results are held in memory. After an interruption the same call
resumes: the documents of the finished shards are read from the iterator again, their
fingerprint checked, and not predicted.

What a shard stores for its ``n`` rows, from the ``S`` probability vectors ``p_s`` of each
document (``S = 1`` for a point model), set by ``keep``:

* ``"mean"`` -- ``probs`` ``(n, C)``: the predictive mean ``p̄ = (1/S) Σ_s p_s``;
* ``"uncertainty"`` -- also ``total = H[p̄]``, ``aleatoric = (1/S) Σ_s H[p_s]`` and
  ``epistemic = total - aleatoric`` (the mutual information), each ``(n,)``, in nats
  (:func:`pyro_llm.metrics.decompose`);
* ``"draws"`` (default) -- also ``draws`` ``(S, n, C)``, every draw: what
  ``regress(predictions=...)`` takes for multiple imputation.

Fingerprints: shard ``k`` records ``d_k = sha256(d_{k-1} || rows of shard k)`` (hex, ``d_{-1}``
empty), each row hashed as its length-prefixed UTF-8 text (and its id, when ``ids`` are given),
so a resume on a different corpus, or in a different order, is refused. The predictor's
fingerprint is recorded as well, so a resume with another model is refused too: ``fingerprint=``
when given, else the ``predict_fn``'s ``fingerprint`` attribute (the helpers below set one: a hash
of the adapter's tensors, of the posterior draws, of a Laplace posterior's MAP, prior precision
and curvature), else a hash of a plain callable's name and of the ``nn.Module`` tensors it is
bound to (:func:`~pyro_llm.predictors.predictor_fingerprint`; a warning says that this cannot
see everything a plain function depends on).

A resume reads every finished shard back (names, shapes, finite values, its fingerprint): a
shard that is missing or damaged is coded again from its rows, which the resume pulls anyway,
and the other shards are kept. ``manifest.json`` is read field by field
(:mod:`pyro_llm.coded_files`): a damaged one is an error naming the field.

Predictors (:mod:`pyro_llm.predictors`, re-exported here): :func:`map_predictor` (a peft /
Hugging Face model), :func:`posterior_predictor`
(a :class:`~pyro_llm.posterior.Posterior` through a :class:`~pyro_llm.BayesianLoRA`, with S
draws fixed once for the whole corpus) and :func:`method_predictor` (a posterior's own
``predict``, e.g. an ensemble or a Laplace posterior). Read results with :func:`load_coded`
(all rows) or :func:`iter_coded` (shard by shard).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ._io import FileFormatError, write_json
from .coded_files import (
    KEEP,
    MANIFEST,
    CodedCorpus,
    check_total,
    iter_coded,
    load_coded,
    new_manifest,
    read_manifest,
    read_shard,
    shard_file,
    write_shard,
)
from .metrics import decompose
from .predictors import map_predictor, method_predictor, posterior_predictor, predictor_fingerprint

__all__ = ["code_corpus", "load_coded", "iter_coded", "CodedCorpus", "CodingRun",
           "map_predictor", "posterior_predictor", "method_predictor", "KEEP", "MANIFEST"]

_SUM_TOL = 1e-3  # float32 softmax rows sum to 1 within ~C * 1e-7; logits miss it by far more


@dataclass(frozen=True)
class CodingRun:
    """What one :func:`code_corpus` call did: rows now in ``out_dir``, rows this call predicted
    (a finished shard found missing or damaged is predicted again and counted here), rows it
    verified and skipped (coded by an earlier call), and its wall time."""

    out_dir: Path
    rows: int
    shards: int
    coded: int
    skipped: int
    seconds: float


# ---------------------------------------------------------------------------- coding
def code_corpus(texts: Iterable[str], predict_fn: Callable[[list[str]], torch.Tensor], out_dir,
                *, ids: Iterable | None = None, batch_size: int = 32, shard_size: int = 4096,
                keep: str = "draws", resume: bool = True, total: int | None = None,
                progress: bool = True, fingerprint: str | None = None) -> CodingRun:
    """Code every text with ``predict_fn`` into safetensors shards under ``out_dir``.

    Parameters
    ----------
    texts:
        Any iterable of non-empty strings, read once, lazily (a generator is fine).
    predict_fn:
        ``predict_fn(list of B texts)`` -> probabilities ``(B, C)`` (a point model) or
        ``(S, B, C)`` (S posterior draws, the same S draws for every batch); see
        :func:`map_predictor`, :func:`posterior_predictor`, :func:`method_predictor`.
    out_dir:
        Folder for ``shard-{k:05d}.safetensors`` and ``manifest.json``.
    ids:
        Optional iterable of str or int ids, one per text (default: row numbers).
    batch_size, shard_size:
        Texts per ``predict_fn`` call; rows per shard (batches never cross shards).
    keep:
        ``"mean"``, ``"uncertainty"`` or ``"draws"``: what is stored (see the module docs).
    resume:
        Continue the run already in ``out_dir`` (checking corpus and settings); ``False``
        refuses an ``out_dir`` that holds a run.
    total:
        Number of texts, for the progress bar (default ``len(texts)`` if it has one).
    fingerprint:
        A name for the model (and its settings) that changes whenever it does: a resume with
        another is refused. Needed for a plain ``predict_fn`` whose model is not an
        ``nn.Module`` it is bound to (see the module docs); default the ``predict_fn``'s own.

    Example
    -------
    >>> import tempfile, torch
    >>> fn = lambda batch: torch.tensor([[0.25, 0.75]] * len(batch))
    >>> d = tempfile.mkdtemp()
    >>> code_corpus(["a", "b", "c"], fn, d, batch_size=2, progress=False, fingerprint="constant").rows
    3
    >>> load_coded(d).probs[2].tolist()
    [0.25, 0.75]
    """
    import time

    settings = _settings(keep, batch_size, shard_size, predict_fn, ids is not None, fingerprint)
    if total is None and hasattr(texts, "__len__"):
        total = len(texts)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    man = _open(out_dir, settings, resume)
    rows = _rows(texts, ids)
    with tqdm(total=total, unit="doc", desc="code", disable=not progress, smoothing=0.1) as bar:
        skipped, coded = _verify(rows, man, out_dir, predict_fn, bar)
        first = next(rows, None)
        if first is None:
            if not man["shards"]:
                raise ValueError("texts yielded no documents: the corpus is empty")
            if not man["complete"]:
                _finish(out_dir, man)
            return CodingRun(out_dir, man["rows"], len(man["shards"]), coded, skipped,
                             time.perf_counter() - start)
        if man["complete"]:
            raise ValueError(f"{out_dir} holds a finished run of {man['rows']} texts, but the corpus "
                             f"has more; code the rest into a new out_dir (or delete {out_dir})")
        rows = itertools.chain([first], rows)
        write_json(out_dir / MANIFEST, man)
        while (n := _code_shard(rows, predict_fn, out_dir, man, bar)) > 0:
            coded += n
    _finish(out_dir, man)
    return CodingRun(out_dir, man["rows"], len(man["shards"]), coded, skipped,
                     time.perf_counter() - start)


def _settings(keep, batch_size, shard_size, predict_fn, has_ids, fingerprint) -> dict:
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not callable(predict_fn):
        raise TypeError(f"predict_fn must be callable (texts -> probabilities), got "
                        f"{type(predict_fn).__name__}")
    fp, verified = predictor_fingerprint(predict_fn, fingerprint)
    if not verified:
        warnings.warn("code_corpus: predict_fn is a plain callable without a fingerprint; its "
                      "fingerprint covers only its name and the nn.Module tensors it is bound to, so a "
                      "resume with a changed model held elsewhere cannot be detected. Pass "
                      "fingerprint='a name that changes with the model' (or use map_predictor, "
                      "posterior_predictor, method_predictor)", UserWarning, stacklevel=3)
    return {"keep": keep, "batch_size": batch_size, "shard_size": shard_size, "predictor": fp,
            "ids": has_ids}


def _rows(texts, ids) -> Iterator[tuple[str, object]]:
    """``(text, id)`` pairs, checked one by one as they are pulled."""
    for name, x in (("texts", texts), ("ids", ids)):
        if isinstance(x, (str, bytes)):
            raise TypeError(f"{name} is a single string; pass an iterable of them (e.g. a list)")
    ids_it = iter(ids) if ids is not None else None
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            what = f"of type {type(text).__name__}" if not isinstance(text, str) else "empty"
            raise ValueError(f"text at row {i} is {what}: every text must be a non-empty string; "
                             "fix or drop it and call again (finished shards are kept)")
        if ids_it is None:
            yield text, i
            continue
        key = next(ids_it, _END)
        if key is _END:
            raise ValueError(f"ids ran out at row {i}: give exactly one id per text")
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            key = int(key)  # numpy integers too
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise TypeError(f"id at row {i} is {key!r}: ids must be str or int")
        yield text, key
    if ids_it is not None and next(ids_it, _END) is not _END:
        raise ValueError("there are more ids than texts: give exactly one id per text")


_END = object()


def _hash_row(h, text: str, key, with_id: bool) -> None:
    for part in (text, json.dumps(key)) if with_id else (text,):
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)


def _open(out_dir: Path, settings: dict, resume: bool) -> dict:
    """The manifest of ``out_dir``: the existing run's (checked), or a new one."""
    f = out_dir / MANIFEST
    if not f.exists():
        if out_dir.exists() and any(out_dir.glob("shard-*.safetensors")):
            raise FileExistsError(f"{out_dir} holds shard files but no {MANIFEST}; choose a new "
                                  "out_dir or delete those files")
        return new_manifest(settings)
    if not resume:
        raise FileExistsError(f"{out_dir} already holds a coding run ({f}); pass resume=True to "
                              "continue it, or choose a new out_dir")
    man = read_manifest(out_dir)
    diff = {k: (man["settings"].get(k), v) for k, v in settings.items()
            if man["settings"].get(k) != v}
    if diff:
        said = ", ".join(f"{k}: run {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{out_dir} holds a run with other settings ({said}); resume with the "
                         "same predictor and settings, or choose a new out_dir")
    check_total(out_dir, man)
    return man


def _verify(rows: Iterator, man: dict, out_dir: Path, predict_fn, bar) -> tuple[int, int]:
    """Pull the rows of the finished shards, check their fingerprints and read each shard back;
    a shard that is missing or damaged is coded again from its rows (the others are kept).
    Returns ``(rows skipped, rows coded again)``."""
    digest, done, redone = "", 0, 0
    for k, sh in enumerate(man["shards"]):
        try:
            read_shard(out_dir, man, k)
            damaged = None
        except (FileNotFoundError, FileFormatError) as e:
            damaged = str(e)
        h, start, kept = hashlib.sha256(digest.encode()), done, []
        for text, key in itertools.islice(rows, sh["rows"]):
            _hash_row(h, text, key, man["settings"]["ids"])
            if damaged:
                kept.append((text, key))
            done += 1
        if done - start < sh["rows"]:
            raise ValueError(f"the corpus ended after {done} texts, but {out_dir} already "
                             f"holds {man['rows']} coded rows: is it the same corpus?")
        if h.hexdigest() != sh["digest"]:
            raise ValueError(f"texts (or ids) at rows {start}-{done - 1} differ from those "
                             f"coded into {sh['file']} of {out_dir}: this is another corpus or "
                             "order; choose a new out_dir for it")
        if damaged:
            warnings.warn(f"code_corpus: {damaged}. Its {sh['rows']} rows are coded again; the other "
                          "shards are kept", UserWarning, stacklevel=3)
            tensors, keys, _ = _predict(iter(kept), predict_fn, man, k, start, digest, bar)
            write_shard(out_dir, k, tensors, keys if man["settings"]["ids"] else None, start,
                        sh["digest"])
            read_shard(out_dir, man, k)
            redone += sh["rows"]
        else:
            bar.update(sh["rows"])
        digest = sh["digest"]
    return done - redone, redone


def _code_shard(rows: Iterator, predict_fn, out_dir: Path, man: dict, bar) -> int:
    """Predict up to ``shard_size`` rows, write them as shard ``k``; return the row count."""
    k = len(man["shards"])
    prev = man["shards"][-1]["digest"] if k else ""
    tensors, keys, digest = _predict(rows, predict_fn, man, k, man["rows"], prev, bar)
    n = len(keys)
    if n:
        write_shard(out_dir, k, tensors, keys if man["settings"]["ids"] else None, man["rows"], digest)
        man["shards"].append({"file": shard_file(k), "first_row": man["rows"], "rows": n,
                              "digest": digest})
        man["rows"] += n
        write_json(out_dir / MANIFEST, man)
    return n


def _predict(rows: Iterator, predict_fn, man: dict, k: int, first_row: int, prev: str, bar):
    """``(tensors, ids, digest)`` of up to ``shard_size`` rows, predicted one batch at a time."""
    st = man["settings"]
    h = hashlib.sha256(prev.encode())
    parts: dict[str, list[torch.Tensor]] = {}
    keys: list = []
    for j in itertools.count():
        batch = list(itertools.islice(rows, min(st["batch_size"], st["shard_size"] - len(keys))))
        if not batch:
            break
        texts = [t for t, _ in batch]
        at = first_row + len(keys)
        where = f"batch {j} of shard {k} (rows {at}-{at + len(texts) - 1})"
        probs = _checked(predict_fn(texts), len(texts), man, where)
        for name, t in _summaries(probs, st["keep"]).items():
            parts.setdefault(name, []).append(t)
        for text, key in batch:
            _hash_row(h, text, key, st["ids"])
        keys += [key for _, key in batch]
        bar.update(len(batch))
    tensors = {name: torch.cat(ts, dim=-2 if name == "draws" else 0).contiguous()
               for name, ts in parts.items()}
    return tensors, keys, h.hexdigest()


def _checked(probs, b: int, man: dict, where: str) -> torch.Tensor:
    """``predict_fn``'s output as float32 ``(S, B, C)``, or an error naming the batch."""
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"predict_fn returned a {type(probs).__name__} for {where}; "
                        "it must return a torch.Tensor of probabilities")
    shape = tuple(probs.shape)
    probs = probs.detach().float().cpu()
    if probs.dim() == 2:
        probs = probs.unsqueeze(0)
    if probs.dim() != 3 or probs.shape[1] != b:
        raise ValueError(f"predict_fn returned shape {shape} for {where} of {b} "
                         f"texts; expected ({b}, C) or (S, {b}, C)")
    S, _, C = probs.shape
    if man["num_samples"] is None:
        man["num_samples"], man["num_classes"] = S, C
    if (S, C) != (man["num_samples"], man["num_classes"]):
        raise ValueError(f"predict_fn returned {S} draws x {C} classes for {where}, but "
                         f"{man['num_samples']} x {man['num_classes']} before; keep them fixed")
    if not torch.isfinite(probs).all():
        raise ValueError(f"predict_fn returned NaN or inf for {where}; check the model's outputs")
    if (probs < 0).any() or ((probs.sum(-1) - 1).abs() > _SUM_TOL).any():
        raise ValueError(f"predict_fn returned rows that are not probabilities for {where} "
                         "(negative, or not summing to 1); apply softmax to logits")
    return probs


def _summaries(probs: torch.Tensor, keep: str) -> dict[str, torch.Tensor]:
    out = {"probs": probs.mean(0)}
    if keep in ("uncertainty", "draws"):
        out.update(decompose(probs))
    if keep == "draws":
        out["draws"] = probs
    return out


def _finish(out_dir: Path, man: dict) -> None:
    man["complete"] = True
    write_json(out_dir / MANIFEST, man)
