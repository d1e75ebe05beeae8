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
so a resume on a different corpus, or in a different order, is refused. A ``predict_fn`` with
a ``fingerprint`` attribute (the helpers below set one: a hash of the adapter's tensors or of
the posterior draws) is recorded as well, so a resume with another model is refused too.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ._io import save_safetensors
from ._io import write_json as _write_json
from .metrics import decompose

__all__ = ["code_corpus", "load_coded", "iter_coded", "CodedCorpus", "CodingRun",
           "map_predictor", "posterior_predictor", "method_predictor"]

from .predictors import map_predictor, method_predictor, posterior_predictor  # noqa: E402

MANIFEST = "manifest.json"
KEEP = ("mean", "uncertainty", "draws")
_VERSION = 1
_SUM_TOL = 1e-3  # float32 softmax rows sum to 1 within ~C * 1e-7; logits miss it by far more


@dataclass(frozen=True)
class CodingRun:
    """What one :func:`code_corpus` call did: rows now in ``out_dir``, rows this call predicted,
    rows it verified and skipped (coded by an earlier call), and its wall time."""

    out_dir: Path
    rows: int
    shards: int
    coded: int
    skipped: int
    seconds: float


@dataclass(frozen=True)
class CodedCorpus:
    """Coded rows: ``probs`` ``(N, C)`` and, as stored, ``total`` / ``aleatoric`` /
    ``epistemic`` ``(N,)`` and ``draws`` ``(S, N, C)`` (else ``None``); ``ids`` are the given
    ids or the row numbers."""

    probs: torch.Tensor
    ids: list
    total: torch.Tensor | None = None
    aleatoric: torch.Tensor | None = None
    epistemic: torch.Tensor | None = None
    draws: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.probs.shape[0]

    def to_frame(self):
        """A pandas DataFrame indexed by id: ``p0 .. p{C-1}`` and the stored uncertainties
        (write it with ``.to_parquet`` where pyarrow is installed)."""
        import pandas as pd

        cols = {f"p{c}": self.probs[:, c].numpy() for c in range(self.probs.shape[1])}
        for k in ("total", "aleatoric", "epistemic"):
            if getattr(self, k) is not None:
                cols[k] = getattr(self, k).numpy()
        return pd.DataFrame(cols, index=pd.Index(self.ids, name="id"))


# ---------------------------------------------------------------------------- coding
def code_corpus(texts: Iterable[str], predict_fn: Callable[[list[str]], torch.Tensor], out_dir,
                *, ids: Iterable | None = None, batch_size: int = 32, shard_size: int = 4096,
                keep: str = "draws", resume: bool = True, total: int | None = None,
                progress: bool = True) -> CodingRun:
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

    Example
    -------
    >>> import tempfile, torch
    >>> fn = lambda batch: torch.tensor([[0.25, 0.75]] * len(batch))
    >>> d = tempfile.mkdtemp()
    >>> code_corpus(["a", "b", "c"], fn, d, batch_size=2, progress=False).rows
    3
    >>> load_coded(d).probs[2].tolist()
    [0.25, 0.75]
    """
    import time

    settings = _settings(keep, batch_size, shard_size, predict_fn, ids is not None)
    if total is None and hasattr(texts, "__len__"):
        total = len(texts)
    out_dir = Path(out_dir)
    start = time.perf_counter()
    man = _open(out_dir, settings, resume)
    rows = _rows(texts, ids)
    skipped = _skip(rows, man, out_dir)
    first = next(rows, None)
    if first is None:
        if not man["shards"]:
            raise ValueError("texts yielded no documents: the corpus is empty")
        if not man["complete"]:
            _finish(out_dir, man)
        return CodingRun(out_dir, man["rows"], len(man["shards"]), 0, skipped,
                         time.perf_counter() - start)
    if man["complete"]:
        raise ValueError(f"{out_dir} holds a finished run of {man['rows']} texts, but the corpus "
                         f"has more; code the rest into a new out_dir (or delete {out_dir})")
    rows = itertools.chain([first], rows)
    _write_json(out_dir / MANIFEST, man)
    coded = 0
    with tqdm(total=total, initial=skipped, unit="doc", desc="code", disable=not progress,
              smoothing=0.1) as bar:
        while (n := _code_shard(rows, predict_fn, out_dir, man, bar)) > 0:
            coded += n
    _finish(out_dir, man)
    return CodingRun(out_dir, man["rows"], len(man["shards"]), coded, skipped,
                     time.perf_counter() - start)


def _settings(keep, batch_size, shard_size, predict_fn, has_ids) -> dict:
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not callable(predict_fn):
        raise TypeError(f"predict_fn must be callable (texts -> probabilities), got "
                        f"{type(predict_fn).__name__}")
    return {"keep": keep, "batch_size": batch_size, "shard_size": shard_size,
            "predictor": getattr(predict_fn, "fingerprint", None), "ids": has_ids}


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
        return {"format": "pyro_llm.stream", "version": _VERSION, "settings": settings,
                "num_samples": None, "num_classes": None, "rows": 0, "complete": False,
                "shards": []}
    man = json.loads(f.read_text())
    if not resume:
        raise FileExistsError(f"{out_dir} already holds a coding run ({man['rows']} rows in "
                              f"{len(man['shards'])} shards); pass resume=True to continue it, "
                              "or choose a new out_dir")
    if man.get("format") != "pyro_llm.stream" or man.get("version") != _VERSION:
        raise ValueError(f"{f} is not a pyro_llm.stream manifest of version {_VERSION}")
    diff = {k: (man["settings"].get(k), v) for k, v in settings.items()
            if man["settings"].get(k) != v}
    if diff:
        said = ", ".join(f"{k}: run {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{out_dir} holds a run with other settings ({said}); resume with the "
                         "same predictor and settings, or choose a new out_dir")
    return man


def _skip(rows: Iterator, man: dict, out_dir: Path) -> int:
    """Pull and fingerprint the rows of the finished shards; return how many there were."""
    digest, done = "", 0
    for sh in man["shards"]:
        h = hashlib.sha256(digest.encode())
        n = 0
        for text, key in itertools.islice(rows, sh["rows"]):
            _hash_row(h, text, key, man["settings"]["ids"])
            n += 1
        if n < sh["rows"]:
            raise ValueError(f"the corpus ended after {done + n} texts, but {out_dir} already "
                             f"holds {man['rows']} coded rows: is it the same corpus?")
        digest = h.hexdigest()
        if digest != sh["digest"]:
            raise ValueError(f"texts (or ids) at rows {done}-{done + n - 1} differ from those "
                             f"coded into {sh['file']} of {out_dir}: this is another corpus or "
                             "order; choose a new out_dir for it")
        done += n
    return done


def _code_shard(rows: Iterator, predict_fn, out_dir: Path, man: dict, bar) -> int:
    """Predict up to ``shard_size`` rows, write them as shard ``k``; return the row count."""
    st, k = man["settings"], len(man["shards"])
    h = hashlib.sha256((man["shards"][-1]["digest"] if k else "").encode())
    parts: dict[str, list[torch.Tensor]] = {}
    keys, n = [], 0
    for j in itertools.count():
        batch = list(itertools.islice(rows, min(st["batch_size"], st["shard_size"] - n)))
        if not batch:
            break
        texts = [t for t, _ in batch]
        where = f"batch {j} of shard {k} (rows {man['rows'] + n}-{man['rows'] + n + len(texts) - 1})"
        probs = _checked(predict_fn(texts), len(texts), man, where)
        for name, t in _summaries(probs, st["keep"]).items():
            parts.setdefault(name, []).append(t)
        for text, key in batch:
            _hash_row(h, text, key, st["ids"])
        keys += [key for _, key in batch]
        n += len(batch)
        bar.update(len(batch))
    if n:
        tensors = {name: torch.cat(ts, dim=-2 if name == "draws" else 0).contiguous()
                   for name, ts in parts.items()}
        _write_shard(out_dir, k, tensors, keys if st["ids"] else None, man["rows"])
        man["shards"].append({"file": _shard_file(k), "first_row": man["rows"], "rows": n,
                              "digest": h.hexdigest()})
        man["rows"] += n
        _write_json(out_dir / MANIFEST, man)
    return n


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


# ---------------------------------------------------------------------------- files
def _shard_file(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _write_shard(out_dir: Path, k: int, tensors: dict, keys: list | None, first_row: int) -> None:
    meta = {"first_row": str(first_row)}
    if keys is not None:
        meta["ids"] = json.dumps(keys)
    save_safetensors(out_dir / _shard_file(k), tensors, metadata=meta)


def _finish(out_dir: Path, man: dict) -> None:
    man["complete"] = True
    _write_json(out_dir / MANIFEST, man)


def iter_coded(out_dir, *, allow_partial: bool = False) -> Iterator[CodedCorpus]:
    """The shards of a :func:`code_corpus` run, one :class:`CodedCorpus` at a time."""
    from safetensors import safe_open

    out_dir = Path(out_dir)
    f = out_dir / MANIFEST
    if not f.exists():
        raise FileNotFoundError(f"{out_dir} holds no {MANIFEST}: not a code_corpus out_dir")
    man = json.loads(f.read_text())
    if not man["complete"] and not allow_partial:
        raise ValueError(f"the run in {out_dir} is unfinished ({man['rows']} rows so far); call "
                         "code_corpus again with resume=True, or pass allow_partial=True")
    for sh in man["shards"]:
        path = out_dir / sh["file"]
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing, though {MANIFEST} lists it")
        with safe_open(str(path), framework="pt") as g:
            t = {k: g.get_tensor(k) for k in g.keys()}
            meta = g.metadata() or {}
        first = sh["first_row"]
        keys = json.loads(meta["ids"]) if "ids" in meta else list(range(first, first + sh["rows"]))
        if t["probs"].shape[0] != sh["rows"] or len(keys) != sh["rows"]:
            raise ValueError(f"{path} holds {t['probs'].shape[0]} rows but {MANIFEST} says "
                             f"{sh['rows']}; the folder is damaged: code again into a new out_dir")
        yield CodedCorpus(ids=keys, **t)


def load_coded(out_dir, *, allow_partial: bool = False) -> CodedCorpus:
    """Every row of a :func:`code_corpus` run, concatenated (see :func:`iter_coded` for
    one shard at a time)."""
    shards = list(iter_coded(out_dir, allow_partial=allow_partial))
    if not shards:
        raise ValueError(f"{out_dir} holds no finished shard yet")
    cat = {k: (torch.cat([getattr(s, k) for s in shards], dim=-2 if k == "draws" else 0)
               if getattr(shards[0], k) is not None else None)
           for k in ("probs", "total", "aleatoric", "epistemic", "draws")}
    return CodedCorpus(ids=[i for s in shards for i in s.ids], **cat)
