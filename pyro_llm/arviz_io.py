"""Posterior draws and predictions to ArviZ, built with ``az.from_dict``.

**Draws and chains.** Every posterior here (an SVI guide, Laplace, an ensemble, BLoB's
guide, PoLAR-VBLL's last layer) gives independent draws, not a Markov chain. The S draws
are laid out in ``chains`` equal chains in the order drawn, chain-major: draw ``s`` sits at
``(chain, draw) = (s // D, s % D)`` with ``D = S / chains``, so ``.values.reshape(S, ...)``
gives them back in order. ``r_hat`` and ``ess_bulk`` of such draws are a check of the export
and of the draws (every chain from one distribution, draws uncorrelated: r_hat near 1, ESS
near S), not of MCMC mixing.

**Names.** ArviZ variable names are short and unique (:func:`short_site_names`): the peft
parameter ``base_model.model.encoder.layer.0.attention.self.query.lora_B.default.weight``
becomes ``layer0.query.B``; other sites keep their names. Each variable's ``attrs["site"]``
holds the full Pyro site name. A LoRA matrix is not exported entry by entry but summarised:

* ``<name>:norm`` -- the Frobenius norm of each drawn matrix;
* ``<layer>:delta_norm`` (when a ``lora`` is known) -- the Frobenius norm of each draw's
  weight update ``scaling * B @ A`` of one LoRA layer (``layer0.query:delta_norm``).

Raw matrices are exported only for the sites named in ``var_names``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .metrics import as_labels
from .posterior import stack_draws
from .site_names import short_site_names

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["to_arviz", "is_lora_site", "short_site_names", "DEFAULT_DRAWS"]

DEFAULT_DRAWS = 400  # draws taken from a posterior object when num_samples is not given
_CHUNK_NUMBERS = 2**24  # numbers held at once while drawing from a posterior


def is_lora_site(name: str) -> bool:
    """Whether a site name is a peft LoRA matrix (``.lora_A.`` or ``.lora_B.`` in it)."""
    return ".lora_A." in name or ".lora_B." in name


# ------------------------------------------------------------------ draws
def _as_stacked(draws) -> dict[str, torch.Tensor]:
    if isinstance(draws, Mapping):
        stacked = {k: torch.as_tensor(v) for k, v in draws.items()}
    elif isinstance(draws, Sequence) and not isinstance(draws, (str, bytes)):
        if not draws:
            raise ValueError("no draws: the list of draws is empty")
        if not all(isinstance(d, Mapping) for d in draws):
            raise TypeError("every draw must be a {site: tensor} dict")
        keys = set(draws[0])
        if any(set(d) != keys for d in draws):
            raise ValueError("every draw must hold the same sites")
        stacked = stack_draws([{k: torch.as_tensor(v) for k, v in d.items()} for d in draws])
    else:
        raise TypeError("draws must be a list of {site: tensor} dicts, a dict of stacked (S, ...) "
                        "tensors or a posterior with sample(num_samples); got "
                        f"{type(draws).__name__}")
    if not stacked:
        raise ValueError("no draws: there are no sites")
    sizes = {k: (v.shape[0] if v.dim() else None) for k, v in stacked.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"every site needs the same leading draw axis S; got sizes {sizes}")
    if next(iter(sizes.values())) == 0:
        raise ValueError("no draws: S = 0")
    return {k: v.detach().cpu() for k, v in stacked.items()}


def _resolve(draws, lora):
    """(draws or a posterior, the BayesianLoRA, fixed point values by site) from any input."""
    fixed = {}
    inner = getattr(draws, "posterior", None)
    if not callable(getattr(draws, "sample", None)) and callable(getattr(inner, "sample", None)):
        estimates = getattr(draws, "point_estimates", None)  # BLoB: B and the head, fitted
        fixed = dict(estimates()) if callable(estimates) else {}
        lora = lora if lora is not None else getattr(draws, "lora", None)
        draws = inner
    if callable(getattr(draws, "sample", None)):  # a Posterior carries its lora and point estimates
        lora = lora if lora is not None else getattr(draws, "lora", None)
        fixed = {**dict(getattr(draws, "fixed", None) or {}), **fixed}
    if lora is not None and not hasattr(lora, "lora_names"):
        lora = None
    return draws, lora, fixed


def _chunks(post, s: int, seed: int, reduce) -> list[dict[str, np.ndarray]]:
    """``reduce`` applied to ``s`` draws of ``post``, drawn a bounded number at a time."""
    out, done, size = [], 0, min(s, 8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        while done < s:
            k = min(size, s - done)
            drawn = post.sample(k)
            if not isinstance(drawn, Sequence) or len(drawn) != k:
                raise TypeError(f"{type(post).__name__}.sample({k}) must return a list of {k} "
                                f"{{site: tensor}} dicts, got {type(drawn).__name__}")
            stacked = _as_stacked(drawn)
            out.append(reduce(stacked))
            done += k
            per_draw = sum(v[0].numel() for v in stacked.values())
            size = max(1, min(256, _CHUNK_NUMBERS // max(per_draw, 1)))
    return out


def _num_chains(s: int, chains: int | None) -> int:
    if chains is not None:
        if int(chains) < 1 or s % int(chains):
            raise ValueError(f"chains must be >= 1 and divide the S = {s} draws, got {chains}")
        return int(chains)
    if s == 1:
        return 1
    if s % 4 == 0 and s >= 16:
        return 4
    if s % 2 == 0 and s >= 4:
        return 2
    warnings.warn(f"S = {s} draws cannot be split into equal chains of 2 or more draws: exported "
                  "as 1 chain, so r_hat is undefined; use an even number of draws, at least 4",
                  stacklevel=3)
    return 1


# ------------------------------------------------------------------ variables
def _np(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    return (x.double() if x.is_floating_point() else x).numpy()


def _delta_norms(lora, stacked, fixed, names) -> dict[str, np.ndarray]:
    """Per LoRA layer: ``||scaling * B @ A||_F`` for each draw, via the r x r Gram matrices."""
    import pyro

    store = pyro.get_param_store()
    s = next(iter(stacked.values())).shape[0]

    def value(peft_name):
        site = lora.site_name(peft_name)
        if site in stacked:
            return stacked[site].double()
        value = fixed.get(site, store[site] if site in store else None)
        value = lora.peft_model.get_parameter(peft_name) if value is None else value
        return value.detach().cpu().double().expand(s, *value.shape)

    out = {}
    for a_name, b_name in zip(lora.lora_names[0::2], lora.lora_names[1::2], strict=True):  # (A, B) per layer
        if lora.site_name(a_name) not in stacked and lora.site_name(b_name) not in stacked:
            continue  # neither matrix is random: the update is a constant
        mod_name = a_name.rsplit(".lora_A.", 1)[0]
        a, b = value(a_name), value(b_name)  # (S, r, in), (S, out, r)
        gram = (a @ a.transpose(-1, -2) * (b.transpose(-1, -2) @ b)).sum((-1, -2))
        layer = lora.peft_model.get_submodule(mod_name)
        scaling = float(getattr(layer, "scaling", {}).get(lora.adapter_name, 1.0))
        out[f"{names[lora.site_name(mod_name)]}:delta_norm"] = _np(abs(scaling) * gram.clamp_min(0).sqrt())
    return out


def _variables(stacked, names, lora_sites, raw, lora_summary) -> dict[str, np.ndarray]:
    out = {}
    for site, v in stacked.items():
        if site in lora_sites or is_lora_site(site):
            if lora_summary == "norm":
                flat = v.double().reshape(v.shape[0], -1)
                out[f"{names[site]}:norm"] = _np(torch.linalg.vector_norm(flat, dim=-1))
            if site not in raw:
                continue
        out[names[site]] = _np(v)
    return out


def _names(sites, lora, short: bool) -> dict[str, str]:
    """Variable names for the drawn sites and, with a ``lora``, its layers (``<A name> - .A``)."""
    a_sites = [lora.site_name(n) for n in lora.lora_names[0::2]] if lora is not None else []
    names = short_site_names([*sites, *a_sites]) if short else {s: s for s in [*sites, *a_sites]}
    for a_site in a_sites:
        module = a_site.rsplit(".lora_A.", 1)[0]
        name = names[a_site]
        names[module] = name[:-2] if short and name != a_site and name.endswith(".A") else module
    return names


def _site_attrs(names) -> dict[str, dict[str, str]]:
    attrs = {}
    for site, name in names.items():
        attrs[name] = {"site": site}
        attrs[f"{name}:norm"] = {"site": site, "summary": "Frobenius norm of the matrix"}
        attrs[f"{name}:delta_norm"] = {"site": site,
                                       "summary": "Frobenius norm of the update scaling * B @ A"}
    return attrs


# ------------------------------------------------------------------ export
def to_arviz(draws, *, num_samples: int | None = None, chains: int | None = None, lora=None,
             sample_probs=None, y=None, obs_name: str = "y", var_names: Sequence[str] | None = None,
             lora_summary: str | None = "norm", short_names: bool = True, coords=None, dims=None,
             seed: int = 0):
    """Posterior draws (and class predictions) as an ArviZ object, in several chains.

    Parameters
    ----------
    draws:
        Any posterior with ``sample(num_samples) -> [{site: tensor}, ...]``
        (:class:`~pyro_llm.GuidePosterior`, :class:`~pyro_llm.LaplacePosterior`,
        :class:`~pyro_llm.EnsemblePosterior`, :class:`~pyro_llm.PolarVBLL`), a result holding
        one as ``.posterior`` (:class:`~pyro_llm.BLoBResult`: its fitted ``B`` enter the
        update norms), S draws as a list of ``{site: tensor}`` dicts, or a dict of stacked
        ``(S, ...)`` tensors (:func:`~pyro_llm.stack_draws`).
    num_samples:
        Draws taken from a posterior: by default ``sample_probs``' S when given, else
        ``DEFAULT_DRAWS`` (400; an ensemble: its M members, in order, once each; with
        ``num_samples`` an ensemble is resampled with replacement; a point posterior, ``degenerate``
        like MAP or temperature scaling: its one draw). Drawn under ``seed``
        without touching the global RNG, a bounded number at a time, and reduced to the
        exported variables as they come. Fresh draws are not those under which
        ``sample_probs`` were computed: pass those draws as a list to keep them paired.
    chains:
        Equal chains to split the S draws into (in order, chain-major; see the module
        docstring). Default 4 when S is a multiple of 4 and at least 16, else 2 when S is
        even and at least 4, else 1 (with a warning). ``r_hat`` / ``ess_bulk`` of these independent draws
        check the export and the draws, not MCMC mixing.
    lora:
        The :class:`~pyro_llm.BayesianLoRA` (default: the posterior's ``.lora``, if any); its
        sites count as LoRA sites, and each LoRA layer's update norm ``||scaling * B @ A||_F``
        is added as ``<layer>:delta_norm`` (a matrix that is not drawn is read from the
        posterior's ``fixed`` point estimates, else the param store, else the peft model).
    sample_probs, y:
        Class probabilities ``(S, N, C)`` under the same draws (:func:`~pyro_llm.predict_probs`)
        and integer labels ``(N,)``. Give ``log_likelihood[obs_name]`` (``log p(y_n | draw s)``,
        dims ``(chain, draw, obs)``, for ``az.loo``), ``posterior_predictive[obs_name]`` (one
        label per draw and example) and ``observed_data[obs_name]``, in the same chains.
    var_names:
        LoRA matrix sites (site or short names) to export raw as well (other sites always are).
    lora_summary:
        ``"norm"`` (default) for the ``:norm`` summaries, ``None`` for none.
    short_names:
        Short variable names (:func:`short_site_names`, default) or the site names themselves.
        Either way ``attrs["site"]`` of each variable holds its site name.
    coords, dims:
        Passed to ``az.from_dict`` (keyed by variable name); the data axis is named ``"obs"``.
    seed:
        Seed for drawing from a posterior and for the posterior predictive labels.

    Returns
    -------
    ``arviz.InferenceData`` (arviz < 1) or ``DataTree`` (arviz >= 1).

    Example
    -------
    >>> import torch
    >>> draws = [{"head.sigma": torch.rand(()), "head.coef": torch.randn(3)} for _ in range(8)]
    >>> probs = torch.softmax(torch.randn(8, 5, 2), -1)
    >>> idata = to_arviz(draws, sample_probs=probs, y=torch.tensor([0, 1, 1, 0, 1]))
    >>> idata.posterior["head.coef"].shape  # 2 chains of 4 draws
    (2, 4, 3)
    >>> idata.log_likelihood["y"].dims
    ('chain', 'draw', 'obs')
    """
    if lora_summary not in ("norm", None):
        raise ValueError(f"lora_summary must be 'norm' or None, got {lora_summary!r}")
    source, lora, fixed = _resolve(draws, lora)
    state = {}

    def reduce(stacked):
        if not state:  # names and the raw set from the first draws
            state.update(sites=set(stacked), names=_names(stacked, lora, short_names))
            state.update(raw=_raw_sites(var_names, state["names"], stacked),
                         lora_sites=set(lora.site_names) if lora is not None else set())
        elif set(stacked) != state["sites"]:
            raise ValueError("every draw must hold the same sites")
        out = _variables(stacked, state["names"], state["lora_sites"], state["raw"], lora_summary)
        if lora is not None and lora_summary == "norm":
            out.update(_delta_norms(lora, stacked, fixed, state["names"]))
        return out

    parts = _collect(source, num_samples, sample_probs, seed, reduce)
    posterior = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    s = next(iter(posterior.values())).shape[0]
    c = _num_chains(s, chains)
    groups = {"posterior": {k: v.reshape(c, s // c, *v.shape[1:]) for k, v in posterior.items()}}
    groups.update(_prediction_groups(sample_probs, y, s, c, obs_name, seed))
    if obs_name in groups["posterior"] and len(groups) > 1:
        raise ValueError(f"obs_name {obs_name!r} is also a variable name; choose another obs_name")
    dims = {**({obs_name: ["obs"]} if len(groups) > 1 else {}), **(dims or {})}
    idata = _from_dict(groups, coords=coords, dims=dims)
    attrs = _site_attrs(state["names"])
    for name in groups["posterior"]:
        idata.posterior[name].attrs.update(attrs.get(name, {}))
    return idata


def _collect(source, num_samples, sample_probs, seed: int, reduce) -> list[dict[str, np.ndarray]]:
    """The exported variables of every draw, in chunks: a list of ``{name: (k, ...)}``."""
    if not callable(getattr(source, "sample", None)):
        return [reduce(_as_stacked(source))]
    members = getattr(source, "members", None)
    if num_samples is None and isinstance(members, list) and members:
        return [reduce(_as_stacked(members))]  # an ensemble: every member once, in order
    shape = getattr(sample_probs, "shape", None)
    default = 1 if getattr(source, "degenerate", False) is True else DEFAULT_DRAWS  # a point: 1 draw
    s = num_samples if num_samples is not None else (
        int(shape[0]) if shape is not None and len(shape) == 3 else default)
    if int(s) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return _chunks(source, int(s), seed, reduce)


def _raw_sites(var_names, names: dict[str, str], sites) -> set[str]:
    by_name = {names[s]: s for s in sites}
    raw = {by_name.get(v, v) for v in (var_names or ())}
    unknown = sorted(raw - set(sites))
    if unknown:
        raise ValueError(f"var_names {unknown} are not among the drawn sites {sorted(sites)[:6]}...")
    return raw


def _prediction_groups(sample_probs, y, s: int, c: int, obs_name: str, seed: int) -> dict:
    out = {}
    if y is not None:
        y = as_labels(y, "y")  # NaN (an unlabelled row) or fractions: an error naming the rows
        if y.dim() != 1:
            raise ValueError(f"y must be a 1-d tensor of integer labels, got {tuple(y.shape)}")
        out["observed_data"] = {obs_name: _np(y)}
    if sample_probs is None:
        return out
    p = torch.as_tensor(sample_probs).detach().cpu().double()
    if p.dim() != 3:
        raise ValueError(f"sample_probs must have shape (S, N, C), got {tuple(p.shape)}")
    if p.shape[0] != s:
        raise ValueError(f"sample_probs has {p.shape[0]} draws but draws has S = {s}; "
                         "predict under the same draws")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("sample_probs must be finite and non-negative")
    if y is not None:
        if y.shape[0] != p.shape[1]:
            raise ValueError(f"y has {y.shape[0]} labels but sample_probs has N = {p.shape[1]}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= p.shape[2]):
            raise ValueError(f"y must lie in [0, {p.shape[2] - 1}], got range "
                             f"[{int(y.min())}, {int(y.max())}]")
        ll = p.gather(-1, y.expand(s, -1).unsqueeze(-1)).squeeze(-1).clamp_min(1e-300).log()
        out["log_likelihood"] = {obs_name: _np(ll).reshape(c, s // c, -1)}
    gen = torch.Generator().manual_seed(seed)
    pred = torch.multinomial(p.reshape(-1, p.shape[2]), 1, generator=gen).reshape(s, -1)
    out["posterior_predictive"] = {obs_name: _np(pred).reshape(c, s // c, -1)}
    return out


def _from_dict(groups: dict, coords, dims):
    if "posterior" in inspect.signature(az.from_dict).parameters:  # arviz < 1: InferenceData
        return az.from_dict(**groups, coords=coords, dims=dims)
    return az.from_dict(groups, coords=coords, dims=dims)  # arviz >= 1: DataTree
