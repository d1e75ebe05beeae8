"""``fit_svi`` and ``fit_map``: one training loop, two objectives.

Both run minibatches from any re-iterable of batches (a ``DataLoader``), show a tqdm bar,
write resumable checkpoints (safetensors + JSON) and can stop early on a held-out metric.
The loss is a plain differentiable scalar and the optimiser a plain torch optimiser over
named tensors, so the same loop runs under torch.distributed: inside a process group of more
than one rank it starts from rank 0's tensors, combines the ranks' gradients after every
``backward()`` (weighted by their shares of the global batch: the single-process gradient of
that batch, see :mod:`pyro_llm.infer.distributed`), records the global batch's loss, and leaves
the progress bar and the checkpoint files to rank 0.

A batch is passed to the model as ``model(**batch)`` if it is a mapping, ``model(*batch)``
if it is a tuple or list, and ``model(batch)`` otherwise.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import pyro
import pyro.infer.autoguide as ag
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from tqdm.auto import tqdm

from ..posterior import call_with_batch
from . import distributed as _dist
from .checkpoint import load_checkpoint, save_checkpoint

_END = object()

__all__ = ["FitResult", "EarlyStopping", "make_guide", "fit_svi", "fit_map", "scale_lr"]


@dataclass(frozen=True)
class FitResult:
    """What a fit returns: a frozen record.

    Attributes
    ----------
    method: ``"svi"`` or ``"map"``.
    guide: the fitted guide (SVI) or ``None`` (MAP; the peft model holds the result).
    params: final values of the fitted tensors by name, detached.
    losses: training loss per step (negative ELBO per step for SVI).
    val_history: ``(step, metric)`` pairs of the held-out metric, if early stopping ran.
    steps, fit_seconds, seconds_per_step: how long the fit took.
    stopped_early, best_step: the early-stopping outcome.
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


GUIDES = {
    "normal": ag.AutoNormal,
    "low_rank": ag.AutoLowRankMultivariateNormal,
    "mvn": ag.AutoMultivariateNormal,
    "delta": ag.AutoDelta,
}


def make_guide(model: Callable, kind: str = "normal", init_values=None,
               init_scale: float = 1e-3, rank: int = 8) -> ag.AutoGuide:
    """An autoguide whose locations start at ``init_values`` (the fine-tuned adapter).

    ``init_values`` is a ``{site: tensor}`` dict or anything with ``init_values()`` (a
    :class:`~pyro_llm.BayesianLoRA`); sites it lacks start at their prior median. peft
    initialises B at zero, so a guide left at the prior would be centred on no adaptation.
    """
    if kind not in GUIDES:
        raise ValueError(f"unknown guide {kind!r}; choose one of {sorted(GUIDES)} or pass a guide")
    if hasattr(init_values, "init_values"):
        init_values = init_values.init_values()
    loc_fn = init_to_value(values=dict(init_values or {}), fallback=init_to_median)
    # discrete sites marked for enumeration are summed out by TraceEnum_ELBO, not guided
    model = poutine.block(model, hide_fn=lambda msg: msg.get("infer", {}).get("enumerate") == "parallel")
    if kind == "delta":
        return ag.AutoDelta(model, init_loc_fn=loc_fn)
    if init_scale <= 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale}")
    kwargs = {"rank": rank} if kind == "low_rank" else {}
    return GUIDES[kind](model, init_loc_fn=loc_fn, init_scale=init_scale, **kwargs)


def _first_batch(data: Iterable):
    for batch in data:
        return batch
    raise ValueError("the data yielded no batch: the dataset is empty")


def _param_store_tensors(model, guide, batch, loss) -> dict[str, torch.Tensor]:
    with poutine.trace(param_only=True) as tr:
        call_with_batch(lambda *a, **k: loss.differentiable_loss(model, guide, *a, **k), batch)
    store = pyro.get_param_store()
    return {name: store._params[name] for name in tr.trace.nodes if name in store._params}


def fit_svi(
    model: Callable,
    guide: Callable | str,
    data: Iterable,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float | Callable[[str], float] = 1e-3,
    num_particles: int = 1,
    init_values=None,
    init_scale: float = 1e-3,
    clip_norm: float | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 100,
    early_stopping: EarlyStopping | None = None,
    progress: bool = True,
    seed: int | None = 0,
    elbo=None,
) -> FitResult:
    """Stochastic variational inference over ``model`` with ``guide``, on minibatches of ``data``.

    Parameters
    ----------
    model, guide:
        A Pyro model and a guide: a guide callable, or ``"normal"``, ``"low_rank"``,
        ``"mvn"``, ``"delta"`` for an autoguide started at ``init_values`` (see
        :func:`make_guide`). Minibatch scaling is the model's: use
        ``pyro.plate(name, size=N, subsample=batch_index)``.
    data:
        A re-iterable of batches (e.g. a ``torch.utils.data.DataLoader``). Each epoch's
        iterator is created under a seed derived from ``seed`` and the epoch, so a shuffling
        DataLoader without a ``generator`` of its own visits the same order when a fit is
        resumed (one with its own generator follows that generator instead).
    epochs, max_steps:
        Passes over ``data``; ``max_steps`` stops sooner.
    lr:
        AdamW learning rate, or a rule ``param name -> lr`` (see :func:`scale_lr`).
    clip_norm:
        Clip the gradient norm at this value. Off by default: clipping a stochastic ELBO
        gradient reweights the noisy draws, which biases the fixed point (guide scales
        come out too wide); Adam already bounds the step size.
    checkpoint:
        A directory; the fit state is written there every ``checkpoint_every`` steps and
        at the end, and a fit started with the same directory resumes from it.
    elbo:
        The Pyro ELBO (default ``Trace_ELBO(num_particles)``); pass
        ``TraceEnum_ELBO(max_plate_nesting=...)`` for a model whose discrete sites are
        enumerated (the autoguides leave those sites out).

    Example
    -------
    >>> import torch, pyro, pyro.distributions as dist
    >>> x = torch.randn(64)
    >>> def model(x, idx):
    ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    ...     with pyro.plate("data", 64, subsample=idx):
    ...         pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])
    >>> batches = [(x, torch.arange(i, i + 16)) for i in range(0, 64, 16)]
    >>> res = fit_svi(model, "normal", batches, epochs=2, lr=0.05, progress=False)
    >>> len(res.losses)
    8
    """
    if (isinstance(num_particles, bool) or not isinstance(num_particles, numbers.Integral)
            or num_particles < 1):
        raise ValueError(f"num_particles must be a positive integer (draws per ELBO estimate), "
                         f"got {num_particles!r}")
    loss = Trace_ELBO(num_particles=num_particles) if elbo is None else elbo
    if seed is not None:
        pyro.set_rng_seed(seed)
    if isinstance(guide, str):
        guide = make_guide(model, guide, init_values, init_scale)
    first = _first_batch(data)
    params = _param_store_tensors(model, guide, first, loss)  # also builds the guide
    if not params:
        raise ValueError("the model and guide have no parameters to fit")

    def step(batch):
        return call_with_batch(lambda *a, **k: loss.differentiable_loss(model, guide, *a, **k), batch)

    return train_loop(
        "svi", step, params, data, guide=guide, epochs=epochs, max_steps=max_steps, lr=lr,
        weight_decay=0.0, clip_norm=clip_norm, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, early_stopping=early_stopping, progress=progress,
        seed=seed,
    )


def hf_loss(model, batch):
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError("fit_map's default loss needs dict batches with a 'labels' entry; "
                         "pass loss=lambda model, batch: ... for other data")
    inputs = {k: v for k, v in batch.items() if k not in ("index",)}
    return model(**inputs).loss


def fit_map(
    peft_model: torch.nn.Module,
    data: Iterable,
    *,
    loss: Callable[[torch.nn.Module, object], torch.Tensor] | None = None,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float | Callable[[str], float] = 5e-4,
    weight_decay: float = 0.0,
    clip_norm: float | None = 10.0,
    checkpoint: str | None = None,
    checkpoint_every: int = 100,
    early_stopping: EarlyStopping | None = None,
    progress: bool = True,
    seed: int | None = 0,
) -> FitResult:
    """Plain LoRA fine-tuning (the MAP baseline) of a peft model's trainable tensors, in place.

    ``loss(model, batch)`` defaults to the Hugging Face ``model(**batch).loss`` (batches with
    ``labels``). The optimiser is AdamW; ``weight_decay`` is the Gaussian prior's precision
    in disguise.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(peft_model).__name__} has no trainable parameters; "
                         "is it a peft model with a LoRA adapter?")
    loss_fn = loss or hf_loss
    _first_batch(data)
    was_training = peft_model.training
    peft_model.train()
    try:
        return train_loop(
            "map", lambda batch: loss_fn(peft_model, batch), params, data, guide=None,
            epochs=epochs, max_steps=max_steps, lr=lr, weight_decay=weight_decay,
            clip_norm=clip_norm, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
            early_stopping=early_stopping, progress=progress, seed=seed,
        )
    finally:
        peft_model.train(was_training)


def train_loop(method, step_fn, params, data, *, guide, epochs, max_steps, lr, weight_decay,
         clip_norm, checkpoint, checkpoint_every, early_stopping, progress, seed,
         optim: torch.optim.Optimizer | None = None) -> FitResult:
    """The training loop every fit shares; ``optim`` over ``params`` (default: AdamW).

    Under torch.distributed (:func:`~pyro_llm.infer.distributed.is_distributed`) each rank runs
    it on its shard with the same seed: a hand all-reduce of ``params``' gradients, the
    equivalent of ``DistributedDataParallel`` for tensors that are not in one ``nn.Module``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if (isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, numbers.Integral)
            or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {checkpoint_every!r}")
    if checkpoint and os.path.exists(checkpoint) and not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint={str(checkpoint)!r} is a file, not a directory: pass a directory "
                         "(it is created if missing) for the fit state")
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
    state = _LoopState()
    if checkpoint:
        meta = load_checkpoint(checkpoint, params, optim)
        if meta is not None:
            state.restore(meta)
    if distributed:
        _dist.check_same(state.step, f"the step restored from checkpoint={checkpoint!r} (every rank "
                                     "must see the same checkpoint directory)")
        _dist.broadcast_params(params)
    bar = tqdm(total=total, initial=state.step, disable=not (progress and main), desc=f"fit {method}",
               leave=False)
    t0 = time.perf_counter() - state.seconds
    base_seed = 0 if seed is None else seed
    try:
        for epoch in range(state.step // n_batches if n_batches else 0, epochs):
            rng = torch.get_rng_state()
            torch.manual_seed(base_seed * 100_003 + epoch)  # reproducible order on resume
            it = iter(data)
            # a DataLoader's RandomSampler draws its shuffle seed at the first next(), so
            # that must happen under the epoch seed too, not under the training RNG
            first = next(it, _END)
            torch.set_rng_state(rng)
            it = iter(()) if first is _END else itertools.chain([first], it)
            skip = state.step - epoch * n_batches if n_batches else 0
            for i, batch in enumerate(it):
                if i < skip:
                    continue
                if state.done(total):
                    break
                optim.zero_grad(set_to_none=True)
                value = step_fn(batch)
                loss_value, share = float(value.detach()), None
                if distributed:  # the global batch's loss, and this rank's share of its rows
                    loss_value, share = _dist.sync_step(loss_value, _dist.batch_rows(batch))
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"loss is {loss_value} at step {state.step}; lower lr "
                        f"(now {lr}) or check the data; the last checkpoint (if any) is intact"
                    )
                value.backward()
                if distributed:
                    _dist.all_reduce_grads(params, share)
                if clip_norm:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), clip_norm)
                optim.step()
                state.step += 1
                state.losses.append(loss_value)
                bar.update(1)
                bar.set_postfix(loss=f"{state.losses[-1]:.4g}")
                if early_stopping and state.step % early_stopping.every == 0:
                    if state.evaluate(early_stopping, params):
                        break
                if checkpoint and main and state.step % checkpoint_every == 0:
                    save_checkpoint(checkpoint, params, optim,
                                    state.meta(time.perf_counter() - t0))
            if distributed:  # every rank ends its epoch here, however it ended
                _dist.sync_end()
            if state.done(total) or state.stopped:
                break
    finally:
        bar.close()
    if state.stopped and state.best is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state.best[n])
    seconds = time.perf_counter() - t0
    if checkpoint and main:
        save_checkpoint(checkpoint, params, optim, state.meta(seconds))
    if checkpoint and distributed:  # no rank returns (and may resume) before the file is written
        _dist.barrier()
    final = _constrained(params) if method == "svi" else params
    return FitResult(
        method=method, guide=guide,
        params={n: p.detach().clone() for n, p in final.items()},
        losses=tuple(state.losses), val_history=tuple(state.val), steps=state.step,
        fit_seconds=seconds, seconds_per_step=seconds / max(state.step, 1),
        stopped_early=state.stopped, best_step=state.best_step,
    )


def _lr_of(lr, name: str) -> float:
    value = float(lr(name) if callable(lr) else lr)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"learning rate must be > 0, got {value!r} for {name or 'the default'!r}")
    return value


def _param_groups(params: dict[str, torch.Tensor], lr) -> list[dict]:
    """One optimiser group per distinct learning rate (``lr`` may be ``name -> lr``)."""
    groups: dict[float, list[torch.Tensor]] = {}
    for name, p in params.items():
        groups.setdefault(_lr_of(lr, name), []).append(p)
    return [{"params": ps, "lr": value} for value, ps in groups.items()]


def scale_lr(lr: float, scale_lr: float) -> Callable[[str], float]:
    """A learning-rate rule for autoguides: ``scale_lr`` for scale parameters, ``lr`` otherwise.

    Guide scales start small (the fine-tuned adapter is a point) and must travel several
    log-units to the posterior width, while the locations should move little; Adam's step is
    about ``lr`` per step in each, so the two deserve different rates.
    """
    suffixes = (".scale", ".scale_tril", ".cov_factor")
    return lambda name: scale_lr if ".scales." in name or name.endswith(suffixes) else lr


def _constrained(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {n: store[n] for n in params}


class _LoopState:
    def __init__(self):
        self.step, self.seconds, self.losses, self.val = 0, 0.0, [], []
        self.best_value, self.best, self.best_step = math.inf, None, None
        self.bad, self.stopped = 0, False

    def done(self, total) -> bool:
        return total is not None and self.step >= total

    def evaluate(self, es: EarlyStopping, params) -> bool:
        value = _dist.mean_over_ranks(float(es.metric()))  # one decision for every rank
        self.val.append((self.step, value))
        if value < self.best_value - es.min_delta:
            self.best_value, self.best_step, self.bad = value, self.step, 0
            self.best = {n: p.detach().clone() for n, p in params.items()}
        else:
            self.bad += 1
        self.stopped = self.bad >= es.patience
        return self.stopped

    def meta(self, seconds: float) -> dict:
        return {"step": self.step, "seconds": seconds, "losses": self.losses,
                "val": self.val, "best_value": self.best_value if self.best else None,
                "best_step": self.best_step, "bad": self.bad}

    def restore(self, meta: dict) -> None:
        self.step, self.seconds = int(meta["step"]), float(meta["seconds"])
        self.losses = list(meta["losses"])
        self.val = [tuple(v) for v in meta["val"]]
        self.bad = int(meta["bad"])
        self.best_step = meta["best_step"]
        if meta.get("best_value") is not None:  # best tensors are not saved: restart the count
            self.bad = 0
