"""Priors over LoRA adapter matrices, and predicates that select which matrices are random.

A prior maps a site (its peft parameter name and shape) to a Pyro distribution whose
event shape is the matrix shape. Three ready-made priors cover the usual choices:

* :class:`IsotropicNormal` -- one scale for every entry of every random matrix;
* :class:`PerMatrixNormal` -- a scale per matrix (a mapping or a function of the name);
* :class:`HierarchicalNormal` -- the scale is itself a random site with a hyperprior,
  shared by all matrices (``per="global"``) or one per matrix (``per="matrix"``),
  so it is learned from the data.

Anything else can be passed as a plain callable ``prior(name, shape) -> Distribution``
or as a univariate :class:`~pyro.distributions.Distribution`, which is expanded to
every matrix's shape.

Example
-------
>>> from pyro_llm.priors import IsotropicNormal, select
>>> prior = IsotropicNormal(scale=0.1)
>>> d = prior.distribution("layer.0.q.lora_B.default.weight", (16, 8), hyper={})
>>> d.event_shape
torch.Size([16, 8])
>>> select("B")("layer.0.q.lora_B.default.weight")
True
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

import pyro.distributions as dist
import torch

__all__ = [
    "AdapterPrior",
    "IsotropicNormal",
    "PerMatrixNormal",
    "HierarchicalNormal",
    "as_prior",
    "select",
    "layer_index",
]

Hyper = Mapping[str, torch.Tensor]


def _check_scale(scale: float, what: str = "prior scale") -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {scale!r}")
    return scale


def _normal(shape: tuple[int, ...], scale, like: torch.Tensor | None) -> dist.Distribution:
    zero = torch.zeros((), dtype=like.dtype if like is not None else None,
                       device=like.device if like is not None else None)
    scale = torch.as_tensor(scale, dtype=zero.dtype, device=zero.device)
    return dist.Normal(zero, scale).expand(torch.Size(shape)).to_event(len(shape))


class AdapterPrior:
    """Base class: a prior over each random adapter matrix, with optional hyper-sites.

    Subclasses implement :meth:`distribution`; hierarchical ones also :meth:`hyperpriors`,
    which names global sites (sampled once per model run, before the matrices).
    """

    def hyperpriors(self, names: list[str]) -> dict[str, dist.Distribution]:
        """Extra global sites ``{site suffix: distribution}`` for the random matrices ``names``."""
        return {}

    def distribution(
        self,
        name: str,
        shape: tuple[int, ...],
        hyper: Hyper,
        like: torch.Tensor | None = None,
    ) -> dist.Distribution:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class IsotropicNormal(AdapterPrior):
    """Every entry of every random matrix is ``Normal(0, scale)``, independently."""

    def __init__(self, scale: float = 1.0):
        self.scale = _check_scale(scale)

    def distribution(self, name, shape, hyper, like=None):
        return _normal(shape, self.scale, like)


class PerMatrixNormal(AdapterPrior):
    """``Normal(0, scale[name])`` with a scale per matrix.

    Parameters
    ----------
    scales:
        A mapping from peft parameter name to scale, or a function ``name -> scale``.
    default:
        Scale for names the mapping lacks; ``None`` makes a missing name an error.
    """

    def __init__(self, scales: Mapping[str, float] | Callable[[str], float],
                 default: float | None = None):
        if isinstance(scales, Mapping):
            for k, v in scales.items():
                _check_scale(v, f"prior scale for {k!r}")
        elif not callable(scales):
            raise TypeError(f"scales must be a mapping or a callable, got {type(scales).__name__}")
        self.scales = scales
        self.default = None if default is None else _check_scale(default, "default prior scale")

    def scale_for(self, name: str) -> float:
        if callable(self.scales):
            return _check_scale(self.scales(name), f"prior scale for {name!r}")
        if name in self.scales:
            return float(self.scales[name])
        if self.default is None:
            raise KeyError(
                f"PerMatrixNormal has no scale for {name!r}; add it to `scales` or pass `default=`"
            )
        return self.default

    def distribution(self, name, shape, hyper, like=None):
        return _normal(shape, self.scale_for(name), like)


class HierarchicalNormal(AdapterPrior):
    """``Normal(0, s)`` with the scale ``s`` a random site: learned from the data.

    Parameters
    ----------
    hyperprior:
        Distribution of the scale (positive support). Default ``LogNormal(log 0.1, 1)``.
    per:
        ``"global"`` -- one scale for all random matrices (site ``lora_prior_scale``);
        ``"matrix"`` -- one per matrix (site ``<matrix name without .weight>.prior_scale``).
    """

    GLOBAL_SITE = "lora_prior_scale"

    def __init__(self, hyperprior: dist.Distribution | None = None, per: str = "global"):
        if per not in ("global", "matrix"):
            raise ValueError(f"per must be 'global' or 'matrix', got {per!r}")
        if hyperprior is None:
            hyperprior = dist.LogNormal(math.log(0.1), 1.0)
        if not isinstance(hyperprior, dist.Distribution):
            raise TypeError(f"hyperprior must be a Distribution, got {type(hyperprior).__name__}")
        if hyperprior.support is not dist.constraints.positive:
            raise ValueError(f"hyperprior must have positive support, got {hyperprior.support}")
        self.hyperprior = hyperprior
        self.per = per

    def _site(self, name: str) -> str:
        if self.per == "global":
            return self.GLOBAL_SITE
        return name.removesuffix(".weight") + ".prior_scale"

    def hyperpriors(self, names):
        return {self._site(n): self.hyperprior for n in names}

    def distribution(self, name, shape, hyper, like=None):
        return _normal(shape, hyper[self._site(name)], like)


class _CallablePrior(AdapterPrior):
    def __init__(self, fn):
        self.fn = fn

    def distribution(self, name, shape, hyper, like=None):
        d = self.fn(name, tuple(shape))
        if not isinstance(d, dist.Distribution):
            raise TypeError(f"prior({name!r}, {tuple(shape)}) returned {type(d).__name__}, "
                            "expected a pyro Distribution")
        if tuple(d.batch_shape) + tuple(d.event_shape) != tuple(shape):
            raise ValueError(f"prior for {name!r} has shape "
                             f"{tuple(d.batch_shape) + tuple(d.event_shape)}, expected {tuple(shape)}")
        return d.to_event(len(d.batch_shape)) if d.batch_shape else d


class _UnivariatePrior(AdapterPrior):
    def __init__(self, base: dist.Distribution):
        if base.batch_shape or base.event_shape:
            raise ValueError("a Distribution prior must be univariate (it is expanded to each "
                             f"matrix), got batch {tuple(base.batch_shape)}, "
                             f"event {tuple(base.event_shape)}")
        self.base = base

    def distribution(self, name, shape, hyper, like=None):
        return self.base.expand(torch.Size(shape)).to_event(len(shape))


def as_prior(prior) -> AdapterPrior:
    """Turn a float (isotropic scale), Distribution, callable or AdapterPrior into an AdapterPrior."""
    if isinstance(prior, AdapterPrior):
        return prior
    if isinstance(prior, (int, float)) and not isinstance(prior, bool):
        return IsotropicNormal(prior)
    if isinstance(prior, dist.Distribution):
        return _UnivariatePrior(prior)
    if callable(prior):
        return _CallablePrior(prior)
    raise TypeError(
        f"prior must be an AdapterPrior, a float scale, a univariate Distribution or a callable "
        f"(name, shape) -> Distribution; got {type(prior).__name__}"
    )


_LAYER = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The first integer path component of a parameter name (the block index), or ``None``."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def select(
    matrices: str = "AB",
    layers: Iterable[int] | None = None,
    names: Iterable[str] | None = None,
    pattern: str | None = None,
) -> Callable[[str], bool]:
    """A predicate on peft parameter names: which LoRA matrices are random.

    Parameters
    ----------
    matrices:
        ``"AB"`` (both), ``"A"`` or ``"B"``.
    layers:
        Block indices to keep (the first integer in the name, e.g. ``layer.4``); ``None``: all.
    names:
        An explicit set of names; combined with the other conditions by *and*.
    pattern:
        A regular expression that the name must contain (``re.search``).
    """
    matrices = matrices.upper()
    if not matrices or set(matrices) - {"A", "B"}:
        raise ValueError(f"matrices must be 'A', 'B' or 'AB', got {matrices!r}")
    layer_set = None if layers is None else {int(i) for i in layers}
    name_set = None if names is None else set(names)
    regex = None if pattern is None else re.compile(pattern)

    def predicate(name: str) -> bool:
        kinds = {"A": ".lora_A.", "B": ".lora_B."}
        if not any(kinds[m] in name for m in matrices):
            return False
        if layer_set is not None and layer_index(name) not in layer_set:
            return False
        if name_set is not None and name not in name_set:
            return False
        return regex is None or regex.search(name) is not None

    predicate.__doc__ = f"select(matrices={matrices!r}, layers={layers!r}, pattern={pattern!r})"
    return predicate
