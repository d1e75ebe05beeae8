"""Files, written atomically and read back through one validated reader.

Writes: a hidden temporary file in the same folder, flushed to disk, then ``os.replace``d over
the target, so a reader (or a resumed run) sees the old file or the new one, never half of one.
A save of several files goes through :func:`atomic_folder`: everything is written into a hidden
sibling folder, which then replaces the target as a whole. The temporary names carry the
process id, so processes writing into one folder (ensemble members in parallel) do not collide.
Tensors go to safetensors, the rest to JSON: nothing is pickled.

Reads: :func:`read_json` and :func:`read_safetensors` turn a missing, truncated or tampered file
into a :class:`FileFormatError` (a ``ValueError``) that names the file and the field, check the
fields' types, the tensors' names and shapes, and that every floating tensor is finite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

__all__ = ["FileFormatError", "write_json", "save_safetensors", "read_json", "read_safetensors",
           "check_field", "check_fields", "atomic_folder", "inside", "tensor_digest", "DIGEST"]


class FileFormatError(ValueError):
    """A saved file is missing a field, has a wrong type or shape, or holds NaN / inf."""


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json(path: str | os.PathLike, obj, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (its folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=indent))
    _replace(tmp, path)


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` to ``path``, atomically, with a digest of the tensors in
    the metadata (``pyro_llm.digest``) that :func:`read_safetensors` checks."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={**(metadata or {}), DIGEST: tensor_digest(tensors)})
    _replace(tmp, path)


DIGEST = "pyro_llm.digest"


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """A blake2b digest of named tensors: names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- folders
@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, owned: Callable[[str], bool] = lambda name: True):
    """Write a multi-file save into a temporary folder, then put it in place of ``path`` whole.

    Yields the temporary folder. On success, entries of an existing ``path`` that the new save
    did not write and that ``owned(name)`` does not claim (a tokenizer saved beside an adapter)
    are carried over (hard links where possible); entries ``owned`` claims but the new save did
    not write (stale ensemble members) are dropped. The old folder is renamed aside, the new one
    renamed in, and the old one removed: a reader sees the old save or the new one, never a mix
    (a crash between the two renames leaves ``path`` missing and both folders beside it). On an
    exception the temporary folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file, not a folder: pass a folder to save into")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            for entry in path.iterdir():
                if (tmp / entry.name).exists() or owned(entry.name):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
                else:
                    _link_or_copy(entry, tmp / entry.name)
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def inside(folder: str | os.PathLike, name: str, what: str = "a file entry") -> Path:
    """``folder / name``, refusing an absolute ``name`` or one that leaves ``folder`` (``..``)."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise FileFormatError(f"{folder}: {what} {name!r} must be a relative path inside the folder")
    target = (folder / name).resolve()
    if folder.resolve() not in target.parents:
        raise FileFormatError(f"{folder}: {what} {name!r} points outside the folder; the file was "
                              "tampered with: delete it and run again")
    return folder / name


# ---------------------------------------------------------------------------- reading
_SPECS: dict[str, Callable[[object], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "int>=0": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "float>=0": lambda v: _SPECS["float"](v) and v >= 0,
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[int]": lambda v: isinstance(v, list) and all(_SPECS["int"](x) for x in v),
    "list[float]": lambda v: isinstance(v, list) and all(_SPECS["float"](x) for x in v),
    "shapes": lambda v: isinstance(v, list) and all(_SPECS["list[int]"](x) for x in v),
    "none": lambda v: v is None,
}


def check_field(value, spec: str) -> bool:
    """Whether ``value`` fits ``spec``: a name of :data:`_SPECS`, or alternatives ``"int|none"``."""
    return any(_SPECS[s](value) for s in spec.split("|"))


def read_json(path: str | os.PathLike, *, what: str, fields: Mapping[str, str] | None = None) -> dict:
    """A JSON object from ``path``, with ``fields`` (name -> spec such as ``"int>=0"``,
    ``"list[str]"``, ``"float|none"``) present and of the right type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a saved {what}")
    try:
        obj = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path} is not valid JSON ({e}): the {what} is damaged; delete it "
                              "and save again") from None
    if not isinstance(obj, dict):
        raise FileFormatError(f"{path} holds a JSON {type(obj).__name__}, not the object of a {what}")
    check_fields(path, obj, fields or {}, what)
    return obj


def check_fields(path, obj: Mapping, fields: Mapping[str, str], what: str, prefix: str = "") -> None:
    """Every field of ``fields`` (name -> spec, see :func:`check_field`) present in ``obj`` with the
    right type, or a :class:`FileFormatError` naming ``path`` and the field (``prefix`` + name)."""
    for key, spec in fields.items():
        if key not in obj:
            raise FileFormatError(f"{path} lacks the field {prefix + key!r} of a {what}; the file is "
                                  "damaged or was written by another program")
        if not check_field(obj[key], spec):
            raise FileFormatError(f"{path}: field {prefix + key!r} is {_short(obj[key])}, expected {spec}; "
                                  f"the {what} is damaged")


def read_safetensors(path: str | os.PathLike, *, what: str,
                     expect: Mapping[str, Sequence[int]] | None = None,
                     finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file. ``expect`` (name -> shape) must all be there
    with those shapes; with ``finite`` every floating tensor must be free of NaN and inf."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a saved {what}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{path} is not a readable safetensors file ({e}): the {what} is "
                              "damaged; delete it and save again") from None
    if DIGEST in meta and tensor_digest(tensors) != meta.pop(DIGEST):
        raise FileFormatError(f"{path}: the tensors do not match the digest written with them: the "
                              f"{what} was damaged or edited after it was saved; delete it and save again")
    for key, shape in (expect or {}).items():
        if key not in tensors:
            raise FileFormatError(f"{path} lacks the tensor {key!r} of the {what}")
        if tuple(tensors[key].shape) != tuple(shape):
            raise FileFormatError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                                  f"expected {tuple(shape)}; it was saved for another model")
    if finite:
        for key, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FileFormatError(f"{path}: tensor {key!r} holds NaN or inf; the {what} is damaged")
    return tensors, meta


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
