"""BLoB: Bayesian low-rank adaptation by backpropagation (Wang et al., NeurIPS 2024).

The method, as in the paper and the authors' code (Wang-ML-Lab/bayesian-peft,
``modelwrappers/blob.py``):

* **Asymmetric**: only the LoRA ``A`` matrices are random; ``B`` and a trainable head are
  point estimates, trained jointly with the variational parameters.
* **Guide**: ``q(A) = N(M, sigma^2)`` entrywise, with ``sigma = G**2``; ``M`` starts at
  the current ``A`` and ``G`` uniformly on ``[eps / sqrt 2, eps]`` (``bayes_eps = 0.05``),
  so ``sigma`` starts in ``[eps^2 / 2, eps^2]``.
* **Prior**: ``A ~ N(0, beta^2)`` entrywise (``bayes_beta = 0.2``). The KL between the two
  diagonal Normals is closed form.
* **KL re-weighting** over the ``M`` minibatches of an epoch: minibatch ``i`` (1-based)
  carries ``pi_i = 2^(i-1) / (2^M - 1)`` of the KL; ``sum_i pi_i = 1``.
* **Flipout**: one noise draw ``dA = A - M`` per step, decorrelated across examples by random
  signs, ``A_n = M + (s_n r_n^T) * dA``, computed as ``((x_n * r_n) dA^T) * s_n``.
* **Test time**: 10 posterior samples (``bayes_eval_n_samples_final``).

Training (``optimizer=``)
-------------------------
``"two"`` (default), the authors' recipe: each step draws ``A`` once (flipout) and

1. steps AdamW at ``lr`` over ``M``, ``B`` and the head on the batch-*mean* NLL;
2. then steps plain SGD at ``kl_lr`` (their ``bayes_kllr``; default here 0.002, their RoBERTa
   scripts' value, see the notes) over ``M`` and ``G``
   on ``kl_scale * pi_i * KL(q || p)``, the closed-form KL at the values after step 1, not
   divided by ``N``. ``M``'s NLL gradient is spent in step 1, so the SGD moves ``M`` by the
   KL gradient only; ``G`` is stepped by the SGD alone, on its NLL gradient plus its KL
   gradient (in the authors' code the AdamW is built before the ``G`` tensors exist).

The KL's pull is thus set by ``kl_lr``, the likelihood's by ``lr``. On ``G`` the SGD descends,
over an epoch of ``M`` steps, ``M`` times the mean NLL plus the KL (a KL weight ``B / N``, batch
size over data size: ``B`` times the ELBO's), and while ``sigma << beta`` the KL alone raises
``G^2`` by about ``4 * kl_lr`` per epoch; on ``M`` its steps of ``kl_lr * pi_i * M / beta^2``
compete with AdamW's of about ``lr``. The step loss recorded (``losses``) is the batch-mean
NLL. Both optimisers run in the shared training loop of ``fit_svi`` (checkpoints, resume,
early stopping, progress bar) as one :class:`~pyro_llm.infer.blob_step.TwoOptimizers`; the
SGD keeps no state, so a resumed fit equals an uninterrupted one.

``"joint"``: one AdamW over ``M``, ``G``, ``B`` and the head on
``(N / B) * NLL(batch) + kl_scale * M * pi_i * KL(q || p)``, where the KL weight enters as
:func:`pyro.poutine.scale` on the ``A`` sites of the model and guide and
:class:`~pyro.infer.TraceMeanField_ELBO` computes the KL in closed form. Each step's loss is
then, on average over an epoch, the full-data negative ELBO (as with :func:`fit_svi`; it is
what ``losses`` records), and the KL counts once per epoch.

Where this differs from the authors' code: they decay both learning rates linearly after a
warm-up (``warmup_ratio``), here both are constant; their AdamW has ``eps = 1e-6``, here
torch's ``1e-8``; their KL adds ``1e-6`` inside its logarithm and denominator, ours is exact;
their ``pi_i`` divides by ``2^(M+1) - 1`` (a sum of ``1 - 1/(2^(M+1) - 1)``) where ours sums
to exactly 1; they draw flipout signs per token, we per example (one weight per sequence, as
in the model); and their optional ``datasetrescaling`` of ``M`` is not built in (pass a
callable ``kl_schedule``).

Notes
-----
* With ``kl_schedule="blob"`` the KL weight ``pi_i`` runs from about ``1 / 2^M`` to ``1 / 2``
  within each epoch, so ``"joint"``'s step losses swing within an epoch: compare epoch means.
  (BLoB's code, followed here, puts the KL on the *last* minibatches; Blundell et al.'s
  original ``2^(M-i)`` puts it on the first: pass ``lambda i, m: 2.0**(m - i) / (2.0**m - 1)``.)
* ``B`` and the head are ``pyro.param`` sites of the ``BayesianLoRA`` (in Pyro's param store,
  reset to the peft model's values when a fit starts); the fitted values are also kept in
  ``BLoBResult.fit.params``, which :meth:`BLoBResult.predict` and
  :meth:`BLoBResult.write_to_peft` use.
* Prediction draws ``A`` from the posterior and shares each draw across the batch (no
  flipout), the usual posterior predictive.
* On little data the NLL hardly holds ``G`` back: MiniLM on 200 reviews, 2 epochs at
  ``lr = 1e-3``, mean ``sigma`` rose from about 0.002 to 0.15 at ``kl_lr = 0.02`` (the means'
  rms fell from 0.029 to 0.011) and to 0.019 at ``kl_lr = 0.002`` (the authors' RoBERTa
  value; their LLaMA runs use 0.01), where the means kept their size (0.028). Hence the
  default ``kl_lr = 0.002`` (their code's default is 0.02).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from ..gaussian import GaussianPosterior
from ..lora import BayesianLoRA
from ..readout import Readout, default_labels, default_logits
from .blob_guide import SCHEDULES, BLoBGuide, kl_weights  # noqa: F401  (re-exported)
from .blob_step import TwoOptimizers
from .checkpoint import checkpoint_step
from .config import takes_config
from .flipout import flipout_forward
from .svi import model_sketch
from .train import EarlyStopping, FitResult, OneShot, peek_batches, train_loop

__all__ = ["BLoBGuide", "BLoBResult", "fit_blob", "kl_weights", "flipout_forward", "OPTIMIZERS",
           "KL_LR"]

OPTIMIZERS = ("two", "joint")
KL_LR = 0.002  # the authors' RoBERTa scripts' bayes_kllr (code default 0.02; LLaMA scripts 0.01)


class _FlipoutLoRA:
    """Callable like the ``BayesianLoRA``: draws the sites, then runs with flipout at the means."""

    def __init__(self, lora: BayesianLoRA, guide: BLoBGuide):
        self.lora, self.guide = lora, guide

    def __call__(self, *args, **kwargs):
        lora = self.lora
        with lora.shared_draw():
            weights = lora.adapter_weights()
        noise = {}
        for name in lora.random_names:
            loc = self.guide.loc(lora.site_name(name))
            noise[name] = weights[name] - loc  # sigma * eps: the gradient reaches G, not M
            weights[name] = loc
        return flipout_forward(lora.peft_model, weights, noise, args, kwargs, lora.dropout)


# ------------------------------------------------------------------------- model + loss
class _Objective:
    """The Pyro model and guide of one BLoB fit, and its per-step loss."""

    def __init__(self, lora, guide, num_data, logits_fn, labels_fn, flipout, num_particles=1):
        self.lora, self.bguide, self.num_data = lora, guide, float(num_data)
        self.logits_fn, self.labels_fn = logits_fn, labels_fn
        self.runner = _FlipoutLoRA(lora, guide) if flipout else lora
        self.elbo = TraceMeanField_ELBO(num_particles=num_particles)

    def model(self, batch, kl_weight: float = 1.0):
        with poutine.scale(scale=kl_weight):  # the A sites: their KL term
            logits = self.logits_fn(self.runner, batch)
        y = self.labels_fn(batch)
        if y is None:
            raise ValueError("the batches carry no labels; pass labels_fn=lambda batch: ...")
        y = torch.as_tensor(y, device=logits.device).long()
        if logits.dim() != 2 or y.shape != logits.shape[:1]:
            raise ValueError(f"logits_fn must return (batch, classes) logits matching the labels; got "
                             f"logits {tuple(logits.shape)}, labels {tuple(y.shape)}")
        with poutine.scale(scale=self.num_data / y.shape[0]), pyro.plate("blob.data", y.shape[0]):
            pyro.sample("blob.y", dist.Categorical(logits=logits), obs=y)

    def guide(self, batch=None, kl_weight: float = 1.0):
        with poutine.scale(scale=kl_weight):
            return self.bguide()

    def loss(self, batch, kl_weight: float = 1.0) -> torch.Tensor:
        return self.elbo.differentiable_loss(self.model, self.guide, batch, kl_weight)

    def nll(self, batch) -> torch.Tensor:
        """Batch-mean NLL under one draw of ``A`` from the guide (flipout: one noise draw)."""
        gtr = poutine.trace(self.guide).get_trace(batch)
        mtr = poutine.trace(poutine.replay(self.model, trace=gtr)).get_trace(batch)
        site = mtr.nodes["blob.y"]
        return -site["fn"].log_prob(site["value"]).mean()

    def params(self, batch) -> dict[str, torch.Tensor]:
        """Every tensor the loss trains: the guide's, and B / the head from the param store."""
        with poutine.trace(param_only=True) as tr:
            self.loss(batch)
        store = pyro.get_param_store()
        out = {n: store._params[n] for n in tr.trace.nodes if n in store._params}
        out.update(self.bguide.named_tensors())
        return out


# ------------------------------------------------------------------------- result
@dataclass(frozen=True)
class BLoBResult:
    """What :func:`fit_blob` returns.

    Attributes
    ----------
    posterior: the fitted Gaussian over the ``A`` sites (a :class:`~pyro_llm.gaussian.GaussianPosterior`
        with ``B`` / the head as its ``fixed`` point estimates): ``predict``, ``save``, ``as_guide``.
    lora, guide: the :class:`~pyro_llm.BayesianLoRA` (``select="A"``) and the :class:`BLoBGuide`.
    fit: the training record (:class:`~pyro_llm.FitResult`, ``method="blob"``); ``fit.params``
        holds the fitted ``B`` / head (by site name) and the guide's tensors.
    kl_weights: the KL weight used at each step: ``kl_scale * pi_i`` (``"two"``, the SGD's loss is
        this times the KL) or ``kl_scale * M * pi_i`` (``"joint"``, beside ``N`` times the mean NLL).
    logits_fn: the ``logits_fn(model, batch)`` of the fit, the default of :meth:`predict`.
    optimizer: ``"two"`` or ``"joint"``, as fitted.
    """

    posterior: GaussianPosterior
    lora: BayesianLoRA
    guide: BLoBGuide
    fit: FitResult
    kl_weights: tuple[float, ...]
    logits_fn: Callable
    optimizer: str = "joint"

    @property
    def losses(self) -> tuple[float, ...]:
        """Per step: the batch-mean NLL (``"two"``) or the negative-ELBO estimate, full data
        (``"joint"``)."""
        return self.fit.losses

    def point_estimates(self) -> dict[str, torch.Tensor]:
        """The fitted ``B`` matrices and head by site name."""
        return {s: self.fit.params[s] for s in map(self.lora.site_name, self.lora.fixed_names)}

    def mean(self) -> dict[str, torch.Tensor]:
        """Posterior mean of ``A`` and the fitted point estimates, by site name."""
        return {**self.guide.median(), **self.point_estimates()}

    def write_to_peft(self) -> list[str]:
        """Write :meth:`mean` into the peft model (then ``save_pretrained`` it); returns the names."""
        return self.lora.write_to_peft(self.mean())

    def predict(self, data: Iterable, num_samples: int = 10, logits_fn: Callable | None = None,
                progress: bool = True, seed: int | None = 0) -> torch.Tensor:
        """Class probabilities ``(S, N, C)`` under ``num_samples`` posterior draws of ``A``, with ``B``
        and the head at this fit's values: ``self.posterior.predict`` (see :class:`GaussianPosterior`)."""
        readout = Readout(logits=logits_fn) if logits_fn is not None else None
        return self.posterior.predict(data, num_samples, readout=readout, progress=progress, seed=seed)


# ------------------------------------------------------------------------- fit
def _num_data(data, labels_fn) -> int:
    ds = getattr(data, "dataset", None)
    if ds is not None and hasattr(ds, "__len__"):
        return len(ds)
    if isinstance(data, OneShot):
        raise ValueError("the data is a one-shot iterator (a generator): counting its rows would use "
                         "it up; pass num_data= (the number of training rows)")
    n = 0
    for batch in data:
        y = labels_fn(batch)
        if y is None:
            raise ValueError("the batches carry no labels; pass labels_fn=lambda batch: ...")
        n += len(y)
    return n


def _step_weights(data, kl_schedule, kl_scale: float, joint: bool = True) -> list[float]:
    """KL weight of the i-th minibatch of an epoch: ``kl_scale * M * pi_i`` (mean ``kl_scale``)
    for the joint loss, ``kl_scale * pi_i`` (sum ``kl_scale``) for the KL optimiser's."""
    n_batches = len(data) if hasattr(data, "__len__") else None
    if n_batches is None and kl_schedule != "uniform":
        raise ValueError("the data has no len(), so the epoch's minibatches cannot be numbered for "
                         f"kl_schedule={kl_schedule!r}; use kl_schedule='uniform' or a DataLoader")
    if n_batches == 0:
        raise ValueError("the data has no batches: the dataset is empty")
    pi = kl_weights(n_batches or 1, kl_schedule)
    return (kl_scale * (pi.numel() if joint else 1) * pi).tolist()


@takes_config
def fit_blob(
    peft_model: torch.nn.Module,
    data: Iterable,
    *,
    prior_scale: float = 0.2,
    init_scale: float = 0.05,
    epochs: int = 1,
    max_steps: int | None = None,
    lr: float | Callable[[str], float] = 1e-3,
    kl_schedule: str | Callable[[int, int], float] = "blob",
    kl_scale: float = 1.0,
    optimizer: str = "two",
    kl_lr: float = KL_LR,
    flipout: bool = True,
    num_data: int | None = None,
    logits_fn: Callable | None = None,
    labels_fn: Callable | None = None,
    adapter_name: str | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 100,
    early_stopping: EarlyStopping | None = None,
    progress: bool = True,
    seed: int | None = 0,
) -> BLoBResult:
    """BLoB: fit a Gaussian posterior over the LoRA ``A`` matrices, with ``B`` and the head, by
    variational inference (see the module docstring for the two training schemes).

    Parameters
    ----------
    peft_model:
        A peft LoRA model (e.g. ``pyro_llm.models.lora_classifier()``); it is not modified
        (use :meth:`BLoBResult.write_to_peft`). ``A`` means and ``B`` / the head start at its
        current tensors: a fresh peft model (the paper: BLoB *is* the fine-tuning) or a
        fine-tuned one.
    data:
        Re-iterable labelled batches (a ``DataLoader``); ``len(data)`` minibatches make an epoch.
    prior_scale, init_scale:
        The prior ``A ~ N(0, prior_scale^2)`` (``bayes_beta``) and the paper's ``eps``
        (``bayes_eps``): ``G ~ U[eps / sqrt 2, eps]``, ``sigma = G**2``.
    kl_schedule, kl_scale:
        The KL share ``pi_i`` of minibatch ``i`` (see :func:`kl_weights`: ``"blob"``,
        ``"uniform"`` or ``(i, M) -> pi_i``); the step's KL weight is ``kl_scale * M * pi_i``
        (``"joint"``; ``"two"``: ``kl_scale * pi_i``); ``kl_scale < 1`` tempers the KL.
    optimizer, kl_lr:
        ``"two"`` (the authors' recipe): AdamW at ``lr`` on the batch-mean NLL over the ``A``
        means, ``B`` and the head, then SGD at ``kl_lr`` (``bayes_kllr``; ``>= 0``) on the
        step's KL over the means and ``G``, which also takes its NLL gradient there.
        ``"joint"``: one AdamW at ``lr`` on the minibatch negative ELBO (``kl_lr`` unused).
    flipout:
        Per-example flipout perturbations of the ``A`` noise in training (``A`` must sit in
        ``Linear`` layers); ``False``: one reparameterised ``A`` draw per minibatch.
    num_data:
        ``N`` for the likelihood's ``N / B`` scaling; default ``len(data.dataset)`` or a count.
    logits_fn, labels_fn:
        ``logits_fn(model, batch) -> (B, C)`` and ``labels_fn(batch) -> (B,)``, as in
        :func:`~pyro_llm.fit_laplace` (defaults: Hugging Face dict batches or ``(x, y)`` tuples);
        ``model`` is called like the peft model.
    epochs, max_steps, lr, checkpoint, checkpoint_every, early_stopping, progress, seed:
        As in :func:`~pyro_llm.fit_svi` (AdamW at ``lr``; resumable checkpoints in safetensors
        + JSON, both optimisers' state included).

    Example
    -------
    >>> res = fit_blob(peft_model, train_loader, epochs=3)               # doctest: +SKIP
    >>> probs = res.predict(test_loader, num_samples=10)                  # (S, N, C)  # doctest: +SKIP
    >>> res.write_to_peft(); peft_model.save_pretrained("blob_mean")      # doctest: +SKIP
    """
    kl_scale = float(kl_scale)
    if not math.isfinite(kl_scale) or kl_scale < 0:
        raise ValueError(f"kl_scale must be a finite number >= 0, got {kl_scale!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    joint = optimizer == "joint"
    if seed is not None:
        pyro.set_rng_seed(seed)
    logits_fn = logits_fn or default_logits
    labels_fn = labels_fn or default_labels
    lora = BayesianLoRA(peft_model, prior=prior_scale, select="A", adapter_name=adapter_name)
    store = pyro.get_param_store()
    for site in map(lora.site_name, lora.fixed_names):  # start B / head at the peft model's values
        if site in store:
            del store[site]
    guide = BLoBGuide(lora, init_scale=init_scale, seed=0 if seed is None else seed)
    first, data = peek_batches(data)
    weights = _step_weights(data, kl_schedule, kl_scale, joint)
    num_data = _num_data(data, labels_fn) if num_data is None else int(num_data)
    if num_data < 1:
        raise ValueError(f"num_data must be >= 1, got {num_data}")
    obj = _Objective(lora, guide, num_data, logits_fn, labels_fn, flipout)
    params = obj.params(first)
    step_count, used = [checkpoint_step(checkpoint)], []

    def step(batch):
        w = weights[step_count[0] % len(weights)]
        step_count[0] += 1
        used.append(w)
        return obj.loss(batch, w) if joint else obj.nll(batch)

    optim = None if joint else _two_optimizers(params, guide, lambda: used[-1] * guide.kl(), lr, kl_lr)
    fingerprint = None if not checkpoint else {
        "model": model_sketch(peft_model, params), "kl": [kl_schedule if isinstance(
            kl_schedule, str) else "callable", kl_scale], "prior_scale": float(prior_scale),
        "init_scale": float(init_scale), "flipout": bool(flipout), "num_data": num_data,
        **({} if joint else {"blob_optimizer": [optimizer, float(kl_lr)]})}
    fit = train_loop("blob", step, params, data, guide=guide, epochs=epochs, max_steps=max_steps, lr=lr,
                     weight_decay=0.0, clip_norm=None, checkpoint=checkpoint,
                     checkpoint_every=checkpoint_every, early_stopping=early_stopping,
                     progress=progress, seed=seed, optim=optim, fingerprint=fingerprint)
    fixed = {site: fit.params[site] for site in map(lora.site_name, lora.fixed_names)}
    posterior = GaussianPosterior.from_guide(guide, lora=lora, fixed=fixed,
                                             readout=Readout(logits=logits_fn, labels=labels_fn))
    return BLoBResult(posterior=posterior, lora=lora, guide=guide,
                      fit=dataclasses.replace(fit, posterior=posterior), kl_weights=tuple(used),
                      logits_fn=logits_fn, optimizer=optimizer)


def _two_optimizers(params, guide: BLoBGuide, kl_loss, lr, kl_lr) -> TwoOptimizers:
    """AdamW over ``M``, ``B`` and the head (the NLL); SGD at ``kl_lr`` over ``M`` and ``G``
    (``kl_loss``, plus ``G``'s NLL gradient): see :mod:`pyro_llm.infer.blob_step`."""
    means = {f"blob.loc.{s}" for s in guide.site_names}
    spreads = {f"blob.G.{s}" for s in guide.site_names}
    nll = {n: p for n, p in params.items() if n not in spreads}
    kl = {n: p for n, p in params.items() if n in means or n in spreads}
    return TwoOptimizers(nll, kl, kl_loss, lr=lr, second_lr=kl_lr)
