"""BLoB's two optimisers (see :mod:`pyro_llm.infer.blob`, ``optimizer="two"``).

As in the authors' training loop (Wang et al., "BLoB: Bayesian Low-Rank Adaptation by
Backpropagation for Large Language Models", NeurIPS 2024), each step is two updates in turn:

1. AdamW at ``lr`` on the batch-mean NLL (one noise draw) over the ``A`` means ``M``, the
   ``B`` matrices and the head. ``G`` is not in this optimiser.
2. Plain SGD at ``kl_lr`` on ``w_i * KL(q || p)`` (closed form, evaluated after update 1;
   ``w_i = kl_scale * pi_i``) over ``M`` and ``G``. The NLL gradients of update 1's tensors are
   spent and cleared first, so ``M`` here moves by its KL gradient alone; ``G``, which only
   this optimiser steps, moves by its NLL gradient plus its KL gradient (in the authors' code
   the AdamW is built before the ``G`` tensors exist and clears only its own gradients).

:class:`TwoOptimizers` holds both and reads to the shared training loop
(:func:`~pyro_llm.infer.train.train_loop`, ``optim=``) as one optimiser: ``zero_grad``,
``step``, ``param_groups``, ``defaults`` and ``state``, the per-tensor state that checkpoints
save and restore. SGD without momentum keeps no state, so the AdamW's state is all of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

__all__ = ["TwoOptimizers"]


def _lr(value, name: str, what: str, zero_ok: bool = False) -> float:
    value = float(value(name) if callable(value) else value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{what} must be {'>= 0' if zero_ok else '> 0'}, got {value!r}"
                         + (f" for {name!r}" if name else ""))
    return value


def _groups(params: Mapping[str, torch.Tensor], lr) -> list[dict]:
    """One AdamW group per distinct learning rate (``lr`` may be ``name -> lr``)."""
    groups: dict[float, list[torch.Tensor]] = {}
    for name, p in params.items():
        groups.setdefault(_lr(lr, name, "lr"), []).append(p)
    return [{"params": ps, "lr": value} for value, ps in groups.items()]


class TwoOptimizers:
    """AdamW on the loss the training loop backpropagates, then SGD on a second loss.

    Parameters
    ----------
    first:
        Tensors by name that the AdamW steps at ``lr`` (a float or ``name -> lr``) with
        their gradients from the loop's ``backward()`` (for BLoB: the NLL).
    second:
        Tensors by name that the SGD steps at ``second_lr`` (``>= 0``; 0 leaves them as they
        are) on the gradient of ``second_loss()``, a callable evaluated after the AdamW
        update. Gradients that the loop left on a tensor that is not in ``first`` are added.
    weight_decay:
        The AdamW's decoupled weight decay.

    Attributes
    ----------
    last_second_loss: the value of ``second_loss()`` at the last step (``nan`` before one).

    Example
    -------
    >>> a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    >>> opt = TwoOptimizers({"a": a}, {"b": b}, lambda: (b**2).sum(), lr=0.1, second_lr=0.5)
    >>> opt.zero_grad(); (a * b).sum().backward(); opt.step()
    >>> b.detach()  # its first gradient (a = 1) plus that of b^2 (2 b), times 0.5
    tensor([-0.5000, -0.5000])
    """

    def __init__(self, first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor],
                 second_loss: Callable[[], torch.Tensor], *, lr, second_lr: float,
                 weight_decay: float = 0.0):
        if not first or not second:
            raise ValueError("both optimisers need tensors to step")
        second_lr = _lr(second_lr, "", "the second learning rate (kl_lr)", zero_ok=True)
        self.first = torch.optim.AdamW(_groups(first, lr), lr=_lr(lr, "", "lr"),
                                       weight_decay=weight_decay)
        self.second = torch.optim.SGD(list(second.values()), lr=second_lr)  # no momentum: no state
        self.second_loss = second_loss
        self.last_second_loss = math.nan

    @property
    def param_groups(self) -> list[dict]:
        """The AdamW's groups, then the SGD's."""
        return self.first.param_groups + self.second.param_groups

    @property
    def defaults(self) -> dict:
        return {**self.first.defaults, "second_lr": self.second.defaults["lr"]}

    @property
    def state(self):
        """Per-tensor optimiser state, read and written by checkpoints: the AdamW's (the SGD
        keeps none)."""
        return self.first.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.first.zero_grad(set_to_none=set_to_none)
        self.second.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        """The AdamW update from the present gradients; then, with the AdamW's gradients
        cleared, the SGD update on ``second_loss()`` (plus any gradient left on its tensors)."""
        self.first.step()
        self.first.zero_grad(set_to_none=True)
        params = [p for g in self.second.param_groups for p in g["params"]]
        loss = self.second_loss()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        bad = [i for i, g in enumerate(grads) if g is not None and not torch.isfinite(g).all()]
        if bad or not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"the second loss ({float(loss.detach()):.6g}) or its gradient is NaN or inf after "
                f"the first optimiser's update; lower lr (now {self.first.defaults['lr']}) or the "
                "second learning rate; the last checkpoint (if any) is intact")
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
        self.second.step()
        self.last_second_loss = float(loss.detach())
