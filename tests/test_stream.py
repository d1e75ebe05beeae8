"""Corpus streaming: shards equal one in-memory pass, resume after an interruption, lazy reads,
refusals of another corpus or other settings, and the MAP / posterior / ensemble predictors."""

from __future__ import annotations

import hashlib
import json
import warnings

import pytest
import torch
from conftest import VOCAB, fake_finetune, tiny_transformer
from pyro import poutine

from pyro_llm import BayesianLoRA
from pyro_llm.infer.ensemble import EnsemblePosterior
from pyro_llm.metrics import decompose
from pyro_llm.posterior import GuidePosterior
from pyro_llm.stream import (
    KEEP,
    code_corpus,
    iter_coded,
    load_coded,
    map_predictor,
    method_predictor,
    posterior_predictor,
)

# FakePredict and the lambdas below are plain callables: code_corpus warns that their fingerprint
# (name only) cannot see a changed model; tests/test_coding_reliability.py tests that warning
pytestmark = pytest.mark.filterwarnings("ignore:code_corpus. predict_fn is a plain callable")


# ------------------------------------------------------------------ a fake predictor
def text_probs(text: str, S: int, C: int) -> torch.Tensor:
    """Probabilities (S, C) that depend on the text only (seeded by its hash)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    logits = 2 * torch.randn(S, C, generator=torch.Generator().manual_seed(seed))
    return logits.softmax(-1)


class FakePredict:
    """``texts -> (S, B, C)`` (or ``(B, C)`` with ``S=None``); logs the texts it saw, can fail."""

    def __init__(self, S: int | None = 3, C: int = 4, fail_after: int | None = None):
        self.S, self.C, self.fail_after, self.seen, self.calls = S, C, fail_after, [], 0

    def __call__(self, texts):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.seen += list(texts)
        p = torch.stack([text_probs(t, self.S or 1, self.C) for t in texts], dim=1)
        return p[0] if self.S is None else p


def docs(n: int, tag: str = "doc") -> list[str]:
    return [f"{tag} {i} " + "word " * (i % 5) for i in range(n)]


def expected(texts, S=3, C=4) -> torch.Tensor:
    return torch.stack([text_probs(t, S, C) for t in texts], dim=1)


# ------------------------------------------------------------------ results
@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("batch_size, shard_size", [(3, 8), (4, 4), (16, 5), (1, 100)])
def test_shards_equal_one_in_memory_pass(tmp_path, keep, batch_size, shard_size):
    texts = docs(23)
    run = code_corpus(iter(texts), FakePredict(), tmp_path, batch_size=batch_size,
                      shard_size=shard_size, keep=keep, progress=False)
    assert (run.rows, run.coded, run.skipped) == (23, 23, 0)
    assert run.shards == -(-23 // shard_size)
    got, full = load_coded(tmp_path), expected(texts)
    # the same per-row float32 operations in either case: equal to the bit
    assert torch.equal(got.probs, full.mean(0))
    assert got.ids == list(range(23))
    if keep == "mean":
        assert got.total is None and got.draws is None
    else:
        for k, v in decompose(full).items():
            assert torch.equal(getattr(got, k), v), k
    if keep == "draws":
        assert torch.equal(got.draws, full)
    else:
        assert got.draws is None
    sizes = [len(s) for s in iter_coded(tmp_path)]
    assert sizes == [min(shard_size, 23 - i) for i in range(0, 23, shard_size)]


def test_point_model_is_stored_with_one_draw(tmp_path):
    texts = docs(7)
    code_corpus(texts, FakePredict(S=None), tmp_path, batch_size=2, progress=False)
    got = load_coded(tmp_path)
    assert got.draws.shape == (1, 7, 4)
    assert torch.equal(got.probs, expected(texts, S=1)[0])
    assert torch.equal(got.epistemic, torch.zeros(7))  # one draw: nothing epistemic


def test_interrupted_run_resumes_to_the_same_output(tmp_path):
    texts = docs(30)
    ref = tmp_path / "ref"
    code_corpus(texts, FakePredict(), ref, batch_size=3, shard_size=8, progress=False)
    out = tmp_path / "out"
    # shards of 8 rows are batched 3 + 3 + 2: the 5th batch (rows 11-13) is in shard 1
    with pytest.raises(KeyboardInterrupt):
        code_corpus(iter(texts), FakePredict(fail_after=4), out, batch_size=3, shard_size=8,
                    progress=False)
    man = json.loads((out / "manifest.json").read_text())
    assert (man["rows"], len(man["shards"]), man["complete"]) == (8, 1, False)
    with pytest.raises(ValueError, match="unfinished"):
        load_coded(out)
    assert len(load_coded(out, allow_partial=True)) == 8
    again = FakePredict()
    run = code_corpus(iter(texts), again, out, batch_size=3, shard_size=8, progress=False)
    assert again.seen == texts[8:]  # only the rows not yet in a finished shard
    assert (run.rows, run.coded, run.skipped) == (30, 22, 8)
    a, b = load_coded(ref), load_coded(out)
    for k in ("probs", "total", "aleatoric", "epistemic", "draws"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in ref.iterdir())  # no .tmp
    # a finished run resumes as a no-op
    idle = FakePredict()
    run = code_corpus(iter(texts), idle, out, batch_size=3, shard_size=8, progress=False)
    assert (idle.calls, run.coded, run.skipped) == (0, 0, 30)


def test_corpus_is_pulled_lazily(tmp_path):
    pulled = {"n": 0}
    ahead = []

    def gen():
        for t in docs(50):
            pulled["n"] += 1
            yield t

    fake = FakePredict()

    def predict(texts):
        ahead.append(pulled["n"] - (len(fake.seen) + len(texts)))
        return fake(texts)

    code_corpus(gen(), predict, tmp_path, batch_size=4, shard_size=10, progress=False)
    # texts are pulled one batch at a time: never a text beyond the batch being predicted
    assert ahead == [0] * len(ahead) and len(ahead) == 15
    assert len(load_coded(tmp_path)) == 50


# ------------------------------------------------------------------ refusals
def test_resume_refuses_another_corpus_or_other_settings(tmp_path):
    texts = docs(20)
    kw = dict(batch_size=3, shard_size=8, progress=False)
    with pytest.raises(KeyboardInterrupt):
        code_corpus(texts, FakePredict(fail_after=5), tmp_path, **kw)  # shard 0 written
    changed = list(texts)
    changed[5] = "another text"
    with pytest.raises(ValueError, match="rows 0-7 differ"):
        code_corpus(changed, FakePredict(), tmp_path, **kw)
    with pytest.raises(ValueError, match="rows 0-7 differ"):
        code_corpus(texts[1:] + texts[:1], FakePredict(), tmp_path, **kw)
    with pytest.raises(ValueError, match="corpus ended after 5 texts"):
        code_corpus(texts[:5], FakePredict(), tmp_path, **kw)
    with pytest.raises(ValueError, match="shard_size: run 8 vs now 10"):
        code_corpus(texts, FakePredict(), tmp_path, batch_size=3, shard_size=10, progress=False)
    with pytest.raises(ValueError, match="keep: run 'draws' vs now 'mean'"):
        code_corpus(texts, FakePredict(), tmp_path, keep="mean", **kw)
    with pytest.raises(ValueError, match="ids: run False vs now True"):
        code_corpus(texts, FakePredict(), tmp_path, ids=range(20), **kw)
    other = FakePredict()
    other.fingerprint = "another model"
    with pytest.raises(ValueError, match="predictor: run 'callable:[0-9a-f]+' vs now 'another model'"):
        code_corpus(texts, other, tmp_path, **kw)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        code_corpus(texts, FakePredict(), tmp_path, resume=False, **kw)
    with pytest.raises(ValueError, match="2 draws x 4 classes .* but 3 x 4"):
        code_corpus(texts, FakePredict(S=2), tmp_path, **kw)
    code_corpus(texts, FakePredict(), tmp_path, **kw)  # the same corpus resumes
    with pytest.raises(ValueError, match="finished run of 20 texts, but the corpus has more"):
        code_corpus(texts + ["one more"], FakePredict(), tmp_path, **kw)


def test_bad_inputs_are_named(tmp_path):
    fn = FakePredict()
    with pytest.raises(ValueError, match="corpus is empty"):
        code_corpus(iter([]), fn, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()  # nothing written for an empty corpus
    with pytest.raises(ValueError, match="row 4 is of type int"):
        code_corpus(docs(4) + [7], fn, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="row 1 is empty"):
        code_corpus(["a", "  "], fn, tmp_path / "c", progress=False)
    with pytest.raises(TypeError, match="texts is a single string"):
        code_corpus("a corpus", fn, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="ids ran out at row 2"):
        code_corpus(docs(3), fn, tmp_path / "e", ids=["x", "y"], progress=False)
    with pytest.raises(ValueError, match="more ids than texts"):
        code_corpus(docs(2), fn, tmp_path / "f", ids=["x", "y", "z"], progress=False)
    with pytest.raises(TypeError, match="id at row 0"):
        code_corpus(docs(2), fn, tmp_path / "g", ids=[1.5, 2.5], progress=False)
    for bad in (dict(keep="all"), dict(batch_size=0), dict(shard_size=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            code_corpus(docs(2), fn, tmp_path / "h", progress=False, **bad)
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "shard-00000.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        code_corpus(docs(2), fn, tmp_path / "i", progress=False)


@pytest.mark.parametrize("out, match", [
    (lambda t: torch.full((len(t) + 1, 2), 0.5), r"shape \(4, 2\) for batch 1 of shard 0 \(rows 3-5\)"),
    (lambda t: torch.full((len(t), 2), float("nan")), "NaN or inf for batch 1"),
    (lambda t: torch.randn(len(t), 2), "not probabilities for batch 1 .* apply softmax"),
    (lambda t: [[0.5, 0.5]] * len(t), "returned a list"),
])
def test_bad_predictions_name_the_batch(tmp_path, out, match):
    good = FakePredict(S=None, C=2)

    def fn(texts):  # the first batch is fine, the second is not
        return good(texts) if good.calls == 0 else out(texts)

    with pytest.raises((ValueError, TypeError), match=match):
        code_corpus(docs(9), fn, tmp_path, batch_size=3, progress=False)


def test_ids_frame_and_damaged_folder(tmp_path):
    texts = docs(9)
    ids = [f"doc-{i}" for i in range(9)]
    code_corpus(texts, FakePredict(), tmp_path, ids=iter(ids), batch_size=2, shard_size=4,
                keep="uncertainty", progress=False)
    got = load_coded(tmp_path)
    assert got.ids == ids
    frame = got.to_frame()
    assert list(frame.columns) == ["p0", "p1", "p2", "p3", "total", "aleatoric", "epistemic"]
    assert frame.loc["doc-5", "p2"] == pytest.approx(float(expected(texts).mean(0)[5, 2]), abs=0)
    import numpy as np

    other = tmp_path / "numpy-ids"  # integer ids from numpy (a DataFrame index) are stored as int
    code_corpus(texts, FakePredict(), other, ids=np.arange(100, 109), progress=False)
    assert load_coded(other).ids == list(range(100, 109))
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["shards"][1]["rows"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="holds 4 rows but manifest.json says 3"):
        load_coded(tmp_path)


# ------------------------------------------------------------------ real (tiny) models
def tiny_tokenizer():
    """A real Hugging Face fast tokenizer over the tiny models' vocabulary: words w2 .. w49."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]")


def word_docs(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=g)
    return [" ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (int(k),), generator=g))
            for k in lengths]


def one_by_one(fn, tok, texts) -> torch.Tensor:
    """Reference: each text alone (no padding), stacked to (N, C)."""
    with torch.no_grad():
        return torch.cat([fn(tok([t], return_tensors="pt")) for t in texts])


# batched (right-padded, masked) and one-text-at-a-time forwards sum in different orders: float32
# rounding of order 1e-7 on probabilities; 1e-5 leaves room and still catches a wrong mask or row
ATOL = 1e-5


def test_map_predictor_matches_one_text_at_a_time(tmp_path):
    model, _ = tiny_transformer("bert")
    fake_finetune(model)
    tok, texts = tiny_tokenizer(), word_docs(13)
    model.train()  # the predictor must switch dropout off, and restore the mode
    predict = map_predictor(model, tok, max_length=32)
    code_corpus(texts, predict, tmp_path, batch_size=4, shard_size=6, progress=False)
    assert model.training
    model.eval()
    ref = one_by_one(lambda enc: model(**enc).logits.softmax(-1), tok, texts)
    got = load_coded(tmp_path)
    torch.testing.assert_close(got.probs, ref, atol=ATOL, rtol=0)
    assert got.draws.shape == (1, 13, 2)
    assert predict.fingerprint == map_predictor(model, tok, max_length=32).fingerprint
    fake_finetune(model, seed=2)
    assert predict.fingerprint != map_predictor(model, tok, max_length=32).fingerprint


@pytest.mark.parametrize("S, vectorize, sample_batch", [
    (3, "auto", None), (4, True, 2), (3, False, None),
    (3, True, 2),  # a last group of one stacked draw, (1, *shape)
])
def test_posterior_predictor_matches_each_draw(tmp_path, S, vectorize, sample_batch):
    model, _ = tiny_transformer("bert")
    fake_finetune(model)
    lora = BayesianLoRA(model, prior=0.1)
    g = torch.Generator().manual_seed(3)
    draws = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in lora.init_values().items()}
             for _ in range(S)]
    tok, texts = tiny_tokenizer(), word_docs(10, seed=1)
    predict = posterior_predictor(lora, draws, tok, max_length=32, vectorize=vectorize,
                                  sample_batch=sample_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "auto" must not fall back to the loop here
        code_corpus(texts, predict, tmp_path, batch_size=4, shard_size=7, progress=False)
    ref = []
    for d in draws:
        with poutine.condition(data=d):
            ref.append(one_by_one(lambda enc: lora(**enc).logits.softmax(-1), tok, texts))
    got = load_coded(tmp_path)
    torch.testing.assert_close(got.draws, torch.stack(ref), atol=ATOL, rtol=0)
    assert (got.epistemic > 0).any()  # the draws disagree


def test_posterior_predictor_falls_back_to_one_draw_at_a_time(tmp_path):
    model, _ = tiny_transformer("bert")
    fake_finetune(model)
    lora = BayesianLoRA(model, prior=0.1)
    draws = [lora.init_values(), {k: 1.5 * v for k, v in lora.init_values().items()}]
    calls = []

    def logits_fn(m, batch):  # refuses stacked draws, as a model-specific head might
        logits = m(**batch).logits
        calls.append(logits.dim())
        if logits.dim() != 2:
            raise ValueError("only (B, C) logits here")
        return logits

    tok, texts = tiny_tokenizer(), word_docs(6, seed=4)
    predict = posterior_predictor(lora, draws, tok, max_length=32, logits_fn=logits_fn)
    with pytest.warns(UserWarning, match="running the 2 draws one at a time") as rec:
        code_corpus(texts, predict, tmp_path, batch_size=2, progress=False)
    assert len(rec) == 1  # decided once, on the first batch
    assert calls.count(3) == 1 and calls.count(2) == 2 * 3  # one stacked try, then 2 draws x 3
    ref = posterior_predictor(lora, draws, tok, max_length=32, vectorize=False)(texts)
    torch.testing.assert_close(load_coded(tmp_path).draws, ref, atol=ATOL, rtol=0)


def test_posterior_draws_are_fixed_by_the_seed():
    import pyro
    from pyro.infer.autoguide import AutoNormal

    model, _ = tiny_transformer("bert")
    lora = BayesianLoRA(model, prior=0.1)

    def prior_model():
        with lora.shared_draw():  # reading the PyroSample attributes draws the sites
            lora.adapter_weights()

    guide = AutoNormal(prior_model)
    guide()  # set up its parameters
    post, tok = GuidePosterior(guide), tiny_tokenizer()
    a = posterior_predictor(lora, post, tok, num_samples=2, seed=5)
    pyro.set_rng_seed(123)  # the global state in between does not matter
    b = posterior_predictor(lora, post, tok, num_samples=2, seed=5)
    c = posterior_predictor(lora, post, tok, num_samples=2, seed=6)
    assert a.fingerprint == b.fingerprint != c.fingerprint  # a resume in a new process may reuse it
    assert set(post.sample(1)[0]) == set(lora.site_names)  # every LoRA matrix is drawn
    head = lora.site_name(lora.fixed_names[0])  # the classifier: a pyro.param point estimate
    pyro.get_param_store()[head] = 2 * pyro.param(head).detach()
    assert posterior_predictor(lora, post, tok, num_samples=2, seed=5).fingerprint != a.fingerprint
    assert b.fingerprint != posterior_predictor(
        lora, post.sample(2), tok).fingerprint
    texts = word_docs(3)
    assert torch.equal(a(texts), b(texts))
    assert a(texts).shape == (2, 3, 2)


def test_method_predictor_runs_an_ensemble(tmp_path):
    model, _ = tiny_transformer("bert")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    members = []
    for seed in (1, 2):
        fake_finetune(model, seed=seed)
        members.append({n: model.get_parameter(n).detach().clone() for n in names})
    ens = EnsemblePosterior(members, peft_model=model)
    tok, texts = tiny_tokenizer(), word_docs(9, seed=2)
    code_corpus(texts, method_predictor(ens, tok, max_length=32), tmp_path, batch_size=4,
                shard_size=5, progress=False)
    ref = ens.predict([dict(tok([t], return_tensors="pt")) for t in texts], progress=False)
    got = load_coded(tmp_path)
    torch.testing.assert_close(got.draws, ref, atol=ATOL, rtol=0)
    assert not torch.allclose(ref[0], ref[1])  # two different members
