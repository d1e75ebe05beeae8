"""LoRA ensembles: training from seeds, resume and slices, files, the posterior interface."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import mlp_base, tiny_transformer, token_batch

from pyro_llm import BayesianLoRA, predict_probs, to_arviz
from pyro_llm.infer import svi
from pyro_llm.infer.ensemble import EnsemblePosterior, load_ensemble, uncertainty
from pyro_llm.infer.ensemble_fit import fit_ensemble

FIT = dict(loss=lambda model, b: torch.nn.functional.cross_entropy(model(b[0]), b[1]),
           epochs=2, lr=1e-2, progress=False)


def head_mlp(seed: int = 0):
    """MLP 4 -> 8 -> 3, LoRA on the first layer, the last layer a modules_to_save head."""
    net = mlp_base(seed)
    return peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                    modules_to_save=["2"]))


def batches(n: int = 64, bs: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_members(a, b):
    assert len(a) == len(b)
    for ma, mb in zip(a, b, strict=True):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert torch.equal(ma[k], mb[k]), k


# ------------------------------------------------------------------ uncertainty decomposition
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
def test_entropy_decomposition_holds_on_random_draws(dtype, tol):
    g = torch.Generator().manual_seed(0)
    conc = torch.rand(50, 4, generator=g) * 3 + 0.1
    p = torch.distributions.Dirichlet(conc).sample((7,)).to(dtype)
    u = uncertainty(p)
    # tolerance: a few ulps of entropies of order log 4 ~ 1.4 (float32 eps 1.2e-7, float64 2.2e-16)
    assert (u["total"] - u["aleatoric"] - u["epistemic"]).abs().max() < tol
    hand_total = -(p.mean(0) * p.mean(0).log()).sum(-1)
    hand_ale = -(p * p.log()).sum(-1).mean(0)
    assert torch.allclose(u["total"], hand_total, atol=10 * tol)
    assert torch.allclose(u["aleatoric"], hand_ale, atol=10 * tol)
    assert (u["epistemic"] > 0).all()  # members disagree: Jensen's gap is strictly positive


def test_uncertainty_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        uncertainty(torch.rand(3, 4))
    with pytest.raises(ValueError, match="finite"):
        uncertainty(torch.full((2, 3, 2), float("nan")))


# ------------------------------------------------------------------ fitting
def test_same_seed_members_are_identical_with_zero_mutual_information():
    net, data = head_mlp(), batches()
    ens = fit_ensemble(net, data, 3, seeds=[3, 3, 3], **FIT)
    assert_same_members(ens.members[:1] * 2, ens.members[1:])
    u = uncertainty(ens.predict(data, progress=False))
    # identical members: the mean of 3 equal float32 numbers is within an ulp of each
    assert u["epistemic"].abs().max() < 1e-6
    assert torch.allclose(u["total"], u["aleatoric"], atol=1e-6)


def test_members_from_different_seeds_differ_and_model_is_restored():
    net, data = head_mlp(), batches()
    net.eval()
    before = trainable(net)
    modes = [m.training for m in net.modules()]
    ens = fit_ensemble(net, data, 3, **FIT)
    assert ens.seeds == [0, 1, 2] and ens.indices == [0, 1, 2]
    assert set(ens.members[0]) == set(before)  # LoRA A, B and the head, by peft name
    for i in range(3):
        for j in range(i + 1, 3):
            for k in before:  # every tensor differs: A and the head re-initialised, B trained
                assert not torch.allclose(ens.members[i][k], ens.members[j][k]), (i, j, k)
    for k, v in before.items():  # untouched by the fit ...
        assert torch.equal(net.get_parameter(k), v), k
    assert [m.training for m in net.modules()] == modes
    probs = ens.predict(data, progress=False)  # ... and by predict
    for k, v in before.items():
        assert torch.equal(net.get_parameter(k), v), k
    assert [m.training for m in net.modules()] == modes
    assert probs.shape == (3, 64, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 64))
    assert float(uncertainty(probs)["epistemic"].mean()) > 1e-4
    assert all(info["steps"] == 8 for info in ens.info)  # 2 epochs x 4 batches


def test_member_zero_is_fit_map_from_the_seeded_reinitialisation():
    net, data = head_mlp(), batches()
    ens = fit_ensemble(net, data, 1, seeds=[5], **FIT)
    # by hand: peft's LoRA init and torch's Linear init under seed 5, then fit_map(seed=5)
    torch.manual_seed(5)
    net.base_model.model[0].reset_lora_parameters("default", True)
    net.base_model.model[2].modules_to_save["default"].reset_parameters()
    assert torch.equal(net.base_model.model[0].lora_B["default"].weight, torch.zeros(8, 2))
    svi.fit_map(net, data, seed=5, **FIT)
    assert_same_members(ens.members, [trainable(net)])


def test_resume_from_out_dir_trains_nothing_new(tmp_path, monkeypatch):
    net, data = head_mlp(), batches()
    first = fit_ensemble(net, data, 2, out_dir=tmp_path, **FIT)
    assert sorted(p.name for p in tmp_path.glob("member_*")) == ["member_000.safetensors",
                                                                  "member_001.safetensors"]
    assert not any((tmp_path / "checkpoints").glob("*/*"))  # finished members leave no checkpoint
    info = json.loads((tmp_path / "ensemble.json").read_text())
    assert info["seeds"] == [0, 1] and info["kept"] == [] and len(info["reinitialised"]) == 4

    def no_training(*a, **k):
        raise AssertionError("fit_map was called on a resume")

    monkeypatch.setattr(svi, "fit_map", no_training)
    again = fit_ensemble(net, data, 2, out_dir=tmp_path, **FIT)
    assert_same_members(first.members, again.members)


def test_two_slices_equal_one_run_of_three(tmp_path):
    data = batches()
    whole = fit_ensemble(head_mlp(), data, 3, **FIT)
    net = head_mlp()
    fit_ensemble(net, data, 3, members=range(0, 2), out_dir=tmp_path, **FIT)
    with pytest.warns(UserWarning, match=r"members \[2\]"):
        assert len(load_ensemble(tmp_path)) == 2
    fit_ensemble(head_mlp(), data, 3, members=range(2, 3), out_dir=tmp_path, **FIT)  # another process
    gathered = load_ensemble(tmp_path, net)
    assert gathered.indices == [0, 1, 2] and gathered.seeds == [0, 1, 2]
    assert_same_members(whole.members, gathered.members)


def test_save_load_round_trip(tmp_path):
    net, data = head_mlp(), batches()
    ens = fit_ensemble(net, data, 2, seeds=[10, 20], **FIT)
    ens.save(tmp_path / "ens")
    back = load_ensemble(tmp_path / "ens", net)
    assert_same_members(ens.members, back.members)
    assert back.seeds == [10, 20] and back.info[0]["steps"] == 8
    assert torch.equal(ens.predict(data, progress=False), back.predict(data, progress=False))
    with pytest.raises(ValueError, match="no parameter"):
        load_ensemble(tmp_path / "ens", mlp_base())


def test_bad_input_errors(tmp_path):
    net, data = head_mlp(), batches()
    with pytest.raises(ValueError, match="num_members"):
        fit_ensemble(net, data, 0, **FIT)
    with pytest.raises(ValueError, match="range"):
        fit_ensemble(net, data, 2, members=[2], **FIT)
    with pytest.raises(ValueError, match="one entry per member"):
        fit_ensemble(net, data, 2, seeds=[1], **FIT)
    with pytest.raises(ValueError, match="out_dir"):
        fit_ensemble(net, data, 2, checkpoint=str(tmp_path), **FIT)
    fit_ensemble(net, data, 1, out_dir=tmp_path, **FIT)
    with pytest.raises(ValueError, match=r"fit.lr was 0.01, now 0.02"):
        fit_ensemble(net, data, 1, out_dir=tmp_path, **{**FIT, "lr": 2e-2})
    with pytest.raises(ValueError, match="num_members"):
        fit_ensemble(net, data, 2, out_dir=tmp_path, **FIT)
    with pytest.raises(ValueError, match="at least one member"):
        EnsemblePosterior([])
    with pytest.raises(ValueError, match="no model attached"):
        EnsemblePosterior([{"w": torch.zeros(1)}]).predict(data)
    with pytest.raises(FileNotFoundError, match="ensemble.json"):
        load_ensemble(tmp_path / "nothing")


# ------------------------------------------------------------------ posterior interface
def test_sample_draws_members_uniformly_with_replacement():
    ens = EnsemblePosterior([{"w": torch.full((2,), float(i))} for i in range(3)])
    draws = ens.sample(3000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(torch.tensor([int(d["w"][0]) for d in draws]), minlength=3)
    # multinomial(3000, 1/3): sd sqrt(3000 * 1/3 * 2/3) = 25.8; 4 sd
    assert ((counts - 1000).abs() < 4 * 25.8).all()
    assert len(ens.sample(10)) == 10  # more draws than members: with replacement
    assert ens.mean()["w"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="num_samples"):
        ens.sample(0)


def test_predict_equals_predict_probs_through_bayesian_lora_and_to_arviz():
    net, data = head_mlp(), batches()
    ens = fit_ensemble(net, data, 3, **FIT)
    lora = BayesianLoRA(net, prior=1.0, select=lambda n: True, prefix="ens")
    assert set(lora.random_names) == set(ens.names)  # the head is a site too
    on_sites = EnsemblePosterior(ens.members, lora=lora)
    assert set(on_sites.members[0]) == {lora.site_name(n) for n in ens.names}
    direct = ens.predict(data, progress=False)
    # the members run in one sample-batched forward by default; written in turn, the same
    torch.testing.assert_close(direct, ens.predict(data, progress=False, vectorize=False),
                               rtol=1e-5, atol=1e-6)
    via = predict_probs(lambda x, y: lora(x).softmax(-1), data, posterior=on_sites.members,
                        progress=False)
    assert torch.allclose(direct, via, atol=1e-6)
    assert torch.allclose(on_sites.predict(data, progress=False), direct, atol=1e-6)
    y = torch.cat([b[1] for b in data])
    head = lora.site_name("base_model.model.2.modules_to_save.default.weight")
    idata = to_arviz(on_sites.members, lora=lora, sample_probs=direct, y=y, var_names=[head],
                     short_names=False, chains=1)
    assert idata.posterior[head].shape == (1, 3, 3, 8)  # raw on request; every site as a norm
    assert idata.posterior[lora.site_name("base_model.model.0:delta_norm")].shape == (1, 3)
    a_norm = idata.posterior[f"{lora.site_name(ens.names[0])}:norm"].values[0]
    assert torch.allclose(torch.as_tensor(a_norm).float(),
                          torch.stack([m[ens.names[0]].norm() for m in ens.members]), atol=1e-6)
    assert idata.log_likelihood["y"].shape == (1, 3, 64)
    short = to_arviz(on_sites, num_samples=6, lora=lora).posterior  # short names, 2 chains
    assert short["ens.2.weight:norm"].shape == (2, 3) and short["ens.2.weight:norm"].attrs["site"] == head


def test_transformer_dict_batches_head_reinitialised(tmp_path):
    net, _ = tiny_transformer("bert")
    data = []
    for s in range(3):
        ids, mask = token_batch(8, 6, seed=s)
        data.append({"input_ids": ids, "attention_mask": mask, "labels": (ids[:, 0] % 2).long()})
    ens = fit_ensemble(net, data, 2, epochs=1, lr=1e-2, progress=False, out_dir=tmp_path)
    head = [n for n in ens.names if "modules_to_save" in n]
    assert head and all(not torch.equal(ens.members[0][n], ens.members[1][n]) for n in head)
    lora = BayesianLoRA(net, select=lambda n: True)
    loaded = load_ensemble(tmp_path, lora=lora)
    via = predict_probs(lambda input_ids, attention_mask, labels: lora(
        input_ids=input_ids, attention_mask=attention_mask).logits.softmax(-1), data,
        posterior=loaded.members, progress=False)
    assert torch.allclose(ens.predict(data, progress=False), via, atol=1e-6)


def test_batched_predict_falls_back_when_a_member_tensor_is_frozen():
    """A frozen head is not a BayesianLoRA site: the batched path would ignore the members'
    heads, so predict writes each member in turn instead (and gets their heads right)."""
    net, data = head_mlp(), batches()
    ens = fit_ensemble(net, data, 2, **FIT)
    head = "base_model.model.2.modules_to_save.default.weight"
    assert head in ens.names
    net.get_parameter(head).requires_grad_(False)
    assert ens._runner() is None
    got = ens.predict(data, progress=False)
    torch.testing.assert_close(got, ens.predict(data, progress=False, vectorize=False))
    assert not torch.allclose(got[0], got[1])
