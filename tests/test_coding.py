"""Cross-fitted coding (pyro_llm.regression.coding): folds never see their own labels, resume,
cache keys, bad inputs, degenerate coders; tiny BERT and Llama classifiers built from configs."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, fake_finetune, tiny_transformer

from pyro_llm.regression import coding
from pyro_llm.regression import finetune as ftmod
from pyro_llm.regression.coding import CrossFitCoding, FineTune, code_crossfit
from pyro_llm.regression.crossfit import fold_ids

FAST = FineTune(epochs=2, lr=1e-2, batch_size=8, patience=1, val_fraction=0.25, min_steps=0)
QUIET = pytest.mark.filterwarnings("ignore:code_crossfit. fold")  # tiny random coders are useless


def tiny_tokenizer():
    """A Hugging Face fast tokenizer over the tiny models' vocabulary: words w2 .. w49."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def corpus(n: int = 24, n_lab: int = 16, seed: int = 0):
    """Distinct word texts; class 1 texts carry w3, class 0 texts w4; the last n - n_lab rows
    are unlabelled (-1)."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 2
    texts = []
    for i in range(n):
        words = [f"w{int(w)}" for w in g.integers(5, VOCAB, size=int(g.integers(2, 8)))]
        texts.append(" ".join([f"w{3 if y[i] else 4}", *words, f"w{5 + i % 40}"]))
    labels = np.where(np.arange(n) < n_lab, y, -1)
    return texts, labels


def tiny_llama(seed: int = 0):
    import peft
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_key_value_heads=2, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                         num_labels=2, pad_token_id=0)
    base = tf.LlamaForSequenceClassification(cfg).eval()
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           task_type=peft.TaskType.SEQ_CLS)
    return peft.get_peft_model(base, lcfg)


def tiny(kind: str = "bert", seed: int = 0):
    return tiny_llama(seed) if kind == "llama" else tiny_transformer("bert", seed)[0]


def run(texts, labels, model=None, **kw):
    kw = {"tokenizer": tiny_tokenizer(), "train": FAST, "folds": 2, "max_length": 16,
          "progress": False, **kw}
    return code_crossfit(texts, labels, model=model if model is not None else tiny(), **kw)


class Interrupted(Exception):
    """Stands for a user's Ctrl-C or a killed job."""


def state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


# ---------------------------------------------------------------------------- end to end
@QUIET
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_end_to_end(kind):
    texts, labels = corpus()
    model = tiny(kind)
    before = state(model)
    res = run(texts, labels, model, folds=3)
    assert isinstance(res, CrossFitCoding)
    n = len(texts)
    assert res.probs.shape == (n, 2) and res.probs.dtype == np.float64
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-12)
    assert (res.probs > 0).all()
    assert res.spread.shape == (n,) and (res.spread == 0).all()
    assert res.fold_ids.shape == (n,) and set(res.fold_ids.tolist()) == {0, 1, 2}
    lab = labels >= 0
    for k in range(3):
        np.testing.assert_array_equal(res.fitted_on[k], np.flatnonzero(lab & (res.fold_ids != k)))
        assert not set(res.fitted_on[k]) & set(np.flatnonzero(res.fold_ids == k))
    assert res.fold_accuracy.shape == (3,) and res.classes == (0, 1)
    assert res.info["posterior"] == "map" and res.info["cache_dir"] is None
    assert len(res.info["seconds"]) == 3 and len(res.info["epochs_run"]) == 3
    after = state(model)  # the model passed in is not changed
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the default fold assignment is crossfit.fold_ids of the labelled rows
    np.testing.assert_array_equal(res.fold_ids, fold_ids(lab, 3, 0))


@QUIET
@pytest.mark.parametrize("posterior", ["laplace", "ensemble", "svi"])
def test_posteriors_give_draws_and_spread(posterior, tmp_path):
    texts, labels = corpus(16, 12)
    res = run(texts, labels, posterior=posterior, num_samples=4, cache_dir=tmp_path)
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-12)
    assert res.spread.shape == (16,) and np.isfinite(res.spread).all()
    assert (res.spread > 0).all()
    assert res.info["posterior"] == posterior
    # a rerun reads everything back: same numbers, nothing refitted
    again = run(texts, labels, posterior=posterior, num_samples=4, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.probs, res.probs)
    np.testing.assert_array_equal(again.spread, res.spread)
    assert again.info["resumed_folds"] == [0, 1]


def test_spread_formula():
    # K = 2: sd of log p1/p0 over draws; K = 3: of the top class against the rest
    d2 = torch.tensor([[[0.5, 0.5]], [[0.2, 0.8]], [[0.1, 0.9]]])
    lo = np.log([1.0, 4.0, 9.0])
    np.testing.assert_allclose(coding.posterior_spread(d2, d2.mean(0).numpy()), [lo.std(ddof=1)], rtol=1e-6)
    d3 = torch.tensor([[[0.5, 0.3, 0.2]], [[0.8, 0.1, 0.1]]])
    lo = np.log([0.5 / 0.5, 0.8 / 0.2])
    np.testing.assert_allclose(coding.posterior_spread(d3, d3.mean(0).numpy()), [lo.std(ddof=1)], rtol=1e-6)


# ---------------------------------------------------------------------------- no leaks
@QUIET
@pytest.mark.parametrize("posterior", ["map", "laplace"])
def test_fold_never_sees_its_own_labels(monkeypatch, posterior):
    """Every labelled dataset built while fitting fold k (training, early stopping, Laplace)
    holds only labelled rows of the other folds; fold k's coding then starts."""
    texts, labels = corpus(30, 24)
    ids = np.arange(30) % 3
    events = []
    real_ds, real_code = ftmod.TextDataset, coding.code_corpus

    class Recording(real_ds):
        def __init__(self, texts_, tokenizer, labels_=None, *a, **k):
            events.append(("data", list(texts_), None if labels_ is None else np.asarray(labels_)))
            super().__init__(texts_, tokenizer, labels_, *a, **k)

    def recording_code(texts_, *a, **k):
        events.append(("code", list(texts_), None))
        return real_code(texts_, *a, **k)

    monkeypatch.setattr(ftmod, "TextDataset", Recording)
    monkeypatch.setattr(coding, "code_corpus", recording_code)
    res = run(texts, labels, folds=3, fold_ids=ids, posterior=posterior, num_samples=2)
    row = {t: i for i, t in enumerate(texts)}
    fold, seen = 0, {0: []}
    for kind, tx, y in events:
        if kind == "code":
            assert {ids[row[t]] for t in tx} == {fold}  # fold k codes its own rows only
            fold += 1
            seen[fold] = []
            continue
        rows = [row[t] for t in tx]
        np.testing.assert_array_equal(y, labels[rows])  # the rows' own labels, none unlabelled
        seen[fold] += rows
    assert fold == 3
    for k in range(3):
        assert seen[k], f"no training data recorded for fold {k}"
        assert not {i for i in seen[k] if ids[i] == k}, f"fold {k}'s model saw fold {k}'s labels"
        assert set(seen[k]) == set(res.fitted_on[k])
        assert all(labels[i] >= 0 for i in seen[k])


@QUIET
def test_trained_adapter_passed_in_is_discarded():
    texts, labels = corpus()
    clean = run(texts, labels, tiny())
    trained = tiny()
    fake_finetune(trained)
    with torch.no_grad():
        trained.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    with pytest.warns(UserWarning, match="already trained"):
        res = run(texts, labels, trained)
    np.testing.assert_array_equal(res.probs, clean.probs)  # nothing of it reached the coders
    assert any("already trained" in w for w in res.info["warnings"])


# ---------------------------------------------------------------------------- resume and cache
@QUIET
def test_resume_after_interruption(monkeypatch, tmp_path):
    texts, labels = corpus(40, 20)
    ref = run(texts, labels, folds=3)
    real = ftmod.finetune
    calls, armed = [], [True]

    def failing(*a, **k):
        calls.append(k["seed"])
        if armed[0] and len(calls) == 2:
            raise Interrupted("stopped during fold 1")
        return real(*a, **k)

    monkeypatch.setattr(ftmod, "finetune", failing)
    with pytest.raises(Interrupted):
        run(texts, labels, folds=3, cache_dir=tmp_path)
    assert (tmp_path / "fold_0" / "fold.json").exists()
    assert not (tmp_path / "fold_1" / "fold.json").exists()
    calls.clear()
    armed[0] = False
    res = run(texts, labels, folds=3, cache_dir=tmp_path)
    assert calls == [1, 2]  # fold 0 (seed 0) is not refitted; folds 1 and 2 are fitted
    assert res.info["resumed_folds"] == [0]
    np.testing.assert_array_equal(res.probs, ref.probs)
    np.testing.assert_array_equal(res.fold_accuracy, ref.fold_accuracy)


@QUIET
def test_resume_mid_coding_reloads_the_saved_adapter(monkeypatch, tmp_path):
    texts, labels = corpus(40, 20)
    monkeypatch.setattr(coding, "SHARD_ROWS", 4)
    monkeypatch.setattr(coding, "CODE_BATCH", 4)
    ref = run(texts, labels)
    real = coding.code_corpus
    n_calls = {"code": 0, "fit": 0}

    def interrupted(texts_, predict_fn, *a, **k):
        n_calls["code"] += 1
        if n_calls["code"] == 2:  # fold 1: fail after two batches (two shards written)
            count = {"n": 0}

            def flaky(batch):
                count["n"] += 1
                if count["n"] > 2:
                    raise Interrupted("stopped while coding fold 1")
                return predict_fn(batch)

            flaky.fingerprint = predict_fn.fingerprint
            return real(texts_, flaky, *a, **k)
        return real(texts_, predict_fn, *a, **k)

    monkeypatch.setattr(coding, "code_corpus", interrupted)
    with pytest.raises(Interrupted):
        run(texts, labels, cache_dir=tmp_path)
    real_fit = ftmod.finetune

    def counting(*a, **k):
        n_calls["fit"] += 1
        return real_fit(*a, **k)

    monkeypatch.setattr(ftmod, "finetune", counting)
    res = run(texts, labels, cache_dir=tmp_path)
    assert n_calls["fit"] == 0  # fold 1's adapter came back from adapter/, not a new fit
    np.testing.assert_array_equal(res.probs, ref.probs)  # shards of the same predictor


@QUIET
def test_cache_refuses_changed_inputs(tmp_path):
    texts, labels = corpus()
    model = tiny()
    first = run(texts, labels, model, cache_dir=tmp_path)
    assert first.info["cache_dir"] == str(tmp_path) and (tmp_path / "key.json").exists()
    changed = tiny()
    with torch.no_grad():
        changed.base_model.model.bert.embeddings.word_embeddings.weight[3, 0] += 1e-3
    with pytest.raises(ValueError, match=r"differing: model\b"):
        run(texts, labels, changed, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="differing: texts"):
        run(texts[:-1] + ["w7 w8"], labels, model, cache_dir=tmp_path)
    flipped = labels.copy()
    flipped[0] = 1 - flipped[0]
    with pytest.raises(ValueError, match="differing: labels"):
        run(texts, flipped, model, cache_dir=tmp_path)
    other = fold_ids(labels >= 0, 2, seed=5)
    with pytest.raises(ValueError, match="differing: fold_ids"):
        run(texts, labels, model, cache_dir=tmp_path, fold_ids=other)
    with pytest.raises(ValueError, match="differing: train"):
        run(texts, labels, model, cache_dir=tmp_path, train=FineTune(epochs=3))
    with pytest.raises(ValueError, match="pass a new cache_dir"):
        run(texts, labels, model, cache_dir=tmp_path, posterior="laplace")
    again = run(texts, labels, model, cache_dir=tmp_path)  # unchanged inputs: all read back
    np.testing.assert_array_equal(again.probs, first.probs)


def test_no_temporary_folder_left(monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    texts, labels = corpus(12, 8)
    seen = []
    real = tempfile.mkdtemp

    def recording(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run(texts, labels)
    assert seen and not any(Path(d).exists() for d in seen)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("pyro_llm_crossfit_")]


# ---------------------------------------------------------------------------- bad inputs
def _bad_cases():
    texts, labels = corpus(12, 8)
    nan_labels = labels.astype(float)
    nan_labels[2] = np.nan
    one_fold_class = labels.copy()
    ids = np.arange(12) % 2
    one_fold_class[:8] = np.where(ids[:8] == 0, 1, 0)  # class 1 labelled only in fold 0
    return [
        ([], [], {}, "texts is empty"),
        (texts, labels[:-1], {}, r"one entry per text: shape \(12,\)"),
        (texts[:3] + ["  "] + texts[4:], labels, {}, "text at row 3 is empty"),
        (texts[:2] + [float("nan")] + texts[3:], labels, {}, "row 2 is NaN"),
        (texts, nan_labels, {}, r"labels contain nan at rows \[2\].*-1"),
        (texts, np.where(np.arange(12) < 1, 0, -1), {}, "1 labelled rows cannot be split into 2"),
        (texts, np.where(labels == 1, 2, labels), {}, "out of range: the model has 2 labels"),
        (texts, one_fold_class, {"fold_ids": ids}, "fold 0's training rows .* no row of class 1"),
        (texts, labels, {"fold_ids": ids[:-1]}, "fold_ids must have one entry per text"),
        (texts, labels, {"fold_ids": ids + 1}, r"fold_ids must lie in 0..1"),
        (texts, labels, {"folds": 3, "fold_ids": ids}, r"fold\(s\) \[2\] have no labelled rows"),
        (texts, labels, {"posterior": "polar_vbll"}, "choose one of .*'map', 'laplace'"),
        (texts, labels.astype(str), {}, "integer class indices"),
        (texts, np.array([0, 1, None, *labels[3:]], dtype=object), {}, r"missing values .* rows \[2\]"),
        (texts, labels + 0.5, {}, "integer class indices; row 0 holds 0.5"),
    ]


@pytest.mark.parametrize("texts, labels, kw, match", _bad_cases())
def test_bad_inputs(texts, labels, kw, match):
    with pytest.raises(ValueError, match=match):
        run(texts, labels, **kw)


def test_model_without_lora_and_missing_tokenizer():
    import transformers as tf

    texts, labels = corpus(12, 8)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=2)
    with pytest.raises(ValueError, match="no LoRA adapter; add one with peft.get_peft_model"):
        run(texts, labels, tf.BertForSequenceClassification(cfg))
    with pytest.raises(ValueError, match="tokenizer= is needed"):
        run(texts, labels, tokenizer=None)
    with pytest.raises(ValueError, match="not a local Hugging Face model folder"):
        run(texts, labels, "/nonexistent/model")
    with pytest.raises(ValueError, match="FineTune.lr"):
        FineTune(lr=0)


@QUIET
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_model_folder_path(tmp_path, kind):
    """A local model folder: the adapter targets come from its model_type (query/value for BERT,
    q_proj/v_proj for Llama), the tokenizer from the folder."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    if kind == "bert":
        net = tf.BertForSequenceClassification(tf.BertConfig(**common))
    else:
        net = tf.LlamaForSequenceClassification(tf.LlamaConfig(num_key_value_heads=2, **common))
    net.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    texts, labels = corpus(16, 12)
    res = run(texts, labels, str(tmp_path / "m"), tokenizer=None)
    assert res.probs.shape == (16, 2)
    np.testing.assert_allclose(res.probs.sum(1), 1.0, atol=1e-12)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "no-such-arch"}')
    with pytest.raises(ValueError, match="no default LoRA target modules for model_type 'no-such-arch'"):
        run(texts, labels, str(tmp_path / "odd"), tokenizer=None)


# ---------------------------------------------------------------------------- degenerate coders
def test_degenerate_coder_warns(monkeypatch):
    texts, labels = corpus(20, 16)

    def useless(model, *a, **k):  # no training, a zero head: probabilities 1/2, argmax class 0
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "modules_to_save" in n:
                    p.zero_()
        return {"epochs_run": 0, "best_epoch": None}

    monkeypatch.setattr(ftmod, "finetune", useless)
    with pytest.warns(UserWarning) as rec:
        res = run(texts, labels)
    said = [str(w.message) for w in rec if str(w.message).startswith("code_crossfit")]
    assert len(said) == 2
    assert re.search(r"fold 0's coder predicts a single class.*held-out accuracy 0\.500.*majority-class "
                     r"rate 0\.500.*label more rows.*FineTune\(epochs=", said[0])
    assert said[1].startswith("code_crossfit: fold 1's coder")
    np.testing.assert_allclose(res.probs, 0.5)
    assert len(res.info["warnings"]) == 2


# ---------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_minilm_rotten_tomatoes_coders_beat_chance():
    """Default fine-tuning on real text: 320 labelled reviews (160 fresh, 160 rotten), 2 folds, LoRA
    on MiniLM's top two blocks, max_length 32; each coder trains on 160 rows (136 after the
    early-stopping split). Measured: 0.72 and 0.69 in ~50 s on one busy core. (With 60 training
    rows LoRA on MiniLM memorises them and stays near 0.55-0.6 on new reviews.)"""
    import time

    from pyro_llm import data, models

    texts, y = data.rotten_tomatoes(seed=0)
    rows = np.sort(np.concatenate([np.flatnonzero(y == 1)[:160], np.flatnonzero(y == 0)[:160]]))
    texts, labels = [texts[i] for i in rows], y[rows]
    model, tok = models.lora_classifier(num_labels=2, layers_to_transform=[4, 5])
    t0 = time.perf_counter()
    res = code_crossfit(texts, labels, model=model, tokenizer=tok, folds=2, max_length=32,
                        progress=False)
    assert (res.fold_accuracy > 0.6).all(), res.fold_accuracy
    assert not res.info["warnings"]
    print(f"fold accuracy {res.fold_accuracy}, {time.perf_counter() - t0:.0f} s")
