"""PoLAR-VBLL (Xiang, Li & Lu 2026): a PoLAR-adapted backbone under a variational Bayesian last layer.

The model is a Bayesian last layer on deterministic features: ``phi = features_fn(adapter, batch)``
(``(B, D)``, e.g. the pooled output that feeds a sequence classifier's head, or a decoder's
last-token hidden state) and ``p(y | phi, W) = softmax(W phi)`` with a Gaussian ``q(W)``
(:class:`~pyro_llm.vbll.VBLLClassification`). A ``features_fn`` may also return a logit offset,
``(phi, b)``: then ``p(y | phi, W) = softmax(b + W phi)`` and ``q(W)`` starts at mean 0, so a
causal LM keeps its own answer-token readout ``b`` and the head learns a correction around it
(:func:`~pyro_llm.infer.answer_head.answer_readout`). One objective, minus the VBLL bound per datum,
is minimised by *alternating optimisation* over two blocks:

1. **head block** (backbone fixed): the variational parameters of ``q(W)`` (mean and
   covariance factor), Adam at ``vbll_lr``, on features computed without gradients;
2. **backbone block** (head fixed): PoLAR's ``U, V`` by the Riemannian optimiser
   (:class:`~pyro_llm.polar.PolarOptimizer`, landing or retraction) and ``Theta`` (plus any
   other trainable tensor of the peft model) by Adam, at ``lr``. The KL term does not depend
   on the backbone, so this block minimises the expected (Jensen-bounded) negative
   log-likelihood under the current ``q(W)``.

``alternate="step"``: on every batch, one forward pass; ``inner_steps`` head steps on its
detached features, then one backbone step through the same graph. ``alternate="epoch"``: every
epoch, first the features of the whole training set under the current backbone (one forward
per batch, no gradients) and ``inner_steps`` passes of head steps over them, then one pass of
backbone steps. The head block always comes first, so the backbone never chases the
randomly initialised head. The backbone runs in eval mode (dropout off) unless ``dropout=True``,
so the bound stays a deterministic objective.

Prediction needs ONE backbone forward per batch: the head's predictive is sampling-free
(:meth:`PolarVBLL.predict`); :meth:`PolarVBLL.predict_samples` reuses that one forward for S
weight draws (for mutual information).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._io import (
    FileFormatError,
    atomic_folder,
    check_field,
    read_json,
    read_safetensors,
    save_safetensors,
    write_json,
)
from ..polar import PolarOptimizer
from ..posterior import Draw, Posterior
from ..readout import default_labels as _read_labels
from ..runtime import train_mode
from ..vbll import VBLLClassification, load_head, save_head
from .answer_head import FeatureMap, answer_readout, split_output
from .config import takes_config

__all__ = ["PolarVBLL", "answer_readout", "fit_polar_vbll", "load_polar_vbll"]

ALTERNATES = ("epoch", "step")
_ADAPTER, _META, _FORMAT = "adapter.safetensors", "polar_vbll.json", "pyro_llm.polar_vbll"
_OWNED = (_ADAPTER, _META, "head", "peft_adapter", FeatureMap.FILE)


def default_labels(batch) -> torch.Tensor:
    """``batch["labels"]`` of a dict batch, ``y`` of an ``(x, y)`` tuple (the shared reader of
    :mod:`~pyro_llm.infer.laplace.capture`), or a clear error."""
    y = _read_labels(batch)
    if y is None:
        raise ValueError(f"cannot find labels in a {type(batch).__name__} batch (dict batches need "
                         "'labels'); pass labels_fn=")
    return y


def _backbone(adapter: torch.nn.Module) -> torch.nn.Module:
    return getattr(adapter, "peft_model", adapter)


class PolarVBLL(Posterior):
    """A fitted PoLAR-VBLL model: the adapter (backbone), the VBLL head and the fit record.

    Attributes: ``adapter``, ``head`` (:class:`~pyro_llm.vbll.VBLLClassification`),
    ``features_fn`` (returns ``phi`` or ``(phi, offset)``), ``losses`` (backbone-block loss per
    step), ``head_losses`` (head-block loss per step), ``fit_seconds``, ``config`` (the fit's settings).

    As a :class:`~pyro_llm.Posterior` its one random site is the last layer's weight matrix,
    ``SITE`` (``(C, D)``); the adapter is a point estimate. So ``to_arviz(model, num_samples=S)``
    exports draws of it, as for the other posteriors.

    Example
    -------
    >>> probs = model.predictive(test_loader)          # (N, C), one forward per batch  # doctest: +SKIP
    >>> draws = model.predict_samples(test_loader, 16)  # (16, N, C), for mutual information  # doctest: +SKIP
    """

    SITE = "last_layer.weight"

    def __init__(self, adapter, head: VBLLClassification, features_fn: Callable, *, dropout=False,
                 losses=(), head_losses=(), fit_seconds=0.0, config=None):
        self.adapter, self.head, self.features_fn, self.dropout = adapter, head, features_fn, dropout
        self.losses, self.head_losses = tuple(losses), tuple(head_losses)
        self.fit_seconds, self.config = fit_seconds, dict(config or {})

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> list[Draw]:
        """``num_samples`` draws of the head's weights from q(W): ``[{SITE: (C, D)}]``."""
        w = self.head.sample_weights(num_samples, generator)
        return [{self.SITE: wi} for wi in w]

    def mean(self) -> Draw:
        """The mean of q(W)."""
        return {self.SITE: self.head.mean.detach().clone()}

    @torch.no_grad()
    def features(self, data: Iterable, progress: bool = True, offset: bool = False):
        """The head's features for every example, ``(N, D)`` (one forward per batch); with
        ``offset=True`` the pair ``(features, offsets)``, offsets ``(N, C)`` or ``None``."""
        pairs = list(self._feature_batches(data, progress))
        phi = torch.cat([f for f, _ in pairs])
        if not offset:
            return phi
        return phi, (None if pairs[0][1] is None else torch.cat([b for _, b in pairs]))

    def _feature_batches(self, data, progress):
        total = len(data) if hasattr(data, "__len__") else None
        with train_mode(_backbone(self.adapter), self.dropout), torch.no_grad():
            for batch in tqdm(data, total=total, disable=not progress, desc="predict", leave=False):
                yield split_output(self.features_fn(self.adapter, batch), self.head.in_features,
                                   self.head.num_classes)

    @torch.no_grad()
    def predictive(self, data: Iterable, num_samples: int | None = None, progress: bool = True,
                   seed: int = 0) -> torch.Tensor:
        """Posterior predictive probabilities ``(N, C)``: one backbone forward per batch.

        ``num_samples=None``: the head's sampling-free predictive; an integer: that many draws
        of the logits per example (see :meth:`~pyro_llm.vbll.VBLLClassification.predict_probs`).
        """
        g = _generator(seed, self.head)
        out = [self.head.predict_probs(f, num_samples, g, offset=b)
               for f, b in self._feature_batches(data, progress)]
        return _cat(out).float()

    @torch.no_grad()
    def predict(self, data: Iterable, num_samples: int | None = None, *, progress: bool = True,
                seed: int = 0, **_) -> torch.Tensor:
        """The posterior protocol's predict: ``(S, N, C)`` under ``num_samples`` draws of the head
        weights (:meth:`predict_samples`), or, with ``num_samples=None`` (default), the closed-form
        predictive as S = 1, ``(1, N, C)`` (:meth:`predictive`)."""
        if num_samples is None:
            return self.predictive(data, progress=progress, seed=seed)[None]
        return self.predict_samples(data, num_samples, progress=progress, seed=seed)

    @torch.no_grad()
    def predict_samples(self, data: Iterable, num_samples: int = 16, progress: bool = True,
                        seed: int = 0) -> torch.Tensor:
        """Probabilities under ``num_samples`` draws of the head weights: ``(S, N, C)``; the same
        draws for every batch, one backbone forward per batch. ``.mean(0)`` is the MC predictive."""
        w = self.head.sample_weights(num_samples, _generator(seed, self.head))
        out = [self.head.sample_probs(f, w, b) for f, b in self._feature_batches(data, progress)]
        return _cat(out, dim=1).float()

    def save(self, path) -> Path:
        """Write the head (``head/``), the adapter's trained tensors (``adapter.safetensors``) and
        ``polar_vbll.json``; a peft-loadable adapter goes to ``peft_adapter/`` when the adapter
        has ``save_pretrained`` (a :class:`~pyro_llm.polar.PolarAdapter`), the standardisation
        of the features to ``features.safetensors`` when they are standardised. Atomic as a
        whole: an interrupted save leaves the previous one in place (other files are kept)."""
        meta = dict(format=_FORMAT, version=1, dropout=self.dropout, config=self.config,
                    losses=list(self.losses), head_losses=list(self.head_losses),
                    fit_seconds=self.fit_seconds)
        with atomic_folder(path, owned=lambda name: name in _OWNED) as tmp:
            save_head(self.head, tmp / "head")
            save_safetensors(tmp / _ADAPTER, _adapter_tensors(self.adapter))
            if isinstance(self.features_fn, FeatureMap) and self.features_fn.shift is not None:
                save_safetensors(tmp / FeatureMap.FILE, self.features_fn.tensors())
            if hasattr(self.adapter, "save_pretrained"):
                self.adapter.save_pretrained(tmp / "peft_adapter")
            write_json(tmp / _META, meta)
        return Path(path)


_FIELDS = {"format": "str", "version": "int", "dropout": "bool", "config": "dict", "losses": "list",
           "head_losses": "list", "fit_seconds": "float>=0"}


def load_polar_vbll(path, adapter: torch.nn.Module, features_fn: Callable) -> PolarVBLL:
    """Read a :meth:`PolarVBLL.save` folder: the adapter's tensors are copied into ``adapter``
    (built on the same base model and LoRA config as the saved one) and written to its peft
    model; ``features_fn`` is the same function the model was fitted with (the saved scale or
    standardisation of its features is applied on top, as in the fit).

    Every file is read and checked first (``polar_vbll.json`` field by field, the head, the
    adapter's tensor names, shapes and finiteness); ``adapter`` is changed only when all pass.
    """
    path = Path(path)
    missing = [f for f in (_ADAPTER, _META, "head") if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a saved PolarVBLL: {missing} missing")
    meta = read_json(path / _META, what="PolarVBLL", fields=_FIELDS)
    scale = meta["config"].get("feature_scale", 1.0)
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool)  # NaN losses stay as fitted
                  for x in meta["losses"] + meta["head_losses"])
    if meta["format"] != _FORMAT or not check_field(scale, "float") or not scale > 0 or not numbers:
        raise FileFormatError(f"{path / _META}: format {meta['format']!r} (expected {_FORMAT!r}), "
                              f"config.feature_scale {scale!r} (expected > 0) or a loss that is not a "
                              "number: the file is damaged")
    current = _adapter_tensors(adapter, live=True)
    saved, _ = read_safetensors(path / _ADAPTER, what="PolarVBLL adapter")
    if sorted(saved) != sorted(current) or any(saved[k].shape != current[k].shape for k in saved):
        raise ValueError(f"the adapter's tensors ({len(current)}) do not match the saved ones "
                         f"({len(saved)}) of {path / _ADAPTER}; build it on the same base model and "
                         "LoRA config")
    device = current[next(iter(current))].device if current else None
    head = load_head(path / "head", device=device)
    if not isinstance(head, VBLLClassification):
        raise FileFormatError(f"{path / 'head'} holds a {type(head).__name__}, not the classification "
                              "head of a PolarVBLL; the folder is damaged")
    fmap = FeatureMap.read(path, features_fn, scale, head.in_features, device,
                           standardized=bool(meta["config"].get("standardize_features")))
    with torch.no_grad():
        for k, p in current.items():
            p.copy_(saved[k].to(device=p.device, dtype=p.dtype))
    if hasattr(adapter, "write_to_peft"):
        adapter.write_to_peft()
    return PolarVBLL(adapter, head, fmap, dropout=meta["dropout"],
                     losses=meta["losses"], head_losses=meta["head_losses"],
                     fit_seconds=meta["fit_seconds"], config=meta["config"])


def _adapter_tensors(adapter, live: bool = False) -> dict[str, torch.Tensor]:
    groups = (("stiefel", adapter.stiefel_parameters()), ("euclidean", adapter.euclidean_parameters()))
    return {f"{g}.{i}": (p if live else p.detach().cpu().contiguous())
            for g, ps in groups for i, p in enumerate(ps)}


def _generator(seed: int, head) -> torch.Generator:
    return torch.Generator(device=head.mean.device).manual_seed(int(seed))


def _cat(chunks, dim=0):
    if not chunks:
        raise ValueError("the data yielded no batch: nothing to predict")
    return torch.cat(chunks, dim=dim)


# ---------------------------------------------------------------- fitting
@takes_config
def fit_polar_vbll(adapter: torch.nn.Module, data: Iterable, features_fn: Callable, num_classes: int, *,
                   epochs: int = 1, lr: float = 1e-3, vbll_lr: float = 1e-2, method: str = "landing",
                   alternate: str = "epoch", inner_steps: int = 1, prior_scale: float | str = 1.0,
                   cov: str = "dense", num_data: int | None = None, labels_fn: Callable | None = None,
                   lam: float = 1.0, dropout: bool = False, normalize_features: bool = True,
                   standardize_features: bool = False, progress: bool = True, seed: int = 0) -> PolarVBLL:
    """Fit PoLAR-VBLL by alternating optimisation (see the module docstring for the blocks).

    Parameters
    ----------
    adapter: a :class:`~pyro_llm.polar.PolarAdapter`, or any module with ``stiefel_parameters()``
        and ``euclidean_parameters()``.
    data: a re-iterable of batches (a ``DataLoader``); labels are read by ``labels_fn(batch)``
        (default ``batch["labels"]``, or the last element of a tuple batch).
    features_fn: ``features_fn(adapter, batch) -> (B, D)`` features through ``adapter``, or a pair
        ``(features, offset)`` with ``(B, C)`` logits the head adds its ``W phi`` to (its mean then
        starts at 0: the model starts as ``offset``). Both carry gradients to the backbone; the
        head block sees them detached. For a causal LM: :func:`answer_readout`.
    num_classes: number of classes C of the VBLL head.
    epochs, lr, vbll_lr: passes over ``data``; learning rates of the backbone and head blocks.
    method, lam: ``"landing"`` (strength ``lam``) or ``"retraction"`` for ``U, V``.
    alternate, inner_steps: ``"epoch"`` (``inner_steps`` head passes over cached features, then
        a backbone pass) or ``"step"`` (``inner_steps`` head steps, then one backbone step, per batch).
    prior_scale, cov: the head's prior standard deviation per weight (``"auto"``: by type-II
        maximum likelihood, see :meth:`~pyro_llm.vbll.VBLLClassification.prior_variance`) and
        covariance structure.
    num_data: training-set size N (KL weight 1/N); default ``len(data.dataset)`` or a count.
    normalize_features: divide the features by one fixed number, the mean L2 norm of the first
        batch's features under the initial backbone, kept in ``config["feature_scale"]`` and
        used at prediction too. A decoder's hidden states have norms of tens (SmolLM2: about
        45 over 576 dimensions), which makes the head's prior (sd ``prior_scale`` per weight)
        a prior of logit sd about 45 and every Adam step of the head move the logits by up to
        ``vbll_lr`` times the features' L1 norm; with unit-norm features the prior's logit sd
        is about ``prior_scale`` whatever the backbone (the reference VBLL code scales its
        prior variance by 1/D for the same reason).
    standardize_features: instead, per-dimension z-scores over ``sqrt(D)``, with the mean and sd
        of a first pass over ``data`` under the initial backbone (no gradients), fixed thereafter
        and saved. A decoder's last-token states are nearly collinear (SmolLM2 on reviews: median
        cosine 0.96), so one scale leaves the head a tiny signal in a huge common direction; with
        ``alternate="epoch"`` that pass is also the first head block's cache (no extra forward).

    Example
    -------
    >>> fn = lambda a, b: features.pool(a(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
    ...                                   output_hidden_states=True), b["attention_mask"], "cls")
    >>> model = fit_polar_vbll(PolarAdapter(peft_model), loader, fn, 2, epochs=3)  # doctest: +SKIP
    """
    if alternate not in ALTERNATES:
        raise ValueError(f"alternate must be one of {ALTERNATES}, got {alternate!r}")
    if epochs < 1 or inner_steps < 1:
        raise ValueError(f"epochs and inner_steps must be >= 1, got {epochs}, {inner_steps}")
    labels_fn = labels_fn or default_labels
    torch.manual_seed(seed)  # DataLoader shuffling and the head's minibatch order
    first = next(iter(data), None)
    if first is None:
        raise ValueError("the data yielded no batch: the dataset is empty")
    n = num_data or _count(data, labels_fn)
    with torch.no_grad(), train_mode(_backbone(adapter), dropout):
        fmap, cache = FeatureMap.fit(features_fn, adapter, data, first, labels_fn, normalize_features,
                                     standardize_features)
    f0, b0, _ = cache[0]
    head = VBLLClassification(f0.shape[1], num_classes, prior_scale=prior_scale, cov=cov, num_data=n,
                              seed=seed).to(f0.device)
    if b0 is not None:  # a correction around the offset: q(W) starts at the prior's mean
        with torch.no_grad():
            head.mean.zero_()
    fitter = _Fitter(adapter, head, fmap, labels_fn, lr, vbll_lr, method, lam, inner_steps)
    t0 = time.perf_counter()
    total = epochs * len(data) if hasattr(data, "__len__") else None
    bar = tqdm(total=total, disable=not progress, desc="fit polar-vbll", leave=False)
    with train_mode(_backbone(adapter), dropout), contextlib.closing(bar):
        for epoch in range(epochs):
            if alternate == "epoch":
                fitter.head_block(data, cache if standardize_features and epoch == 0 else None)
            for batch in data:
                fitter.step(batch, head_first=alternate == "step")
                bar.update(1)
                bar.set_postfix(loss=f"{fitter.losses[-1]:.4g}")
    if hasattr(adapter, "write_to_peft"):
        adapter.write_to_peft()
    config = dict(num_classes=num_classes, epochs=epochs, lr=lr, vbll_lr=vbll_lr, method=method,
                  alternate=alternate, inner_steps=inner_steps, lam=lam, num_data=n, seed=seed,
                  feature_scale=fmap.scale if not standardize_features else 1.0,
                  standardize_features=standardize_features, prior_scale=prior_scale,
                  offset=b0 is not None)
    return PolarVBLL(adapter, head, fmap, dropout=dropout, losses=fitter.losses,
                     head_losses=fitter.head_losses, fit_seconds=time.perf_counter() - t0, config=config)


def _count(data, labels_fn) -> int:
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return sum(len(labels_fn(b)) for b in data)


class _Fitter:
    """The two blocks and their optimisers."""

    def __init__(self, adapter, head, features_fn, labels_fn, lr, vbll_lr, method, lam, inner_steps):
        self.adapter, self.head, self.features_fn, self.labels_fn = adapter, head, features_fn, labels_fn
        self.inner_steps = inner_steps
        self.backbone_opt = PolarOptimizer(
            [dict(params=adapter.stiefel_parameters(), stiefel=True),
             dict(params=adapter.euclidean_parameters(), stiefel=False)],
            lr=lr, method=method, lam=lam)
        self.head_opt = torch.optim.Adam(head.parameters(), lr=vbll_lr)
        self.losses: list[float] = []
        self.head_losses: list[float] = []

    def _features(self, batch):
        out = self.features_fn(self.adapter, batch)
        return split_output(out, self.head.in_features, self.head.num_classes)

    def _head_step(self, f: torch.Tensor, offset: torch.Tensor | None, y: torch.Tensor) -> None:
        self.head_opt.zero_grad(set_to_none=True)
        loss = self.head.loss(f, y, offset)
        loss.backward()
        self.head_opt.step()
        self.head_losses.append(float(loss.detach()))

    def head_block(self, data, cache=None) -> None:
        """Features of every batch under the current backbone (or ``cache``, the same), then
        ``inner_steps`` passes."""
        if cache is None:
            with torch.no_grad():
                cache = [(*self._features(b), self.labels_fn(b)) for b in data]
        for _ in range(self.inner_steps):
            for i in torch.randperm(len(cache)).tolist():
                self._head_step(*cache[i])

    def step(self, batch, head_first: bool) -> None:
        """One backbone step (head fixed), after ``inner_steps`` head steps if ``head_first``."""
        f, offset = self._features(batch)
        y = self.labels_fn(batch)
        if head_first:
            for _ in range(self.inner_steps):
                self._head_step(f.detach(), None if offset is None else offset.detach(), y)
        self.backbone_opt.zero_grad(set_to_none=True)
        self.head.requires_grad_(False)
        try:
            loss = self.head.loss(f, y, offset)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss.detach())} at step {len(self.losses)}; "
                                         "lower lr or check the data")
            loss.backward()
        finally:
            self.head.requires_grad_(True)
        self.backbone_opt.step()
        self.losses.append(float(loss.detach()))
