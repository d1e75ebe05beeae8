"""The training loop every fit shares (``fit_map``, ``fit_svi``, ``fit_blob``, ``fit_polar``).

It runs minibatches from a re-iterable of batches, shows a tqdm bar, writes resumable
checkpoints (:mod:`pyro_llm.infer.checkpoint`) and can stop early on a held-out metric. A
resumed fit equals the uninterrupted one bit for bit: the checkpoint holds the parameters, the
optimiser state, the random-number states, the position in the epoch and the early-stopping
state (its best tensors included), and each epoch's data order is drawn under a seed of its
own. A checkpoint written by another model, other data or other settings is refused.

Under torch.distributed the loop starts from rank 0's tensors, combines the ranks' gradients
after every ``backward()`` (see :mod:`pyro_llm.infer.distributed`) and leaves the progress bar
and the checkpoint files to rank 0.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import distributed as _dist
from .checkpoint import load_checkpoint, save_checkpoint, sketch

__all__ = ["FitResult", "EarlyStopping", "LossPlateau", "train_loop", "peek_batches", "data_sketch",
           "OneShot"]

_END = object()
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class FitResult:
    """What a fit returns: a frozen record.

    Attributes
    ----------
    method: ``"svi"``, ``"map"``, ``"blob"`` or ``"polar"``.
    guide: the fitted guide (SVI) or ``None`` (MAP; the peft model holds the result).
    params: final values of the fitted tensors by name, detached.
    losses: training loss per step (negative ELBO per step for SVI).
    val_history: ``(step, metric)`` pairs of the held-out metric, if early stopping ran.
    steps, fit_seconds, seconds_per_step: how long the fit took.
    stopped_early, best_step: the early-stopping outcome.
    posterior: the fitted posterior in the one protocol (:class:`~pyro_llm.posterior.Posterior`):
        a snapshot of the guide's Gaussian (SVI, BLoB), or the point (MAP, PoLAR).
    """

    method: str
    guide: Callable | None
    params: dict[str, torch.Tensor]
    losses: tuple[float, ...]
    val_history: tuple[tuple[int, float], ...] = ()
    steps: int = 0
    fit_seconds: float = 0.0
    seconds_per_step: float = float("nan")
    stopped_early: bool = False
    best_step: int | None = None
    extra: dict = field(default_factory=dict)
    posterior: object = None


@dataclass(frozen=True)
class EarlyStopping:
    """Stop when ``metric()`` (lower is better, e.g. held-out NLL) has not improved.

    ``metric`` is called every ``every`` steps; after ``patience`` calls without an
    improvement larger than ``min_delta`` the fit stops and the best parameters are restored.
    """

    metric: Callable[[], float]
    every: int = 50
    patience: int = 3
    min_delta: float = 0.0

    def __post_init__(self):
        if self.every < 1 or self.patience < 1:
            raise ValueError(f"every and patience must be >= 1, got {self.every}, {self.patience}")

    def value(self, losses: list[float]) -> tuple[float, float]:
        """``(value, margin)``: the metric now and the improvement it must beat."""
        return float(self.metric()), self.min_delta


@dataclass(frozen=True)
class LossPlateau(EarlyStopping):
    """Stop when the training loss has stopped falling: a convergence rule for a stochastic
    objective (SVI's negative ELBO), with no held-out data.

    Every ``every`` steps the mean loss of those steps is compared with the best window mean so
    far; a window improves only if it is lower by more than ``rtol * |best| + min_delta`` (plus
    ``z`` standard errors of the difference of two window means, from the window's spread, when
    ``z > 0``). After ``patience`` windows without an improvement the fit stops and the
    parameters at the end of the best window are restored.

    Take ``every`` = one epoch's batches (:func:`~pyro_llm.fit_svi` does for ``"auto"``): epoch
    means then compare the same examples, so the spread between minibatches cancels and what is
    left is the noise of the guide's draws, which ``patience`` absorbs. With shorter windows
    minibatch noise swamps slow progress unless ``z`` accounts for it (and then the rule may stop
    while the loss still falls, slower than the noise).
    """

    metric: Callable[[], float] | None = None
    every: int = 50
    patience: int = 3
    min_delta: float = 0.0
    rtol: float = 1e-3
    z: float = 0.0

    def value(self, losses: list[float]) -> tuple[float, float]:
        window = torch.tensor(losses[-self.every:], dtype=torch.float64)
        se = float(window.std()) / len(window) ** 0.5 if len(window) > 1 else 0.0
        mean = float(window.mean())
        return mean, self.min_delta + self.rtol * abs(mean) + self.z * se * 2 ** 0.5


# ---------------------------------------------------------------------------- data
class OneShot:
    """A one-shot iterator (a generator) with its first batch kept: iterable exactly once."""

    def __init__(self, iterator, first):
        self.first, self._it, self._used = first, iterator, False

    def __iter__(self):
        if self._used:
            raise ValueError("this data is a one-shot iterator (a generator) and was used up; pass "
                             "a list of batches or a DataLoader to iterate it more than once")
        self._used = True
        return itertools.chain([self.first], self._it)


def peek_batches(data: Iterable):
    """``(first batch, data)`` without losing a batch: a one-shot iterator comes back as a
    :class:`OneShot` that still yields its first batch; an empty one raises."""
    if isinstance(data, OneShot):
        return data.first, data
    first = next(iter(data), _END)
    if first is _END:
        raise ValueError("the data yielded no batch: the dataset is empty")
    if isinstance(data, Iterator):  # a one-shot iterator: next() consumed the batch
        return first, OneShot(data, first)
    return first, data


def _epoch_batches(data, epoch: int, base_seed: int):
    """An iterator over one epoch, its order drawn under the epoch's own seed (a DataLoader's
    sampler draws its shuffle seed at the first ``next()``), the training RNG left as it was."""
    if isinstance(data, OneShot):
        return iter(data)
    rng = torch.get_rng_state()
    torch.manual_seed(base_seed * 100_003 + epoch)
    it = iter(data)
    first = next(it, _END)
    torch.set_rng_state(rng)
    return iter(()) if first is _END else itertools.chain([first], it)


def data_sketch(data, base_seed: int = 0) -> dict:
    """What identifies the data of a fit, independent of its order where possible: a few items
    of a list of batches or of a DataLoader's dataset, else the first batch of epoch 0."""
    n = len(data) if hasattr(data, "__len__") else None
    items = None
    if isinstance(data, Sequence) and n:
        items = [data[i] for i in sorted({0, n // 2, n - 1})]
    else:
        ds = getattr(data, "dataset", None)
        try:
            m = len(ds)
            items = [ds[i] for i in sorted({0, m // 2, m - 1})] + [m, getattr(data, "batch_size", None)]
        except Exception:  # an IterableDataset, or no dataset at all
            items = None
    if items is None:
        first = data.first if isinstance(data, OneShot) else next(_epoch_batches(data, 0, base_seed), None)
        items = [first]
    return {"batches": n, "content": sketch(items)}


# ---------------------------------------------------------------------------- loop
def train_loop(method, step_fn, params, data, *, guide, epochs, max_steps, lr, weight_decay,
               clip_norm, checkpoint, checkpoint_every, early_stopping, progress, seed,
               optim: torch.optim.Optimizer | None = None, fingerprint: Mapping | None = None) -> FitResult:
    """Fit ``params`` by ``step_fn(batch) -> loss`` over ``epochs`` of ``data``; ``optim`` over
    ``params`` (default: AdamW). ``fingerprint`` (JSON-able) identifies the model and the
    caller's settings; the loop adds the data, the parameters and the optimiser's settings.

    Under torch.distributed (:func:`~pyro_llm.infer.distributed.is_distributed`) each rank runs
    it on its shard with the same seed: a hand all-reduce of ``params``' gradients, the
    equivalent of ``DistributedDataParallel`` for tensors that are not in one ``nn.Module``.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be >= 1 (a whole number of passes), got {epochs!r}")
    if (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, numbers.Integral)
            or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every!r}")
    if checkpoint and os.path.exists(checkpoint) and not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint={str(checkpoint)!r} is a file, not a directory: pass a directory "
                         "(it is created if missing) for the fit state")
    _check_precision(params)
    if isinstance(data, Iterator):
        _, data = peek_batches(data)
    if isinstance(data, OneShot) and epochs > 1:
        raise ValueError(f"data is a one-shot iterator (a generator) but epochs={epochs}: every epoch "
                         "after the first would be empty; pass a list of batches or a DataLoader")
    n_batches = len(data) if hasattr(data, "__len__") else None
    if n_batches == 0:
        raise ValueError("the data has no batches: the dataset is empty")
    distributed, main = _dist.is_distributed(), _dist.rank() == 0 or not _dist.is_distributed()
    if distributed:
        _dist.check_same(-1 if n_batches is None else n_batches, "the number of batches, len(data),")
    total = epochs * n_batches if n_batches else None
    if max_steps is not None:
        total = min(total, max_steps) if total else max_steps
    if optim is None:
        optim = torch.optim.AdamW(_param_groups(params, lr), lr=_lr_of(lr, ""),
                                  weight_decay=weight_decay)
    base_seed = 0 if seed is None else seed
    state = _LoopState()
    if checkpoint:
        full = _fingerprint(method, params, data, optim, clip_norm, seed, early_stopping, fingerprint)
        state.fingerprint = full
        loaded = load_checkpoint(checkpoint, params, optim, full)
        if loaded is not None:
            state.restore(*loaded)
            if n_batches and state.step != state.epoch * n_batches + state.pos:
                raise ValueError(f"checkpoint in {checkpoint} is at step {state.step} but epoch "
                                 f"{state.epoch}, batch {state.pos} of {n_batches}: it is damaged; "
                                 "use a fresh checkpoint directory")
    if distributed:
        _dist.check_same(state.step, f"the step restored from checkpoint={checkpoint!r} (every rank "
                                     "must see the same checkpoint directory)")
        _dist.broadcast_params(params)
    bar = tqdm(total=total, initial=state.step, disable=not (progress and main), desc=f"fit {method}",
               leave=False)
    t0 = time.perf_counter() - state.seconds
    try:
        for epoch in range(state.epoch, epochs):
            if state.done(total) or state.stopped:
                break
            skip, state.epoch = (state.pos if epoch == state.epoch else 0), epoch
            for i, batch in enumerate(_epoch_batches(data, epoch, base_seed)):
                if i < skip:
                    continue
                if state.done(total):
                    break
                _one_step(state, step_fn, batch, params, optim, clip_norm, lr, distributed)
                state.pos = i + 1
                bar.update(1)
                bar.set_postfix(loss=f"{state.losses[-1]:.4g}")
                if early_stopping and state.step % early_stopping.every == 0:
                    if state.evaluate(early_stopping, params):
                        break
                if checkpoint and main and state.step % checkpoint_every == 0:
                    save_checkpoint(checkpoint, params, optim, state.meta(time.perf_counter() - t0),
                                    state.best)
            else:
                state.epoch, state.pos = epoch + 1, 0
            if distributed:  # every rank ends its epoch here, however it ended
                _dist.sync_end()
    finally:
        bar.close()
    if state.stopped and state.best is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state.best[n])
    seconds = time.perf_counter() - t0
    if checkpoint and main:
        save_checkpoint(checkpoint, params, optim, state.meta(seconds), state.best)
    if checkpoint and distributed:  # no rank returns (and may resume) before the file is written
        _dist.barrier()
    return FitResult(
        method=method, guide=guide,
        params={n: p.detach().clone() for n, p in params.items()},
        losses=tuple(state.losses), val_history=tuple(state.val), steps=state.step,
        fit_seconds=seconds, seconds_per_step=seconds / max(state.step, 1),
        stopped_early=state.stopped, best_step=state.best_step,
    )


def _one_step(state, step_fn, batch, params, optim, clip_norm, lr, distributed) -> None:
    optim.zero_grad(set_to_none=True)
    value = step_fn(batch)
    loss_value, share = float(value.detach()), None
    if distributed:  # the global batch's loss, and this rank's share of its rows
        loss_value, share = _dist.sync_step(loss_value, _dist.batch_rows(batch))
    if not math.isfinite(loss_value):
        raise FloatingPointError(
            f"loss is {loss_value} at step {state.step}; lower lr (now {lr}) or check the data; "
            "the parameters are those before this step and the last checkpoint (if any) is intact")
    value.backward()
    if distributed:
        _dist.all_reduce_grads(params, share)
    grads = [p.grad for p in params.values() if p.grad is not None]
    if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        bad = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
        raise FloatingPointError(
            f"the gradient of {bad[:3]} is NaN or inf at step {state.step} though the loss "
            f"({loss_value:.6g}) is finite; lower lr (now {lr}) or check the model; the parameters "
            "are those before this step and the last checkpoint (if any) is intact")
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(list(params.values()), clip_norm)
    optim.step()
    state.step += 1
    state.losses.append(loss_value)


def _check_precision(params: Mapping[str, torch.Tensor]) -> None:
    half = [n for n, p in params.items() if p.dtype in _HALF]
    if half:
        dtype = params[half[0]].dtype
        raise ValueError(
            f"{len(half)} trainable tensors, e.g. {half[0]!r}, are {dtype}: optimiser steps of about "
            "lr fall below half-precision resolution, so many entries would never move (and the "
            "optimiser state would round). Keep the trainable tensors in float32 (peft does so by "
            "default: get_peft_model(..., autocast_adapter_dtype=True)); the frozen base may stay "
            "in half precision")


def _fingerprint(method, params, data, optim, clip_norm, seed, early_stopping, extra) -> dict:
    defaults = {k: v for k, v in optim.defaults.items()
                if v is None or isinstance(v, (bool, int, float, str, tuple, list))}
    return {
        "method": method, "parameters": sketch([[n, list(p.shape), str(p.dtype)] for n, p in params.items()]),
        "data": data_sketch(data, 0 if seed is None else seed),
        "optimizer": [type(optim).__name__, sketch(defaults),
                      sorted({float(g["lr"]) for g in optim.param_groups})],
        "clip_norm": clip_norm, "seed": seed,
        "early_stopping": None if early_stopping is None else
        [early_stopping.every, early_stopping.patience, early_stopping.min_delta,
         type(early_stopping).__name__, getattr(early_stopping, "rtol", None),
         getattr(early_stopping, "z", None)],
        **dict(extra or {}),
    }


def _lr_of(lr, name: str) -> float:
    value = float(lr(name) if callable(lr) else lr)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"learning rate must be > 0, got {value!r} for {name or 'the default'!r}")
    return value


def _param_groups(params: Mapping[str, torch.Tensor], lr) -> list[dict]:
    """One optimiser group per distinct learning rate (``lr`` may be ``name -> lr``)."""
    groups: dict[float, list[torch.Tensor]] = {}
    for name, p in params.items():
        groups.setdefault(_lr_of(lr, name), []).append(p)
    return [{"params": ps, "lr": value} for value, ps in groups.items()]


class _LoopState:
    def __init__(self):
        self.step, self.epoch, self.pos, self.seconds = 0, 0, 0, 0.0
        self.losses, self.val = [], []
        self.best_value, self.best, self.best_step = math.inf, None, None
        self.bad, self.stopped, self.fingerprint = 0, False, {}

    def done(self, total) -> bool:
        return total is not None and self.step >= total

    def evaluate(self, es: EarlyStopping, params) -> bool:
        value, margin = es.value(self.losses)
        value = _dist.mean_over_ranks(value)  # one decision for every rank
        margin = _dist.mean_over_ranks(margin)
        self.val.append((self.step, value))
        if value < self.best_value - margin:
            self.best_value, self.best_step, self.bad = value, self.step, 0
            self.best = {n: p.detach().clone() for n, p in params.items()}
        else:
            self.bad += 1
        self.stopped = self.bad >= es.patience
        return self.stopped

    def meta(self, seconds: float) -> dict:
        return {"step": self.step, "epoch": self.epoch, "pos": self.pos, "seconds": seconds,
                "losses": self.losses, "val": self.val, "best_step": self.best_step,
                "best_value": self.best_value if self.best is not None else None,
                "bad": self.bad, "stopped": self.stopped, "fingerprint": self.fingerprint}

    def restore(self, meta: dict, best: dict) -> None:
        self.step, self.epoch, self.pos = meta["step"], meta["epoch"], meta["pos"]
        self.seconds, self.losses = float(meta["seconds"]), [float(v) for v in meta["losses"]]
        try:
            self.val = [(int(s), float(v)) for s, v in meta["val"]]
        except (TypeError, ValueError):
            raise ValueError(f"the checkpoint's early-stopping record {meta['val']!r:.60} is not a "
                             "list of (step, value) pairs; it is damaged: use a fresh checkpoint "
                             "directory") from None
        self.bad, self.stopped, self.best_step = meta["bad"], meta["stopped"], meta["best_step"]
        if meta["best_value"] is not None:
            if not best:
                raise ValueError("the checkpoint records an early-stopping best but holds no best "
                                 "tensors; it is damaged: use a fresh checkpoint directory")
            self.best_value, self.best = float(meta["best_value"]), best
