"""Checkpoints of a fit in progress: one safetensors file, never a pickle.

``state.safetensors`` holds the fitted tensors, the optimiser state, the early-stopping best
tensors and the random-number states; its metadata holds the loop's record as JSON (step,
position in the epoch, losses, early-stopping counters, the fit's fingerprint). One file
written atomically means a crash leaves the previous checkpoint or the new one, never a mix.
Read the record with ``safetensors.safe_open(path, "pt").metadata()["meta"]``.

A checkpoint is written only when every tensor in it is finite, and read back only through
:func:`pyro_llm._io.read_safetensors` with every field and shape checked; a checkpoint whose
fingerprint (model, data, settings) differs from the fit's is refused, naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .._io import FileFormatError, check_fields, read_safetensors, save_safetensors

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_step", "check_fingerprint", "sketch",
           "describe_named", "TENSORS"]

TENSORS = "state.safetensors"
_WHAT = "fit checkpoint"
_FIELDS = {"step": "int>=0", "epoch": "int>=0", "pos": "int>=0", "seconds": "float>=0",
           "losses": "list[float]", "val": "list", "best_value": "float|none",
           "best_step": "int|none", "bad": "int>=0", "stopped": "bool", "param_names": "list[str]",
           "optim_scalars": "dict", "fingerprint": "dict", "rng_python": "list"}


def sketch(obj, values: int = 4096) -> str:
    """A short hash of ``obj``: tensors and arrays by shape, dtype and up to ``values`` evenly
    spaced entries (a sketch, cheap on a billion-weight model), mappings and sequences
    recursively, numbers and strings by value, anything else by its type name."""
    h = hashlib.blake2b(digest_size=12)
    _feed(h, obj, values)
    return h.hexdigest()


def _feed(h, obj, values: int) -> None:
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(np.ascontiguousarray(obj)) if obj.dtype != object else obj.tolist()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().reshape(-1)
        step = max(1, t.numel() // values)
        t = t[::step][:values].cpu()
        t = t.to(torch.float64) if t.is_floating_point() else t.to(torch.int64)
        h.update(f"T{tuple(obj.shape)}{obj.dtype}".encode())
        h.update(t.numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _feed(h, obj[k], values)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for x in obj:
            _feed(h, x, values)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(repr(obj).encode())
    else:
        h.update(type(obj).__qualname__.encode())


def save_checkpoint(
    directory: str | os.PathLike,
    params: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    meta: dict,
    best: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write ``params``, the optimiser's state, ``best`` (early stopping) and ``meta``
    atomically into ``directory``; refuse (``FloatingPointError``) if any tensor is not finite,
    so a good checkpoint is never replaced by a broken one."""
    d = Path(directory)
    names = list(params)
    index = {id(p): i for i, p in enumerate(params.values())}
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    tensors.update({f"best/{n}": t.detach().cpu().contiguous() for n, t in (best or {}).items()})
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
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FloatingPointError(
                f"{key} holds NaN or inf at step {meta.get('step')}; the checkpoint in {d} was not "
                "overwritten and still holds the last good state. Lower the learning rate or check "
                "the data")
    tensors["rng/torch"] = torch.get_rng_state()
    np_state = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = dict(meta, optim_scalars=scalars, param_names=names,
                rng_python=[py_version, list(py_state), py_gauss],
                rng_numpy=[int(np_state[2]), int(np_state[3]), float(np_state[4])])
    text = json.dumps(meta)
    save_safetensors(d / TENSORS, tensors, metadata={"meta": text})


def _read(d: Path, shapes: Mapping[str, Sequence[int]] | None = None):
    expect = {f"param/{n}": s for n, s in (shapes or {}).items()}
    tensors, raw = read_safetensors(d / TENSORS, what=_WHAT, expect=expect)
    try:
        meta = json.loads(raw["meta"])
    except (KeyError, json.JSONDecodeError):
        raise FileFormatError(f"{d / TENSORS} lacks the fit record in its metadata: not a checkpoint "
                              "of this version; use a fresh checkpoint directory") from None
    check_fields(d / TENSORS, meta, _FIELDS, "fit checkpoint (use a fresh checkpoint directory)")
    if len(meta["losses"]) != meta["step"]:
        raise FileFormatError(f"{d / TENSORS}: step {meta['step']} but {len(meta['losses'])} losses "
                              "recorded; the checkpoint is damaged: use a fresh directory")
    for key in ("rng/torch", "rng/numpy"):
        if key not in tensors:
            raise FileFormatError(f"{d / TENSORS} lacks {key!r}; the checkpoint is damaged")
    return tensors, meta


def checkpoint_step(directory: str | os.PathLike | None) -> int:
    """The step a checkpoint in ``directory`` holds (0 if there is none), validated."""
    if not directory or not (Path(directory) / TENSORS).exists():
        return 0
    return _read(Path(directory))[1]["step"]


def load_checkpoint(
    directory: str | os.PathLike,
    params: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    fingerprint: Mapping | None = None,
) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """Restore into ``params`` and ``optimizer`` in place; return ``(meta, best tensors)``,
    or ``None`` when ``directory`` holds no checkpoint. A checkpoint written for other
    parameters, or whose ``fingerprint`` differs from this fit's, is refused."""
    d = Path(directory)
    if not (d / TENSORS).exists():
        return None
    tensors, meta = _read(d)
    missing = [n for n in meta["param_names"] if n not in params]
    extra = [n for n in params if n not in meta["param_names"]]
    if missing or extra:
        raise ValueError(
            f"checkpoint in {d} does not match this fit: it has parameters {missing[:3]} that the "
            f"fit lacks and lacks {extra[:3]}; use a fresh checkpoint directory or the same model"
        )
    for n, p in params.items():
        for key in (f"param/{n}", f"best/{n}"):
            if key in tensors and tensors[key].shape != p.shape:
                raise ValueError(f"checkpoint tensor {key!r} in {d} has shape {tuple(tensors[key].shape)}, "
                                 f"the fit has {tuple(p.shape)}; use a fresh checkpoint directory")
        if f"param/{n}" not in tensors:
            raise FileFormatError(f"{d / TENSORS} lacks the tensor 'param/{n}'; the checkpoint is damaged")
    if fingerprint is not None:
        check_fingerprint(d, meta["fingerprint"], fingerprint)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param/{n}"].to(p.device, p.dtype))
    for n, p in params.items():
        state = {k: torch.tensor(v) for k, v in meta["optim_scalars"].get(n, {}).items()}
        prefix = f"optim/{n}/"
        state.update({key[len(prefix):]: v.to(p.device) for key, v in tensors.items()
                      if key.startswith(prefix)})
        if state:
            optimizer.state[p] = state
    torch.set_rng_state(tensors["rng/torch"])
    pos, has_gauss, gauss = meta.get("rng_numpy", [624, 0, 0.0])
    np.random.set_state(("MT19937", tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, py_gauss = meta["rng_python"]
    random.setstate((version, tuple(state), py_gauss))
    best = {n: tensors[f"best/{n}"].to(p.device, p.dtype) for n, p in params.items()
            if f"best/{n}" in tensors}
    return meta, best


def check_fingerprint(d: Path, saved: Mapping, now: Mapping) -> None:
    """Refuse a checkpoint whose fingerprint differs from the fit's, naming what differs."""
    diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        k = diff[0]
        raise ValueError(
            f"checkpoint in {d} was written by a different fit: {k} was {_short(saved.get(k))}, now "
            f"{_short(now.get(k))} (differing: {diff}); resume with the same model, data and settings, "
            "or use a fresh checkpoint directory")


def describe_named(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """:func:`sketch` of named tensors (a model's frozen weights)."""
    return sketch(dict(named))


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."
