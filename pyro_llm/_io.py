"""Atomic file writes: a hidden temporary file in the same folder, flushed to disk, then
``os.replace``d over the target, so a reader (or a resumed run) sees the old file or the new
one, never half of one. The temporary name carries the process id, so processes writing into
one folder (ensemble members in parallel) do not collide. Tensors go to safetensors, the rest
to JSON: nothing is pickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["write_json", "save_safetensors"]


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
    """``safetensors.torch.save_file`` to ``path``, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    save_file(tensors, str(tmp), metadata=metadata)
    _replace(tmp, path)
