"""What the language model hands a statistical model.

* :func:`pool` -- pooled hidden states (``"mean"``, ``"cls"``, ``"last"`` token);
* :func:`class_logits` -- a sequence classifier's logits;
* :func:`label_token_logits` with :class:`LabelTokenPrompt` -- a causal LM's next-token
  logits restricted to the answer tokens after a prompt (Laplace-LoRA, appendix D).

All are plain tensor functions of a model output, so one forward pass of
:class:`~pyro_llm.BayesianLoRA` (one adapter draw) can feed several heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["pool", "class_logits", "last_token_index", "label_token_logits", "label_token_ids",
           "LabelTokenPrompt"]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended position in each row (right or left padding), shape ``(B,)``."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got {tuple(attention_mask.shape)}")
    if (attention_mask.sum(-1) == 0).any():
        raise ValueError("a row of attention_mask is all zero: an empty text reached the model")
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * (pos + 1)).argmax(-1)


def _hidden(output, layer: int) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    hs = getattr(output, "hidden_states", None)
    if hs is not None:
        return hs[layer]
    if layer == -1 and getattr(output, "last_hidden_state", None) is not None:
        return output.last_hidden_state
    raise ValueError("the model output has no hidden states; call the model with "
                     "output_hidden_states=True or use the base model's last_hidden_state")


def pool(output, attention_mask: torch.Tensor, method: str = "mean", layer: int = -1) -> torch.Tensor:
    """Pool token states of ``output`` (a tensor ``(B, T, H)`` or a model output) to ``(B, H)``.

    ``method``: ``"mean"`` over attended tokens, ``"cls"`` (first token) or ``"last"``
    (last attended token, for decoders). ``layer`` picks a hidden-state layer when the
    output carries ``hidden_states``. Leading draw dimensions (``(S, B, T, H)`` from a
    sample-batched forward) are kept: ``(S, B, H)``.
    """
    h = _hidden(output, layer)
    if h.dim() < 3 or h.shape[-3:-1] != attention_mask.shape:
        raise ValueError(f"hidden states {tuple(h.shape)} do not match attention_mask "
                         f"{tuple(attention_mask.shape)}")
    if method == "mean":
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(-2) / m.sum(-2).clamp_min(1.0)
    if method == "cls":
        return h[..., 0, :]
    if method == "last":
        rows = torch.arange(h.shape[-3], device=h.device)
        return h[..., rows, last_token_index(attention_mask), :]
    raise ValueError(f"unknown pooling {method!r}; choose 'mean', 'cls' or 'last'")


def class_logits(output) -> torch.Tensor:
    """Logits ``(B, C)`` of a sequence classifier (``(S, B, C)`` for the output of a
    sample-batched forward, which carries its ``sample_shape``)."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    dims = 2 + len(getattr(output, "sample_shape", ()))
    if logits is None or logits.dim() != dims:
        raise ValueError("expected (batch, classes) logits; is this a sequence classifier? "
                         "For a causal LM use label_token_logits")
    return logits


def label_token_logits(output, attention_mask: torch.Tensor, token_ids: Sequence[int] | torch.Tensor
                       ) -> torch.Tensor:
    """Next-token logits at the last attended position, restricted to ``token_ids``: ``(B, K)``
    (``(S, B, K)`` under stacked draws)."""
    logits = output if isinstance(output, torch.Tensor) else output.logits
    if logits.dim() < 3:
        raise ValueError(f"expected causal-LM logits (batch, seq, vocab), got {tuple(logits.shape)}")
    ids = torch.as_tensor(token_ids, device=logits.device, dtype=torch.long)
    if ids.numel() < 2 or int(ids.max()) >= logits.shape[-1] or int(ids.min()) < 0:
        raise ValueError(f"token_ids must be >= 2 ids in [0, {logits.shape[-1]}), got {ids.tolist()}")
    last = last_token_index(attention_mask)
    rows = torch.arange(logits.shape[-3], device=logits.device)
    return logits[..., rows, last, :][..., ids]


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """The answer token of each label word: the first token of ``" " + word``, one per class.

    A prompt ends right before the answer (``"...Sentiment:"``), so the answer's first token
    carries the word's leading space. A word of several tokens is scored by its first one only;
    two words with the same first token cannot be told apart and are refused.

    Example
    -------
    >>> ids = label_token_ids(tokenizer, ["negative", "positive"])  # doctest: +SKIP
    >>> label_token_logits(model(**batch), batch["attention_mask"], ids)  # (B, 2)  # doctest: +SKIP
    """
    if isinstance(labels, str) or len(labels) < 2:
        raise ValueError(f"labels must be a list of at least 2 words, got {labels!r}")
    ids = []
    for word in labels:
        if not isinstance(word, str):
            raise TypeError(f"labels must be strings, got {word!r}")
        toks = tokenizer.encode(" " + word.strip(), add_special_tokens=False)
        if not toks:
            raise ValueError(f"label {word!r} encodes to no token")
        ids.append(int(toks[0]))
    if len(set(ids)) != len(ids):
        same = sorted({w for w, i in zip(labels, ids, strict=True) if ids.count(i) > 1})
        raise ValueError(f"labels {same} share a first token ({ids}); choose words that start "
                         "differently")
    return ids


@dataclass
class LabelTokenPrompt:
    """A prompt template whose answer is one of a few label words, scored by next-token logits.

    Parameters
    ----------
    tokenizer: a Hugging Face tokenizer.
    template: a format string with ``{text}``, ending where the answer token would go.
    labels: the answer words, one per class (their first token is the class's token).

    Example
    -------
    ``prompt = LabelTokenPrompt(tok, "Review: {text}\\nSentiment (negative or positive):",
    ["negative", "positive"])``; then ``enc = prompt.encode(texts)`` and
    ``label_token_logits(model(**enc), enc["attention_mask"], prompt.token_ids)``.
    """

    tokenizer: object
    template: str
    labels: Sequence[str]
    max_length: int = 128

    def __post_init__(self):
        if "{text}" not in self.template:
            raise ValueError(f"template must contain '{{text}}', got {self.template!r}")
        self.token_ids = label_token_ids(self.tokenizer, self.labels)

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise prompts, truncating on the left so that the answer slot survives.

        A prompt longer than ``max_length`` loses its first tokens (the start of the text,
        and the template's head with it), never the end of the template.
        """
        prompts = [self.template.format(text=t) for t in texts]
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        side = getattr(tok, "truncation_side", "right")
        tok.truncation_side = "left"
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, truncation=True,
                      max_length=self.max_length)
        finally:
            tok.truncation_side = side
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
