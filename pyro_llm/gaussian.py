"""Gaussian posteriors over named sites, the saved form of SVI and BLoB posteriors.

:class:`GaussianPosterior` holds a Gaussian over the flattened sites in one of three forms:
``"diag"`` (independent entries: ``AutoNormal``, ``AutoDelta`` with zero scale, BLoB's guide),
``"lowrank"`` (``AutoLowRankMultivariateNormal``: ``W W^T + diag(d)``) or ``"full"``
(``AutoMultivariateNormal``: a Cholesky factor). :meth:`GaussianPosterior.from_guide` reads a
fitted guide through Pyro's public API (``median``, ``quantiles``, ``get_posterior``); the
sites must be real-valued (a hierarchical prior's positive scale site is not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ._io import FileFormatError, atomic_folder, read_json, read_safetensors, save_safetensors, write_json
from .posterior import Draw, Posterior, check_sites
from .readout import Readout

__all__ = ["GaussianPosterior", "POSTERIOR_FILE", "read_fixed"]

POSTERIOR_FILE = "posterior.json"
_TENSORS = "posterior.safetensors"
FORMS = ("diag", "lowrank", "full")
_PHI1 = 0.8413447460685429  # Phi(1): the quantile one standard deviation above the median


class GaussianPosterior(Posterior):
    """``N(loc, Sigma)`` over ``site_names`` (flattened in that order), with ``Sigma`` given by
    ``form``: ``"diag"`` (``scale``, one sd per entry), ``"lowrank"`` (``cov_factor`` (D, r) and
    ``cov_diag`` (D,)) or ``"full"`` (``scale_tril`` (D, D)).

    Example
    -------
    >>> import torch
    >>> post = GaussianPosterior(["w"], [(2,)], torch.zeros(2), "diag", scale=torch.ones(2))
    >>> post.sample(3)[0]["w"].shape, post.mean()["w"].tolist()
    (torch.Size([2]), [0.0, 0.0])
    """

    def __init__(self, site_names: Sequence[str], shapes: Sequence[Sequence[int]], loc: torch.Tensor,
                 form: str = "diag", *, scale=None, cov_factor=None, cov_diag=None, scale_tril=None,
                 lora=None, fixed: Mapping[str, torch.Tensor] | None = None, readout: Readout | None = None,
                 method: str = "svi"):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.site_names, self.shapes = list(site_names), [tuple(int(d) for d in s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.loc = torch.as_tensor(loc).detach().reshape(-1)
        if self.loc.numel() != sum(self.sizes):
            raise ValueError(f"loc has {self.loc.numel()} entries, the sites {sum(self.sizes)}")
        self.form = form
        self.tensors = {"loc": self.loc}
        need = {"diag": {"scale": scale}, "lowrank": {"cov_factor": cov_factor, "cov_diag": cov_diag},
                "full": {"scale_tril": scale_tril}}[form]
        for k, v in need.items():
            if v is None:
                raise ValueError(f"form={form!r} needs {k}=")
            self.tensors[k] = torch.as_tensor(v).detach().to(self.loc)
        self.lora, self.readout, self.method = lora, readout, method
        self.fixed = {k: v.detach().clone() for k, v in (fixed or {}).items()}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_guide(cls, guide, *, lora=None, fixed=None, readout=None) -> GaussianPosterior:
        """The Gaussian of a fitted autoguide (``AutoNormal``, ``AutoDiagonalNormal``, ``AutoDelta``,
        ``AutoLowRankMultivariateNormal``, ``AutoMultivariateNormal``) or a BLoB guide."""
        median = {k: v.detach() for k, v in guide.median().items()}
        names = list(median)
        loc = torch.cat([median[n].reshape(-1) for n in names])
        kw = dict(lora=lora, fixed=fixed, readout=readout)
        if hasattr(guide, "scales") and hasattr(guide, "distribution"):  # BLoB's guide
            scales = guide.scales()
            return cls(names, [median[n].shape for n in names], loc, "diag", method="blob",
                       scale=torch.cat([scales[n].detach().reshape(-1) for n in names]), **kw)
        _check_real(guide)
        shapes = [median[n].shape for n in names]
        if isinstance(guide, pyro.infer.autoguide.AutoDelta):
            return cls(names, shapes, loc, "diag", scale=torch.zeros_like(loc), **kw)
        if isinstance(guide, pyro.infer.autoguide.AutoNormal):
            q = guide.quantiles([_PHI1])
            scale = torch.cat([(q[n].detach().reshape(-1) - median[n].reshape(-1)) for n in names])
            return cls(names, shapes, loc, "diag", scale=scale.clamp_min(0), **kw)
        post = guide.get_posterior() if hasattr(guide, "get_posterior") else None
        if isinstance(post, dist.Independent) and isinstance(post.base_dist, dist.Normal):  # AutoDiagonal
            return cls(names, shapes, post.base_dist.loc, "diag", scale=post.base_dist.scale, **kw)
        if isinstance(post, dist.LowRankMultivariateNormal):
            return cls(names, shapes, post.loc, "lowrank", cov_factor=post.cov_factor,
                       cov_diag=post.cov_diag, **kw)
        if isinstance(post, dist.MultivariateNormal):
            return cls(names, shapes, post.loc, "full", scale_tril=post.scale_tril, **kw)
        raise NotImplementedError(f"{type(guide).__name__} is not a Gaussian guide this library can read "
                                  "(AutoNormal, AutoDelta, AutoLowRankMultivariateNormal, "
                                  "AutoMultivariateNormal, BLoBGuide); save draws instead")

    # ------------------------------------------------------------------ the distribution
    def _split(self, flat: torch.Tensor) -> Draw:
        parts = torch.split(flat, self.sizes, dim=-1)
        lead = flat.shape[:-1]
        return {n: p.reshape(*lead, *s) for n, p, s in zip(self.site_names, parts, self.shapes, strict=True)}

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> list[Draw]:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        t, d = self.tensors, self.loc.numel()
        eps = torch.randn(num_samples, d, generator=generator, dtype=self.loc.dtype)
        if self.form == "diag":
            x = self.loc + eps * t["scale"]
        elif self.form == "full":
            x = self.loc + eps @ t["scale_tril"].T
        else:
            w = torch.randn(num_samples, t["cov_factor"].shape[1], generator=generator, dtype=self.loc.dtype)
            x = self.loc + w @ t["cov_factor"].T + eps * t["cov_diag"].sqrt()
        split = self._split(x)
        return [{n: v[i] for n, v in split.items()} for i in range(num_samples)]

    def mean(self) -> Draw:
        return {n: v.clone() for n, v in self._split(self.loc).items()}

    def distribution(self) -> dist.Distribution:
        """The Gaussian over the flattened sites as a Pyro distribution."""
        t = self.tensors
        if self.form == "diag":
            return dist.Normal(self.loc, t["scale"]).to_event(1)
        if self.form == "full":
            return dist.MultivariateNormal(self.loc, scale_tril=t["scale_tril"])
        return dist.LowRankMultivariateNormal(self.loc, t["cov_factor"], t["cov_diag"])

    def log_prob(self, draw: Mapping[str, torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([torch.as_tensor(draw[n]).reshape(-1).to(self.loc) for n in self.site_names])
        return self.distribution().log_prob(flat)

    def as_guide(self):
        """A guide drawing the flattened Gaussian as one auxiliary site, then each site from it."""

        def guide(*args, **kwargs):
            flat = pyro.sample("_gaussian_flat", self.distribution(), infer={"is_auxiliary": True})
            return {n: pyro.sample(n, dist.Delta(v, event_dim=v.dim()))
                    for n, v in self._split(flat).items()}

        return guide

    # ------------------------------------------------------------------ files
    def save(self, path) -> Path:
        """``posterior.json`` + ``posterior.safetensors`` in the folder ``path``, atomically."""
        tensors = {f"q/{k}": v.contiguous() for k, v in self.tensors.items()}
        tensors.update({f"fixed/{k}": v.contiguous() for k, v in self.fixed.items()})
        info = {"format": "pyro_llm.posterior", "version": 1, "kind": "gaussian", "form": self.form,
                "method": self.method, "site_names": self.site_names,
                "shapes": [list(s) for s in self.shapes],
                "fixed": list(self.fixed)}
        with atomic_folder(path, owned=lambda n: n in (POSTERIOR_FILE, _TENSORS)) as tmp:
            save_safetensors(tmp / _TENSORS, tensors)
            write_json(tmp / POSTERIOR_FILE, info)
        return Path(path)

    @classmethod
    def load(cls, path, lora=None, readout: Readout | None = None) -> GaussianPosterior:
        path = Path(path)
        info = read_json(path / POSTERIOR_FILE, what="Gaussian posterior", fields={
            "kind": "str", "form": "str", "method": "str", "site_names": "list[str]", "shapes": "shapes",
            "fixed": "list[str]"})
        if info["kind"] != "gaussian" or info["form"] not in FORMS:
            raise FileFormatError(f"{path / POSTERIOR_FILE}: kind {info['kind']!r} / form {info['form']!r} "
                                  "is not a Gaussian posterior of this version")
        d = sum(math.prod(s) for s in info["shapes"])
        expect = {"q/loc": (d,), **{f"q/{k}": s for k, s in {
            "diag": {"scale": (d,)}, "full": {"scale_tril": (d, d)}, "lowrank": {"cov_diag": (d,)}}[
            info["form"]].items()}}
        t, _ = read_safetensors(path / _TENSORS, what="Gaussian posterior", expect=expect)
        fixed = read_fixed(path / _TENSORS, t, info["fixed"])
        if lora is not None:
            check_sites(lora, info["site_names"], info["shapes"], path)
        q = {k[2:]: v for k, v in t.items() if k.startswith("q/") and k != "q/loc"}
        return cls(info["site_names"], info["shapes"], t["q/loc"], info["form"], lora=lora, fixed=fixed,
                   readout=readout, method=info["method"], **q)


def read_fixed(f: Path, tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> Draw:
    """The ``fixed/<name>`` tensors a saved posterior lists, or an error naming the file."""
    missing = [n for n in names if f"fixed/{n}" not in tensors]
    if missing:
        raise FileFormatError(f"{f} lacks the point estimates {missing[:3]}; the file is damaged")
    return {n: tensors[f"fixed/{n}"] for n in names}


def _check_real(guide) -> None:
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        support = site["fn"].support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        if support is not constraints.real:
            raise NotImplementedError(f"site {name!r} has support {support}, not the real line: only "
                                      "guides over real-valued sites convert to a GaussianPosterior")
