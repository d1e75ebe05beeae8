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

import dataclasses
import numbers
from collections.abc import Callable, Iterable, Mapping

import pyro
import pyro.infer.autoguide as ag
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

from ..point import PointPosterior
from ..posterior import GuidePosterior, Posterior
from ..runtime import call_with_batch
from .checkpoint import describe_named, sketch
from .config import takes_config
from .train import EarlyStopping, FitResult, LossPlateau, peek_batches, train_loop

__all__ = ["FitResult", "EarlyStopping", "make_guide", "fit_svi", "fit_map", "scale_lr",
           "param_store_tensors", "model_sketch", "svi_posterior", "hf_loss", "set_guide_scales",
           "marginal_sds"]


GUIDES = {
    "normal": ag.AutoNormal,
    "diagonal": ag.AutoDiagonalNormal,  # the same family as "normal", as one flat site: fewer ops
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

    ``"normal"`` (``AutoNormal``: one Gaussian site per random matrix) and ``"diagonal"``
    (``AutoDiagonalNormal``: the same mean-field family as one flat site) fit the same posterior;
    the flat site issues fewer small tensor operations per step (on MiniLM with 24 random
    matrices, an SVI step costs about 0.1 MAP steps less), but a posterior as ``init_scale``
    (a warm start) needs ``"normal"``.
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


def param_store_tensors(model, guide, batch, loss) -> dict[str, torch.Tensor]:
    """The param-store tensors one ELBO evaluation on ``batch`` touches (building the guide's)."""
    with poutine.trace(param_only=True) as tr:
        call_with_batch(lambda *a, **k: loss.differentiable_loss(model, guide, *a, **k), batch)
    store = pyro.get_param_store()
    return {name: store._params[name] for name in tr.trace.nodes if name in store._params}


@takes_config
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
    init_scale: float | Posterior | Mapping[str, torch.Tensor] = 1e-3,
    clip_norm: float | None = None,
    checkpoint: str | None = None,
    checkpoint_every: int = 100,
    early_stopping: EarlyStopping | str | None = None,
    progress: bool = True,
    seed: int | None = 0,
    elbo=None,
) -> FitResult:
    """Stochastic variational inference over ``model`` with ``guide``, on minibatches of ``data``.

    Parameters
    ----------
    model, guide:
        A Pyro model and a guide: a guide callable, or ``"normal"``, ``"diagonal"``,
        ``"low_rank"``, ``"mvn"``, ``"delta"`` for an autoguide started at ``init_values`` (see
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
    init_scale:
        Where an ``"normal"`` guide's scales start: one number for every entry, or a posterior
        over the same sites (e.g. :func:`~pyro_llm.fit_laplace`'s) whose marginal standard
        deviations (from 256 draws) start them, or ``{site: sd}``. A guide started at a small
        scale needs many steps for the scales to travel to the posterior's width (Adam moves
        them about ``lr`` per step in log space); started at the Laplace widths, a few dozen
        steps refine them. Check the result: the guide's scales, or the mutual information of
        the predictive (:func:`~pyro_llm.metrics.decompose`), should not be near zero.
    clip_norm:
        Clip the gradient norm at this value. Off by default: clipping a stochastic ELBO
        gradient reweights the noisy draws, which biases the fixed point (guide scales
        come out too wide); Adam already bounds the step size.
    checkpoint:
        A directory; the fit state is written there every ``checkpoint_every`` steps and
        at the end, and a fit started with the same directory resumes from it.
    early_stopping:
        An :class:`EarlyStopping` on a held-out metric, or a convergence rule on the loss itself:
        ``"auto"`` is :class:`~pyro_llm.infer.train.LossPlateau` over epoch means (stop after 3
        epochs whose mean negative ELBO is not 0.1% below the best; ``epochs`` is then a cap).
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
    warm = None if isinstance(init_scale, numbers.Real) else init_scale
    if isinstance(guide, str):
        guide = make_guide(model, guide, init_values, 1e-3 if warm is not None else init_scale)
    first, data = peek_batches(data)
    early_stopping = _auto_stopping(early_stopping, data)
    params = param_store_tensors(model, guide, first, loss)  # also builds the guide
    if not params:
        raise ValueError("the model and guide have no parameters to fit")
    if warm is not None:
        set_guide_scales(guide, marginal_sds(warm))
        params = param_store_tensors(model, guide, first, loss)  # the store now holds new tensors

    def step(batch):
        return call_with_batch(lambda *a, **k: loss.differentiable_loss(model, guide, *a, **k), batch)

    fingerprint = {"model": model_sketch(model, params) if checkpoint else None,
                   "guide": type(guide).__qualname__, "elbo": [type(loss).__qualname__, num_particles]}
    fit = train_loop(
        "svi", step, params, data, guide=guide, epochs=epochs, max_steps=max_steps, lr=lr,
        weight_decay=0.0, clip_norm=clip_norm, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, early_stopping=early_stopping, progress=progress,
        seed=seed, fingerprint=fingerprint,
    )
    return dataclasses.replace(fit, params={n: p.detach().clone() for n, p in _constrained(params).items()},
                               posterior=svi_posterior(guide, _find_lora(model, init_values)))


def _auto_stopping(rule, data):
    if not isinstance(rule, str):
        return rule
    if rule != "auto":
        raise ValueError(f"early_stopping must be an EarlyStopping, 'auto' or None, got {rule!r}")
    if not hasattr(data, "__len__"):
        raise ValueError("early_stopping='auto' compares epoch means and needs data with a len() "
                         "(a DataLoader or a list); pass LossPlateau(every=<batches per epoch>)")
    return LossPlateau(every=max(len(data), 1))


def svi_posterior(guide, lora=None) -> Posterior:
    """The fitted guide in the posterior protocol: a snapshot of its Gaussian when it is one (the
    autoguides over real-valued sites; :meth:`save` and :func:`pyro_llm.load` then round-trip
    it exactly), else the live :class:`~pyro_llm.GuidePosterior`. ``lora``'s ``pyro.param``
    tensors (its ``fixed_names``) travel with it as point estimates."""
    fixed = {}
    if lora is not None:
        store = pyro.get_param_store()
        fixed = {s: store[s].detach().clone() for s in map(lora.site_name, lora.fixed_names) if s in store}
    post = GuidePosterior(guide, lora=lora, fixed=fixed)
    try:
        return post.gaussian()
    except NotImplementedError:
        return post


def _find_lora(model, init_values):
    from ..lora import BayesianLoRA

    found = [c for c in [init_values, *referenced(model)] if isinstance(c, BayesianLoRA)]
    return found[0] if found else None


def referenced(fn) -> list:
    """What a model refers to: itself, the object of a bound method, its closure's cells, and
    the globals its code names (a module-level ``lora`` used inside ``def model``)."""
    out = [fn, getattr(fn, "__self__", None)]
    out += [c.cell_contents for c in getattr(fn, "__closure__", None) or () if _filled(c)]
    code, env = getattr(fn, "__code__", None), getattr(fn, "__globals__", {})
    out += [env[n] for n in (code.co_names if code else ()) if n in env]
    return out


def model_sketch(model, exclude: Mapping[str, torch.Tensor] = {}) -> str | None:
    """A sketch of the frozen tensors a model reads, to refuse resuming on another model: of
    ``model`` if it is a module, else of the modules it refers to (:func:`referenced`: its
    closure and the globals its code names; a ``BayesianLoRA``'s peft model counts). ``None``
    when there is no module to see."""
    skip = {id(t) for t in exclude.values()}
    found = []
    for obj in referenced(model):
        obj = getattr(obj, "peft_model", obj)
        if isinstance(obj, torch.nn.Module) and all(obj is not f for f in found):
            found.append(obj)
    if not found:
        return None
    return sketch([describe_named((n, t) for n, t in list(m.named_parameters()) + list(m.named_buffers())
                                  if id(t) not in skip and not t.requires_grad) for m in found])


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
        return True
    except ValueError:  # an empty cell
        return False


def marginal_sds(post: Posterior | Mapping[str, torch.Tensor], num_samples: int = 256) -> dict:
    """Marginal standard deviations per site: of a posterior's draws, or a ``{site: sd}`` as given."""
    if isinstance(post, Mapping):
        return {k: torch.as_tensor(v).detach() for k, v in post.items()}
    if not isinstance(post, Posterior):
        raise TypeError(f"init_scale must be a number, a Posterior or a {{site: sd}} dict, got "
                        f"{type(post).__name__}")
    draws = post.sample(num_samples, torch.Generator().manual_seed(0))
    return {k: torch.stack([d[k] for d in draws]).std(0) for k in draws[0]}


def set_guide_scales(guide, sds: Mapping[str, torch.Tensor]) -> None:
    """Set a fitted-or-set-up ``AutoNormal``'s scales to ``sds`` (by site; floored at 1e-8)."""
    if not isinstance(guide, ag.AutoNormal):
        raise ValueError(f"a posterior as init_scale needs the 'normal' guide (AutoNormal), not "
                         f"{type(guide).__name__}")
    store = pyro.get_param_store()
    sites = list(guide.median())
    missing = [s for s in sites if s not in sds]
    if missing:
        raise ValueError(f"init_scale has no scale for the guide's sites {missing[:3]}; give a posterior "
                         "over the same sites (the same BayesianLoRA select= and prefix=)")
    for site in sites:
        keys = [k for k in store.keys() if k.endswith(f".scales.{site}")]
        if len(keys) != 1:
            raise ValueError(f"cannot find the guide's scale parameter of {site!r} in the param store")
        old = store[keys[0]]
        sd = torch.as_tensor(sds[site]).to(old).clamp_min(1e-8)
        if sd.shape != old.shape:
            raise ValueError(f"init_scale of {site!r} has shape {tuple(sd.shape)}, the site "
                             f"{tuple(old.shape)}")
        store[keys[0]] = sd


def hf_loss(model, batch):
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError("fit_map's default loss needs dict batches with a 'labels' entry; "
                         "pass loss=lambda model, batch: ... for other data")
    inputs = {k: v for k, v in batch.items() if k not in ("index",)}
    return model(**inputs).loss


@takes_config
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
    _, data = peek_batches(data)
    was_training = peft_model.training
    peft_model.train()
    try:
        fit = train_loop(
            "map", lambda batch: loss_fn(peft_model, batch), params, data, guide=None,
            epochs=epochs, max_steps=max_steps, lr=lr, weight_decay=weight_decay,
            clip_norm=clip_norm, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
            early_stopping=early_stopping, progress=progress, seed=seed,
            fingerprint={"model": model_sketch(peft_model, params) if checkpoint else None,
                         "loss": _name(loss_fn), "weight_decay": weight_decay},
        )
        return dataclasses.replace(fit, posterior=PointPosterior(fit.params, model=peft_model))
    finally:
        peft_model.train(was_training)


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


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
