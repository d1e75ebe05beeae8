"""Posterior draws and predictions to ArviZ, built with ``az.from_dict`` (one chain).

Variable names are the Pyro site names. A LoRA matrix site (peft name containing
``.lora_A.`` or ``.lora_B.``) is not exported entry by entry but summarised:

* ``<site>:norm`` -- the Frobenius norm of each drawn matrix;
* ``<prefix><lora module>:delta_norm`` (when ``lora`` is given) -- the Frobenius norm of
  each draw's weight update ``scaling * B @ A`` of one LoRA layer.

Raw matrices are exported only for the sites named in ``var_names``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .metrics import as_labels
from .posterior import Posterior, stack_draws

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["to_arviz", "is_lora_site"]


def is_lora_site(name: str) -> bool:
    """Whether a site name is a peft LoRA matrix (``.lora_A.`` or ``.lora_B.`` in it)."""
    return ".lora_A." in name or ".lora_B." in name


def _as_stacked(draws, num_samples) -> dict[str, torch.Tensor]:
    if isinstance(draws, Posterior):
        if num_samples is None:
            raise ValueError("pass num_samples= to draw from a Posterior")
        draws = draws.sample(num_samples)
    if isinstance(draws, Mapping):
        stacked = {k: torch.as_tensor(v) for k, v in draws.items()}
    elif isinstance(draws, Sequence) and not isinstance(draws, (str, bytes)):
        if not draws:
            raise ValueError("no draws: the list of draws is empty")
        keys = set(draws[0])
        if any(set(d) != keys for d in draws):
            raise ValueError("every draw must hold the same sites")
        stacked = stack_draws([{k: torch.as_tensor(v) for k, v in d.items()} for d in draws])
    else:
        raise TypeError("draws must be a list of {site: tensor} dicts, a dict of stacked "
                        f"(S, ...) tensors or a Posterior; got {type(draws).__name__}")
    if not stacked:
        raise ValueError("no draws: there are no sites")
    sizes = {k: (v.shape[0] if v.dim() else None) for k, v in stacked.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"every site needs the same leading draw axis S; got sizes {sizes}")
    if next(iter(sizes.values())) == 0:
        raise ValueError("no draws: S = 0")
    return {k: v.detach().cpu() for k, v in stacked.items()}


def _np(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    return (x.double() if x.is_floating_point() else x).numpy()


def _delta_norms(lora, stacked: dict[str, torch.Tensor], s: int) -> dict[str, np.ndarray]:
    """Per LoRA layer: ``||scaling * B @ A||_F`` for each draw, via the r x r Gram matrices."""
    import pyro

    store = pyro.get_param_store()

    def value(peft_name):
        site = lora.site_name(peft_name)
        if site in stacked:
            return stacked[site].double()
        fixed = store[site] if site in store else lora.peft_model.get_parameter(peft_name)
        return fixed.detach().cpu().double().expand(s, *fixed.shape)

    out = {}
    for a_name, b_name in zip(lora.lora_names[0::2], lora.lora_names[1::2], strict=True):  # (A, B) per layer
        if lora.site_name(a_name) not in stacked and lora.site_name(b_name) not in stacked:
            continue  # neither matrix is random: the update is a constant
        mod_name = a_name.rsplit(".lora_A.", 1)[0]
        a, b = value(a_name), value(b_name)  # (S, r, in), (S, out, r)
        gram = (a @ a.transpose(-1, -2) * (b.transpose(-1, -2) @ b)).sum((-1, -2))
        layer = lora.peft_model.get_submodule(mod_name)
        scaling = float(getattr(layer, "scaling", {}).get(lora.adapter_name, 1.0))
        out[f"{lora.site_name(mod_name)}:delta_norm"] = _np(abs(scaling) * gram.clamp_min(0).sqrt())
    return out


def to_arviz(draws, *, num_samples: int | None = None, lora=None, sample_probs=None, y=None,
             obs_name: str = "y", var_names: Sequence[str] | None = None,
             lora_summary: str | None = "norm", coords=None, dims=None, seed: int = 0):
    """Posterior draws (and class predictions) as an ArviZ object with one chain.

    Parameters
    ----------
    draws:
        S draws as a list of ``{site: tensor}`` dicts (``GuidePosterior(guide).sample(S)``),
        a dict of stacked ``(S, ...)`` tensors (:func:`~pyro_llm.stack_draws`), or a
        :class:`~pyro_llm.Posterior` together with ``num_samples``.
    lora:
        The :class:`~pyro_llm.BayesianLoRA`; its sites count as LoRA sites, and each LoRA
        layer's update norm ``||scaling * B @ A||_F`` is added as ``<layer>:delta_norm``.
    sample_probs, y:
        Class probabilities ``(S, N, C)`` under the same draws (:func:`~pyro_llm.predict_probs`)
        and integer labels ``(N,)``. Give ``log_likelihood[obs_name]`` (``log p(y_n | draw s)``,
        dims ``(chain, draw, obs)``, for ``az.loo``), ``posterior_predictive[obs_name]`` (one
        label per draw and example) and ``observed_data[obs_name]``.
    var_names:
        LoRA matrix sites to export raw as well (other sites are always exported as-is).
    lora_summary:
        ``"norm"`` (default) for the ``<site>:norm`` summaries, ``None`` for none.
    coords, dims:
        Passed to ``az.from_dict``; the data axis is named ``"obs"``.
    seed:
        Seed for the posterior predictive labels.

    Returns
    -------
    ``arviz.InferenceData`` (arviz < 1) or ``DataTree`` (arviz >= 1).

    Example
    -------
    >>> import torch
    >>> draws = [{"head.sigma": torch.rand(()), "head.coef": torch.randn(3)} for _ in range(8)]
    >>> probs = torch.softmax(torch.randn(8, 5, 2), -1)
    >>> idata = to_arviz(draws, sample_probs=probs, y=torch.tensor([0, 1, 1, 0, 1]))
    >>> idata.posterior["head.coef"].shape
    (1, 8, 3)
    >>> idata.log_likelihood["y"].dims
    ('chain', 'draw', 'obs')
    """
    if lora_summary not in ("norm", None):
        raise ValueError(f"lora_summary must be 'norm' or None, got {lora_summary!r}")
    stacked = _as_stacked(draws, num_samples)
    s = next(iter(stacked.values())).shape[0]
    lora_sites = set(lora.site_names) if lora is not None else set()
    raw = set(var_names or ())
    unknown = raw - set(stacked)
    if unknown:
        raise ValueError(f"var_names {sorted(unknown)} are not among the drawn sites "
                         f"{sorted(stacked)[:6]}...")
    posterior = {}
    for name, v in stacked.items():
        if name in lora_sites or is_lora_site(name):
            if lora_summary == "norm":
                flat = v.double().reshape(s, -1)
                posterior[f"{name}:norm"] = _np(torch.linalg.vector_norm(flat, dim=-1))
            if name not in raw:
                continue
        posterior[name] = _np(v)
    if lora is not None and lora_summary == "norm":
        posterior.update(_delta_norms(lora, stacked, s))
    groups = {"posterior": {k: v[None] for k, v in posterior.items()}}
    groups.update(_prediction_groups(sample_probs, y, s, obs_name, seed))
    if obs_name in groups["posterior"] and len(groups) > 1:
        raise ValueError(f"obs_name {obs_name!r} is also a drawn site; choose another obs_name")
    dims = {**({obs_name: ["obs"]} if len(groups) > 1 else {}), **(dims or {})}
    return _from_dict(groups, coords=coords, dims=dims)


def _prediction_groups(sample_probs, y, s: int, obs_name: str, seed: int) -> dict:
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
        out["log_likelihood"] = {obs_name: _np(ll)[None]}
    gen = torch.Generator().manual_seed(seed)
    pred = torch.multinomial(p.reshape(-1, p.shape[2]), 1, generator=gen).reshape(s, -1)
    out["posterior_predictive"] = {obs_name: _np(pred)[None]}
    return out


def _from_dict(groups: dict, coords, dims):
    if "posterior" in inspect.signature(az.from_dict).parameters:  # arviz < 1: InferenceData
        return az.from_dict(**groups, coords=coords, dims=dims)
    return az.from_dict(groups, coords=coords, dims=dims)  # arviz >= 1: DataTree
