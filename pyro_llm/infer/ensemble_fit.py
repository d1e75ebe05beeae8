"""Training a LoRA ensemble: :func:`fit_ensemble` (the posterior is
:class:`~pyro_llm.infer.ensemble.EnsemblePosterior`).

The members are trained one after another on the same peft model (memory of one model). Before
member k, every trainable tensor is put back to its value before the call and then
re-initialised under ``torch.manual_seed(seeds[k])``: each LoRA layer of the adapter by peft's
``reset_lora_parameters(adapter, init_lora_weights)`` (A random, B zero), each
``modules_to_save`` copy (a classifier head) by the ``reset_parameters()`` of its submodules
(torch's default init); other trainable tensors restart at their value before the call
(``ensemble.json`` lists both groups). Training is :func:`~pyro_llm.infer.svi.fit_map` with
``seed=seeds[k]``, so the data order differs too. With ``out_dir`` every member is written as
soon as it is trained; a re-run skips the members already there, and separate processes may
train disjoint ``members=range(a, b)`` slices into one ``out_dir``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import svi
from .config import takes_config
from .ensemble import EnsemblePosterior, restored_tensors, write_values
from .ensemble_io import (
    check_or_write_settings,
    describe,
    load_member,
    member_file,
    remove_checkpoint,
    save_member,
)

__all__ = ["fit_ensemble"]

_LORA_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}


@takes_config
def fit_ensemble(peft_model: torch.nn.Module, data: Iterable, num_members: int = 5, *,
                 members: Iterable[int] | None = None, seeds: Sequence[int] | None = None,
                 out_dir=None, loss: Callable | None = None, epochs: int = 1, lr=5e-4,
                 weight_decay: float = 0.0, progress: bool = True, **fit_kwargs) -> EnsemblePosterior:
    """Train a LoRA ensemble, one member after another on ``peft_model``.

    Parameters
    ----------
    peft_model:
        A peft model; its trainable tensors (LoRA A and B, a ``modules_to_save`` head) are
        what each member fits. They are restored to their values before the call at the end.
    data:
        Re-iterable batches, as for :func:`~pyro_llm.infer.svi.fit_map`.
    num_members:
        M, the size of the full ensemble.
    members:
        Which member indices to train in this call (default all, ``range(M)``); e.g.
        ``range(0, 2)`` in one process and ``range(2, 5)`` in another, same ``out_dir``.
    seeds:
        One seed per member of the full ensemble; default ``seeds[k] = k``. The seed sets the
        re-initialisation and ``fit_map``'s data order.
    out_dir:
        Folder for ``member_{k:03d}.safetensors`` and ``ensemble.json``; members already there
        are loaded, not trained again (resume). A member in progress is checkpointed to
        ``out_dir/checkpoints/member_{k:03d}`` and resumes mid-fit. Other settings than the
        folder's raise a ``ValueError``.
    loss, epochs, lr, weight_decay, progress, **fit_kwargs:
        Passed to :func:`~pyro_llm.infer.svi.fit_map` (``checkpoint`` is set from ``out_dir``).

    Returns
    -------
    EnsemblePosterior with the members of ``members`` (use :func:`load_ensemble` to gather
    slices trained elsewhere).

    Example
    -------
    >>> import torch, peft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> net = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    >>> batches = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(4)]
    >>> ce = lambda model, b: torch.nn.functional.cross_entropy(model(b[0]), b[1])
    >>> ens = fit_ensemble(net, batches, 3, loss=ce, lr=1e-2, progress=False)
    >>> ens.predict(batches, progress=False).shape
    torch.Size([3, 64, 2])
    """
    if "checkpoint" in fit_kwargs:
        raise ValueError("fit_ensemble sets each member's checkpoint itself; pass out_dir= instead "
                         "of checkpoint=")
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(peft_model).__name__} has no trainable parameters; is it a peft model "
                         "with a LoRA adapter?")
    todo, seeds = _resolve_members(num_members, members, seeds)
    reinit, kept = _reinit_plan(peft_model, params)
    settings = {"names": list(params), "shapes": [list(p.shape) for p in params.values()],
                "dtypes": [str(p.dtype).removeprefix("torch.") for p in params.values()],
                "num_members": num_members, "seeds": seeds, "reinitialised": reinit, "kept": kept,
                "fit": describe(dict(loss=loss, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                      num_batches=len(data) if hasattr(data, "__len__") else None,
                                      **fit_kwargs))}
    out = Path(out_dir) if out_dir is not None else None
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    if out is not None:
        check_or_write_settings(out, settings)
    fitted, info = [], []
    with restored_tensors(peft_model, list(params)) as before:
        for k in tqdm(todo, disable=not progress, desc="ensemble", leave=False):
            if out is not None and (out / member_file(k)).exists():
                member, rec = load_member(out / member_file(k), shapes, params)
                fitted.append(member)
                info.append({**rec, "resumed": True})
                continue
            write_values(peft_model, before)
            _reinitialise(peft_model, seeds[k])
            ckpt = str(out / "checkpoints" / f"member_{k:03d}") if out is not None else None
            t0 = time.perf_counter()
            res = svi.fit_map(peft_model, data, loss=loss, epochs=epochs, lr=lr, weight_decay=weight_decay,
                              progress=progress, seed=seeds[k], checkpoint=ckpt, **fit_kwargs)
            member = {n: p.detach().clone() for n, p in params.items()}
            rec = {"seed": seeds[k], "steps": res.steps, "fit_seconds": time.perf_counter() - t0,
                   "final_loss": res.losses[-1] if res.losses else None, "losses": list(res.losses)}
            if out is not None:
                save_member(out, k, member, rec)
                remove_checkpoint(ckpt)
            fitted.append(member)
            info.append(rec)
    return EnsemblePosterior(fitted, peft_model=peft_model, seeds=[seeds[k] for k in todo],
                             indices=todo, info=info)


def _resolve_members(num_members, members, seeds) -> tuple[list[int], list[int]]:
    if not isinstance(num_members, int) or num_members < 1:
        raise ValueError(f"num_members must be an integer >= 1, got {num_members!r}")
    seeds = list(range(num_members)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != num_members:
        raise ValueError(f"seeds must have one entry per member ({num_members}), got {len(seeds)}")
    todo = list(range(num_members)) if members is None else [int(k) for k in members]
    bad = [k for k in todo if not 0 <= k < num_members]
    if not todo or bad or len(set(todo)) != len(todo):
        raise ValueError(f"members must be distinct indices in range({num_members}), got {todo}; "
                         "raise num_members to train more")
    return todo, seeds


def _lora_init(peft_model):
    cfg = getattr(peft_model, "peft_config", {}).get(getattr(peft_model, "active_adapter", None))
    init = getattr(cfg, "init_lora_weights", True)
    return init if init in (True, "gaussian") else True  # PiSSA-like inits rewrite the base weights


def _adapter_modules(peft_model):
    """``(module, kind, adapter)`` for the active adapter's LoRA layers and modules_to_save copies."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    adapter = getattr(peft_model, "active_adapter", "default")
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A):
            yield name, m, "lora", adapter
        elif isinstance(m, ModulesToSaveWrapper) and adapter in m.modules_to_save:
            yield name, m, "head", adapter


def _reinit_plan(peft_model, params) -> tuple[list[str], list[str]]:
    covered = set()
    for name, m, kind, adapter in _adapter_modules(peft_model):
        sub = m if kind == "lora" else m.modules_to_save[adapter]
        prefix = name if kind == "lora" else f"{name}.modules_to_save.{adapter}"
        for pn, _ in sub.named_parameters(prefix=prefix):
            parts = set(pn.split("."))
            if kind == "head" or adapter in parts and parts & _LORA_PARTS:
                covered.add(pn)
    return [n for n in params if n in covered], [n for n in params if n not in covered]


@torch.no_grad()
def _reinitialise(peft_model, seed: int) -> None:
    torch.manual_seed(seed)
    init = _lora_init(peft_model)
    for _, m, kind, adapter in _adapter_modules(peft_model):
        if kind == "lora":
            m.reset_lora_parameters(adapter, init)
        else:
            for sub in m.modules_to_save[adapter].modules():
                own = list(sub.parameters(recurse=False))
                # a head tied to a frozen embedding is left alone: resetting would change the backbone
                reset = getattr(sub, "reset_parameters", None)
                if own and all(p.requires_grad for p in own) and callable(reset):
                    reset()
