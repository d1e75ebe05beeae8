"""MAP training of a PoLAR adapter (:class:`~pyro_llm.polar.PolarAdapter`): Riemannian steps on
``U, V``, AdamW on ``Theta`` and a head, checkpoints that resume, the result written into the peft
model at the end (so :func:`~pyro_llm.fit_laplace` and :class:`~pyro_llm.BayesianLoRA` take it)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable

import pyro
import torch
from tqdm.auto import tqdm

from ..lora import _train_mode
from ..polar import PolarAdapter, polar_optimizer
from .checkpoint import load_checkpoint, save_checkpoint
from .svi import FitResult, _hf_loss

__all__ = ["fit_polar"]


# ---------------------------------------------------------------- MAP training
def _epoch_batches(data: Iterable, seed: int, epoch: int):
    rng = torch.get_rng_state()
    torch.manual_seed(seed * 100_003 + epoch)  # the same shuffle order on resume, as fit_map
    it = iter(data)
    first = next(it, None)
    torch.set_rng_state(rng)
    if first is not None:
        yield first
        yield from it


def fit_polar(adapter: PolarAdapter, data: Iterable, *,
              loss: Callable[[torch.nn.Module, object], torch.Tensor] | None = None,
              epochs: int = 1, max_steps: int | None = None, lr: float = 1e-3,
              method: str = "landing", lam: float = 1.0, weight_decay: float = 0.0,
              clip_norm: float | None = None, checkpoint: str | None = None,
              checkpoint_every: int = 100, progress: bool = True, seed: int | None = 0,
              **optim_kw):
    """MAP training of a PoLAR adapter; the result is written into the peft model at the end.

    ``loss(adapter, batch)`` defaults to the Hugging Face ``adapter(**batch).loss`` (dict batches
    with ``labels``), as :func:`~pyro_llm.fit_map`. The backbone runs in train mode (dropout on)
    during the fit. ``checkpoint`` is a directory for resumable state (safetensors + JSON);
    ``optim_kw`` go to :func:`polar_optimizer` (``stiefel_lr``, ``precondition``, ``betas``, ``eps``).
    Returns a :class:`~pyro_llm.FitResult` with ``method="polar"``; ``extra`` holds the final
    orthogonality errors.

    Example
    -------
    >>> res = fit_polar(PolarAdapter(peft_model), loader, epochs=3, lr=1e-3)   # doctest: +SKIP
    >>> peft_model.save_pretrained("out")  # holds A = Theta V^T, B = U   # doctest: +SKIP
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    loss_fn = loss or _hf_loss
    opt = polar_optimizer(adapter, lr, method, lam=lam, weight_decay=weight_decay, **optim_kw)
    params = {f"polar/{k}": t for k, t in adapter.named_polar_tensors().items()}
    params.update({f"extra/{n}": adapter.peft_model.get_parameter(n) for n in adapter.extra_names})
    meta = load_checkpoint(checkpoint, params, opt) if checkpoint else None
    step, losses = (int(meta["step"]), list(meta["losses"])) if meta else (0, [])
    n_batches = len(data) if hasattr(data, "__len__") else None
    total = epochs * n_batches if n_batches is not None else None
    if max_steps is not None:
        total = min(total, max_steps) if total is not None else max_steps
    t0 = time.perf_counter() - (float(meta["seconds"]) if meta else 0.0)
    bar = tqdm(total=total, initial=step, disable=not progress, desc="fit polar", leave=False)
    seen = 0
    with _train_mode(adapter.peft_model, True), contextlib.closing(bar):
        for epoch in range(epochs):
            for batch in _epoch_batches(data, seed or 0, epoch):
                seen += 1
                if seen <= step:
                    continue  # resumed: already trained on this batch
                if total is not None and step >= total:
                    break
                opt.zero_grad(set_to_none=True)
                value = loss_fn(adapter, batch)
                if not torch.isfinite(value):
                    raise FloatingPointError(f"loss is {float(value.detach())} at step {step}; lower "
                                             f"lr (now {lr}) or check the data")
                value.backward()
                if clip_norm:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), clip_norm)
                opt.step()
                step += 1
                losses.append(float(value.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
                if checkpoint and step % checkpoint_every == 0:
                    save_checkpoint(checkpoint, params, opt, _meta(step, t0, losses))
            if total is not None and step >= total:
                break
    if step == 0 and not losses:
        raise ValueError("the data yielded no batch: the dataset is empty")
    seconds = time.perf_counter() - t0
    if checkpoint:
        save_checkpoint(checkpoint, params, opt, _meta(step, t0, losses))
    adapter.write_to_peft()
    return FitResult(method="polar", guide=None,
                     params={k: t.detach().clone() for k, t in params.items()},
                     losses=tuple(losses), steps=step, fit_seconds=seconds,
                     seconds_per_step=seconds / max(step, 1),
                     extra={"method": method, "orthogonality": adapter.orthogonality_errors()})


def _meta(step: int, t0: float, losses: list[float]) -> dict:
    return {"step": step, "seconds": time.perf_counter() - t0, "losses": losses}
