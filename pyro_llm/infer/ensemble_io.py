"""Files of a LoRA ensemble (:mod:`pyro_llm.infer.ensemble`): one safetensors file per member,
written atomically, and ``ensemble.json`` with the settings, checked field by field on resume."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from .._io import save_safetensors
from .._io import write_json as _write_json

ENSEMBLE_INFO = "ensemble.json"
ENSEMBLE_VERSION = 1


def member_file(k: int) -> str:
    return f"member_{k:03d}.safetensors"


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
        saved, now = _flat(json.loads(f.read_text())), _flat(settings)
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


def load_member(f: Path, params: Mapping[str, torch.Tensor | None]) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as fh:
        member = {n: fh.get_tensor(n) if p is None else fh.get_tensor(n).to(device=p.device, dtype=p.dtype)
                  for n, p in params.items()}
        info = json.loads((fh.metadata() or {}).get("info", "{}"))
    return member, info


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
    params = dict(model.named_parameters())
    for n, shape in zip(meta["names"], meta["shapes"], strict=True):
        if n not in params:
            raise ValueError(f"{path}: the model has no parameter {n!r}; load the ensemble with the peft "
                             "model (same adapter and modules_to_save) it was fitted on")
        if list(params[n].shape) != list(shape):
            raise ValueError(f"{path}: {n!r} has shape {shape} in the ensemble, "
                             f"{list(params[n].shape)} in the model")
