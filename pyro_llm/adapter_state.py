"""Which LoRA path a peft model takes: refuse merged adapters, and tell whether peft's own
forward computes exactly the adapter a :class:`~pyro_llm.BayesianLoRA` draws (else the draws
go in through hooks, see :mod:`pyro_llm.batched`)."""

from __future__ import annotations

import torch

__all__ = ["check_unmerged", "own_path"]


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
