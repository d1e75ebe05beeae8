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
