"""Saved posteriors: every multi-file save is atomic, every load is checked before it is used.

Covers issue 14, items 8 (stale, duplicate, out-of-range and stray ensemble members), 9 (a save
interrupted between its writes leaves the old save, byte for byte), 10 (a tampered PolarVBLL
folder leaves the caller's adapter untouched) and 13 (NaN tensors, other shapes and tampered
JSON are a FileFormatError naming the file and the field).
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import peft
import pytest
import safetensors.torch
import torch
from conftest import mlp_base, mlp_peft
from safetensors import safe_open

import pyro_llm.polar
from pyro_llm import BayesianLoRA
from pyro_llm._io import DIGEST, FileFormatError
from pyro_llm.infer.ensemble import EnsemblePosterior, load_ensemble
from pyro_llm.infer.laplace import fit_laplace, load_laplace
from pyro_llm.infer.polar_vbll import PolarVBLL, load_polar_vbll
from pyro_llm.polar import PolarAdapter
from pyro_llm.vbll import VBLLClassification, load_head, save_head

D_FEAT, C = 6, 3


# ---------------------------------------------------------------- helpers
def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def interrupt_after(monkeypatch, n: int) -> None:
    """Let ``n`` file writes (safetensors files, ``Path.write_text``) through; the next one raises,
    as a crash between the writes of one save would."""
    count = [0]
    real_save, real_write = safetensors.torch.save_file, pathlib.Path.write_text

    def gate():
        count[0] += 1
        if count[0] > n:
            raise RuntimeError("simulated crash")

    def save_file(*a, **k):
        gate()
        return real_save(*a, **k)

    def write_text(self, *a, **k):
        gate()
        return real_write(self, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    if hasattr(pyro_llm.polar, "save_file"):  # a module that imported save_file by name
        monkeypatch.setattr(pyro_llm.polar, "save_file", save_file)


def rewrite_tensors(f: pathlib.Path, change) -> None:
    """Tamper with a safetensors file: ``change(tensors)`` in place, metadata kept but for the
    digest (dropped: it would report the edit before the check a test means to reach)."""
    with safe_open(str(f), framework="pt") as fh:
        meta, t = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    change(t)
    meta.pop(DIGEST, None)
    safetensors.torch.save_file(t, str(f), metadata=meta)


def rewrite_json(f: pathlib.Path, change) -> None:
    obj = json.loads(f.read_text())
    change(obj)
    f.write_text(json.dumps(obj))


def no_leftovers(folder: pathlib.Path) -> bool:
    return not list(folder.parent.glob(f".{folder.name}.*"))


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- the saved objects
def head_mlp(seed=0):
    return peft.get_peft_model(mlp_base(seed), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                                modules_to_save=["2"]))


def ensemble(num: int, shift: float = 0.0, net=None) -> EnsemblePosterior:
    net = net or head_mlp()
    base = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(int(num + 10 * shift))
    members = [{n: v + shift + torch.randn(v.shape, generator=g) for n, v in base.items()}
               for _ in range(num)]
    return EnsemblePosterior(members, peft_model=net, seeds=list(range(num)))


def laplace_fit(hidden=16):
    pm = mlp_peft(0, d_in=6, hidden=hidden, classes=C, r=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    X, y = torch.randn(20, 6, generator=g), torch.randint(0, C, (20,), generator=g)
    return pm, fit_laplace(pm, [(X[:10], y[:10]), (X[10:], y[10:])], progress=False)


def vbll_head(seed=0):
    head = VBLLClassification(D_FEAT, C, num_data=50, seed=seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 7)))
    return head


def polar_adapter(seed=0, theta_seed=2):
    ad = PolarAdapter(mlp_peft(0, classes=D_FEAT), seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(theta_seed)
        for t in ad.Theta:
            t.copy_(torch.randn(t.shape, generator=g))
    return ad


def features(adapter, batch):
    return adapter(batch[0])


def polar_vbll(seed=0):
    return PolarVBLL(polar_adapter(theta_seed=seed + 2), vbll_head(seed), features,
                     losses=[1.0, 0.5], head_losses=[2.0], fit_seconds=1.5,
                     config={"feature_scale": 0.5, "seed": seed})


def saved(kind: str, folder: pathlib.Path):
    """Save one object of ``kind`` into ``folder``; return ``(load, state)``: ``load()`` reads the
    folder back, ``state(loaded)`` the tensors to compare, ``target()`` the caller's tensors a
    load writes into (``None`` where it writes into nothing of the caller's)."""
    if kind == "laplace":
        pm, la = laplace_fit()
        la.save(folder)
        return (lambda: load_laplace(folder, lora=BayesianLoRA(pm)),
                lambda x: {**x.map, "delta": x.prior_precision}, None)
    if kind == "ensemble":
        net = head_mlp()
        ensemble(3, net=net).save(folder)
        return (lambda: load_ensemble(folder, net),
                lambda x: {f"{i}/{k}": v for i, m in enumerate(x.members) for k, v in m.items()}, None)
    if kind == "head":
        save_head(vbll_head(), folder)
        return lambda: load_head(folder), lambda x: x.state_dict(), None
    if kind == "polar_vbll":
        polar_vbll().save(folder)
        fresh = PolarAdapter(mlp_peft(0, classes=D_FEAT), seed=5)
        return (lambda: load_polar_vbll(folder, fresh, features),
                lambda x: {**x.head.state_dict(), **x.adapter.state_dict()},
                lambda: {**params(fresh), **params(fresh.peft_model)})
    if kind == "polar":
        polar_adapter().save_pretrained(folder)
        model = mlp_peft(0, classes=D_FEAT)
        return (lambda: PolarAdapter.from_pretrained(model, folder), lambda x: x.state_dict(),
                lambda: params(model))
    raise ValueError(kind)


# ---------------------------------------------------------------- item 8: ensemble folders
def test_ensemble_save_over_a_larger_one_leaves_no_stale_member(tmp_path):
    folder = tmp_path / "ens"
    ensemble(3).save(folder)
    (folder / "notes.txt").write_text("kept")
    small = ensemble(2, shift=1.0)
    small.save(folder)
    back = load_ensemble(folder)
    assert len(back) == 2 and back.indices == [0, 1]
    assert_identical({f"{i}/{k}": v for i, m in enumerate(back.members) for k, v in m.items()},
                     {f"{i}/{k}": v for i, m in enumerate(small.members) for k, v in m.items()})
    assert sorted(p.name for p in folder.iterdir()) == ["ensemble.json", "member_000.safetensors",
                                                       "member_001.safetensors", "notes.txt"]
    assert no_leftovers(folder)


def test_load_ensemble_refuses_out_of_range_and_duplicate_members(tmp_path):
    folder = tmp_path / "ens"
    ensemble(3).save(folder)
    shutil.copy(folder / "member_001.safetensors", folder / "member_005.safetensors")
    with pytest.raises(FileFormatError, match=r"member_005\.safetensors is member 5.*num_members = 3"):
        load_ensemble(folder)
    (folder / "member_005.safetensors").unlink()
    shutil.copy(folder / "member_001.safetensors", folder / "member_01.safetensors")
    with pytest.raises(FileFormatError, match=r"member_001\.safetensors and member_01\.safetensors"):
        load_ensemble(folder)


@pytest.mark.parametrize("stray", ["member_abc.safetensors", "member_abc", "member_002.safetensors/"])
def test_load_ensemble_names_a_stray_member_entry(tmp_path, stray):
    folder = tmp_path / "ens"
    ensemble(2).save(folder)
    if stray.endswith("/") or "." not in stray:
        (folder / stray.rstrip("/")).mkdir()
    else:
        shutil.copy(folder / "member_000.safetensors", folder / stray)
    with pytest.raises(FileFormatError, match=re.escape(stray.rstrip("/")) + ".*not a member file"):
        load_ensemble(folder)


# ---------------------------------------------------------------- item 9: atomic saves
def _interrupted(monkeypatch, folder, save_new, after):
    before = snapshot(folder)
    with monkeypatch.context() as m:
        interrupt_after(m, after)
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_new()
    assert snapshot(folder) == before, "an interrupted save changed the folder"
    assert no_leftovers(folder)


def test_interrupted_ensemble_save_leaves_the_old_one(tmp_path, monkeypatch):
    folder = tmp_path / "ens"
    old = ensemble(3)
    old.save(folder)
    _interrupted(monkeypatch, folder, lambda: ensemble(3, shift=1.0).save(folder), after=2)
    back = load_ensemble(folder)
    for a, b in zip(back.members, old.members, strict=True):
        assert_identical(a, b)


def test_interrupted_laplace_save_leaves_the_old_one(tmp_path, monkeypatch):
    pm, la = laplace_fit()
    folder = tmp_path / "la"
    la.save(folder)
    old = {**{k: v.clone() for k, v in la.map.items()}, "delta": la.prior_precision.clone()}
    la.prior_precision = 7.0
    for v in la.map.values():
        v.add_(1.0)
    _interrupted(monkeypatch, folder, lambda: la.save(folder), after=1)
    back = load_laplace(folder, lora=BayesianLoRA(pm))
    assert_identical({**back.map, "delta": back.prior_precision}, old)


def test_interrupted_head_save_leaves_the_old_one(tmp_path, monkeypatch):
    head, folder = vbll_head(), tmp_path / "head"
    save_head(head, folder)
    old = {k: v.clone() for k, v in head.state_dict().items()}
    with torch.no_grad():
        head.mean.add_(1.0)
    _interrupted(monkeypatch, folder, lambda: save_head(head, folder), after=1)
    assert_identical(load_head(folder).state_dict(), old)


@pytest.mark.parametrize("after", [1, 3])
def test_interrupted_polar_vbll_save_leaves_the_old_one(tmp_path, monkeypatch, after):
    folder = tmp_path / "pv"
    polar_vbll(seed=0).save(folder)
    load, state, _ = saved("polar_vbll", tmp_path / "reference")  # the same model, saved whole
    old = state(load())
    _interrupted(monkeypatch, folder, lambda: polar_vbll(seed=1).save(folder), after=after)
    back = load_polar_vbll(folder, PolarAdapter(mlp_peft(0, classes=D_FEAT), seed=5), features)
    assert_identical(state(back), old)


def test_interrupted_polar_adapter_save_leaves_the_old_one_and_keeps_files_beside_it(tmp_path, monkeypatch):
    folder = tmp_path / "polar"
    old = polar_adapter(theta_seed=2)
    old.save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    _interrupted(monkeypatch, folder, lambda: polar_adapter(theta_seed=3).save_pretrained(folder), after=1)
    back = PolarAdapter.from_pretrained(mlp_peft(0, classes=D_FEAT), folder)
    assert_identical(back.state_dict(), old.state_dict())
    new = polar_adapter(theta_seed=3)
    new.save_pretrained(folder)  # a save that completes keeps the user's file
    assert (folder / "tokenizer.json").read_text() == "{}"
    assert_identical(PolarAdapter.from_pretrained(mlp_peft(0, classes=D_FEAT), folder).state_dict(),
                     new.state_dict())


# ---------------------------------------------------------------- items 10 and 13: tampered files
JSON_CASES = [  # kind, file, field, tampering
    ("laplace", "laplace.json", "n_data", "drop"), ("laplace", "laplace.json", "n_data", "many"),
    ("laplace", "laplace.json", "shapes", [[1, "a"]]),
    ("ensemble", "ensemble.json", "names", "drop"), ("ensemble", "ensemble.json", "num_members", "3"),
    ("head", "vbll.json", "in_features", "drop"), ("head", "vbll.json", "cov_rank", "two"),
    ("polar_vbll", "polar_vbll.json", "dropout", "drop"),
    ("polar_vbll", "polar_vbll.json", "fit_seconds", "x"),
    ("polar_vbll", "head/vbll.json", "prior_scale", None),
    ("polar", "polar.json", "layers", "drop"), ("polar", "polar.json", "extra_names", 5),
]


@pytest.mark.parametrize("kind, name, field, bad", JSON_CASES)
def test_tampered_json_is_a_format_error_naming_file_and_field(tmp_path, kind, name, field, bad):
    load, _, target = saved(kind, tmp_path / "saved")
    before = target() if target else None

    def change(obj):
        if bad == "drop":
            del obj[field]
        else:
            obj[field] = bad

    rewrite_json(tmp_path / "saved" / name, change)
    with pytest.raises(FileFormatError, match=rf"{re.escape(name)}.*'{field}'"):
        load()
    if target:  # item 10: nothing of the caller's was written
        assert_identical(target(), before)


NAN_CASES = [  # kind, file, tensor (None: the first)
    ("laplace", "laplace.safetensors", "map.0"), ("laplace", "laplace.safetensors", "block1.QA"),
    ("ensemble", "member_001.safetensors", None), ("head", "vbll.safetensors", "mean"),
    ("polar_vbll", "adapter.safetensors", "stiefel.0"), ("polar_vbll", "head/vbll.safetensors", "mean"),
    ("polar", "polar.safetensors", None),
]


@pytest.mark.parametrize("kind, name, key", NAN_CASES)
def test_nan_tensors_are_refused_before_anything_is_written(tmp_path, kind, name, key):
    load, _, target = saved(kind, tmp_path / "saved")
    before = target() if target else None
    holder = {}

    def change(t):
        k = key or sorted(t)[0]
        t[k] = t[k].clone()
        t[k].view(-1)[0] = float("nan")
        holder["key"] = k

    rewrite_tensors(tmp_path / "saved" / name, change)
    where = rf"{re.escape(name)}: tensor '{re.escape(holder['key'])}' holds NaN"
    with pytest.raises(FileFormatError, match=where):
        load()
    if target:
        assert_identical(target(), before)


def _drop(key):
    return lambda obj: obj.pop(key)


@pytest.mark.parametrize("name, change, message", [
    ("polar_vbll.json", _drop("dropout"), r"polar_vbll\.json lacks the field 'dropout'"),
    ("head/vbll.json", _drop("cov"), r"vbll\.json lacks the field 'cov'"),
    ("head/vbll.safetensors", _drop("cov.off"), r"vbll\.safetensors lacks the tensor 'cov.off'"),
], ids=["meta-json", "head-json", "head-tensors"])
def test_a_failed_polar_vbll_load_leaves_the_adapter_bit_identical(tmp_path, name, change, message):
    load, _, target = saved("polar_vbll", tmp_path / "pv")
    before = target()
    f = tmp_path / "pv" / name
    (rewrite_json if f.suffix == ".json" else rewrite_tensors)(f, change)
    try:
        load()
    except Exception as e:  # noqa: BLE001 -- first what it left behind, then what it said
        error = e
    else:
        error = None
    assert_identical(target(), before)
    assert isinstance(error, FileFormatError) and re.search(message, str(error)), error


def test_laplace_of_another_models_shapes_is_refused_at_load(tmp_path):
    _, la = laplace_fit(hidden=16)
    la.save(tmp_path / "la")
    other = mlp_peft(0, d_in=6, hidden=8, classes=C, r=2)  # the same site names, other shapes
    with pytest.raises(ValueError, match=r"shape \(16, 2\) in the saved posterior, \(8, 2\) in the model"):
        load_laplace(tmp_path / "la", lora=BayesianLoRA(other))
    rewrite_tensors(tmp_path / "la" / "laplace.safetensors",
                    lambda t: t.update({"block0.QG": t["block0.QG"][:1]}))
    with pytest.raises(FileFormatError, match=r"laplace\.safetensors: the kron block 0"):
        load_laplace(tmp_path / "la")
