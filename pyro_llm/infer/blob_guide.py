"""BLoB's variational family and KL schedule (see :mod:`pyro_llm.infer.blob` for the method):
:class:`BLoBGuide`, ``q(A) = N(M, (G**2)^2)`` entrywise over a BayesianLoRA's ``A`` sites, and
:func:`kl_weights`, the share of the KL each minibatch of an epoch carries."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from ..lora import BayesianLoRA

__all__ = ["BLoBGuide", "kl_weights", "SCHEDULES"]

SCHEDULES = ("blob", "uniform")


# ------------------------------------------------------------------------- KL schedule
def kl_weights(num_batches: int, schedule: str | Callable[[int, int], float] = "blob") -> torch.Tensor:
    """The KL share ``pi_i`` of each minibatch ``i = 1..M`` of an epoch (float64, shape ``(M,)``).

    ``"blob"``: ``pi_i = 2^(i-1) / (2^M - 1)`` (BLoB's re-weighting; sums to 1, most of the
    KL on the last minibatches); ``"uniform"``: ``1 / M``; a callable ``(i, M) -> pi_i`` is
    used as given (it should sum to 1 over an epoch for the loss to be the ELBO).

    Example
    -------
    >>> kl_weights(3)
    tensor([0.1429, 0.2857, 0.5714], dtype=torch.float64)
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    i = torch.arange(1, num_batches + 1, dtype=torch.float64)
    if schedule == "blob":  # 2^(i-1-M) / (1 - 2^-M): no overflow for large M
        return torch.exp2(i - 1 - num_batches) / (1 - 2.0 ** -num_batches)
    if schedule == "uniform":
        return torch.full((num_batches,), 1 / num_batches, dtype=torch.float64)
    if callable(schedule):
        pi = torch.tensor([float(schedule(int(k), num_batches)) for k in i], dtype=torch.float64)
        if not torch.isfinite(pi).all() or (pi < 0).any():
            raise ValueError(f"kl_schedule returned {pi.tolist()[:5]}...; weights must be finite and >= 0")
        return pi
    raise ValueError(f"kl_schedule must be one of {SCHEDULES} or a callable (i, M) -> pi_i, "
                     f"got {schedule!r}")


# ------------------------------------------------------------------------- guide
def _sigma(g: torch.Tensor) -> torch.Tensor:
    # sigma = G^2 as in the paper; the floor only keeps Normal valid should G hit 0 exactly
    return g.square().clamp_min(torch.finfo(g.dtype).tiny)


class BLoBGuide(PyroModule):
    """BLoB's variational family: ``N(M, (G**2)^2)`` independently for every entry of each site.

    Parameters
    ----------
    lora:
        The :class:`~pyro_llm.BayesianLoRA` whose random sites (for BLoB its ``A`` matrices,
        ``select="A"``) the guide covers. Its prior must have no hyper-sites.
    init_scale:
        The paper's ``eps`` (``bayes_eps``): ``G`` starts uniform on ``[eps / sqrt 2, eps]``,
        so ``sigma = G**2`` starts in ``[eps^2 / 2, eps^2]``. Means start at the current A.
    seed:
        Seed of the initial ``G``.

    Notes
    -----
    The guide owns its tensors: ordinary torch parameters (``guide.parameters()``, named
    ``blob.loc.<site>`` and ``blob.G.<site>`` by :meth:`named_tensors`), not entries of Pyro's
    param store, so clearing the store does not reset a fitted guide and a new guide never
    inherits an older one's values.

    Example
    -------
    >>> import torch, peft
    >>> net = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 2)),
    ...                           peft.LoraConfig(r=2, target_modules=["0"]))
    >>> guide = BLoBGuide(BayesianLoRA(net, prior=0.2, select="A"))
    >>> list(guide())
    ['base_model.model.0.lora_A.default.weight']
    >>> bool((guide.scales()[guide.site_names[0]] > 0).all())
    True
    """

    def __init__(self, lora: BayesianLoRA, init_scale: float = 0.05, seed: int = 0):
        super().__init__("blob")
        if not isinstance(lora, BayesianLoRA):
            raise TypeError(f"lora must be a pyro_llm.BayesianLoRA, got {type(lora).__name__}")
        if lora.hyper_names:
            raise ValueError(f"BLoBGuide covers the matrix sites only, but the prior has hyper-sites "
                             f"{lora.hyper_names}; use a fixed-scale prior (a float, IsotropicNormal)")
        init_scale = float(init_scale)
        if not math.isfinite(init_scale) or init_scale <= 0:
            raise ValueError(f"init_scale (the paper's eps) must be > 0, got {init_scale!r}")
        object.__setattr__(self, "_lora", lora)  # not a submodule: its site names must not change
        gen = torch.Generator().manual_seed(seed)
        init = lora.init_values()
        self.site_names = list(init)
        self.locs = torch.nn.ParameterList([torch.nn.Parameter(v.clone()) for v in init.values()])
        low = init_scale / math.sqrt(2)
        self.gs = torch.nn.ParameterList([
            torch.nn.Parameter((low + (init_scale - low) * torch.rand(v.shape, generator=gen,
                                                                       dtype=torch.float64))
                               .to(dtype=v.dtype, device=v.device))
            for v in init.values()
        ])

    # The parameter lists are read from ``_modules`` directly: reading them as attributes of a
    # PyroModule would issue ``pyro.module``, which shares them with the global param store
    # (and makes a new guide silently take over an older guide's values of the same name).
    @property
    def _locs(self) -> torch.nn.ParameterList:
        return self._modules["locs"]

    @property
    def _gs(self) -> torch.nn.ParameterList:
        return self._modules["gs"]

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Draw every site (reparameterised); arguments are ignored."""
        return {name: pyro.sample(name, self.distribution(name)) for name in self.site_names}

    def distribution(self, site: str) -> dist.Distribution:
        """``q`` of one site: ``Normal(M, G**2)`` with the matrix as the event."""
        i = self._index(site)
        loc = self._locs[i]
        return dist.Normal(loc, _sigma(self._gs[i])).to_event(loc.dim())

    def _index(self, site: str) -> int:
        try:
            return self.site_names.index(site)
        except ValueError:
            raise KeyError(f"{site!r} is not a site of this guide; its sites are "
                           f"{self.site_names[:3]}...") from None

    def loc(self, site: str) -> torch.Tensor:
        """The mean ``M`` of one site (the live parameter)."""
        return self._locs[self._index(site)]

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior means (= medians) by site, detached."""
        return {n: m.detach().clone() for n, m in zip(self.site_names, self._locs, strict=True)}

    @torch.no_grad()
    def scales(self) -> dict[str, torch.Tensor]:
        """Posterior standard deviations ``sigma = G**2`` by site, detached."""
        return {n: _sigma(g).detach().clone() for n, g in zip(self.site_names, self._gs, strict=True)}

    def kl(self) -> torch.Tensor:
        """``KL(q || prior)`` summed over all sites, in closed form (differentiable)."""
        lora = self._lora
        total = 0.0
        for name in self.site_names:
            prior = lora._prior_for(lora.peft_name(name))
            total = total + torch.distributions.kl_divergence(self.distribution(name), prior)
        return total

    def named_tensors(self) -> dict[str, torch.nn.Parameter]:
        """The fitted tensors by stable name: ``blob.loc.<site>`` and ``blob.G.<site>``."""
        out = {f"blob.loc.{n}": p for n, p in zip(self.site_names, self._locs, strict=True)}
        out.update({f"blob.G.{n}": p for n, p in zip(self.site_names, self._gs, strict=True)})
        return out
