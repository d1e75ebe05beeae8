"""Files of a LoRA ensemble (:mod:`pyro_llm.infer.ensemble`): one safetensors file per member,
written atomically, and ``ensemble.json`` with the settings, checked field by field on resume.

Reading goes through :mod:`pyro_llm._io`: ``ensemble.json`` field by field, every member's
tensors against the names and shapes of ``ensemble.json`` (and of the model, when given) and
for NaN / inf. The folder's entries named ``member_*`` must all be regular files
``member_NNN.safetensors`` (``member_file(k)``) with ``0 <= k < num_members``; anything else
so named (``member_abc``, ``member_01.safetensors``, a folder) is an error that names it, not
skipped: an unexpected member file means the folder is not what the caller thinks it is.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .._io import FileFormatError, read_json, read_safetensors, save_safetensors
from .._io import write_json as _write_json

ENSEMBLE_INFO = "ensemble.json"
ENSEMBLE_VERSION = 1
INFO_FIELDS = {"names": "list[str]", "shapes": "shapes", "num_members": "int", "seeds": "list"}
_MEMBER = re.compile(r"member_(\d+)\.safetensors")


def member_file(k: int) -> str:
    return f"member_{k:03d}.safetensors"


def is_member_entry(name: str) -> bool:
    """Whether a folder entry belongs to the members (what a whole-folder save replaces)."""
    return name == ENSEMBLE_INFO or name.startswith("member_")


def describe(v):
    """A JSON-able record of a setting: plain values as they are, callables by qualified name."""
    if isinstance(v, Mapping):
        return {str(k): describe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [describe(x) for x in v]
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if callable(v) and hasattr(v, "__qualname__"):
        return f"{getattr(v, '__module__', '')}.{v.__qualname__}"
    return type(v).__name__


def check_or_write_settings(out: Path, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    f = out / ENSEMBLE_INFO
    if f.exists():
        saved, now = _flat(read_json(f, what="ensemble's settings")), _flat(settings)
        diff = [k for k in now if saved.get(k) != now[k]]
        if diff:
            k = diff[0]
            raise ValueError(f"{out} holds an ensemble fitted with other settings: {k} was "
                             f"{saved.get(k)!r}, now {now[k]!r} (differing: {diff}); use a fresh "
                             "out_dir or the same settings")
        return
    _write_json(f, {"version": ENSEMBLE_VERSION, **settings})


def _flat(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else {f"{prefix}{k}": v})
    return out


def save_member(out: Path, k: int, member: Mapping[str, torch.Tensor], info: dict) -> None:
    tensors = {n: v.detach().cpu().contiguous() for n, v in member.items()}
    save_safetensors(out / member_file(k), tensors, metadata={"info": json.dumps(describe(info))})


def load_member(f: Path, shapes: Mapping[str, tuple], like: Mapping[str, torch.Tensor | None] | None = None
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """A member's tensors (checked: the names and ``shapes`` exactly, finite) and its fit record;
    tensors follow the device and dtype of ``like[name]`` where given."""
    t, meta = read_safetensors(f, what="ensemble member", expect=shapes)
    extra = sorted(set(t) - set(shapes))
    if extra:
        raise FileFormatError(f"{f} holds tensors {extra[:3]} that {ENSEMBLE_INFO} does not list; the "
                              "member belongs to another ensemble: remove it or save again")
    try:
        info = json.loads(meta.get("info", "{}"))
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{f}: its metadata 'info' is not valid JSON ({e}); the member file is "
                              "damaged: delete it and train or save it again") from None
    if not isinstance(info, dict):
        raise FileFormatError(f"{f}: its metadata 'info' is a {type(info).__name__}, not an object")
    like = like or {}
    member = {n: t[n] if like.get(n) is None else t[n].to(device=like[n].device, dtype=like[n].dtype)
              for n in shapes}
    return member, info


def read_info(path: Path) -> dict:
    """``ensemble.json``, every field checked (names and shapes agree, seeds one per member)."""
    f = path / ENSEMBLE_INFO
    if not f.exists():
        raise FileNotFoundError(f"{path} holds no {ENSEMBLE_INFO}: not an ensemble folder (fit_ensemble's "
                                "out_dir or EnsemblePosterior.save)")
    meta = read_json(f, what="ensemble's settings", fields=INFO_FIELDS)
    n = meta["num_members"]
    if n < 1 or len(meta["seeds"]) != n or len(meta["shapes"]) != len(meta["names"]) \
            or len(set(meta["names"])) != len(meta["names"]):
        raise FileFormatError(f"{f}: num_members {n}, {len(meta['seeds'])} seeds, {len(meta['names'])} "
                              f"names and {len(meta['shapes'])} shapes do not fit together (num_members "
                              ">= 1, one seed per member, one shape per distinct name); the file is damaged")
    return meta


def member_files(path: Path, num_members: int) -> list[tuple[int, Path]]:
    """``(k, file)`` of every member in ``path``, in index order; a stray, duplicate or
    out-of-range ``member_*`` entry is a :class:`~pyro_llm._io.FileFormatError` naming it."""
    found: dict[int, list[Path]] = {}
    for entry in sorted(path.glob("member_*")):
        m = _MEMBER.fullmatch(entry.name)
        if m is None or not entry.is_file():
            raise FileFormatError(f"{entry} is not a member file (member_NNN.safetensors, a regular file); "
                                  "move it out of the ensemble folder, or save the ensemble again")
        found.setdefault(int(m.group(1)), []).append(entry)
    for k, files in found.items():
        if len(files) > 1:
            raise FileFormatError(f"{' and '.join(f.name for f in files)} in {path} all hold member {k}; "
                                  f"keep {member_file(k)} and remove the others")
        if files[0].name != member_file(k):
            raise FileFormatError(f"{files[0]} should be named {member_file(k)}; rename it")
        if k >= num_members:
            raise FileFormatError(f"{files[0]} is member {k}, but {path / ENSEMBLE_INFO} says num_members "
                                  f"= {num_members}; remove it, or save the ensemble again")
    if not found:
        raise FileNotFoundError(f"{path} holds no member_*.safetensors: no member has finished yet")
    return sorted((k, files[0]) for k, files in found.items())


def read_members(path: Path, model: torch.nn.Module | None = None) -> tuple[list, list, list, list]:
    """Members, indices, seeds and fit records of an ensemble folder, every file checked; with
    ``model``, against its tensors too (the members follow its device and dtype)."""
    meta = read_info(path)
    files = member_files(path, meta["num_members"])
    if model is not None:
        check_names(model, meta, path)
    shapes = {n: tuple(s) for n, s in zip(meta["names"], meta["shapes"], strict=True)}
    like = {n: model.get_parameter(n) for n in shapes} if model is not None else None
    members, indices, seeds, info = [], [], [], []
    for k, f in files:
        m, rec = load_member(f, shapes, like)
        members.append(m)
        indices.append(k)
        seeds.append(rec.get("seed"))
        info.append(rec)
    missing = sorted(set(range(meta["num_members"])) - set(indices))
    if missing:
        warnings.warn(f"{path}: members {missing} of {meta['num_members']} are not there yet; "
                      f"loaded {len(indices)}", stacklevel=3)
    return members, indices, seeds, info


def remove_checkpoint(ckpt: str) -> None:
    d = Path(ckpt)
    for f in d.glob("*"):
        f.unlink()
    if d.exists():
        d.rmdir()


def full_seeds(indices, seeds, n) -> list:
    out = [None] * n
    for k, s in zip(indices, seeds, strict=True):
        out[k] = s
    return out


def check_names(model, meta, path) -> None:
    """The model has every tensor of ``meta`` (``ensemble.json``), with the same shape."""
    params = dict(model.named_parameters())
    for n, shape in zip(meta["names"], meta["shapes"], strict=True):
        if n not in params:
            raise ValueError(f"{path}: the model has no parameter {n!r}; load the ensemble with the peft "
                             "model (same adapter and modules_to_save) it was fitted on")
        if list(params[n].shape) != list(shape):
            raise ValueError(f"{path}: {n!r} has shape {shape} in the ensemble, "
                             f"{list(params[n].shape)} in the model")
