"""The runtime every layer shares, on the lowest floor: train / eval modes, the plates in
force (through Pyro's public :func:`pyro.poutine.runtime.get_plates`), and calling a function
on a batch. The shared training loop is :mod:`pyro_llm.infer.train`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from pyro.poutine.runtime import get_plates

__all__ = ["DRAW_PLATES", "train_mode", "in_data_plate", "draw_plates", "call_with_batch"]

# plates that vectorise over draws (Pyro's particles, Predictive(parallel=True)), not over data
DRAW_PLATES = ("num_particles_vectorized", "_num_predictive_samples")


@contextlib.contextmanager
def train_mode(model: torch.nn.Module, mode: bool):
    """Within the block, ``model`` in train (``True``) or eval mode; every module's own flag is
    restored afterwards (peft leaves models in mixed modes: its new LoRA modules in train mode,
    a base model put in eval mode before wrapping stays so)."""
    before = [(m, m.training) for m in model.modules()]
    if all(t == mode for _, t in before):
        yield
        return
    model.train(mode)
    try:
        yield
    finally:
        for m, t in before:
            m.training = t


def in_data_plate() -> bool:
    """Inside a vectorised plate over data (plates over draws do not count)."""
    return any(f.dim is not None and f.name not in DRAW_PLATES for f in get_plates())


def draw_plates() -> int:
    """How many plates over draws are active."""
    return sum(f.name in DRAW_PLATES for f in get_plates())


def call_with_batch(fn: Callable, batch):
    """``fn(**batch)`` for a mapping, ``fn(*batch)`` for a tuple or list, else ``fn(batch)``."""
    if isinstance(batch, Mapping):
        return fn(**batch)
    if isinstance(batch, (tuple, list)):
        return fn(*batch)
    return fn(batch)
