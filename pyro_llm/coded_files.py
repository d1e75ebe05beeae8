"""The files of a :func:`pyro_llm.stream.code_corpus` run: ``manifest.json`` and the shards.

``manifest.json`` is read through :func:`pyro_llm._io.read_json` with a spec for every field
(and for every field of every shard entry), so a tampered or truncated manifest is a
:class:`~pyro_llm._io.FileFormatError` naming the file and the field. A shard entry's ``file``
must be a relative name inside the run's folder (:func:`pyro_llm._io.inside`), and the entries
must tile the rows (shard k starts where shard k-1 ends). Shards are read through
:func:`pyro_llm._io.read_safetensors` with the shapes the manifest implies (``probs`` ``(n, C)``,
the uncertainties ``(n,)``, ``draws`` ``(S, n, C)``) and finite values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ._io import (
    FileFormatError,
    check_fields,
    inside,
    read_json,
    read_safetensors,
    save_safetensors,
)

__all__ = ["MANIFEST", "VERSION", "KEEP", "CodedCorpus", "new_manifest", "read_manifest",
           "shard_file", "read_shard", "check_total", "write_shard", "iter_coded", "load_coded"]

MANIFEST = "manifest.json"
VERSION = 1
KEEP = ("mean", "uncertainty", "draws")
WHAT = "code_corpus manifest"
FIELDS = {"format": "str", "version": "int", "settings": "dict", "num_samples": "int>=0|none",
          "num_classes": "int>=0|none", "rows": "int>=0", "complete": "bool", "shards": "list"}
SETTINGS = {"keep": "str", "batch_size": "int>=0", "shard_size": "int>=0", "predictor": "str|none",
            "ids": "bool"}
SHARD = {"file": "str", "first_row": "int>=0", "rows": "int>=0", "digest": "str"}


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


def new_manifest(settings: dict) -> dict:
    return {"format": "pyro_llm.stream", "version": VERSION, "settings": settings,
            "num_samples": None, "num_classes": None, "rows": 0, "complete": False, "shards": []}


def shard_file(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


# ---------------------------------------------------------------------------- manifest
def read_manifest(out_dir: Path) -> dict:
    """``out_dir/manifest.json``, every field checked; a ``FileFormatError`` names the one at fault."""
    f = Path(out_dir) / MANIFEST
    man = read_json(f, what=WHAT, fields=FIELDS)
    if man["format"] != "pyro_llm.stream" or man["version"] != VERSION:
        raise FileFormatError(f"{f} is not a pyro_llm.stream manifest of version {VERSION} (format "
                              f"{man['format']!r}, version {man['version']!r}); choose a new out_dir")
    check_fields(f, man["settings"], SETTINGS, WHAT, "settings.")
    if man["settings"]["keep"] not in KEEP:
        raise FileFormatError(f"{f}: field 'settings.keep' is {man['settings']['keep']!r}, expected one "
                              f"of {KEEP}; the {WHAT} is damaged")
    for k, sh in enumerate(man["shards"]):
        if not isinstance(sh, dict):
            raise FileFormatError(f"{f}: field 'shards[{k}]' is not an object; the {WHAT} is damaged")
        check_fields(f, sh, SHARD, WHAT, f"shards[{k}].")
        inside(out_dir, sh["file"], what=f"shards[{k}].file")
    if man["shards"] and not all(isinstance(man[k], int) and man[k] >= 1
                                 for k in ("num_samples", "num_classes")):
        raise FileFormatError(f"{f}: fields 'num_samples' and 'num_classes' must be positive integers "
                              f"once shards are written; the {WHAT} is damaged")
    return man


# ---------------------------------------------------------------------------- shards
def _expect(man: dict, rows: int) -> dict[str, tuple[int, ...]]:
    S, C, keep = man["num_samples"], man["num_classes"], man["settings"]["keep"]
    out = {"probs": (rows, C)}
    if keep in ("uncertainty", "draws"):
        out.update({k: (rows,) for k in ("total", "aleatoric", "epistemic")})
    if keep == "draws":
        out["draws"] = (S, rows, C)
    return out


def read_shard(out_dir: Path, man: dict, k: int) -> CodedCorpus:
    """Shard ``k`` of the manifest ``man``, checked against it (names, rows, shapes, ids, finite)."""
    sh, f = man["shards"][k], Path(out_dir) / MANIFEST
    path = inside(out_dir, sh["file"], what=f"shards[{k}].file")
    what = f"shard {k} of the code_corpus run in {out_dir}"
    start = sum(s["rows"] for s in man["shards"][:k])
    if sh["first_row"] != start:
        raise FileFormatError(f"{f}: field 'shards[{k}].first_row' is {sh['first_row']}, expected "
                              f"{start} (where shard {k - 1} ends); the {WHAT} is damaged")
    try:
        t, meta = read_safetensors(path, what=what)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} (shard {k}, rows {start}-{start + sh['rows'] - 1}) is missing, "
                                f"though {MANIFEST} lists it; call code_corpus again with the same texts "
                                "and predictor (resume=True) to code its rows again") from None
    expect = _expect(man, sh["rows"])
    if set(t) != set(expect):
        raise FileFormatError(f"{path} holds tensors {sorted(t)}, but a run with keep="
                              f"{man['settings']['keep']!r} writes {sorted(expect)}; the {what} is damaged")
    if t["probs"].dim() != 2 or t["probs"].shape[0] != sh["rows"]:
        raise FileFormatError(f"{path} holds {t['probs'].shape[0] if t['probs'].dim() else 0} rows but "
                              f"{MANIFEST} says {sh['rows']}; the folder is damaged: code again into a "
                              "new out_dir")
    for name, shape in expect.items():
        if tuple(t[name].shape) != shape:
            raise FileFormatError(f"{path}: tensor {name!r} has shape {tuple(t[name].shape)}, expected "
                                  f"{shape} from {MANIFEST}; the {what} is damaged")
    if meta.get("digest", sh["digest"]) != sh["digest"]:
        raise FileFormatError(f"{path} holds the rows of another shard or run (its fingerprint differs "
                              f"from the one {MANIFEST} records); the {what} is damaged")
    keys = list(range(start, start + sh["rows"]))
    if man["settings"]["ids"]:
        try:
            keys = json.loads(meta["ids"])
        except (KeyError, json.JSONDecodeError):
            keys = None
        if not isinstance(keys, list) or len(keys) != sh["rows"] or not all(
                isinstance(i, (str, int)) and not isinstance(i, bool) for i in keys):
            raise FileFormatError(f"{path} lacks the {sh['rows']} ids of its rows (metadata 'ids'); "
                                  f"the {what} is damaged")
    return CodedCorpus(ids=keys, **t)


def check_total(out_dir: Path, man: dict) -> None:
    """The shards tile the rows: each starts where the one before ends, and they add up to the
    manifest's ``rows``."""
    f, start = Path(out_dir) / MANIFEST, 0
    for k, sh in enumerate(man["shards"]):
        if sh["first_row"] != start:
            raise FileFormatError(f"{f}: field 'shards[{k}].first_row' is {sh['first_row']}, expected "
                                  f"{start} (where shard {k - 1} ends); the {WHAT} is damaged")
        start += sh["rows"]
    if start != man["rows"]:
        raise FileFormatError(f"{f}: field 'rows' is {man['rows']} but the shards hold {start} rows; "
                              f"the {WHAT} is damaged")


def write_shard(out_dir: Path, k: int, tensors: dict, keys: list | None, first_row: int,
                digest: str) -> None:
    """Shard ``k``'s tensors, with its first row, ids and fingerprint (``digest``) as metadata."""
    meta = {"first_row": str(first_row), "digest": digest}
    if keys is not None:
        meta["ids"] = json.dumps(keys)
    save_safetensors(Path(out_dir) / shard_file(k), tensors, metadata=meta)


# ---------------------------------------------------------------------------- reading a run
def iter_coded(out_dir, *, allow_partial: bool = False) -> Iterator[CodedCorpus]:
    """The shards of a :func:`~pyro_llm.stream.code_corpus` run, one :class:`CodedCorpus` at a time."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).exists():
        raise FileNotFoundError(f"{out_dir} holds no {MANIFEST}: not a code_corpus out_dir")
    man = read_manifest(out_dir)
    if not man["complete"] and not allow_partial:
        raise ValueError(f"the run in {out_dir} is unfinished ({man['rows']} rows so far); call "
                         "code_corpus again with resume=True, or pass allow_partial=True")
    for k in range(len(man["shards"])):
        yield read_shard(out_dir, man, k)
    check_total(out_dir, man)


def load_coded(out_dir, *, allow_partial: bool = False) -> CodedCorpus:
    """Every row of a :func:`~pyro_llm.stream.code_corpus` run, concatenated (see
    :func:`iter_coded` for one shard at a time)."""
    shards = list(iter_coded(out_dir, allow_partial=allow_partial))
    if not shards:
        raise ValueError(f"{out_dir} holds no finished shard yet")
    cat = {k: (torch.cat([getattr(s, k) for s in shards], dim=-2 if k == "draws" else 0)
               if getattr(shards[0], k) is not None else None)
           for k in ("probs", "total", "aleatoric", "epistemic", "draws")}
    return CodedCorpus(ids=[i for s in shards for i in s.ids], **cat)
