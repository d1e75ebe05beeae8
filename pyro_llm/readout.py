"""The one callback convention: how class logits and labels are read from a batch.

Every fit and every ``predict`` takes a :class:`Readout`: ``logits(model, batch) -> (B, C)``
runs the model (a peft model, a :class:`~pyro_llm.BayesianLoRA`, a PoLAR adapter) on one batch,
``labels(batch) -> (B,)`` reads the labels. The defaults understand Hugging Face dict batches
(``model(**inputs).logits``, ``batch["labels"]``) and ``(x, y)`` tuples (``model(x)``, ``y``);
:meth:`Readout.label_tokens` scores a causal LM through the next-token logits of a few label
words. Under stacked adapter draws the logits carry the draw axis in front, ``(S, B, C)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .features import class_logits, label_token_logits

__all__ = ["Readout", "default_logits", "default_labels", "as_readout"]

_NOT_INPUTS = ("labels", "label", "index")


def default_logits(model: torch.nn.Module, batch) -> torch.Tensor:
    """``model(**inputs).logits`` for a dict batch (``labels`` / ``index`` left out), ``model(x)`` for
    an ``(x, y)`` tuple; a plain tensor output is taken as the logits."""
    if isinstance(batch, Mapping):
        out = model(**{k: v for k, v in batch.items() if k not in _NOT_INPUTS})
    elif isinstance(batch, (tuple, list)):
        out = model(batch[0])
    else:
        out = model(batch)
    return class_logits(out)


def default_labels(batch) -> torch.Tensor | None:
    """``batch["labels"]`` (or ``"label"``) of a dict batch, ``y`` of an ``(x, y)`` tuple."""
    if isinstance(batch, Mapping):
        return batch.get("labels", batch.get("label"))
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


@dataclass(frozen=True)
class Readout:
    """How to get class logits and labels from a batch (see the module docs).

    Example
    -------
    >>> import torch
    >>> net = torch.nn.Linear(4, 3)
    >>> r = Readout()
    >>> r.logits(net, (torch.randn(2, 4), torch.tensor([0, 2]))).shape
    torch.Size([2, 3])
    >>> r.require_labels({"x": 1, "labels": torch.tensor([1])}).tolist()
    [1]
    """

    logits: Callable[[torch.nn.Module, object], torch.Tensor] = default_logits
    labels: Callable[[object], torch.Tensor | None] = default_labels

    @classmethod
    def label_tokens(cls, token_ids: Sequence[int] | torch.Tensor) -> Readout:
        """A causal LM answering through label words: the next-token logits of ``token_ids`` at the
        last attended position (dict batches with ``input_ids`` and ``attention_mask``)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long)

        def logits(model, batch):
            if not isinstance(batch, Mapping) or "attention_mask" not in batch:
                raise ValueError("Readout.label_tokens reads dict batches with input_ids and "
                                 f"attention_mask (e.g. PromptDataset's), got a {type(batch).__name__}")
            inputs = {k: v for k, v in batch.items() if k not in _NOT_INPUTS}
            return label_token_logits(model(**inputs), batch["attention_mask"], ids)

        return cls(logits=logits)

    def require_labels(self, batch) -> torch.Tensor:
        """The batch's labels, or an error that says how to supply them."""
        y = self.labels(batch)
        if y is None:
            raise ValueError(f"cannot find labels in a {type(batch).__name__} batch (dict batches need "
                             "'labels', tuples (x, y)); pass readout=Readout(labels=lambda batch: ...)")
        return y

    def probs(self, model: torch.nn.Module, batch) -> torch.Tensor:
        """Class probabilities: the softmax of :attr:`logits`, in float32."""
        return self.logits(model, batch).float().softmax(-1)


def as_readout(readout: Readout | None = None, logits_fn: Callable | None = None,
               labels_fn: Callable | None = None, default: Readout | None = None) -> Readout:
    """A :class:`Readout` from the new argument or the older ``logits_fn`` / ``labels_fn`` pair."""
    if readout is not None and (logits_fn is not None or labels_fn is not None):
        raise ValueError("pass readout= or logits_fn= / labels_fn=, not both")
    if readout is not None:
        if not isinstance(readout, Readout):
            raise TypeError(f"readout must be a pyro_llm.Readout, got {type(readout).__name__}")
        return readout
    base = default or Readout()
    return Readout(logits=logits_fn or base.logits, labels=labels_fn or base.labels)
