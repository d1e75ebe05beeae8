"""LoRA ensembles: M adapters trained from different seeds, as one posterior over the named sites.

:func:`fit_ensemble` trains the members one after another on the same peft model (memory of one
model). Before member k, every trainable tensor is put back to its value before the call and then
re-initialised under ``torch.manual_seed(seeds[k])``: each LoRA layer of the adapter by peft's
``reset_lora_parameters(adapter, init_lora_weights)`` (A random, B zero), each ``modules_to_save``
copy (a classifier head) by the ``reset_parameters()`` of its submodules (torch's default init,
which is not the Hugging Face init the head was born with); other trainable tensors restart at
their value before the call (``ensemble.json`` lists both groups). Training is
:func:`~pyro_llm.infer.svi.fit_map` with ``seed=seeds[k]``, so the data order differs too.

The result is an :class:`EnsemblePosterior`: a uniform mixture of M point masses over the same
named sites as :class:`~pyro_llm.BayesianLoRA`, so ``predict_probs``, ``to_arviz`` and
``regress(predictions=...)`` take it like any other posterior.

Files (safetensors + JSON, never pickle): ``out_dir/member_{k:03d}.safetensors`` per member,
written as soon as it is trained, and ``out_dir/ensemble.json`` (names, shapes, seeds, fit
settings). A re-run with the same ``out_dir`` skips the members already there; separate
processes may train disjoint ``members=range(a, b)`` slices into one ``out_dir``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import metrics
from .._io import atomic_folder, write_json
from ..posterior import Draw, Posterior, predict_probs
from ..readout import Readout, default_logits
from . import svi
from .config import takes_config
from .ensemble_io import (
    ENSEMBLE_INFO,
    ENSEMBLE_VERSION,
    check_or_write_settings,
    describe,
    full_seeds,
    is_member_entry,
    load_member,
    member_file,
    read_members,
    remove_checkpoint,
    save_member,
)

__all__ = ["EnsemblePosterior", "fit_ensemble", "load_ensemble", "uncertainty"]

_LORA_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}


# ---------------------------------------------------------------------------- posterior
class EnsemblePosterior(Posterior):
    """A LoRA ensemble: a uniform mixture of point masses at the members' trainable tensors.

    Parameters
    ----------
    members:
        One dict per member, ``{name: tensor}`` keyed by peft parameter names (or by the
        ``lora``'s site names).
    peft_model:
        The peft model the members belong to (needed by :meth:`predict`).
    lora:
        A :class:`~pyro_llm.BayesianLoRA` over that model: :attr:`members` are then keyed by its
        site names (``lora.site_name(n)``). For ``predict_probs`` through the ``lora`` to use
        every tensor of a member, build it with every trainable tensor random
        (``select=lambda n: True``); tensors it keeps as ``pyro.param`` are read from the param
        store instead.
    seeds, indices, info:
        Per-member seeds and indices in the full ensemble, and per-member fit records.

    Example
    -------
    >>> import torch
    >>> ens = EnsemblePosterior([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])
    >>> len(ens), ens.mean()["w"].tolist()
    (2, [0.5, 0.5])
    """

    def __init__(self, members: Sequence[Mapping[str, torch.Tensor]], *, peft_model=None, lora=None,
                 seeds: Sequence[int] | None = None, indices: Sequence[int] | None = None,
                 info: Sequence[dict] | None = None):
        if len(members) == 0:
            raise ValueError("an ensemble needs at least one member; got none")
        to_peft = lora.peft_name if lora is not None else (lambda n: n)
        self._peft = [{to_peft(k): torch.as_tensor(v).detach() for k, v in m.items()} for m in members]
        keys, shapes = list(self._peft[0]), {k: tuple(v.shape) for k, v in self._peft[0].items()}
        for i, m in enumerate(self._peft):
            if list(m) != keys or any(tuple(v.shape) != shapes[k] for k, v in m.items()):
                raise ValueError(f"member {i} has different tensors or shapes than member 0; "
                                 "every member must hold the same named tensors")
        self.lora = lora
        self.peft_model = lora.peft_model if lora is not None and peft_model is None else peft_model
        if lora is not None and set(lora.fixed_names) & set(keys):
            warnings.warn("the BayesianLoRA keeps some member tensors as pyro.param point estimates "
                          f"({sorted(set(lora.fixed_names) & set(keys))[:2]}...): predict_probs through it "
                          "would not use the members' values there; build it with select=lambda n: True",
                          stacklevel=2)
        n = len(self._peft)
        self.seeds = list(seeds) if seeds is not None else [None] * n
        self.indices = list(indices) if indices is not None else list(range(n))
        self.info = list(info) if info is not None else [{} for _ in range(n)]
        if not len(self.seeds) == len(self.indices) == len(self.info) == n:
            raise ValueError(f"seeds, indices and info must have one entry per member ({n})")
        site = lora.site_name if lora is not None else (lambda name: name)
        self.members: list[Draw] = [{site(k): v for k, v in m.items()} for m in self._peft]

    def _runner(self):
        """A BayesianLoRA whose random sites are the members' tensors (site = peft name)."""
        from ..lora import BayesianLoRA

        try:
            runner = BayesianLoRA(self.peft_model, prior=1.0, select=set(self.names))
        except (ValueError, TypeError):
            return None
        # every member tensor must be a site (a frozen head would not be): else the loop
        return runner if set(runner.random_names) == set(self.names) else None

    @property
    def names(self) -> list[str]:
        """Peft parameter names of the members' tensors."""
        return list(self._peft[0])

    def __len__(self) -> int:
        return len(self.members)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> list[Draw]:
        """``num_samples`` members drawn uniformly WITH replacement (the mixture's exact sampler).

        To use every member once, in order, use :attr:`members` instead.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        idx = torch.randint(len(self), (num_samples,), generator=generator)
        return [dict(self.members[i]) for i in idx.tolist()]

    def mean(self) -> Draw:
        """The average of the members' tensors, site by site.

        Not a predictive: LoRA's update ``B @ A`` is not linear in (A, B), and the members sit
        in different modes, so the averaged adapter can predict worse than any member. Use
        :meth:`predict` and average the probabilities.
        """
        return {k: torch.stack([m[k] for m in self.members]).mean(0) for k in self.members[0]}

    def attach(self, lora=None, readout=None) -> EnsemblePosterior:
        """Set the model (a peft model, or a BayesianLoRA's) that :meth:`predict` runs."""
        if lora is not None:
            self.peft_model = getattr(lora, "peft_model", lora)
        if readout is not None:
            self.readout = readout
        return self

    def predict(self, data: Iterable, num_samples: int | None = None, *, readout=None,
                logits_fn: Callable | None = None, progress: bool = True, vectorize: bool | str = "auto",
                seed: int | None = 0) -> torch.Tensor:
        """Class probabilities ``(M, N, C)`` of every member once (``num_samples=None``, the exact
        mixture; :meth:`predict_members`), or ``(S, N, C)`` of ``num_samples`` members drawn with
        replacement under ``seed``."""
        if logits_fn is None:
            logits_fn = (readout or self.readout or Readout()).logits
        post = self
        if num_samples is not None:
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            idx = torch.randint(len(self), (num_samples,), generator=g).tolist()
            post = EnsemblePosterior([self._peft[i] for i in idx], peft_model=self.peft_model)
        return post.predict_members(data, logits_fn=logits_fn, progress=progress, vectorize=vectorize)

    @torch.no_grad()
    def predict_members(self, data: Iterable, *, logits_fn: Callable | None = None,
                        progress: bool = True, vectorize: bool | str = "auto") -> torch.Tensor:
        """Class probabilities ``(M, N, C)`` of every member, in eval mode (dropout off).

        ``logits_fn(model, batch)`` defaults to ``model(**batch).logits`` for dict batches
        (``labels``/``index`` left out) and ``model(x)`` for ``(x, y)`` tuples. By default the M
        members run together in one sample-batched forward per batch (their adapters stacked,
        the blocks below the lowest adapter shared; see :mod:`pyro_llm.batched`), checked on the
        first batch against member 0 alone. ``vectorize=False`` (or a model the batched path
        cannot run) writes each member into the peft model in turn; the model's tensors and
        train/eval modes are restored afterwards.
        """
        if self.peft_model is None:
            raise ValueError("this ensemble has no model attached; pass peft_model= (or lora=) when "
                             "building or loading it")
        logits_fn = logits_fn or default_logits
        if vectorize is not False and len(self) > 1:
            runner = self._runner()
            if runner is not None:
                def fn(*args, **batch):
                    b = batch if batch else (args[0] if len(args) == 1 else args)
                    return logits_fn(runner, b).softmax(-1)

                with _restored(self.peft_model, self.names):
                    self.peft_model.eval()
                    return predict_probs(fn, data, [dict(m) for m in self._peft], progress=progress,
                                         seed=None, vectorize=vectorize)
        chunks = []
        total = len(data) if hasattr(data, "__len__") else None
        with _restored(self.peft_model, self.names):
            self.peft_model.eval()
            for batch in tqdm(data, total=total, disable=not progress, desc="ensemble", leave=False):
                per = []
                for m in self._peft:
                    _write(self.peft_model, m)
                    per.append(logits_fn(self.peft_model, batch).detach().float().softmax(-1))
                chunks.append(torch.stack(per))
        if not chunks:
            raise ValueError("the data yielded no batch: nothing to predict")
        return torch.cat(chunks, dim=1)

    def save(self, path) -> Path:
        """Write ``member_{k:03d}.safetensors`` per member and ``ensemble.json`` into ``path``.

        The save is atomic as a whole (:func:`~pyro_llm._io.atomic_folder`): a reader sees the
        old ensemble or the new one. Every ``member_*`` entry and ``ensemble.json`` already in
        ``path`` is replaced (a larger ensemble saved there before leaves no member behind);
        other files in the folder are kept.
        """
        first = self._peft[0]
        n = max(self.indices) + 1
        settings = {"names": list(first), "shapes": [list(v.shape) for v in first.values()],
                    "num_members": n, "seeds": full_seeds(self.indices, self.seeds, n)}
        with atomic_folder(path, owned=is_member_entry) as tmp:
            write_json(tmp / ENSEMBLE_INFO, {"version": ENSEMBLE_VERSION, **settings})
            for k, seed, m, info in zip(self.indices, self.seeds, self._peft, self.info, strict=True):
                save_member(tmp, k, m, {**info, "seed": seed})
        return Path(path)


def load_ensemble(path, peft_model: torch.nn.Module | None = None, *, lora=None) -> EnsemblePosterior:
    """Gather every ``member_NNN.safetensors`` of ``path`` into an :class:`EnsemblePosterior`.

    Members trained in separate processes (``members=range(a, b)``) into one folder come back
    together; a warning names the members of ``ensemble.json``'s ``num_members`` still missing.
    With ``peft_model`` (or ``lora``) the names and shapes are checked against its trainable
    tensors and the members follow its device and dtype. Every file is checked before use
    (``ensemble.json`` field by field, each member's tensor names and shapes, NaN / inf); a
    ``member_*`` entry that is not ``member_NNN.safetensors`` with ``NNN < num_members`` is an
    error naming it (see :mod:`~pyro_llm.infer.ensemble_io`).
    """
    model = lora.peft_model if lora is not None and peft_model is None else peft_model
    members, indices, seeds, info = read_members(Path(path), model)
    return EnsemblePosterior(members, peft_model=model, lora=lora, seeds=seeds, indices=indices, info=info)


# ---------------------------------------------------------------------------- fitting
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
    with _restored(peft_model, list(params)) as before:
        for k in tqdm(todo, disable=not progress, desc="ensemble", leave=False):
            if out is not None and (out / member_file(k)).exists():
                member, rec = load_member(out / member_file(k), shapes, params)
                fitted.append(member)
                info.append({**rec, "resumed": True})
                continue
            _write(peft_model, before)
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


def uncertainty(sample_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example predictive entropy and its split into aleatoric and epistemic parts.

    :func:`pyro_llm.metrics.decompose` after checking the input: ``sample_probs`` is
    ``(S, N, C)`` (members or posterior draws); returns ``(N,)`` tensors ``aleatoric`` (mean
    entropy), ``epistemic`` (mutual information, clamped at 0 against round-off) and
    ``total = aleatoric + epistemic``, which equals the entropy of the mean prediction up to
    float round-off (within 2e-6 in float32 where identical members make the difference
    round below zero).

    Example
    -------
    >>> import torch
    >>> u = uncertainty(torch.tensor([[[0.9, 0.1]], [[0.1, 0.9]]]))
    >>> round(float(u["epistemic"][0]), 4)
    0.3681
    """
    p = torch.as_tensor(sample_probs)
    if p.dim() != 3 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"sample_probs must have shape (S, N, C) with S, N >= 1, got {tuple(p.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("sample_probs must be finite and non-negative probabilities")
    return metrics.decompose(p)


# ---------------------------------------------------------------------------- helpers
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


@torch.no_grad()
def _write(model, values: Mapping[str, torch.Tensor]) -> None:
    for n, v in values.items():
        p = model.get_parameter(n)
        p.copy_(v.to(device=p.device, dtype=p.dtype))


class _restored:
    """Context: the named tensors' values and every module's train/eval mode are restored on exit."""

    def __init__(self, model, names):
        self.model, self.names = model, names

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.before = {n: self.model.get_parameter(n).detach().clone() for n in self.names}
        self.modes = [(m, m.training) for m in self.model.modules()]
        return self.before

    def __exit__(self, *exc) -> None:
        _write(self.model, self.before)
        for m, t in self.modes:
            m.training = t
