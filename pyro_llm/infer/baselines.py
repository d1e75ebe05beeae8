"""Non-Bayesian calibration baselines for a fine-tuned peft model: temperature scaling, MC dropout.

* **Temperature scaling** (Guo et al. 2017): one scalar T > 0 divides the logits; T minimises
  the NLL of held-out labels (:func:`fit_temperature`, L-BFGS over log T). It changes
  confidence, never the predicted class.
* **MC dropout** (Gal & Ghahramani 2016): dropout left on at prediction time; S stochastic
  forward passes give ``(S, N, C)`` probabilities (:func:`mc_dropout_predict`), which the
  metrics treat like posterior draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..point import PointPosterior, WithValues
from ..readout import Readout, default_labels, default_logits
from .config import takes_config

__all__ = ["TemperatureScaling", "collect_logits", "fit_temperature", "mc_dropout_predict",
           "MCDropoutPosterior", "active_dropouts"]


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("logits is empty: temperature scaling needs held-out examples")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},) to match logits, "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point() and (labels != labels.round()).any():
        raise ValueError("labels must be integer class indices")
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}], got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contains NaN or inf; check the model's outputs")
    return logits.detach().double().cpu(), labels.cpu()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """The temperature T that minimises the mean NLL of ``labels`` under ``softmax(logits / T)``.

    Fit it on held-out data (not the training set, where the model is overconfident by
    construction). The objective is convex in 1/T; L-BFGS with a strong-Wolfe line search runs
    over log T from T = 1, in float64.

    Example
    -------
    >>> import torch
    >>> z = torch.randn(2000, 3) * 2
    >>> y = torch.distributions.Categorical(logits=z).sample()
    >>> T = fit_temperature(5 * z, y)          # logits 5x too confident
    >>> 4.0 < T < 6.0
    True
    """
    z, y = _check_logits(logits, labels)
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        raise FloatingPointError(f"temperature fit diverged (T = {t}); are the logits constant?")
    return t


class TemperatureScaling:
    """A fitted temperature: ``.fit(logits, y)`` on held-out data, then ``.probs(logits)``.

    Example
    -------
    >>> import torch
    >>> ts = TemperatureScaling().fit(torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]]),
    ...                               torch.tensor([0, 1, 1]))
    >>> ts.temperature > 1.0
    True
    >>> ts.probs(torch.zeros(1, 2)).tolist()
    [[0.5, 0.5]]
    """

    def __init__(self, max_iter: int = 100):
        self.max_iter = max_iter
        self.temperature: float | None = None

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> TemperatureScaling:
        self.temperature = fit_temperature(logits, labels, max_iter=self.max_iter)
        return self

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``softmax(logits / T)``, in the logits' dtype (float32 at least)."""
        if self.temperature is None:
            raise RuntimeError("TemperatureScaling is not fitted; call .fit(logits, labels) on "
                               "held-out data first")
        logits = torch.as_tensor(logits)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return (logits.to(dtype) / self.temperature).softmax(-1)

    def __repr__(self) -> str:
        return f"TemperatureScaling(temperature={self.temperature})"


@torch.no_grad()
def collect_logits(peft_model: torch.nn.Module, data: Iterable, logits_fn: Callable | None = None,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits ``(N, C)`` and labels ``(N,)`` of every batch, on the CPU.

    ``logits_fn(model, batch)`` defaults to ``model(**batch).logits`` for dict batches and
    ``model(x)`` for ``(x, y)`` tuples; labels come from ``batch["labels"]`` or ``y``. The
    model's train/eval modes are restored afterwards.
    """
    logits_fn = logits_fn or default_logits
    modes = [(m, m.training) for m in peft_model.modules()]
    zs, ys = [], []
    total = len(data) if hasattr(data, "__len__") else None
    peft_model.eval()
    try:
        for batch in tqdm(data, total=total, disable=not progress, desc="logits", leave=False):
            y = default_labels(batch)
            if y is None:
                raise ValueError("a batch carries no labels; use dict batches with 'labels' or (x, y) "
                                 "tuples to collect held-out logits")
            zs.append(logits_fn(peft_model, batch).detach().float().cpu())
            ys.append(torch.as_tensor(y).long().cpu())
    finally:
        for m, t in modes:
            m.training = t
    if not zs:
        raise ValueError("the data yielded no batch: nothing to collect")
    return torch.cat(zs), torch.cat(ys)


def active_dropouts(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The dropout modules of ``model`` with p > 0 (peft's ``lora_dropout`` holds
    ``torch.nn.Dropout`` modules, ``nn.Identity`` when ``lora_dropout=0``)."""
    return [m for m in model.modules()
            if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]


@takes_config(config=False)
@torch.no_grad()
def mc_dropout_predict(peft_model: torch.nn.Module, data: Iterable, num_samples: int = 20, *,
                       logits_fn: Callable | None = None, progress: bool = True, seed: int = 0,
                       return_logits: bool = False) -> torch.Tensor:
    """MC-dropout class probabilities ``(S, N, C)``: S forward passes with dropout on.

    Every ``torch.nn.Dropout*`` module with p > 0 (peft's ``lora_dropout`` included) runs in
    train mode, every other module in eval mode, under ``no_grad``; all modes are restored
    afterwards. Dropout that a module applies through ``torch.nn.functional`` keyed on its own
    ``training`` flag (the attention-probability dropout of Hugging Face attention layers)
    therefore stays off. Each batch is read once and run S times; the masks are drawn from a
    forked RNG seeded with ``seed``, so the global RNG is left as it was.
    ``return_logits=True`` returns the ``(S, N, C)`` logits instead.

    Example
    -------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(4, 3))
    >>> mc_dropout_predict(net, [torch.randn(5, 4)], 8, progress=False).shape
    torch.Size([8, 5, 3])
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    drops = active_dropouts(peft_model)
    if not drops:
        raise ValueError(f"{type(peft_model).__name__} has no dropout module with p > 0, so MC dropout "
                         "would repeat one deterministic prediction; build the adapter with "
                         "LoraConfig(lora_dropout=0.1) or use a backbone with dropout")
    logits_fn = logits_fn or default_logits
    modes = [(m, m.training) for m in peft_model.modules()]
    cuda = sorted({p.device.index or 0 for p in peft_model.parameters() if p.device.type == "cuda"})
    chunks = []
    total = len(data) if hasattr(data, "__len__") else None
    try:
        peft_model.eval()
        for m in drops:
            m.train()
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            for batch in tqdm(data, total=total, disable=not progress, desc="mc dropout", leave=False):
                z = torch.stack([logits_fn(peft_model, batch).detach().float() for _ in range(num_samples)])
                chunks.append(z if return_logits else z.softmax(-1))
    finally:
        for m, t in modes:
            m.training = t
    if not chunks:
        raise ValueError("the data yielded no batch: nothing to predict")
    return torch.cat(chunks, dim=1)


class MCDropoutPosterior(PointPosterior):
    """MC dropout in the posterior protocol: the adapter's trainable tensors are a point
    (``sample`` repeats them), and :meth:`predict` draws the randomness from dropout masks
    (:func:`mc_dropout_predict`), ``(S, N, C)``. Saved as a point with ``method="mc_dropout"``."""

    degenerate = False

    def __init__(self, peft_model: torch.nn.Module, *, readout=None, values=None):
        values = values if values is not None else {
            n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        super().__init__(values, model=peft_model, readout=readout, method="mc_dropout")

    @torch.no_grad()
    def predict(self, data: Iterable, num_samples: int = 20, *, readout=None, progress: bool = True,
                seed: int | None = 0, **_) -> torch.Tensor:
        r = readout or self.readout or Readout()
        model = WithValues(self.model, self.values)
        return mc_dropout_predict(model, data, num_samples, logits_fn=lambda m, b: r.logits(m, b),
                                  progress=progress, seed=0 if seed is None else seed)
