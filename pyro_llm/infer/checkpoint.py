"""Checkpoints of a fit in progress: tensors in safetensors, the rest in JSON. Never pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .._io import save_safetensors, write_json

__all__ = ["save_checkpoint", "load_checkpoint"]

_TENSORS = "state.safetensors"
STATE_FILE = "state.json"


def save_checkpoint(
    directory: str | os.PathLike,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    meta: dict,
) -> None:
    """Write ``params`` (by name), the optimiser's state and ``meta`` atomically into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = list(params)
    index = {id(p): i for i, p in enumerate(params.values())}
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    scalars: dict[str, dict] = {}
    for p, state in optimizer.state.items():
        if id(p) not in index:
            continue
        n = names[index[id(p)]]
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                tensors[f"optim/{n}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(n, {})[k] = float(v)
    tensors["rng/torch"] = torch.get_rng_state()
    meta = dict(meta, optim_scalars=scalars, param_names=names)
    save_safetensors(d / _TENSORS, tensors)
    write_json(d / STATE_FILE, meta, indent=None)


def load_checkpoint(
    directory: str | os.PathLike,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> dict | None:
    """Restore into ``params`` and ``optimizer`` in place; return the saved meta, or ``None``."""
    d = Path(directory)
    if not (d / STATE_FILE).exists() or not (d / _TENSORS).exists():
        return None
    meta = json.loads((d / STATE_FILE).read_text())
    tensors = load_file(str(d / _TENSORS))
    missing = [n for n in meta["param_names"] if n not in params]
    extra = [n for n in params if n not in meta["param_names"]]
    if missing or extra:
        raise ValueError(
            f"checkpoint in {d} does not match this fit: it has parameters {missing[:3]} that the "
            f"fit lacks and lacks {extra[:3]}; use a fresh checkpoint directory or the same model"
        )
    with torch.no_grad():
        for n, p in params.items():
            saved = tensors[f"param/{n}"]
            if saved.shape != p.shape:
                raise ValueError(f"checkpoint parameter {n!r} has shape {tuple(saved.shape)}, "
                                 f"the fit has {tuple(p.shape)}")
            p.copy_(saved.to(p.device, p.dtype))
    for n, p in params.items():
        state = {}
        for k, v in meta["optim_scalars"].get(n, {}).items():
            state[k] = torch.tensor(v)
        prefix = f"optim/{n}/"
        for key, v in tensors.items():
            if key.startswith(prefix):
                state[key[len(prefix):]] = v.to(p.device)
        if state:
            optimizer.state[p] = state
    torch.set_rng_state(tensors["rng/torch"])
    return meta
