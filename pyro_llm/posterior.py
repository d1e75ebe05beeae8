"""One posterior interface: draws of named global sites, and predictions under them.

Every approximation is a :class:`Posterior` with one protocol:

* ``sample(S)``: S dicts ``{site name: tensor}``; ``mean()``: one dict;
* ``predict(data, num_samples=...)``: class probabilities ``(S, N, C)`` (a point posterior,
  ``degenerate = True``, returns S = 1);
* ``log_prob(draw)`` where the density is defined;
* ``as_guide()``: a Pyro guide drawing the sites, for ``pyro.infer.Predictive`` or a user's
  own model;
* ``save(folder)``, read back by :func:`pyro_llm.load`.

Prediction conditions the model's sites on each draw with :func:`pyro.poutine.condition`
(through the posterior's :class:`~pyro_llm.BayesianLoRA`, ``lora``) and reads the logits with
its :class:`~pyro_llm.Readout`, so whatever code runs the model under a draw needs no
knowledge of where the draw came from. Trainable tensors that are not random (a ``pyro.param``
B matrix or classifier head) travel with the posterior as ``fixed`` point estimates and are
substituted at prediction time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from tqdm.auto import tqdm

from .readout import Readout
from .runtime import call_with_batch

__all__ = ["Posterior", "GuidePosterior", "batch_probs", "check_sites", "predict_probs", "stack_draws",
           "Draw"]

Draw = dict[str, torch.Tensor]


class Posterior:
    """Base class: a distribution over named global sites, and predictions under it.

    Attributes
    ----------
    lora: the :class:`~pyro_llm.BayesianLoRA` whose sites these are (needed by ``predict``).
    readout: how ``predict`` reads logits from a batch (default :class:`~pyro_llm.Readout`).
    fixed: point estimates of the trainable tensors that are not random, by site name.
    degenerate: ``True`` for a point posterior (MAP, temperature scaling): ``predict`` gives S = 1.
    """

    lora = None
    readout: Readout | None = None
    fixed: Draw = {}
    degenerate = False

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> list[Draw]:
        raise NotImplementedError

    def mean(self) -> Draw:
        draws = self.sample(64)
        return {k: torch.stack([d[k] for d in draws]).mean(0) for k in draws[0]}

    def log_prob(self, draw: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Log density of ``draw`` (all sites) under the posterior."""
        raise NotImplementedError(f"{type(self).__name__} has no density over its sites (a mixture of "
                                  "point masses, or draws only)")

    def attach(self, lora=None, readout: Readout | None = None) -> Posterior:
        """Set the :class:`~pyro_llm.BayesianLoRA` (and the readout) ``predict`` runs; returns self."""
        if lora is not None:
            self.lora = lora
        if readout is not None:
            self.readout = readout
        return self

    @torch.no_grad()
    def predict(self, data: Iterable, num_samples: int = 16, *, readout: Readout | None = None,
                progress: bool = True, seed: int | None = 0, vectorize: bool | str = "auto") -> torch.Tensor:
        """Class probabilities ``(S, N, C)`` under ``num_samples`` posterior draws (S = 1 for a
        degenerate posterior); the same draws for every batch, seeded by ``seed``."""
        if self.lora is None:
            raise ValueError(f"this {type(self).__name__} has no model attached; call "
                             ".attach(lora) with the BayesianLoRA it was fitted with (or pass model= to "
                             "pyro_llm.load)")
        fn = batch_probs(self.lora, readout or self.readout or Readout())
        if self.fixed:
            fn = poutine.substitute(fn, data=self.fixed)
        if seed is not None:
            pyro.set_rng_seed(seed)
        draws = self.sample(1 if self.degenerate else num_samples)
        return predict_probs(fn, data, draws, progress=progress, seed=None, vectorize=vectorize)

    def as_guide(self) -> Callable:
        """A Pyro guide drawing every site from this posterior (arguments are ignored). Each call
        draws anew: use ``Predictive(model, guide=post.as_guide(), num_samples=S)`` (not
        ``parallel=True``, which would broadcast one draw)."""

        def guide(*args, **kwargs):
            draw = self.sample(1)[0]
            return {n: pyro.sample(n, dist.Delta(v, event_dim=v.dim())) for n, v in draw.items()}

        return guide

    def save(self, path) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be saved; save the draws "
                                  "(pyro_llm._io.save_safetensors(path, stack_draws(post.sample(S))))")


def check_sites(lora, names, shapes, path) -> None:
    """A saved posterior's sites ``names`` with ``shapes`` are exactly the BayesianLoRA's, with the
    model's shapes, or a ``ValueError`` saying how to build the matching one."""
    if set(lora.site_names) != set(names):
        raise ValueError(f"{path}: the BayesianLoRA's sites {lora.site_names[:2]}... differ from the saved "
                         f"posterior's {list(names)[:2]}...; build it with the same select= and prefix=")
    for n, s in zip(names, shapes, strict=True):
        have = tuple(lora.peft_model.get_parameter(lora.peft_name(n)).shape)
        if have != tuple(s):
            raise ValueError(f"{path}: site {n!r} has shape {tuple(s)} in the saved posterior, {have} in the "
                             "model; load it with the model it was fitted on")


def batch_probs(model, readout: Readout) -> Callable:
    """``fn(*batch) -> probabilities`` as :func:`predict_probs` calls it (a dict batch arrives as
    keywords, a tuple as arguments), reading the logits of ``model`` with ``readout``."""

    def fn(*args, **kwargs):
        batch = kwargs if kwargs else (args[0] if len(args) == 1 else args)
        return readout.probs(model, batch)

    return fn


class GuidePosterior(Posterior):
    """The posterior of a fitted Pyro guide.

    ``args`` and ``kwargs`` are passed to the guide when it is run (autoguides need none once
    fitted). Auxiliary and observed sites are left out of the draws. ``lora``, ``fixed`` and
    ``readout`` (keywords) serve :meth:`predict`. A guide over real-valued sites (the
    autoguides, BLoB's) saves as its Gaussian (:meth:`save`); a custom guide cannot be saved.
    """

    def __init__(self, guide: Callable, *args, lora=None, fixed: Mapping[str, torch.Tensor] | None = None,
                 readout: Readout | None = None, **kwargs):
        self.guide, self.args, self.kwargs = guide, args, kwargs
        self.lora, self.readout = lora, readout
        self.fixed = {k: v.detach().clone() for k, v in (fixed or {}).items()}

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> list[Draw]:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        out = []
        for _ in range(num_samples):
            tr = poutine.trace(self.guide).get_trace(*self.args, **self.kwargs)
            out.append({
                name: site["value"].detach()
                for name, site in tr.nodes.items()
                if site["type"] == "sample" and not site["is_observed"]
                and not site["infer"].get("is_auxiliary")
            })
        return out

    @torch.no_grad()
    def mean(self) -> Draw:
        median = getattr(self.guide, "median", None)
        if callable(median):  # exact for Gaussian guides; the median otherwise
            return {k: v.detach() for k, v in median(*self.args, **self.kwargs).items()}
        return super().mean()

    def log_prob(self, draw: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log q(draw)``: the guide run with its sites fixed at ``draw``."""
        with torch.no_grad():
            tr = poutine.trace(poutine.condition(self.guide, data=dict(draw))).get_trace(
                *self.args, **self.kwargs)
        return sum(site["fn"].log_prob(site["value"]).sum() for name, site in tr.nodes.items()
                   if site["type"] == "sample" and name in draw)

    def as_guide(self) -> Callable:
        return self.guide

    def gaussian(self):
        """This posterior as a :class:`~pyro_llm.gaussian.GaussianPosterior` (autoguides over
        real-valued sites and BLoB's guide), which can be saved."""
        from .gaussian import GaussianPosterior

        return GaussianPosterior.from_guide(self.guide, lora=self.lora, fixed=self.fixed,
                                            readout=self.readout)

    def save(self, path):
        """Save as the guide's Gaussian (see :meth:`gaussian`); :func:`pyro_llm.load` reads it back
        as a :class:`~pyro_llm.gaussian.GaussianPosterior` with the same distribution."""
        return self.gaussian().save(path)


def stack_draws(draws: list[Draw]) -> dict[str, torch.Tensor]:
    """``[{site: x}] * S`` to ``{site: x stacked on a leading axis of size S}``."""
    if not draws:
        raise ValueError("no draws to stack")
    return {k: torch.stack([d[k] for d in draws]) for k in draws[0]}


@torch.no_grad()
def predict_probs(
    fn: Callable,
    data: Iterable,
    posterior: Posterior | list[Draw] | None = None,
    num_samples: int = 16,
    progress: bool = True,
    seed: int | None = 0,
    vectorize: bool | str = "auto",
    sample_batch: int | None = None,
) -> torch.Tensor:
    """Class probabilities under each posterior draw: a tensor of shape ``(S, N, C)``.

    ``fn(batch) -> (B, C) probabilities`` runs the model on one batch (a mapping batch is
    passed as keywords); under each draw its random sites take the drawn values. The same S
    draws are used for every batch. With ``posterior=None``, ``fn`` runs once (S = 1): the
    point-estimate prediction. The mean over the first axis is the posterior predictive.

    ``vectorize``: condition on the draws stacked, ``sample_batch`` (default all S) at a time,
    so that a :class:`~pyro_llm.BayesianLoRA` inside ``fn`` evaluates them in one forward
    and ``fn`` returns ``(draws, B, C)`` (see :mod:`pyro_llm.batched`). ``"auto"`` (default)
    checks on the first batch that the stacked result has that shape and equals the first
    draw run alone, and otherwise warns and runs the draws one at a time; ``True`` requires
    it; ``False`` always loops.
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    if vectorize not in (True, False, "auto"):
        raise ValueError(f"vectorize must be True, False or 'auto', got {vectorize!r}")
    if posterior is None:
        draws: list[Draw | None] = [None]
    elif isinstance(posterior, Posterior):
        draws = posterior.sample(num_samples)
    else:
        draws = list(posterior)
    if not draws:
        raise ValueError("no posterior draws were given; pass a Posterior or a non-empty list "
                         "of draws (or posterior=None for the point prediction)")
    if sample_batch is not None and sample_batch < 1:
        raise ValueError(f"sample_batch must be >= 1, got {sample_batch}")
    mode = vectorize if draws[0] is not None and len(draws) > 1 else False
    groups = []
    if mode is not False:
        size = sample_batch or len(draws)
        groups = [stack_draws(draws[i:i + size]) for i in range(0, len(draws), size)]
    chunks = []
    total = len(data) if hasattr(data, "__len__") else None
    for batch in tqdm(data, total=total, disable=not progress, desc="predict", leave=False):
        if mode is not False:
            try:
                chunks.append(_stacked(fn, batch, groups, draws[0] if mode == "auto" else None))
                mode = True
                continue
            except _NotVectorised as e:
                if mode is True:
                    raise ValueError(f"{e}; pass vectorize=False to run the draws one at a "
                                     "time") from e.__cause__
                warnings.warn(f"predict_probs: {e}; running the {len(draws)} draws one at a time "
                              "(pass vectorize=False to skip this check)", stacklevel=2)
                mode = False
        per_draw = []
        for d in draws:
            if d is None:
                p = call_with_batch(fn, batch)
            else:
                with poutine.condition(data=d):
                    p = call_with_batch(fn, batch)
            per_draw.append(p.detach().float())
        chunks.append(torch.stack(per_draw))
    if not chunks:
        raise ValueError("the data yielded no batch: nothing to predict")
    probs = torch.cat(chunks, dim=1)
    if probs.dim() != 3:
        raise ValueError(f"fn must return (batch, classes) probabilities, got {tuple(probs.shape[1:])}")
    return probs


class _NotVectorised(Exception):
    pass


def _stacked(fn: Callable, batch, groups: list[Draw], check: Draw | None) -> torch.Tensor:
    """``fn`` under each group of stacked draws, concatenated: ``(S, B, C)``; with ``check``,
    the first draw alone must give the same first row."""
    out = []
    for g in groups:
        s = next(iter(g.values())).shape[0]
        try:
            with poutine.condition(data=g):
                p = call_with_batch(fn, batch)
        except Exception as e:  # noqa: BLE001 -- any failure means: not vectorisable
            raise _NotVectorised(f"fn failed under stacked draws ({type(e).__name__}: {e})") from e
        if not isinstance(p, torch.Tensor) or p.dim() != 3 or p.shape[0] != s:
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise _NotVectorised(f"fn returned {shape} under {s} stacked draws, not ({s}, B, C)")
        out.append(p.detach().float())
    probs = torch.cat(out)
    if check is not None:
        with poutine.condition(data=check):
            one = call_with_batch(fn, batch).detach().float()
        if one.shape != probs.shape[1:] or not torch.allclose(probs[0], one, rtol=1e-4, atol=1e-6):
            raise _NotVectorised("fn's result under the stacked draws differs from the first draw "
                                 "run alone")
    return probs
