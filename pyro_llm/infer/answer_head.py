"""What the VBLL head of PoLAR-VBLL reads: features, an optional logit offset, and a fixed map.

A ``features_fn(adapter, batch)`` returns the head's features ``phi`` (``(B, D)``), or a pair
``(phi, offset)`` with a logit offset ``(B, C)``: the head's logits are then ``offset + W phi``,
so a model that already answers (a causal LM's next-token logits of the label words) keeps its
answer and the Bayesian last layer learns a correction around it, with prior mean zero.

* :func:`answer_readout` -- that pair for a Hugging Face causal LM: ``phi`` the final hidden
  state at the last attended token, ``offset`` the model's own logits of the answer tokens there;
* :class:`FeatureMap` -- a ``features_fn`` followed by a fixed map of ``phi`` (one scale, or
  per-dimension standardisation), fitted once under the initial backbone and saved with the model;
* :func:`split_output` -- a ``features_fn``'s output as ``(phi, offset or None)``, checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch

from .._io import read_safetensors
from ..features import last_token_index, pool

__all__ = ["AnswerReadout", "FeatureMap", "answer_readout", "split_output"]


def split_output(out, dim: int | None = None, classes: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(phi, offset)`` from a ``features_fn`` output (``phi`` or ``(phi, offset)``), checked:
    ``phi`` ``(B, dim)``, ``offset`` ``(B, classes)`` (``None`` for a plain ``phi``)."""
    phi, offset = tuple(out) if isinstance(out, (tuple, list)) and len(out) == 2 else (out, None)
    if not torch.is_tensor(phi) or phi.dim() != 2 or (dim is not None and phi.shape[1] != dim):
        shape = tuple(phi.shape) if torch.is_tensor(phi) else type(out).__name__
        raise ValueError(f"features_fn must return (batch, {dim or 'D'}) features, or a pair "
                         f"(features, offset), got {shape}")
    if offset is not None and (not torch.is_tensor(offset) or offset.dim() != 2 or len(offset) != len(phi)
                               or (classes is not None and offset.shape[1] != classes)):
        shape = tuple(offset.shape) if torch.is_tensor(offset) else type(offset).__name__
        raise ValueError(f"features_fn's offset must be ({len(phi)}, {classes or 'C'}) logits, got {shape}")
    return phi, offset


class FeatureMap:
    """``features_fn`` followed by the fixed map ``phi -> (phi - shift) * scale`` (the offset, if
    any, passes unchanged): ``scale`` a number (with ``shift=None``: :func:`fit_polar_vbll`'s
    ``normalize_features``) or, with :meth:`standardize`, per-dimension ``(D,)`` tensors.

    Calling it returns ``(phi, offset or None)``, whatever form ``features_fn`` returns.
    """

    FILE = "features.safetensors"

    def __init__(self, features_fn: Callable, scale: float | torch.Tensor = 1.0,
                 shift: torch.Tensor | None = None):
        self.features_fn, self.shift = features_fn, shift
        self.scale = scale if torch.is_tensor(scale) else float(scale)

    def __call__(self, adapter, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        phi, offset = split_output(self.features_fn(adapter, batch))
        return self.apply(phi), offset

    def apply(self, phi: torch.Tensor) -> torch.Tensor:
        """The map on raw features ``(B, D)``."""
        if self.shift is None and not torch.is_tensor(self.scale):
            return phi * self.scale
        shift = 0.0 if self.shift is None else self.shift.to(phi)
        return (phi - shift) * torch.as_tensor(self.scale).to(phi)

    @classmethod
    def standardize(cls, features_fn: Callable, phi: torch.Tensor) -> FeatureMap:
        """Per-dimension z-scores of raw features ``phi`` (``(N, D)``, N >= 2), divided by
        ``sqrt(D)`` so that their mean squared norm is 1 (as with one ``normalize_features``
        scale, a prior sd ``s`` per weight is then a logit sd of about ``s``). A dimension with
        sd below 1e-6 of the largest carries nothing and is mapped to 0."""
        if phi.dim() != 2 or len(phi) < 2:
            raise ValueError(f"standardising needs (N >= 2, D) features, got {tuple(phi.shape)}")
        x = phi.detach().double()
        mean, sd = x.mean(0), x.std(0, unbiased=False)
        if not (torch.isfinite(sd).all() and sd.max() > 0):
            raise ValueError("the training features are constant or not finite; check features_fn")
        scale = torch.where(sd > 1e-6 * sd.max(), 1 / (sd.clamp_min(1e-300) * math.sqrt(x.shape[1])),
                            torch.zeros_like(sd))
        return cls(features_fn, scale.to(phi.dtype), mean.to(phi.dtype))

    @classmethod
    def fit(cls, features_fn: Callable, adapter, data: Iterable, first, labels_fn: Callable,
            normalize: bool, standardize: bool) -> tuple[FeatureMap, list]:
        """The map :func:`~pyro_llm.infer.polar_vbll.fit_polar_vbll` fixes under the initial backbone
        (call it without gradients), and mapped ``(phi, offset, y)``: of every batch when
        standardising (the statistics' pass), else of the ``first`` batch only (``y`` None).
        ``normalize``: one scale, 1 / the mean norm of the first batch's features."""
        if standardize:
            raw = [(*split_output(features_fn(adapter, b)), labels_fn(b)) for b in data]
            fmap = cls.standardize(features_fn, torch.cat([f for f, _, _ in raw]))
            return fmap, [(fmap.apply(f), off, y) for f, off, y in raw]
        f0, b0 = split_output(features_fn(adapter, first))
        scale = 1.0
        if normalize:
            norm = float(f0.float().norm(dim=-1).mean())
            if not norm > 0 or not math.isfinite(norm):
                raise ValueError(f"the first batch's features have mean norm {norm}; check features_fn")
            scale = 1.0 / norm
        fmap = cls(features_fn, scale)
        return fmap, [(fmap.apply(f0), b0, None)]

    @classmethod
    def read(cls, folder, features_fn: Callable, scale: float, dim: int, device=None,
             standardized: bool = False) -> FeatureMap:
        """The map saved in ``folder``: its standardisation (:attr:`FILE`, checked: shapes
        ``(dim,)``, finite) if there, else the one ``scale``."""
        file = Path(folder) / cls.FILE
        if not file.exists():
            if standardized:
                raise FileNotFoundError(f"{file} is missing: the model's features were standardised")
            return cls(features_fn, scale)
        t, _ = read_safetensors(file, what="feature standardisation",
                                expect={"shift": (dim,), "scale": (dim,)})
        return cls(features_fn, t["scale"].to(device), t["shift"].to(device))

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{"shift": (D,), "scale": (D,)}`` of a standardising map (for safetensors)."""
        if self.shift is None or not torch.is_tensor(self.scale):
            raise ValueError("only a standardising FeatureMap has tensors to save")
        return {"shift": self.shift, "scale": self.scale}


class AnswerReadout:
    """``(phi, offset)`` of a causal LM answering with label words: see :func:`answer_readout`."""

    def __init__(self, token_ids: Sequence[int] | torch.Tensor, layer: int = -1):
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if ids.numel() < 2 or len(set(ids.tolist())) != ids.numel() or int(ids.min()) < 0:
            raise ValueError(f"token_ids must be >= 2 distinct token ids, got {ids.tolist()}")
        self.token_ids, self.layer = ids, int(layer)

    def __call__(self, adapter, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "attention_mask" not in batch:
            raise ValueError("answer_readout reads dict batches with input_ids and attention_mask, got "
                             f"a {type(batch).__name__}")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        last = last_token_index(mask)
        rows = torch.arange(len(last), device=last.device)
        try:  # the LM head at the answer slot only, not at every position
            out = adapter(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                          logits_to_keep=last[:, None])
        except TypeError:  # an older transformers without logits_to_keep
            out = adapter(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        z = out.logits
        if z.dim() == 3 and z.shape[1] == 1 and z.shape[0] == len(last):
            z = z[:, 0]
        elif z.dim() == 3 and z.shape[:2] == mask.shape:
            z = z[rows, last]
        else:
            raise ValueError(f"unexpected causal-LM logits {tuple(z.shape)} for a batch of "
                             f"{tuple(mask.shape)}; is this a causal LM (transformers >= 4.45)?")
        if int(self.token_ids.max()) >= z.shape[-1]:
            raise ValueError(f"token_ids {self.token_ids.tolist()} exceed the vocabulary ({z.shape[-1]})")
        return pool(out, mask, "last", self.layer), z[:, self.token_ids.to(z.device)]


def answer_readout(token_ids: Sequence[int] | torch.Tensor, layer: int = -1) -> AnswerReadout:
    """The features and logit offset of a Hugging Face causal LM that answers with label words.

    ``answer_readout(ids)(adapter, batch)`` runs ``adapter`` (a PoLAR adapter, peft model or
    plain model) once on a dict batch (``input_ids``, ``attention_mask``; left or right padding)
    and returns ``(phi, offset)``: ``phi`` the hidden state of layer ``layer`` (default the final
    one: Hugging Face's last ``hidden_states`` entry is taken after the final norm, so it is what
    the LM head reads) at the last attended token, ``(B, H)``; ``offset`` the model's own
    next-token logits of ``token_ids`` there, ``(B, K)``, i.e. ``model(...).logits[b, last_b,
    token_ids]``, computed with the LM head at that position only (``logits_to_keep``). Both keep
    their graph, so a backbone step trains through the answer logits and the features.

    With :func:`~pyro_llm.infer.polar_vbll.fit_polar_vbll` the head's logits are
    ``offset + Delta phi``: the LM's answer plus a Bayesian correction, which starts at zero.

    Example
    -------
    >>> prompt = LabelTokenPrompt(tok, "{text}\\nSentiment:", ["negative", "positive"])  # doctest: +SKIP
    >>> fit_polar_vbll(PolarAdapter(peft_lm), loader, answer_readout(prompt.token_ids), 2,
    ...                prior_scale="auto", standardize_features=True)  # doctest: +SKIP
    """
    return AnswerReadout(token_ids, layer)
