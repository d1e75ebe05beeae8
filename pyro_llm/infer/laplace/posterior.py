"""``LaplacePosterior``: a Gaussian at the MAP over the same named sites as ``BayesianLoRA``.

It is a :class:`~pyro_llm.Posterior` (``sample`` / ``mean`` of ``{site: tensor}`` draws), so
``predict_probs``, ``to_arviz`` and the downstream regression take it as they take an SVI
guide; :attr:`LaplacePosterior.guide` is a Pyro guide for ``pyro.infer.Predictive``. The
prior is ``N(mu_0, 1/delta)`` per site (``mu_0`` zero, or where fine-tuning started);
:meth:`log_marginal_likelihood` is the Laplace evidence (Laplace-LoRA eq. 13) and
:meth:`optimize_prior_precision` maximises it over ``delta``, one value or one per group.
Saved with safetensors (tensors) and JSON (the rest); nothing is pickled.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints

from ..._io import (
    FileFormatError,
    atomic_folder,
    check_field,
    read_json,
    read_safetensors,
    save_safetensors,
    write_json,
)
from ...posterior import Draw, Posterior, check_sites
from .blocks import BLOCKS, DTYPE

__all__ = ["LaplacePosterior", "load_laplace", "prior_groups", "GROUPINGS"]

_FILES = ("laplace.safetensors", "laplace.json")


class LaplacePosterior(Posterior):
    """Laplace approximation ``N(theta_MAP, (H + delta)^-1)`` over named sites.

    Built by :func:`~pyro_llm.infer.laplace.fit_laplace`; ``blocks`` hold the curvature ``H``,
    ``prior_precision`` is ``delta`` (one value, or one per site), ``log_likelihood`` the
    training log-likelihood at the MAP over ``n_data`` examples.
    """

    def __init__(self, site_names, shapes, map_values, blocks, prior_precision, log_likelihood: float,
                 n_data: int, meta: dict, lora=None, prior_mean=None):
        self.site_names = list(site_names)
        self.shapes = [tuple(s) for s in shapes]
        self.map = {k: v.detach().clone() for k, v in map_values.items()}
        self.prior_mean = _prior_mean(self.site_names, self.shapes, prior_mean)
        self.blocks = list(blocks)
        self.log_likelihood, self.n_data, self.meta = float(log_likelihood), int(n_data), dict(meta)
        self.lora = lora
        self.logits_fn = None  # fit_laplace's logits_fn, the default of predict (not saved)
        self.marglik_trace: list[float] = []
        self.prior_precision = prior_precision

    # ------------------------------------------------------------------ prior
    @property
    def prior_precision(self) -> torch.Tensor:
        """Prior precision per site, shape ``(num_sites,)``."""
        return self._delta

    @prior_precision.setter
    def prior_precision(self, value) -> None:
        d = torch.as_tensor(value, dtype=DTYPE).detach().reshape(-1)
        if d.numel() not in (1, len(self.site_names)):
            raise ValueError(f"prior_precision needs 1 or {len(self.site_names)} values (one per site), "
                             f"got {d.numel()}")
        if not torch.isfinite(d).all() or (d <= 0).any():
            raise ValueError(f"prior_precision must be finite and > 0, got {d.tolist()[:4]}")
        self._delta = d.expand(len(self.site_names)).clone()

    def _d(self, delta=None) -> torch.Tensor:
        if delta is None:
            return self._delta
        d = torch.as_tensor(delta, dtype=DTYPE).reshape(-1)
        return d.expand(len(self.site_names)) if d.numel() == 1 else d

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def curvature_above_prior(self, delta=None) -> float:
        """The share of the posterior's directions where the data's curvature exceeds the prior
        precision: curvature eigenvalues (of every block: Kronecker products of the factors'
        eigenvalues, diagonal entries, or a full block's spectrum) above ``delta`` over the number
        of parameters. Near 0, the posterior is the prior in almost every direction and the
        predictive is set by the prior precision, not by the data."""
        d = self._d(delta)
        above = 0
        for b in self.blocks:
            level = float(d[b.sites].min())
            if b.kind == "kron":
                above += int((b.E > level).sum())
            elif b.kind == "diag":
                above += int((b.diag > level).sum())
            else:
                above += int((torch.linalg.eigvalsh(b.H) > level).sum())
        return above / self.num_parameters

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the curvature blocks."""
        return sum(t.numel() * t.element_size() for b in self.blocks for t in b.tensors().values())

    def log_det_ratio(self, delta=None) -> torch.Tensor:
        """``log det(H + delta) - log det(delta)``: the Occam factor's curvature part."""
        d = self._d(delta)
        post = sum(b.logdet(d[b.sites]) for b in self.blocks)
        prior = sum(math.prod(s) * torch.log(d[i]) for i, s in enumerate(self.shapes))
        return post - prior

    def log_marginal_likelihood(self, prior_precision=None) -> torch.Tensor:
        """Laplace evidence ``log p(y | theta*) + log p(theta*) + D/2 log 2 pi - 1/2 log det(H + delta)``."""
        d = self._d(prior_precision)
        scatter = sum(d[i] * (self.map[n].double() - self.prior_mean[n].to(self.map[n].device)).square().sum()
                      for i, n in enumerate(self.site_names))
        return self.log_likelihood - 0.5 * (self.log_det_ratio(d) + scatter)

    def optimize_prior_precision(self, per_site: bool = False, steps: int = 200, init=None,
                                 groups: str | None = None) -> torch.Tensor:
        """Maximise the marginal likelihood over ``log delta`` (L-BFGS with a strong-Wolfe line search).

        One value for all sites (``groups="one"``, the default), one per site (``"site"``, or
        ``per_site=True``) or one for the LoRA ``A`` sites, one for the ``B`` sites and one for any
        other (a head) (``"AB"``, see :func:`prior_groups`). Sets and returns the prior precision;
        ``marglik_trace`` holds the objective at each evaluation. (Adam at lr 0.1, the Laplace-LoRA
        recipe, crawls here: the gradient shrinks by orders of magnitude on the way from a poor
        start, and Adam's second-moment memory keeps its steps small.)
        """
        index = prior_groups(self.site_names, "site" if per_site else (groups or "one"))
        start = (self._delta if init is None else self._d(init)).log()
        k = int(index.max()) + 1
        log_d = torch.stack([start[index == g].mean() for g in range(k)]).clone().requires_grad_()
        opt = torch.optim.LBFGS([log_d], lr=1.0, max_iter=steps, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")
        trace: list[float] = []

        def closure():
            opt.zero_grad()
            loss = -self.log_marginal_likelihood(log_d.exp()[index])
            loss.backward()
            trace.append(-loss.item())
            return loss

        opt.step(closure)
        self.prior_precision = log_d.detach().exp()[index]
        self.marglik_trace = trace + [float(self.log_marginal_likelihood())]
        return self.prior_precision

    # ------------------------------------------------------------------ draws
    def deviations(self, num_samples: int, generator: torch.Generator | None = None
                   ) -> dict[str, torch.Tensor]:
        """``num_samples`` draws of ``theta - theta_MAP``, stacked per site ``(S, *shape)``."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        out = {}
        for b in self.blocks:
            for i, x in zip(b.sites, b.sample(self._delta[b.sites], num_samples, generator), strict=True):
                out[self.site_names[i]] = x
        return out

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> list[Draw]:
        dev = self.deviations(num_samples, generator)
        stacked = {n: self.map[n] + dev[n].to(self.map[n]) for n in self.site_names}
        return [{n: v[s] for n, v in stacked.items()} for s in range(num_samples)]

    def mean(self) -> Draw:
        return {n: v.clone() for n, v in self.map.items()}

    def functional_variance(self, jacobians: dict[str, torch.Tensor], split: bool = False):
        """``J Sigma J^T`` (B, C, C) from per-site Jacobians ``(B, C, *shape)`` of the logits.

        With ``split``, also the part of it from the prior-ruled directions: those where the
        data's curvature is below the prior precision (in each block's eigenbasis relative to its
        prior), so the posterior variance there is more than half the prior's."""
        parts = [b.variance([jacobians[self.site_names[i]] for i in b.sites], self._delta[b.sites],
                            split=split) for b in self.blocks]
        if not split:
            return sum(parts)
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def guide(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """A Pyro guide drawing every site (arguments are ignored): use with ``Predictive``."""
        out = {}
        for j, b in enumerate(self.blocks):
            names = [self.site_names[i] for i in b.sites]
            if b.kind != "full":
                out[names[0]] = pyro.sample(names[0], _BlockNormal(self, b))
                continue
            flat = pyro.sample(f"_laplace_block{j}", _BlockNormal(self, b), infer={"is_auxiliary": True})
            for n, x in zip(names, b._split(flat), strict=True):
                out[n] = pyro.sample(n, dist.Delta(x.to(self.map[n]), event_dim=x.dim()))
        return out

    def predict(self, data, num_samples: int = 100, *, readout=None, pred_type: str = "glm",
                link: str = "mc", logits_fn=None, progress: bool = True, seed: int | None = 0,
                **_) -> torch.Tensor:
        """Predictive class probabilities ``(S, N, C)``; see :func:`~.predictive.laplace_predict`.
        ``num_samples`` are draws of the linearised logits (``pred_type="glm"``, cheap: one forward
        and the Jacobian per batch) or of the weights (``"nn"``: one forward per draw)."""
        from .predictive import laplace_predict

        if readout is not None:
            logits_fn = readout.logits
        elif logits_fn is None and self.readout is not None:
            logits_fn = self.readout.logits
        return laplace_predict(self, data, pred_type=pred_type, link=link, num_samples=num_samples,
                               logits_fn=logits_fn, progress=progress, seed=seed)

    def as_guide(self):
        """:meth:`guide`: every site drawn from the Gaussian (full blocks jointly)."""
        return self.guide

    def log_prob(self, draw) -> torch.Tensor:
        """Log density of ``draw`` (every site) under ``N(theta_MAP, (H + delta)^-1)``."""
        total = torch.zeros((), dtype=DTYPE)
        for b in self.blocks:
            d = _BlockNormal(self, b)
            names = [self.site_names[i] for i in b.sites]
            value = (torch.cat([torch.as_tensor(draw[n]).reshape(-1) for n in names]) if d.flat
                     else torch.as_tensor(draw[names[0]]))
            total = total + d.log_prob(value.to(DTYPE)).to(DTYPE)
        return total

    # ------------------------------------------------------------------ files
    def save(self, path) -> Path:
        """Write ``laplace.safetensors`` and ``laplace.json`` into the folder ``path``, atomically
        as a pair (other files in the folder are kept)."""
        tensors = {f"map.{i}": self.map[n].contiguous() for i, n in enumerate(self.site_names)}
        tensors["prior_precision"] = self._delta.contiguous()
        tensors.update({f"prior_mean.{i}": self.prior_mean[n].contiguous()
                        for i, n in enumerate(self.site_names) if self.prior_mean[n].any()})
        for j, b in enumerate(self.blocks):
            tensors.update({f"block{j}.{k}": t.contiguous() for k, t in b.tensors().items()})
        info = dict(site_names=self.site_names, shapes=self.shapes, log_likelihood=self.log_likelihood,
                    n_data=self.n_data, meta=self.meta, blocks=[[b.kind, b.sites] for b in self.blocks])
        with atomic_folder(path, owned=lambda name: name in _FILES) as tmp:
            save_safetensors(tmp / _FILES[0], tensors)
            write_json(tmp / _FILES[1], info)
        return Path(path)


_FIELDS = {"site_names": "list[str]", "shapes": "shapes", "log_likelihood": "float", "n_data": "int>=0",
           "meta": "dict", "blocks": "list"}


GROUPINGS = ("one", "AB", "site")


def prior_groups(site_names: list[str], how: str) -> torch.Tensor:
    """The prior-precision group of each site, ``(num_sites,)`` indices from 0: ``"one"`` (one
    group), ``"site"`` (a group per site) or ``"AB"`` (the LoRA ``A`` sites, the ``B`` sites and
    any other site such as a head: one group each, numbered in that order, empty ones skipped)."""
    if how not in GROUPINGS:
        raise ValueError(f"prior groups must be one of {GROUPINGS}, got {how!r}")
    if how == "one":
        return torch.zeros(len(site_names), dtype=torch.long)
    if how == "site":
        return torch.arange(len(site_names))
    kind = ["A" if "lora_A" in n else "B" if "lora_B" in n else "other" for n in site_names]
    order = [k for k in ("A", "B", "other") if k in kind]
    return torch.tensor([order.index(k) for k in kind])


def _prior_mean(names, shapes, given) -> dict[str, torch.Tensor]:
    """Per-site prior means (float64, zeros where ``given`` has none), shapes checked."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"prior_mean names {unknown[:3]} that are not sites; the sites are {names[:3]}...")
    out = {}
    for n, s in zip(names, shapes, strict=True):
        m = given.get(n)
        m = torch.zeros(s, dtype=DTYPE) if m is None else torch.as_tensor(m).detach().to("cpu", DTYPE)
        if tuple(m.shape) != tuple(s):
            raise ValueError(f"prior_mean[{n!r}] has shape {tuple(m.shape)}, the site has {tuple(s)}")
        out[n] = m
    return out


def load_laplace(path, lora=None) -> LaplacePosterior:
    """Read a :meth:`LaplacePosterior.save` folder; ``lora`` (a ``BayesianLoRA``) enables ``predict``.

    Both files are checked before use: ``laplace.json`` field by field, every tensor's name and
    shape against it, NaN / inf, and, with ``lora``, the sites and their shapes against the
    model's; a damaged or tampered file is a :class:`~pyro_llm._io.FileFormatError` naming it.
    """
    path = Path(path)
    missing = [f for f in _FILES if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a saved Laplace posterior: {missing} missing")
    jf, tf = path / _FILES[1], path / _FILES[0]
    info = read_json(jf, what="Laplace posterior", fields=_FIELDS)
    names, shapes = info["site_names"], [tuple(s) for s in info["shapes"]]
    if len(shapes) != len(names) or len(set(names)) != len(names) or not names:
        raise FileFormatError(f"{jf}: {len(names)} site_names (distinct, at least one) need as many "
                              f"shapes, got {len(shapes)}; the file is damaged")
    if lora is not None:
        check_sites(lora, names, shapes, path)
    expect = {f"map.{i}": s for i, s in enumerate(shapes)} | {"prior_precision": (len(names),)}
    t, _ = read_safetensors(tf, what="Laplace posterior", expect=expect)
    if (t["prior_precision"] <= 0).any():
        raise FileFormatError(f"{tf}: tensor 'prior_precision' must be > 0, got "
                              f"{t['prior_precision'].tolist()[:4]}; the file is damaged")
    blocks = []
    for j, kind, sites, bt in _block_entries(jf, info["blocks"], t, len(names)):
        _check_block(tf, j, kind, [shapes[i] for i in sites], bt)
        blocks.append(BLOCKS[kind].from_tensors(sites, [shapes[i] for i in sites], bt))
    means = {n: t[f"prior_mean.{i}"] for i, n in enumerate(names) if f"prior_mean.{i}" in t}
    for i, n in enumerate(names):
        if n in means and tuple(means[n].shape) != shapes[i]:
            raise FileFormatError(f"{tf}: tensor 'prior_mean.{i}' has shape {tuple(means[n].shape)}, "
                                  f"expected {shapes[i]} (the site {n!r}); the file is damaged")
    return LaplacePosterior(names, shapes, {n: t[f"map.{i}"] for i, n in enumerate(names)}, blocks,
                            t["prior_precision"], info["log_likelihood"], info["n_data"], info["meta"],
                            lora=lora, prior_mean=means)


def _block_entries(jf, entries, t, num_sites):
    """``(j, kind, sites, tensors)`` per block of ``laplace.json``; every site in exactly one block."""
    seen = []
    for j, e in enumerate(entries):
        ok = isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and e[0] in BLOCKS \
            and check_field(e[1], "list[int]") and all(0 <= i < num_sites for i in e[1]) \
            and (len(e[1]) >= 1 if e[0] == "full" else len(e[1]) == 1)
        if not ok:
            raise FileFormatError(f"{jf}: blocks[{j}] is {e!r}, expected [kind, sites] with kind one of "
                                  f"{sorted(BLOCKS)} and site indices below {num_sites}; the file is "
                                  "damaged")
        seen += e[1]
        yield j, e[0], e[1], {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(f"block{j}.")}
    if sorted(seen) != list(range(num_sites)):
        raise FileFormatError(f"{jf}: the blocks cover the sites {sorted(seen)}, not each of the "
                              f"{num_sites} sites once; the file is damaged")


def _check_block(tf, j, kind, shapes, bt) -> None:
    """The block's tensors are there with shapes that fit its sites' shapes."""
    size = sum(math.prod(s) for s in shapes)
    if kind == "kron":  # QG (out, kG), lG (kG,), QA (in, kA), lA (kA,), k <= the side
        ok = len(shapes[0]) == 2 and all(k in bt for k in ("QG", "lG", "QA", "lA"))
        for q, lam, side in (("QG", "lG", 0), ("QA", "lA", 1)):
            ok = ok and bt[lam].dim() == 1 and tuple(bt[q].shape) == (shapes[0][side], len(bt[lam])) \
                and len(bt[lam]) <= shapes[0][side]
        if not ok:
            got = {k: tuple(v.shape) for k, v in bt.items()}
            raise FileFormatError(f"{tf}: the kron block {j} over a site of shape {shapes[0]} has tensors "
                                  f"{got}, expected QG (out, kG), lG (kG,), QA (in, kA), lA (kA,); the "
                                  "file is damaged")
        return
    want = {"H": (size, size)} if kind == "full" else {"diag": tuple(shapes[0])}
    for k, shape in want.items():
        if k not in bt or tuple(bt[k].shape) != shape:
            got = tuple(bt[k].shape) if k in bt else "missing"
            raise FileFormatError(f"{tf}: tensor 'block{j}.{k}' of the {kind} block over shape(s) {shapes} "
                                  f"is {got}, expected {shape}; the file is damaged")


class _BlockNormal(TorchDistribution):
    """The Gaussian of one block as a Pyro distribution (event = the site, or the flat block)."""

    arg_constraints: dict = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, post: LaplacePosterior, block, validate_args=None):
        self.post, self.block = post, block
        names = [post.site_names[i] for i in block.sites]
        self.loc = [post.map[n] for n in names]
        self.flat = block.kind == "full"
        event = (sum(v.numel() for v in self.loc),) if self.flat else tuple(self.loc[0].shape)
        super().__init__(torch.Size(), torch.Size(event), validate_args=validate_args)

    def rsample(self, sample_shape=()):
        sample_shape = torch.Size(sample_shape)
        n = math.prod(sample_shape) if len(sample_shape) else 1
        dev = self.block.sample(self.post.prior_precision[self.block.sites], n)
        x = [(loc + d.to(loc)) for loc, d in zip(self.loc, dev, strict=True)]
        x = torch.cat([xi.flatten(1) for xi in x], 1) if self.flat else x[0]
        return x.reshape(*sample_shape, *self.event_shape)

    def log_prob(self, value):
        delta = self.post.prior_precision[self.block.sites]
        if self.flat:
            dev = [v - loc.to(v) for v, loc in zip(self.block._split(value), self.loc, strict=True)]
        else:
            dev = [value - self.loc[0].to(value)]
        D = self.event_shape.numel()
        q = self.block.mahalanobis(dev, delta)
        return (-0.5 * (q + D * math.log(2 * math.pi) - self.block.logdet(delta))).to(value.dtype)
