"""LoRA ensembles: M adapters trained from different seeds, as one posterior over the named sites.

:func:`~pyro_llm.infer.ensemble_fit.fit_ensemble` trains M adapters from different seeds
(see its module).

Its result is an :class:`EnsemblePosterior`: a uniform mixture of M point masses over the same
named sites as :class:`~pyro_llm.BayesianLoRA`, so ``predict_probs``, ``to_arviz`` and
``regress(predictions=...)`` take it like any other posterior.

Files (safetensors + JSON, never pickle): ``out_dir/member_{k:03d}.safetensors`` per member,
written as soon as it is trained, and ``out_dir/ensemble.json`` (names, shapes, seeds, fit
settings). A re-run with the same ``out_dir`` skips the members already there; separate
processes may train disjoint ``members=range(a, b)`` slices into one ``out_dir``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import metrics
from .._io import atomic_folder, write_json
from ..posterior import Draw, Posterior, predict_probs
from ..readout import Readout, default_logits
from .ensemble_io import (
    ENSEMBLE_INFO,
    ENSEMBLE_VERSION,
    full_seeds,
    is_member_entry,
    read_members,
    save_member,
)

__all__ = ["EnsemblePosterior", "load_ensemble", "uncertainty", "write_values", "restored_tensors"]

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
        if num_samples is None:
            return self.predict_members(data, logits_fn=logits_fn, progress=progress, vectorize=vectorize)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        idx = torch.randint(len(self), (num_samples,), generator=g)
        drawn, where = torch.unique(idx, return_inverse=True)  # each drawn member runs once
        post = EnsemblePosterior([self._peft[i] for i in drawn.tolist()], peft_model=self.peft_model)
        return post.predict_members(data, logits_fn=logits_fn, progress=progress, vectorize=vectorize)[where]

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

                with restored_tensors(self.peft_model, self.names):
                    self.peft_model.eval()
                    return predict_probs(fn, data, [dict(m) for m in self._peft], progress=progress,
                                         seed=None, vectorize=vectorize)
        chunks = []
        total = len(data) if hasattr(data, "__len__") else None
        with restored_tensors(self.peft_model, self.names):
            self.peft_model.eval()
            for batch in tqdm(data, total=total, disable=not progress, desc="ensemble", leave=False):
                per = []
                for m in self._peft:
                    write_values(self.peft_model, m)
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
@torch.no_grad()
def write_values(model, values: Mapping[str, torch.Tensor]) -> None:
    for n, v in values.items():
        p = model.get_parameter(n)
        p.copy_(v.to(device=p.device, dtype=p.dtype))


class restored_tensors:
    """Context: the named tensors' values and every module's train/eval mode are restored on exit."""

    def __init__(self, model, names):
        self.model, self.names = model, names

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.before = {n: self.model.get_parameter(n).detach().clone() for n in self.names}
        self.modes = [(m, m.training) for m in self.model.modules()]
        return self.before

    def __exit__(self, *exc) -> None:
        write_values(self.model, self.before)
        for m, t in self.modes:
            m.training = t
