"""``regress(model=..., text=...)``: the one call from a DataFrame of texts to a coefficient table,
on tiny BERT and Llama classifiers built from configs (their coders are weak; the plumbing and the
guarantees are what is tested)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_coding import FAST, tiny, tiny_tokenizer

from pyro_llm.regression import regress

QUIET = pytest.mark.filterwarnings("ignore:code_crossfit. fold")


def frame(n: int = 60, n_lab: int = 30, seed: int = 0) -> pd.DataFrame:
    """Texts whose first word carries the class (w3 / w4), an outcome depending on it."""
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 2, n)
    q = rng.normal(size=n)
    texts = [" ".join([f"w{3 if z[i] else 4}", *[f"w{int(w)}" for w in rng.integers(5, 40, 4)]])
             for i in range(n)]
    lab = np.zeros(n, bool)
    lab[rng.choice(n, n_lab, replace=False)] = True
    return pd.DataFrame({"text": texts, "q": q, "y": 1 + z + 0.5 * q + rng.normal(size=n),
                         "z": np.where(lab, z, np.nan)})


def call(df, model=None, **kw):
    kw = {"text": "text", "tokenizer": tiny_tokenizer(), "train": FAST, "folds": 2, "progress": False,
          "coder": {"max_length": 12}, "num_draws": 100, **kw}
    return regress(df, "y ~ z + q", label="z", model=model if model is not None else tiny(), **kw)


@QUIET
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_one_call_end_to_end(kind):
    df = frame()
    res = call(df, model=tiny(kind))
    assert res.method == "dr" and res.coef_names == ("Intercept", "z", "q")
    assert res.info["posterior"] == "map" and res.info["fold_accuracy"].shape == (2,)
    assert np.isfinite(res.coef).all() and (res.sd > 0).all() and res.draws.shape == (100, 3)
    assert "coder's cross-fitted accuracy per fold" in repr(res)
    assert set(np.unique(res.info["fold_ids"])) == {0, 1}


@QUIET
def test_one_call_resumes_from_its_cache_with_the_same_table(tmp_path):
    df = frame(seed=1)
    first = call(df, cache_dir=tmp_path / "c")
    again = call(df, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(first.coef, again.coef)
    np.testing.assert_array_equal(first.cov, again.cov)
    assert again.info["coder"]["resumed_folds"] == [0, 1]
    with pytest.raises(ValueError, match="texts"):       # other data, same cache: refused, named
        call(df.assign(text=df["text"] + " w7"), cache_dir=tmp_path / "c")


@pytest.mark.parametrize("change, kwargs, match", [
    (None, {"text": "body"}, r"names columns|not in the DataFrame"),
    (None, {"text": None}, "model= needs text="),
    (lambda d: d.assign(z=d["z"].where(d.index.isin(d.index[d["z"].notna()][:4]))), {"folds": 5},
     "cannot be split into 5 folds"),
    (None, {"predictions": np.zeros(60)}, "exactly one of model="),
])
def test_one_call_bad_input_is_a_clear_error(change, kwargs, match):
    df = frame()
    if change is not None:
        df = change(df)
    with pytest.raises(ValueError, match=match):
        call(df, **kwargs)


def test_one_call_refuses_a_model_without_lora():
    import transformers as tf
    from conftest import VOCAB

    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    base = tf.BertForSequenceClassification(cfg)
    with pytest.raises(ValueError, match="LoRA"):
        call(frame(), model=base)


def test_one_call_refuses_a_class_missing_from_a_fold():
    df = frame(n=60, n_lab=30)
    lab = df["z"].notna().to_numpy()
    ones = np.flatnonzero(lab & (df["z"] == 1).to_numpy())
    df.loc[ones[1:], "z"] = 0.0                                      # a single labelled row of class 1
    with pytest.raises(ValueError, match="class"):
        call(df)


@QUIET
def test_downstream_fine_tuning_stays_inside_the_folds(monkeypatch):
    """With downstream=True each fold's coder also trains on the regression likelihood over the
    other folds' unlabelled rows; its (β, σ) come from the other folds' labelled rows only. A test
    that fails if fold k's rows (labels, outcomes, unlabelled texts) reach fold k's coder."""
    from pyro_llm.regression import finetune as ftmod

    df = frame(n=60, n_lab=30, seed=3)
    seen = []
    real = ftmod.finetune

    def spy(model, tok, texts, labels, settings, **kw):
        term, unl_texts, unl_rows = kw["downstream"]
        seen.append((set(texts), np.asarray(unl_rows), term.beta.detach().numpy().copy()))
        return real(model, tok, texts, labels, settings, **kw)

    monkeypatch.setattr(ftmod, "finetune", spy)
    res = call(df, downstream=True)
    ids = res.info["coded"]["fold_ids"]
    lab = df["z"].notna().to_numpy()
    assert len(seen) == 2
    for k, (texts, unl_rows, beta) in enumerate(seen):
        own = set(df["text"][ids == k])
        assert not texts & own and not set(unl_rows) & set(np.flatnonzero(ids == k))
        assert set(unl_rows) == set(np.flatnonzero(~lab & (ids != k)))
        rows = lab & (ids != k)
        X = np.column_stack([np.ones(rows.sum()), df["z"][rows], df["q"][rows]])
        np.testing.assert_allclose(beta, np.linalg.lstsq(X, df["y"][rows], rcond=None)[0], rtol=1e-4)
    with pytest.raises(ValueError, match="needs model= and text="):
        regress(df, "y ~ z + q", label="z", predictions=np.zeros(60), downstream=True)
