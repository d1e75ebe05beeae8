"""Pooling, classifier logits and label-token logits against manual computation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pyro_llm import features

RIGHT = torch.tensor([[1, 1, 1, 0, 0],
                      [1, 1, 1, 1, 1],
                      [1, 0, 0, 0, 0]])
LEFT = torch.tensor([[0, 0, 1, 1, 1],
                     [1, 1, 1, 1, 1],
                     [0, 0, 0, 0, 1]])


def _hidden(seed=0, B=3, T=5, H=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, generator=g, dtype=torch.float64)


def test_last_token_index_right_and_left_padding():
    assert features.last_token_index(RIGHT).tolist() == [2, 4, 0]
    assert features.last_token_index(LEFT).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="all zero"):
        features.last_token_index(torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        features.last_token_index(torch.ones(4, dtype=torch.long))


@pytest.mark.parametrize("mask", [RIGHT, LEFT], ids=["right_pad", "left_pad"])
def test_pool_against_manual(mask):
    h = _hidden()
    mean = features.pool(h, mask, "mean")
    cls = features.pool(h, mask, "cls")
    last = features.pool(h, mask, "last")
    for b in range(h.shape[0]):
        pos = [t for t in range(h.shape[1]) if mask[b, t]]
        torch.testing.assert_close(mean[b], h[b, pos].mean(0), rtol=0, atol=1e-12)
        assert torch.equal(last[b], h[b, pos[-1]])
        assert torch.equal(cls[b], h[b, 0])
    # padded positions do not leak into the mean
    h2 = h.clone()
    h2[mask == 0] = 1e6
    torch.testing.assert_close(features.pool(h2, mask, "mean"), mean, rtol=0, atol=1e-9)


def test_pool_reads_model_outputs():
    hs = tuple(_hidden(seed=s) for s in range(3))
    out = SimpleNamespace(hidden_states=hs)
    assert torch.equal(features.pool(out, RIGHT, "cls", layer=1), hs[1][:, 0])
    assert torch.equal(features.pool(out, RIGHT, "cls"), hs[-1][:, 0])
    out = SimpleNamespace(hidden_states=None, last_hidden_state=hs[0])
    assert torch.equal(features.pool(out, RIGHT, "cls"), hs[0][:, 0])
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        features.pool(SimpleNamespace(hidden_states=None, last_hidden_state=None), RIGHT)


def test_pool_errors():
    h = _hidden()
    with pytest.raises(ValueError, match="do not match attention_mask"):
        features.pool(h, RIGHT[:, :4])
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        features.pool(h, RIGHT, "max")
    with pytest.raises(ValueError, match="empty text"):
        features.pool(h, torch.zeros_like(RIGHT), "last")


def test_class_logits():
    logits = torch.randn(3, 2)
    assert features.class_logits(SimpleNamespace(logits=logits)) is logits
    assert features.class_logits(logits) is logits
    with pytest.raises(ValueError, match="label_token_logits"):
        features.class_logits(torch.randn(3, 5, 2))
    with pytest.raises(ValueError, match="sequence classifier"):
        features.class_logits(SimpleNamespace())


@pytest.mark.parametrize("mask", [RIGHT, LEFT], ids=["right_pad", "left_pad"])
def test_label_token_logits_picks_last_position_and_ids(mask):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g)
    ids = [7, 2, 9]
    out = features.label_token_logits(SimpleNamespace(logits=logits), mask, ids)
    assert out.shape == (3, 3)
    for b in range(3):
        last = max(t for t in range(5) if mask[b, t])
        assert torch.equal(out[b], logits[b, last, ids])
    assert torch.equal(features.label_token_logits(logits, mask, torch.tensor(ids)), out)


def test_label_token_logits_errors():
    logits = torch.randn(3, 5, 11)
    with pytest.raises(ValueError, match=r"token_ids must be >= 2 ids in \[0, 11\)"):
        features.label_token_logits(logits, RIGHT, [3])
    with pytest.raises(ValueError, match="token_ids must be"):
        features.label_token_logits(logits, RIGHT, [3, 11])
    with pytest.raises(ValueError, match="token_ids must be"):
        features.label_token_logits(logits, RIGHT, [-1, 3])
    with pytest.raises(ValueError, match=r"\(batch, seq, vocab\)"):
        features.label_token_logits(logits[:, 0], RIGHT, [1, 2])


# ---------------------------------------------------------------- LabelTokenPrompt (real tokenizer)
TEMPLATE = "Review: {text}\nSentiment (negative or positive):"


def test_label_token_prompt_token_ids(minilm_tokenizer):
    tok = minilm_tokenizer
    prompt = features.LabelTokenPrompt(tok, TEMPLATE, ["negative", "positive"])
    assert prompt.token_ids == tok.convert_tokens_to_ids(["negative", "positive"])
    assert prompt.token_ids[0] != prompt.token_ids[1]
    # a multi-token word is scored by its first token
    first = tok.encode(" unbelievable", add_special_tokens=False)[0]
    p2 = features.LabelTokenPrompt(tok, TEMPLATE, ["unbelievable", "no"])
    assert p2.token_ids[0] == first


def test_label_token_prompt_encode(minilm_tokenizer):
    tok = minilm_tokenizer
    prompt = features.LabelTokenPrompt(tok, TEMPLATE, ["negative", "positive"])
    texts = ["A fine film.", "Dull, long and far too loud for its own good."]
    enc = prompt.encode(texts)
    assert set(enc) == {"input_ids", "attention_mask"}
    assert enc["input_ids"].shape == enc["attention_mask"].shape
    assert enc["input_ids"].shape[0] == 2
    ref = tok([TEMPLATE.format(text=t) for t in texts], padding=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    assert torch.equal(enc["attention_mask"], ref["attention_mask"])
    # the first row is shorter: right-padded with the pad id
    n0 = int(enc["attention_mask"][0].sum())
    assert n0 < enc["input_ids"].shape[1]
    assert (enc["input_ids"][0, n0:] == tok.pad_token_id).all()


def test_label_token_prompt_truncation_keeps_answer_slot(minilm_tokenizer):
    """A long text is cut, not the end of the template where the answer token goes."""
    tok = minilm_tokenizer
    prompt = features.LabelTokenPrompt(tok, TEMPLATE, ["negative", "positive"], max_length=24)
    long_text = " ".join(["an endless, meandering and overlong film"] * 20)
    enc = prompt.encode([long_text, "Short."])
    assert enc["input_ids"].shape[1] == 24
    suffix = tok.encode("Sentiment (negative or positive):", add_special_tokens=False)
    row = enc["input_ids"][0].tolist()
    assert row[0] == tok.cls_token_id and row[-1] == tok.sep_token_id
    assert row[-1 - len(suffix):-1] == suffix
    assert tok.truncation_side == "right"  # the shared tokenizer is left as it was
    # and the position label_token_logits reads is the last attended one
    assert int(features.last_token_index(enc["attention_mask"])[0]) == 23


def test_label_token_prompt_errors(minilm_tokenizer):
    tok = minilm_tokenizer
    with pytest.raises(ValueError, match=r"must contain '\{text\}'"):
        features.LabelTokenPrompt(tok, "Review: ...", ["negative", "positive"])
    with pytest.raises(ValueError, match="share a first token"):
        features.LabelTokenPrompt(tok, TEMPLATE, ["good", "good job"])
    with pytest.raises(ValueError, match="encodes to no token"):
        features.LabelTokenPrompt(tok, TEMPLATE, ["negative", "   "])
