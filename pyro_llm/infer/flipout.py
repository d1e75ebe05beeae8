"""Flipout (Wen et al. 2018): weight noise decorrelated across the examples of a batch by random
signs, for Linear layers of a peft model run through :func:`torch.func.functional_call`. BLoB
(:mod:`pyro_llm.infer.blob`) uses it for the noise of its LoRA ``A`` matrices."""

from __future__ import annotations

import torch

from ..runtime import train_mode

__all__ = ["flipout_forward"]


def _signs(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, shape, device=like.device).to(like.dtype) * 2 - 1


def _flip_hook(noise: torch.Tensor):
    def hook(module, inputs, output):
        x = inputs[0]
        per_example = (x.shape[0],) + (1,) * (x.dim() - 2)  # one sign vector per example
        r = _signs(per_example + (x.shape[-1],), x)
        s = _signs(per_example + (output.shape[-1],), output)
        return output + ((x * r) @ noise.to(x.dtype).T) * s

    return hook


def flipout_forward(peft_model: torch.nn.Module, weights: dict[str, torch.Tensor],
                    noise: dict[str, torch.Tensor], args=(), kwargs=None, dropout: bool = False):
    """Run ``peft_model`` with ``weights`` injected and flipout noise on the ``noise`` matrices.

    ``weights`` holds the means for the keys of ``noise`` (peft names of ``Linear`` weights,
    e.g. LoRA ``A``); example ``n`` of the batch (dimension 0 of the layer input) then sees the
    weight ``W + (s_n r_n^T) * noise`` with random signs ``r_n``, ``s_n`` (Wen et al. 2018):
    marginally the same as a weight draw, but nearly independent across examples.

    Example
    -------
    >>> import torch, peft
    >>> net = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 2)),
    ...                           peft.LoraConfig(r=2, target_modules=["0"]))
    >>> a = "base_model.model.0.lora_A.default.weight"
    >>> w = {a: net.get_parameter(a).detach()}
    >>> flipout_forward(net, w, {a: 0.1 * torch.randn(2, 4)}, (torch.randn(5, 4),)).shape
    torch.Size([5, 2])
    """
    hooks = []
    try:
        for name, dw in noise.items():
            module = peft_model.get_submodule(name.rsplit(".", 1)[0])
            if not isinstance(module, torch.nn.Linear) or not name.endswith(".weight"):
                raise ValueError(f"flipout needs Linear weights; {name!r} belongs to a "
                                 f"{type(module).__name__}: pass flipout=False")
            hooks.append(module.register_forward_hook(_flip_hook(dw)))
        with train_mode(peft_model, dropout):
            return torch.func.functional_call(peft_model, weights, tuple(args), kwargs or {})
    finally:
        for h in hooks:
            h.remove()
