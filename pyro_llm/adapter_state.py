"""Which LoRA path a peft model takes: refuse merged adapters, and tell whether peft's own
forward computes exactly the adapter a :class:`~pyro_llm.BayesianLoRA` draws (else the draws
go in through hooks, see :mod:`pyro_llm.batched`)."""

from __future__ import annotations

import torch

__all__ = ["check_unmerged", "own_path", "record_init", "initial_values"]


def check_unmerged(model: torch.nn.Module, plan) -> None:
    """Refuse LoRA layers whose adapter is merged into the base weight: injected draws would be
    ignored (peft skips the LoRA path of a merged layer) or added twice. ``plan`` is a
    :class:`~pyro_llm.batched.Plan`; its LoRA modules are cached in ``plan.extra``."""
    mods = plan.extra.get("lora_modules")
    if mods is None:
        from peft.tuners.lora import LoraLayer

        mods = plan.extra["lora_modules"] = {
            n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and plan.adapter in m.lora_A}
    merged = [n for n, m in mods.items() if getattr(m, "merged", False)]
    if merged:
        raise ValueError(f"the LoRA adapter is merged into the base weights of {merged[:2]} "
                         f"({len(merged)} layers): drawn adapters would be ignored; call "
                         "peft_model.unmerge_adapter() first (or load the adapter unmerged)")


def own_path(model: torch.nn.Module, plan) -> bool:
    """Whether peft's forward of every LoRA layer computes exactly ``plan.adapter`` (it is the
    one active adapter and adapters are not disabled)."""
    check_unmerged(model, plan)
    return all(not m.disable_adapters and list(m.active_adapters) == [plan.adapter]
               for m in plan.extra["lora_modules"].values())


_INIT_ATTR = "_pyro_llm_initial_values"


def record_init(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Keep a copy of every trainable tensor of ``model`` (the LoRA ``A``, ``B``, a new head) as it
    is now, before fine-tuning: the centre of a Laplace prior at the initialisation
    (``fit_laplace(prior_mean="init")``). :func:`pyro_llm.models.lora_classifier` and
    :func:`~pyro_llm.models.lora_causal_lm` call it; call it yourself on a peft model you build,
    before training. Returns the copies (also kept on the model, not saved with it)."""
    values = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    object.__setattr__(model, _INIT_ATTR, values)
    return values


def initial_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors :func:`record_init` kept for ``model``; a ``ValueError`` that says what to do
    when there are none."""
    values = getattr(model, _INIT_ATTR, None)
    if values is None:
        raise ValueError(
            "the model has no recorded initial LoRA values, so a prior centred at the initialisation "
            "cannot be formed: build it with pyro_llm.models.lora_classifier / lora_causal_lm, or "
            "call pyro_llm.adapter_state.record_init(peft_model) before fine-tuning, or pass "
            "prior_mean={peft parameter name: tensor} (or prior_mean='zero')")
    return values
