"""MAP training of a PoLAR adapter (:class:`~pyro_llm.polar.PolarAdapter`): Riemannian steps on
``U, V``, AdamW on ``Theta`` and a head, checkpoints that resume, the result written into the peft
model at the end (so :func:`~pyro_llm.fit_laplace` and :class:`~pyro_llm.BayesianLoRA` take it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import pyro
import torch

from ..point import PointPosterior
from ..polar import PolarAdapter, polar_optimizer
from ..runtime import train_mode
from .config import takes_config
from .svi import hf_loss
from .train import train_loop

__all__ = ["fit_polar"]


@takes_config
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
    loss_fn = loss or hf_loss
    opt = polar_optimizer(adapter, lr, method, lam=lam, weight_decay=weight_decay, **optim_kw)
    params = {f"polar/{k}": t for k, t in adapter.named_polar_tensors().items()}
    params.update({f"extra/{n}": adapter.peft_model.get_parameter(n) for n in adapter.extra_names})
    with train_mode(adapter.peft_model, True):
        fit = train_loop("polar", lambda batch: loss_fn(adapter, batch), params, data, guide=None,
                   epochs=epochs, max_steps=max_steps, lr=lr, weight_decay=weight_decay,
                   clip_norm=clip_norm, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                   early_stopping=None, progress=progress, seed=seed, optim=opt)
    adapter.write_to_peft()
    point = PointPosterior({n: v.detach().clone() for n, v in adapter.lora_weights().items()},
                           model=adapter.peft_model, method="polar")
    return dataclasses.replace(fit, extra={"method": method,
                                           "orthogonality": adapter.orthogonality_errors()},
                               posterior=point)
