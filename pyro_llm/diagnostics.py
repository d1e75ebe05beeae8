"""Diagnostics of the adapter itself: how many directions each LoRA update really uses.

A LoRA layer of rank ``r`` adds ``Delta W = scaling * B @ A`` to a frozen weight. Its
*stable rank* ``||Delta W||_F^2 / ||Delta W||_2^2`` (:func:`pyro_llm.metrics.stable_rank`)
lies between 1 and ``r``: near 1 when fine-tuning moved the layer along one direction, near
``r`` when it spread the change evenly. Comparing it across layers, across methods (MAP,
a posterior mean, posterior draws) shows where the adapter's capacity goes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .lora import find_lora_parameters, lora_layers
from .metrics import stable_rank

__all__ = ["adapter_stable_ranks", "lora_deltas"]


def _lookup(weights: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """``weights[name]``, or the one entry whose key ends with ``"." + name`` (site prefix)."""
    if name in weights:
        return weights[name]
    hits = [k for k in weights if k.endswith("." + name)]
    if len(hits) > 1:
        raise ValueError(f"several entries of weights end with {name!r}: {hits}; "
                         "pass the draws of one model only")
    return weights[hits[0]] if hits else None


def lora_deltas(
    peft_model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """``{LoRA layer name: scaling * B @ A}`` for one adapter of a peft model.

    ``weights`` (e.g. a posterior draw or mean, keyed by peft parameter names or by
    ``BayesianLoRA`` site names, which may carry a prefix) replaces the model's own A and B
    where it has an entry; the model supplies the rest. Layer names are peft module names
    (``base_model.model.<module>``). ``Delta W`` has shape ``(out, in)`` for ``nn.Linear``
    layers (GPT-2 ``Conv1D`` layers store the transpose; stable ranks are unaffected).
    """
    names = set(find_lora_parameters(peft_model, adapter_name))
    params = dict(peft_model.named_parameters())
    weights = {} if weights is None else weights
    out = {}
    for mod_name, module in lora_layers(peft_model):
        a_name = next((n for n in names if n.startswith(mod_name + ".lora_A.")), None)
        if a_name is None:
            continue
        adapter = a_name.split(".")[-2]
        b_name = f"{mod_name}.lora_B.{adapter}.weight"
        mats = []
        for n in (a_name, b_name):
            w = _lookup(weights, n)
            w = params[n] if w is None else torch.as_tensor(w)
            if w.shape != params[n].shape:
                raise ValueError(f"weights[{n!r}] has shape {tuple(w.shape)}, but the model's "
                                 f"tensor has {tuple(params[n].shape)}; pass one draw at a time")
            mats.append(w.detach().to(torch.float32))
        a, b = mats
        out[mod_name] = float(module.scaling[adapter]) * (b @ a)
    return out


def adapter_stable_ranks(
    peft_model: torch.nn.Module,
    weights: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str | None = None,
) -> dict[str, float]:
    """Stable rank of ``Delta W = scaling * B @ A`` for every LoRA layer of one adapter.

    Parameters
    ----------
    peft_model:
        A model adapted by peft with LoRA.
    weights:
        Optional ``{name: tensor}`` to use instead of the model's A and B, e.g. one draw of
        ``Posterior.sample`` or ``Posterior.mean()`` (site names, with or without a
        ``BayesianLoRA`` prefix); entries for other tensors (a classifier head) are ignored.
    adapter_name:
        Which adapter; default the active one.

    Returns
    -------
    dict
        ``{peft module name: stable rank}`` in model order; 0.0 for a layer whose update is
        zero (peft initialises B at zero, so an untrained adapter gives all zeros).

    Example
    -------
    >>> import torch, peft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> net = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    >>> adapter_stable_ranks(net)
    {'base_model.model.0': 0.0, 'base_model.model.2': 0.0}
    """
    deltas = lora_deltas(peft_model, weights, adapter_name)
    return {name: float(stable_rank(d.double())) for name, d in deltas.items()}
