"""``BayesianLoRA``: the LoRA matrices of a peft model as Pyro random sites.

The peft model is never modified. Its LoRA tensors are read once, for their shapes and
fine-tuned values; at every call the selected matrices are drawn as ``PyroSample`` sites
(named by peft's own parameter names, under an optional prefix), the remaining trainable
tensors (unselected matrices, a ``modules_to_save`` classifier head) are ``pyro.param``
point estimates, and the backbone runs with those tensors injected through
:func:`torch.func.functional_call`. Base weights stay frozen and bit-identical, and
``save_pretrained`` keeps working; :meth:`BayesianLoRA.write_to_peft` writes a posterior
mean or a draw back into the peft model, to be saved the usual way.

Many draws in one pass
----------------------
Draws may arrive stacked: condition the sites on ``(S, *shape)`` tensors (a posterior's
``stack_draws``, Pyro's vectorised particles or ``Predictive(parallel=True)``) and one call
evaluates all S adapters in a single forward, with outputs ``(S, N, ...)``; the frozen blocks
below the lowest random adapter run once per input, not once per draw, and a
:class:`~pyro_llm.prefix_cache.PrefixCache` keeps them between calls (see
:mod:`pyro_llm.batched`).

Dropout
-------
By default the backbone runs in eval mode, so ``lora_dropout`` (and every other dropout
layer) is off: the posterior over the adapter is what expresses uncertainty, and a
deterministic likelihood keeps the ELBO an honest objective. ``dropout=True`` runs the
backbone in train mode, which makes the likelihood itself random (MC-dropout noise on top
of the posterior); use it only on purpose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

import pyro
import torch
from pyro.nn import PyroModule, PyroSample

from . import batched as _batched
from .adapter_state import check_unmerged
from .priors import AdapterPrior, as_prior, select
from .runtime import in_data_plate, train_mode

__all__ = ["BayesianLoRA", "find_lora_parameters"]


def lora_layers(model: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _active_adapter(model: torch.nn.Module, layers) -> str:
    names = getattr(model, "active_adapters", None)
    if callable(names):  # a transformers model's method, not peft's property
        names = None
    if not names:
        names = layers[0][1].active_adapters
    if isinstance(names, str):
        names = [names]
    if len(names) != 1:
        raise ValueError(f"the model has {len(names)} active adapters {names}; "
                         "pass adapter_name= to choose one")
    return names[0]


def find_lora_parameters(model: torch.nn.Module, adapter_name: str | None = None) -> list[str]:
    """peft parameter names of the LoRA A and B matrices of one adapter, in model order.

    Raises a ``ValueError`` if the model carries no LoRA adapter or lacks ``adapter_name``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module adapted by peft, got {type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no LoRA layers; adapt it first, e.g. "
            "peft.get_peft_model(model, peft.LoraConfig(target_modules=[...]))"
        )
    available = sorted({a for _, m in layers for a in m.lora_A.keys()})
    adapter = adapter_name or _active_adapter(model, layers)
    if adapter not in available:
        raise ValueError(f"unknown adapter {adapter!r}; the model has LoRA adapters {available}")
    params = dict(model.named_parameters())
    names = []
    for mod_name, m in layers:
        if adapter not in m.lora_A:
            continue
        for kind in ("lora_A", "lora_B"):
            name = f"{mod_name}.{kind}.{adapter}.weight"
            if name not in params:
                raise ValueError(f"expected peft parameter {name!r} was not found")
            names.append(name)
    return names


class _Hyper:
    """Read-only view of a module's hyper-sites; reading one draws it (once per context)."""

    def __init__(self, module: PyroModule):
        self._module = module

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self._module, name)


class BayesianLoRA(PyroModule):
    """A peft LoRA model whose adapter matrices are Pyro random variables.

    Parameters
    ----------
    peft_model:
        Any torch module adapted by peft with LoRA (``get_peft_model`` or
        ``inject_adapter_in_model``): encoders, decoders, classifiers, GPT-2 ``Conv1D``.
    prior:
        An :class:`~pyro_llm.priors.AdapterPrior`, a float (isotropic Normal scale),
        a univariate Distribution, or a callable ``(name, shape) -> Distribution``.
    select:
        Which trainable tensors are random: ``"AB"``, ``"A"``, ``"B"``, a predicate on
        peft parameter names (see :func:`pyro_llm.priors.select`) or a collection of names.
        Trainable tensors not selected are point estimates (``pyro.param`` sites).
    adapter_name:
        Which LoRA adapter; default the active one.
    prefix:
        Optional prefix for every site name (``prefix.<peft name>``).
    dropout:
        Run the backbone in train mode (dropout on). Default ``False``; see the module docs.
    share_prefix:
        Run the frozen blocks below the lowest random (or trainable) adapter once per input
        when many draws are evaluated together (default ``True``; off with ``dropout``).
    prefix_cache:
        A :class:`~pyro_llm.prefix_cache.PrefixCache` that keeps those frozen activations
        between calls (SVI epochs, repeated predictions); ``None`` keeps nothing.

    Example
    -------
    >>> import torch, peft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> net = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    >>> lora = BayesianLoRA(net, prior=0.1)
    >>> lora.random_names[0]
    'base_model.model.0.lora_A.default.weight'
    >>> lora(torch.randn(3, 4)).shape
    torch.Size([3, 2])
    """

    def __init__(
        self,
        peft_model: torch.nn.Module,
        prior: AdapterPrior | float | Callable = 1.0,
        select: str | Callable[[str], bool] | Iterable[str] = "AB",
        adapter_name: str | None = None,
        prefix: str = "",
        dropout: bool = False,
        share_prefix: bool = True,
        prefix_cache=None,
    ):
        super().__init__(prefix)
        lora_names = find_lora_parameters(peft_model, adapter_name)
        object.__setattr__(self, "_peft_model", peft_model)  # not a submodule: stays untouched
        params = dict(peft_model.named_parameters())
        adapter = lora_names[0].split(".")[-2]
        other_lora = {n for n in params if (".lora_A." in n or ".lora_B." in n)
                      and f".{adapter}." not in n}
        predicate = self._predicate(select)
        # The adapter's LoRA tensors can be random even when frozen (a PeftModel loaded for
        # inference marks them requires_grad=False); a frozen tensor that is not selected
        # stays a constant (e.g. a fixed A, as in LoRA-FA), not a fitted pyro.param.
        lora_set = set(lora_names)
        trainable = [n for n, p in params.items() if n not in other_lora
                     and (p.requires_grad or (n in lora_set and predicate(n)))]
        self.adapter_name = adapter
        self.prior = as_prior(prior)
        self.dropout = bool(dropout)
        self.share_prefix = bool(share_prefix)
        object.__setattr__(self, "prefix_cache", prefix_cache)
        self.lora_names = lora_names
        self.random_names = [n for n in trainable if predicate(n)]
        self.fixed_names = [n for n in trainable if not predicate(n)]
        if not self.random_names:
            raise ValueError(f"select={select!r} matched none of the trainable tensors "
                             f"{trainable[:4]}...; nothing would be random")
        self._shapes = {n: tuple(params[n].shape) for n in trainable}
        self.hyper_names = list(self.prior.hyperpriors(self.random_names))
        for h, d in self.prior.hyperpriors(self.random_names).items():
            setattr(self, h, PyroSample(d))
        for n in self.random_names:
            setattr(self, n, PyroSample(lambda mod, n=n: mod._prior_for(n)))
        check_unmerged(peft_model, self.plan)

    @staticmethod
    def _predicate(sel) -> Callable[[str], bool]:
        if isinstance(sel, str):
            return select(sel)
        if callable(sel):
            return sel
        names = set(sel)
        return lambda n: n in names

    # ------------------------------------------------------------------ naming
    @property
    def peft_model(self) -> torch.nn.Module:
        """The wrapped peft model (not a submodule: its state is never changed by Pyro)."""
        return self._peft_model

    def site_name(self, peft_name: str) -> str:
        """The Pyro site name of a peft parameter (``prefix.`` + the peft name)."""
        return f"{self._pyro_name}.{peft_name}" if self._pyro_name else peft_name

    def peft_name(self, site_name: str) -> str:
        """Inverse of :meth:`site_name`."""
        p = self._pyro_name
        return site_name[len(p) + 1:] if p and site_name.startswith(p + ".") else site_name

    @property
    def site_names(self) -> list[str]:
        """Names of the random matrix sites, in model order."""
        return [self.site_name(n) for n in self.random_names]

    @property
    def num_random_parameters(self) -> int:
        return sum(int(torch.Size(self._shapes[n]).numel()) for n in self.random_names)

    def _prior_for(self, name: str):
        like = self._peft_model.get_parameter(name)
        return self.prior.distribution(name, self._shapes[name], _Hyper(self), like=like)

    # ------------------------------------------------------------------ values
    def init_values(self) -> dict[str, torch.Tensor]:
        """Fine-tuned values of the random matrices keyed by site name (for guide init)."""
        return {self.site_name(n): self._peft_model.get_parameter(n).detach().clone()
                for n in self.random_names}

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """Draw (or read) every trainable tensor; keys are peft names. Call inside ``forward``."""
        for h in self.hyper_names:
            getattr(self, h)
        out = {n: getattr(self, n) for n in self.random_names}
        for n in self.fixed_names:
            init = self._peft_model.get_parameter(n)
            out[n] = pyro.param(self.site_name(n), lambda init=init: init.detach().clone())
        return out

    @torch.no_grad()
    def write_to_peft(self, values: Mapping[str, torch.Tensor]) -> list[str]:
        """Copy tensors (keyed by site or peft name) into the peft model's LoRA parameters.

        Returns the peft names written. Use it to save a posterior mean or a draw with
        ``peft_model.save_pretrained``.
        """
        written = []
        for key, v in values.items():
            name = self.peft_name(key)
            if name not in self._shapes:
                continue
            v = torch.as_tensor(v)
            if tuple(v.shape) != self._shapes[name]:
                raise ValueError(f"value for {key!r} has shape {tuple(v.shape)}, "
                                 f"expected {self._shapes[name]}")
            p = self._peft_model.get_parameter(name)
            p.copy_(v.to(device=p.device, dtype=p.dtype))
            written.append(name)
        return written

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def shared_draw(self):
        """Within this block, every call of the module reuses one draw of the adapter."""
        with self._pyro_context:
            yield self

    def forward(self, *args, **kwargs):
        """Run the peft model on ``args, kwargs`` with drawn adapter matrices."""
        _check_finite(args, kwargs)
        _check_dtypes(self._peft_model, args, kwargs)
        first = self.site_name(self.random_names[0])
        if in_data_plate() and self._pyro_context.get(first) is None:
            raise RuntimeError(
                "BayesianLoRA was first called inside a pyro.plate, which would draw one adapter "
                "per data point; call it before entering the plate (or read "
                "lora.adapter_weights() there first)"
            )
        weights = self.adapter_weights()
        sample_shape = self._sample_shape(weights)
        with train_mode(self._peft_model, self.dropout):
            return _batched.run(self._peft_model, self.plan, weights, sample_shape, args, kwargs,
                                random=self.random_names,
                                share_prefix=self.share_prefix and not self.dropout,
                                cache=None if self.dropout else self.prefix_cache)

    @property
    def plan(self) -> _batched.Plan:
        """Where the adapted layers sit in the backbone (its blocks, for the shared prefix)."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = _batched.plan_for(self._peft_model, self.random_names + self.fixed_names,
                                     self.adapter_name)
            object.__setattr__(self, "_plan", plan)
        return plan

    def _sample_shape(self, weights: Mapping[str, torch.Tensor]) -> torch.Size:
        """Leading draw dimensions of the random tensors (trailing 1s after the first, which
        Pyro's plates nested inside add, dropped); ``()`` for a single unstacked draw."""
        shapes = set()
        for n in self.random_names:
            w, shape = weights[n], self._shapes[n]
            if w.dim() < len(shape) or tuple(w.shape[w.dim() - len(shape):]) != shape:
                raise ValueError(f"{self.site_name(n)} has shape {tuple(w.shape)}; expected "
                                 f"{shape} or (draws..., *{shape})")
            lead = list(w.shape[: w.dim() - len(shape)])
            while len(lead) > 1 and lead[-1] == 1:  # (P, 1): particles left of a data plate
                lead.pop()
            shapes.add(tuple(lead))
        if len(shapes) > 1:
            raise ValueError(f"the random adapter tensors carry different draw dimensions "
                             f"{sorted(shapes)}; stack the same number of draws for every site")
        shape = torch.Size(shapes.pop())
        if shape:
            for n in self.random_names:
                w = weights[n]
                weights[n] = w.reshape(*shape, *self._shapes[n])
        return shape

    def extra_repr(self) -> str:
        return (f"adapter={self.adapter_name!r}, random={len(self.random_names)} tensors "
                f"({self.num_random_parameters} scalars), fixed={len(self.fixed_names)}, "
                f"prior={self.prior!r}")


def _check_finite(args, kwargs) -> None:
    for i, t in enumerate(list(args) + list(kwargs.values())):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            where = f"argument {i}" if i < len(args) else f"keyword {list(kwargs)[i - len(args)]!r}"
            raise ValueError(f"{where} contains NaN or inf; clean the inputs before the forward")


def _check_dtypes(model: torch.nn.Module, args, kwargs) -> None:
    """Floating inputs (``lora(x)``, ``inputs_embeds=``) must match the base weights' dtype, and a
    plain ``nn.Linear`` cast to an integer dtype cannot run: say so before torch fails deep inside."""
    inputs = [t for t in list(args) + [kwargs.get("inputs_embeds")]
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not inputs:
        return
    found = next(((n, m.weight) for n, m in model.named_modules()
                  if type(m) is torch.nn.Linear and isinstance(m.weight, torch.Tensor)), None)
    if found is None:
        return
    (name, w), x = found, inputs[0]
    if not w.is_floating_point():
        raise ValueError(f"the base weight {name}.weight is {w.dtype}: a plain nn.Linear cast to an "
                         "integer dtype cannot run; keep the base floating (quantised bases need "
                         "their own layers, e.g. bitsandbytes via BitsAndBytesConfig)")
    if x.dtype != w.dtype:
        raise ValueError(f"the input is {x.dtype} but the base weights (e.g. {name}.weight) are "
                         f"{w.dtype}; cast the input (x.to({w.dtype})) or the model to one dtype")
