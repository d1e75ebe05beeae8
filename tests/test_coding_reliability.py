"""Coded corpora that resume safely and files and inputs that fail with clear errors (issue 14,
items 7 and 12): finished shards checked on resume and by ``load_coded``, predictor
fingerprints that change with the model, manifest paths kept inside the folder, a manifest read
field by field; NaN / object-boolean labels and bfloat16 predictions; the regression coder's
cache files read through the validated readers."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_llm._io import FileFormatError
from pyro_llm.stream import code_corpus, load_coded, method_predictor

PLAIN = "ignore:code_corpus. predict_fn is a plain callable"


# ---------------------------------------------------------------------------- helpers
def text_probs(text: str, C: int = 3) -> torch.Tensor:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return (2 * torch.randn(C, generator=torch.Generator().manual_seed(seed))).softmax(-1)


class Predict:
    """``texts -> (2, B, C)``, logging what it saw; a fingerprint so that no warning is raised;
    ``fail_after`` batches it raises ``KeyboardInterrupt`` (an interrupted run)."""

    fingerprint = "test-predictor"

    def __init__(self, fail_after: int | None = None):
        self.seen, self.calls, self.fail_after = [], 0, fail_after

    def __call__(self, texts):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.seen += list(texts)
        p = torch.stack([text_probs(t) for t in texts])
        return torch.stack([p, p.roll(1, -1)])


def docs(n: int) -> list[str]:
    return [f"doc {i} " + "word " * (i % 4) for i in range(n)]


KW = dict(batch_size=3, shard_size=8, progress=False)


def coded(tmp_path, n: int = 20, name: str = "run", **kw):
    out = tmp_path / name
    code_corpus(docs(n), Predict(), out, **{**KW, **kw})
    return out


def same(a, b) -> None:
    for k in ("probs", "total", "aleatoric", "epistemic", "draws"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.ids == b.ids


# ---------------------------------------------------------------------------- 7a: finished shards
@pytest.mark.parametrize("damage", ["delete", "truncate", "nan"])
def test_resume_codes_a_missing_or_damaged_shard_again_and_keeps_the_others(tmp_path, damage):
    ref = load_coded(coded(tmp_path, name="ref"))
    out = coded(tmp_path)
    f = out / "shard-00001.safetensors"
    if damage == "delete":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:100])
    else:  # a float flipped to NaN inside the file (the last 4 bytes are the end of a tensor)
        b = bytearray(f.read_bytes())
        b[-4:] = np.array([np.nan], dtype=np.float32).tobytes()
        f.write_bytes(bytes(b))
    untouched = (out / "shard-00000.safetensors").stat().st_mtime_ns
    again = Predict()
    with pytest.warns(UserWarning, match="shard-00001.safetensors.*rows are coded again"):
        run = code_corpus(docs(20), again, out, **KW)
    assert again.seen == docs(20)[8:16]  # only the rows of the damaged shard
    assert (run.rows, run.coded, run.skipped) == (20, 8, 12)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == untouched
    same(load_coded(out), ref)


def test_resume_of_an_interrupted_run_recodes_a_lost_shard_then_goes_on(tmp_path):
    texts = docs(30)
    ref = load_coded(coded(tmp_path, 30, name="ref"))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # shards 0 and 1 written, then interrupted
        code_corpus(texts, Predict(fail_after=7), out, **KW)
    (out / "shard-00000.safetensors").unlink()
    again = Predict()
    with pytest.warns(UserWarning, match="shard-00000.safetensors"):
        run = code_corpus(texts, again, out, **KW)
    assert again.seen == texts[:8] + texts[16:]
    assert (run.coded, run.skipped) == (22, 8)
    same(load_coded(out), ref)


def test_load_coded_names_a_missing_or_damaged_shard(tmp_path):
    out = coded(tmp_path)
    f = out / "shard-00001.safetensors"
    keep = f.read_bytes()
    f.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-00001.safetensors \(shard 1, rows 8-15\) is "
                                                r"missing.*call code_corpus again"):
        load_coded(out)
    f.write_bytes(keep[:-7])
    with pytest.raises(FileFormatError, match="shard-00001.safetensors is not a readable safetensors"):
        load_coded(out)
    shutil.copy(out / "shard-00002.safetensors", f)  # another shard's file in its place
    with pytest.raises(FileFormatError, match="shard-00001.safetensors holds 4 rows but manifest.json "
                                              "says 8"):
        load_coded(out)


# ---------------------------------------------------------------------------- 7c: paths
@pytest.mark.parametrize("entry", ["../other/shard-00000.safetensors", "/tmp/shard-00000.safetensors"])
def test_a_manifest_entry_outside_the_folder_is_refused(tmp_path, entry):
    out, other = coded(tmp_path), coded(tmp_path, name="other")
    man = json.loads((out / "manifest.json").read_text())
    man["shards"][0]["file"] = entry if entry.startswith("..") else str(other / "shard-00000.safetensors")
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FileFormatError, match=r"shards\[0\].file .* (outside the folder|relative path)"):
        load_coded(out)
    with pytest.raises(FileFormatError, match=r"shards\[0\].file"):
        code_corpus(docs(20), Predict(), out, **KW)


# ---------------------------------------------------------------------------- 7d: manifest fields
@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("shards"), "'shards'"),
    (lambda m: m.update(rows="20"), "'rows'"),
    (lambda m: m["shards"][1].update(rows=None), r"'shards\[1\].rows'"),
    (lambda m: m["shards"][2].pop("digest"), r"'shards\[2\].digest'"),
    (lambda m: m["settings"].update(ids="no"), "'settings.ids'"),
    (lambda m: m.update(rows=21), "'rows' is 21 but the shards hold 20"),
    (lambda m: m["shards"][1].update(first_row=9), r"'shards\[1\].first_row' is 9, expected 8"),
    (lambda m: m.update(num_classes=None), "'num_samples' and 'num_classes'"),
])
def test_a_tampered_manifest_names_the_file_and_field(tmp_path, edit, field):
    out = coded(tmp_path)
    man = json.loads((out / "manifest.json").read_text())
    edit(man)
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(FileFormatError, match=f"manifest.json.*{field}"):
        load_coded(out)
    with pytest.raises(FileFormatError, match=f"manifest.json.*{field}"):
        code_corpus(docs(20), Predict(), out, **KW)


def test_a_manifest_that_is_not_json_names_the_file(tmp_path):
    out = coded(tmp_path)
    (out / "manifest.json").write_text('{"format": "pyro_llm.stream", "rows": 2')
    for call in (lambda: load_coded(out), lambda: code_corpus(docs(20), Predict(), out, **KW)):
        with pytest.raises(FileFormatError, match="manifest.json is not valid JSON"):
            call()


# ---------------------------------------------------------------------------- 7b: fingerprints
def features(texts) -> torch.Tensor:
    return torch.stack([torch.tensor([len(t), t.count("word"), sum(map(ord, t)) % 7, 1.0]).float()
                        for t in texts])


def test_a_plain_callable_bound_to_a_changed_model_is_refused_on_resume(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    calls = {"n": 0}

    def predict(texts):  # a user's function over a model in a closure
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        with torch.no_grad():
            return net(features(texts)).softmax(-1)

    with pytest.warns(UserWarning, match="plain callable without a fingerprint.*fingerprint="):
        with pytest.raises(KeyboardInterrupt):
            code_corpus(docs(20), predict, tmp_path, **KW)
    with torch.no_grad():
        net.weight.add_(0.5)  # another model
    with pytest.warns(UserWarning, match="plain callable"):
        with pytest.raises(ValueError, match="predictor: run 'callable:.*' vs now 'callable:"):
            code_corpus(docs(20), predict, tmp_path, **KW)
    with torch.no_grad():
        net.weight.sub_(0.5)  # the same model again resumes
    with pytest.warns(UserWarning, match="plain callable"):
        assert code_corpus(docs(20), predict, tmp_path, **KW).skipped == 8


def test_a_module_or_a_bound_method_is_fingerprinted_by_its_weights():
    from pyro_llm.predictors import predictor_fingerprint

    class Coder(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, texts):
            return self.lin(features(texts)).softmax(-1)

        def code(self, texts):
            return self(texts)

    a, b = Coder(0), Coder(1)
    for get in (lambda m: m, lambda m: m.code, lambda m: (lambda t: m.code(t))):
        fa, verified = predictor_fingerprint(get(a))
        assert not verified and fa.startswith("callable:")
        assert fa == predictor_fingerprint(get(Coder(0)))[0] != predictor_fingerprint(get(b))[0]


def test_an_explicit_fingerprint_is_recorded_and_checked_without_a_warning(tmp_path):
    fn = lambda texts: torch.full((len(texts), 2), 0.5)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code_corpus(docs(9), fn, tmp_path, fingerprint="coin v1", **KW)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["settings"]["predictor"] == "coin v1"
    with pytest.raises(ValueError, match="predictor: run 'coin v1' vs now 'coin v2'"):
        code_corpus(docs(9), fn, tmp_path, fingerprint="coin v2", **KW)
    with pytest.raises(TypeError, match="fingerprint must be a non-empty str"):
        code_corpus(docs(9), fn, tmp_path / "b", fingerprint=3, **KW)


def laplace(structure: str = "diag", delta: float = 1.0, seed: int = 0):
    from pyro_llm.infer.laplace.blocks import DiagBlock, FullBlock
    from pyro_llm.infer.laplace.posterior import LaplacePosterior

    g = torch.Generator().manual_seed(seed)
    m = torch.randn(2, 3, generator=g)
    h = torch.rand(2, 3, generator=g, dtype=torch.float64) + 0.1
    block = (DiagBlock(0, (2, 3), h) if structure == "diag"
             else FullBlock([0], [(2, 3)], torch.diag(h.reshape(-1))))
    return LaplacePosterior(["head"], [(2, 3)], {"head": m}, [block], delta, -3.0, 10, {})


def test_a_laplace_fingerprint_changes_with_prior_precision_curvature_and_map():
    fp = lambda la: method_predictor(la, None, num_samples=8).fingerprint  # noqa: E731
    base = fp(laplace())
    assert fp(laplace()) == base  # the same posterior, rebuilt, resumes
    assert fp(laplace(delta=2.0)) != base
    assert fp(laplace(structure="full")) != base
    other_h = laplace()
    other_h.blocks[0].diag.mul_(2)
    assert fp(other_h) != base
    other_map = laplace()
    other_map.map["head"].add_(1)
    assert fp(other_map) != base


# ---------------------------------------------------------------------------- 12: labels, predictions
def b1(seed: int = 0, N: int = 300, n: int = 100):
    """z binary, y = 1 + z + 0.5 q + noise; the first n rows labelled; (N, 2) probabilities."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=N)
    z = rng.random(N) < 0.5
    y = 1 + z + 0.5 * q + rng.normal(size=N)
    p1 = 1 / (1 + np.exp(-(2 * (2 * z - 1) + rng.normal(size=N))))
    lab = np.arange(N) < n
    return pd.DataFrame({"y": y, "q": q}), z, lab, np.stack([1 - p1, p1], 1)


def fit(df, probs, **kw):
    from pyro_llm.regression import regress

    return regress(df, "y ~ z + q", label="z", predictions=probs, num_draws=0, splits=2,
                   progress=False, **kw)


def test_nan_marks_the_unlabelled_rows_of_the_label_column():
    """regress: a missing label (NaN, None, pd.NA) is an unlabelled row, whatever the dtype."""
    df, z, lab, P = b1()
    as_float = fit(df.assign(z=np.where(lab, z.astype(float), np.nan)), P)
    assert as_float.info["n_labelled"] == lab.sum() and as_float.info["n"] == len(df)
    for col in (pd.array(np.where(lab, z.astype(int), None), dtype="Int64"),
                pd.array(np.where(lab, z, None), dtype="boolean")):
        np.testing.assert_allclose(fit(df.assign(z=col), P).coef, as_float.coef, rtol=1e-10)


def test_nan_labels_outside_regress_name_the_rows():
    from pyro_llm import metrics
    from pyro_llm.data import TextDataset
    from pyro_llm.likelihoods import categorical

    probs, y = torch.softmax(torch.randn(4, 2), -1), torch.tensor([0.0, 1.0, float("nan"), 1.0])
    for f in (metrics.accuracy, metrics.nll, metrics.summarize):
        with pytest.raises(ValueError, match=r"rows \[2\] \(1 in all\) hold NaN .*keep only the labelled"):
            f(probs, y)
    with pytest.raises(ValueError, match=r"labels must be integer class indices, but rows \[0\]"):
        TextDataset(["w2 w3", "w4", "w5 w6"], tokenizer(), labels=[np.nan, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"label: labels .* rows \[2\]"):
        categorical("label", torch.zeros(4, 2), y, 4, torch.arange(4))


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 50)}},
                                    unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def objects(z, lab, f) -> pd.Series:
    """An object column: ``f(z)`` on the labelled rows, None elsewhere."""
    return pd.Series([f(v) if ok else None for v, ok in zip(z, lab, strict=True)], dtype=object)


def test_an_object_column_of_true_false_is_a_boolean_label():
    from pyro_llm.data import TextDataset
    from pyro_llm.regression import regress

    df, z, lab, P = b1()
    ref = fit(df.assign(z=pd.array(np.where(lab, z, None), dtype="boolean")), P)
    obj = objects(z, lab, bool)
    with pytest.warns(UserWarning, match="'z' has dtype object holding True/False; it was read as a "
                                         "boolean column"):
        got = fit(df.assign(z=obj), P)
    np.testing.assert_allclose(got.coef, ref.coef, rtol=1e-10)
    assert got.info["classes"] == (False, True)
    with pytest.warns(UserWarning, match="dtype object holding numbers"):  # ints and None
        ints = fit(df.assign(z=objects(z, lab, int)), P)
    np.testing.assert_allclose(ints.coef, ref.coef, rtol=1e-10)
    mixed = objects(z, lab, lambda v: 1 if v else "no")
    assert np.isfinite(fit(df.assign(z=mixed), P).coef).all()  # categories of mixed types
    with pytest.warns(UserWarning, match="holding True/False"):  # the outcome role as well
        regress(df.assign(z=obj), "z ~ q", label="z", role="outcome", predictions=P, num_draws=0,
                splits=2, progress=False)
    ds = TextDataset(["w2 w3", "w4", "w5 w6"], tokenizer(),
                     labels=np.array([True, False, True], dtype=object))
    assert ds.labels.tolist() == [1, 0, 1]


@pytest.mark.filterwarnings("ignore:probability rows sum to 1 only within")  # bf16 rounding
def test_bfloat16_predictions_are_upcast_with_a_warning():
    from pyro_llm.data import TextDataset

    df, z, lab, P = b1()
    df = df.assign(z=np.where(lab, z.astype(float), np.nan))
    T = torch.tensor(P, dtype=torch.float32).bfloat16()
    ref = fit(df, T.float().numpy() / T.float().numpy().sum(1, keepdims=True))
    for preds in (T, list(T), tuple(T)):  # a tensor, or one tensor per row
        with pytest.warns(UserWarning, match="predictions are bfloat16: upcast to float32"):
            np.testing.assert_allclose(fit(df, preds).coef, ref.coef, rtol=1e-6)
    with pytest.warns(UserWarning, match="spread= are bfloat16"):
        fit(df, P, spread=torch.full((len(df),), 0.5).bfloat16())
    with pytest.warns(UserWarning, match="prob= are bfloat16"):
        weighted = fit(df, P, prob=torch.full((len(df),), 0.25).bfloat16())
    np.testing.assert_allclose(weighted.coef, fit(df, P, prob=np.full(len(df), 0.25)).coef, rtol=1e-6)
    ds = TextDataset(["w2 w3", "w4", "w5 w6"], tokenizer(), labels=torch.tensor([1.0, 0.0, 1.0]).bfloat16())
    assert ds.labels.tolist() == [1, 0, 1]


# ---------------------------------------------------------------------------- regression cache files
def crossfit(tmp_path, posterior: str = "map", quiet: bool = True):
    from conftest import tiny_transformer

    from pyro_llm.regression.coding import FineTune, code_crossfit

    g = np.random.default_rng(0)
    y = np.arange(20) % 2
    texts = [" ".join([f"w{3 if y[i] else 4}", *(f"w{int(w)}" for w in g.integers(5, 50, size=4))])
             for i in range(20)]
    labels = np.where(np.arange(20) < 14, y, -1)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        return code_crossfit(texts, labels, model=tiny_transformer("bert", 0)[0], tokenizer=tokenizer(),
                             posterior=posterior, folds=2, num_samples=3, max_length=16,
                             cache_dir=tmp_path, progress=False,
                             train=FineTune(epochs=1, lr=1e-2, batch_size=8, patience=1,
                                            val_fraction=0.25, min_steps=0))


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "key.json").write_text('{"format": '), r"key.json is not valid JSON.*new cache_dir"),
    (lambda d: edit_json(d / "fold_0" / "fold.json", accuracy="high"),
     r"fold_0/fold.json: field 'accuracy' is 'high'.*delete .*fold_0"),
    (lambda d: edit_json(d / "fold_1" / "fold.json", fit={"epochs_run": 1.0}),
     r"fold_1/fold.json lacks the field 'fit.best_epoch'|fold_1/fold.json: field 'fit.best_epoch'"),
    (lambda d: ((d / "fold_0" / "fold.json").unlink(), truncate(d / "fold_0" / "adapter" /
                                                               "adapter_model.safetensors")),
     r"adapter_model.safetensors is not a readable safetensors file.*delete its fold folder"),
    (lambda d: ((d / "fold_0" / "fold.json").unlink(), edit_json(d / "fold_0" / "fit.json", seconds=-1)),
     r"fold_0/fit.json: field 'seconds' is -1"),
])
def test_a_damaged_crossfit_cache_file_is_named(tmp_path, damage, match):
    crossfit(tmp_path)
    damage(tmp_path)
    with pytest.raises(FileFormatError, match=match):
        crossfit(tmp_path)


def test_a_finished_fold_missing_a_coded_shard_codes_it_again_without_refitting(tmp_path, monkeypatch):
    from pyro_llm.regression import finetune

    ref = crossfit(tmp_path / "ref")
    crossfit(tmp_path / "run")
    (tmp_path / "run" / "fold_0" / "coded" / "shard-00000.safetensors").unlink()
    monkeypatch.setattr(finetune, "finetune", lambda *a, **k: pytest.fail("refitted"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = crossfit(tmp_path / "run", quiet=False)
    said = " ".join(str(w.message) for w in caught)
    assert "shard-00000.safetensors" in said and "fold 0 is coded again" in said
    np.testing.assert_array_equal(again.probs, ref.probs)


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-9])


def test_damaged_svi_draws_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    crossfit(tmp_path, "svi")
    (tmp_path / "fold_0" / "fold.json").unlink()  # the fold is resumed from its saved files
    f = tmp_path / "fold_0" / "svi" / "draws.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if not k.startswith("draw1/")}, str(f))
    with pytest.raises(FileFormatError, match=r"draws.safetensors: its 3 draws do not all hold the same"):
        crossfit(tmp_path, "svi")
