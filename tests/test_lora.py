"""BayesianLoRA: site naming, the peft model left untouched, round trips, architectures."""

from __future__ import annotations

import copy

import peft
import pyro
import pytest
import torch
from conftest import fake_finetune, mlp_base, mlp_peft, tiny_transformer, token_batch
from pyro import poutine
from safetensors.torch import load_file, save_file

from pyro_llm import (
    BayesianLoRA,
    GuidePosterior,
    find_lora_parameters,
    fit_svi,
    likelihoods,
    make_guide,
    predict_probs,
    priors,
)

X = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 1, 0])
IDX = torch.arange(5)


def _mlp_model(lora, size=5):
    def model(x, y, idx):
        likelihoods.categorical("y", lora(x), y, size, idx)
    return model


def _lora_names(pm, adapter="default"):
    return [n for n, _ in pm.named_parameters() if f".{adapter}." in n and ".lora_" in n]


def _snapshot(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters()}


def _assert_unchanged(pm, before):
    now = dict(pm.named_parameters())
    assert now.keys() == before.keys()
    for n, p in now.items():
        assert torch.equal(p, before[n]), n


# ---------------------------------------------------------------- naming
def test_site_names_are_peft_names():
    pm = mlp_peft()
    lora = BayesianLoRA(pm)
    names = _lora_names(pm)
    assert len(names) == 4
    assert lora.random_names == names == find_lora_parameters(pm)
    assert lora.site_names == names
    assert names[0] == "base_model.model.0.lora_A.default.weight"
    tr = poutine.trace(lora).get_trace(X)
    samples = [k for k, s in tr.nodes.items() if s["type"] == "sample"]
    assert samples == names
    for n in names:  # each site has the matrix's shape and the prior's event shape
        assert tr.nodes[n]["value"].shape == pm.get_parameter(n).shape
        assert tr.nodes[n]["fn"].event_shape == pm.get_parameter(n).shape
    assert lora.num_random_parameters == sum(pm.get_parameter(n).numel() for n in names)


def test_site_names_with_prefix():
    pm = mlp_peft()
    lora = BayesianLoRA(pm, prefix="llm", select="B")
    names = _lora_names(pm)
    b_names = [n for n in names if ".lora_B." in n]
    assert lora.site_names == ["llm." + n for n in b_names]
    assert lora.site_name(b_names[0]) == "llm." + b_names[0]
    assert lora.peft_name("llm." + b_names[0]) == b_names[0]
    tr = poutine.trace(lora).get_trace(X)
    samples = {k for k, s in tr.nodes.items() if s["type"] == "sample"}
    params = {k for k, s in tr.nodes.items() if s["type"] == "param"}
    assert samples == {"llm." + n for n in b_names}
    assert params == {"llm." + n for n in names if ".lora_A." in n}  # fixed A: point estimates
    assert set(lora.init_values()) == samples


def test_second_adapter_by_name():
    pm = mlp_peft()
    pm.add_adapter("other", peft.LoraConfig(r=3, target_modules=["2"]))
    lora = BayesianLoRA(pm, adapter_name="other")
    assert lora.adapter_name == "other"
    assert lora.random_names == ["base_model.model.2.lora_A.other.weight",
                                 "base_model.model.2.lora_B.other.weight"]
    assert lora.fixed_names == []  # the default adapter's tensors are not part of it


def _two_adapters():
    pm = mlp_peft()
    pm.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=3, target_modules=["0", "2"]))
    with torch.no_grad():  # both adapters non-zero, so using the wrong one shows
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    return pm


def _reference(pm, adapter, values):
    """base + the chosen adapter's delta, by hand, from the values (peft names)."""
    base = mlp_base()
    x, out = X, None
    for i in (0, 2):
        lin = base[i]
        a = values[f"base_model.model.{i}.lora_A.{adapter}.weight"]
        b = values[f"base_model.model.{i}.lora_B.{adapter}.weight"]
        scale = pm.base_model.model[i].scaling[adapter]
        out = lin(x) + scale * (x @ a.T) @ b.T
        x = torch.relu(out)
    return out


@pytest.mark.parametrize("active", ["default", "other"])
@pytest.mark.parametrize("adapter", ["default", "other"])
@pytest.mark.parametrize("sel", ["AB", "A", "B"])
def test_single_and_stacked_paths_compute_the_chosen_adapter(active, adapter, sel):
    pm = _two_adapters()
    pm.set_adapter(active)
    lora = BayesianLoRA(pm, prior=0.1, select=sel, adapter_name=adapter)
    pyro.clear_param_store()
    values = {n: p.detach().clone() for n, p in pm.named_parameters() if ".lora_" in n}
    draw = {s: torch.randn_like(v) * 0.3 for s, v in lora.init_values().items()}
    values.update({lora.peft_name(s): v for s, v in draw.items()})
    expected = _reference(pm, adapter, values)
    single = poutine.condition(lora, data=draw)(X)
    stacked = poutine.condition(lora, data={s: torch.stack([v, v]) for s, v in draw.items()})(X)
    torch.testing.assert_close(single, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stacked[1], expected, atol=1e-5, rtol=1e-5)


def test_merged_adapter_is_refused_at_construction_and_forward():
    pm = _two_adapters()
    lora = BayesianLoRA(pm, prior=0.1)
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged.*unmerge_adapter"):
        lora(X)
    with pytest.raises(ValueError, match="merged"):
        BayesianLoRA(pm, prior=0.1)
    pm.unmerge_adapter()
    assert lora(X).shape == (5, 3)


# ---------------------------------------------------------------- select and priors
def _bert_names(pm, matrix=None, layer=None):
    out = _lora_names(pm)
    if matrix:
        out = [n for n in out if f".lora_{matrix}." in n]
    if layer is not None:
        out = [n for n in out if f".layer.{layer}." in n]
    return out


@pytest.mark.parametrize("sel", ["A", "B", "layer1", "query_B", "names"])
def test_select_gives_expected_sites(sel):
    pm, _ = tiny_transformer("bert")
    head = ["base_model.model.classifier.modules_to_save.default.weight",
            "base_model.model.classifier.modules_to_save.default.bias"]
    if sel == "A":
        lora, want = BayesianLoRA(pm, select="A"), _bert_names(pm, "A")
    elif sel == "B":
        lora, want = BayesianLoRA(pm, select="B"), _bert_names(pm, "B")
    elif sel == "layer1":
        lora, want = BayesianLoRA(pm, select=priors.select(layers=[1])), _bert_names(pm, layer=1)
    elif sel == "query_B":
        lora = BayesianLoRA(pm, select=priors.select("B", pattern=r"\.query\."))
        want = [n for n in _bert_names(pm, "B") if ".query." in n]
    else:
        want = _bert_names(pm)[:3]
        lora = BayesianLoRA(pm, select=want)
    assert want and lora.random_names == want
    assert lora.fixed_names == [n for n in _bert_names(pm) if n not in want] + head
    ids, mask = token_batch()
    tr = poutine.trace(lora).get_trace(input_ids=ids, attention_mask=mask)
    assert [k for k, s in tr.nodes.items() if s["type"] == "sample"] == want
    assert {k for k, s in tr.nodes.items() if s["type"] == "param"} == set(lora.fixed_names)


def test_layer_selection_counts():
    pm, _ = tiny_transformer("bert")
    lora = BayesianLoRA(pm)
    assert len(lora.random_names) == 8  # 2 layers x (q, v) x (A, B); the head stays a point
    assert len(lora.fixed_names) == 2
    assert len(BayesianLoRA(pm, select=priors.select(layers=[0])).random_names) == 4


def test_hierarchical_prior_adds_hyper_site():
    pm = mlp_peft()
    lora = BayesianLoRA(pm, prior=priors.HierarchicalNormal(), prefix="m")
    assert lora.hyper_names == ["lora_prior_scale"]
    tr = poutine.trace(lora).get_trace(X)
    samples = [k for k, s in tr.nodes.items() if s["type"] == "sample"]
    assert samples == ["m.lora_prior_scale"] + lora.site_names  # the hyper site comes first
    scale = tr.nodes["m.lora_prior_scale"]["value"]
    assert scale.shape == () and scale > 0
    for n in lora.site_names:  # every matrix's prior uses the drawn scale
        base = tr.nodes[n]["fn"].base_dist
        assert torch.equal(base.scale, scale.expand(base.scale.shape))

    lora = BayesianLoRA(pm, prior=priors.HierarchicalNormal(per="matrix"), select="B")
    want = [n.removesuffix(".weight") + ".prior_scale" for n in lora.random_names]
    assert lora.hyper_names == want
    tr = poutine.trace(lora).get_trace(X)
    for n, h in zip(lora.random_names, want, strict=True):
        scale = tr.nodes[n]["fn"].base_dist.scale
        assert torch.equal(scale.unique(), tr.nodes[h]["value"].reshape(1))


# ---------------------------------------------------------------- guide initialisation
@pytest.mark.parametrize("kind", ["normal", "mvn", "low_rank", "delta"])
def test_guide_starts_at_fine_tuned_adapter(kind):
    pm = mlp_peft()
    fake_finetune(pm)
    lora = BayesianLoRA(pm, prior=0.1)
    model = _mlp_model(lora)
    guide = make_guide(model, kind, init_values=lora)
    guide(X, Y, IDX)
    median = guide.median()
    assert set(median) == set(lora.site_names)
    for n in lora.site_names:
        torch.testing.assert_close(median[n], pm.get_parameter(n), rtol=0, atol=1e-6)
    assert any(pm.get_parameter(n).abs().min() > 0 for n in lora.site_names if "lora_B" in n)
    # without init values the guide starts near the prior median (0), not at the adapter
    pyro.clear_param_store()
    guide = make_guide(model, kind)
    guide(X, Y, IDX)
    for n, v in guide.median().items():
        if ".lora_B." in n:
            assert (v - pm.get_parameter(n)).abs().max() > 0.1


# ---------------------------------------------------------------- the peft model stays untouched
def test_fit_leaves_peft_model_bit_identical_and_write_to_peft_round_trip(tmp_path):
    pm = mlp_peft(seed=0)
    fake_finetune(pm)
    pm.eval()
    before = _snapshot(pm)
    lora = BayesianLoRA(pm, prior=0.5)
    res = fit_svi(_mlp_model(lora), "normal", [(X, Y, IDX)], epochs=5, lr=0.05, init_values=lora,
                  progress=False)
    _assert_unchanged(pm, before)  # base weights and LoRA tensors: not a bit changed

    mean = GuidePosterior(res.guide).mean()
    assert set(mean) == set(lora.site_names)
    assert any(not torch.equal(mean[n], before[n]) for n in lora.site_names)  # the fit moved
    with torch.no_grad(), poutine.condition(data=mean):
        out_mean = lora(X)
    written = lora.write_to_peft(mean)
    assert written == lora.random_names
    for n, p in pm.named_parameters():
        want = mean[n] if n in mean else before[n]
        assert torch.equal(p, want), n
    with torch.no_grad():
        torch.testing.assert_close(pm(X), out_mean, rtol=1e-6, atol=1e-7)

    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    base = mlp_base(seed=0)  # the same base weights (same seed)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), pm(X))
    # the loaded adapter is frozen (inference mode) but still random under BayesianLoRA
    lora2 = BayesianLoRA(loaded)
    assert lora2.random_names == lora.random_names and lora2.fixed_names == []


def test_write_to_peft_writes_fitted_point_estimates_and_checks_shapes():
    pm = mlp_peft()
    fake_finetune(pm)
    lora = BayesianLoRA(pm, select="B", prefix="p")
    res = fit_svi(_mlp_model(lora), "normal", [(X, Y, IDX)], epochs=3, lr=0.05,
                  init_values=lora, progress=False)
    a_sites = {lora.site_name(n) for n in lora.fixed_names}
    assert a_sites <= set(res.params)  # the fixed A matrices were fitted as pyro.params
    written = lora.write_to_peft(res.params)  # guide params are skipped, A's are written
    assert written == lora.fixed_names
    for n in lora.fixed_names:
        assert torch.equal(pm.get_parameter(n), res.params[lora.site_name(n)])
    with pytest.raises(ValueError, match=r"has shape \(2, 2\), expected \(2, 4\)"):
        lora.write_to_peft({lora.fixed_names[0]: torch.zeros(2, 2)})


def test_guide_params_round_trip_through_safetensors(tmp_path):
    pm = mlp_peft()
    fake_finetune(pm)
    lora = BayesianLoRA(pm, prior=0.5, select="B")  # guide params and pyro.param A's
    model = _mlp_model(lora)
    res = fit_svi(model, "normal", [(X, Y, IDX)], epochs=4, lr=0.05, init_values=lora,
                  progress=False)

    def predict(guide):
        fn = lambda x: torch.softmax(lora(x), -1)  # noqa: E731
        return predict_probs(fn, [X], GuidePosterior(guide), num_samples=6, progress=False, seed=3)

    probs = predict(res.guide)
    assert probs.shape == (6, 5, 3)
    assert not torch.allclose(probs[0], probs[1])  # the draws differ
    store = pyro.get_param_store()
    saved = {n: p.detach().contiguous() for n, p in store.named_parameters()}  # unconstrained
    save_file(saved, str(tmp_path / "guide.safetensors"))

    pyro.clear_param_store()
    guide = make_guide(model, "normal", init_values=lora)
    pyro.infer.Trace_ELBO().loss(model, guide, X, Y, IDX)  # creates every param afresh
    loaded = load_file(str(tmp_path / "guide.safetensors"))
    params = dict(pyro.get_param_store().named_parameters())
    assert params.keys() == loaded.keys()
    assert any(not torch.equal(params[n], loaded[n]) for n in params)  # fresh ones differ
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(loaded[n])
    assert torch.equal(predict(guide), probs)


# ---------------------------------------------------------------- architectures
@pytest.mark.parametrize("kind", ["mlp", "bert", "llama", "gpt2"])
def test_architectures_fit_and_inject(kind):
    if kind == "mlp":
        pm = mlp_peft(classes=2)
        inputs = {"input": torch.randn(4, 4, generator=torch.Generator().manual_seed(2))}
        fn = lambda out, mask: out  # noqa: E731
        call = lambda m: fn(m(inputs["input"]), None)  # noqa: E731
    else:
        pm, fn = tiny_transformer(kind)
        ids, mask = token_batch()
        inputs = {"input_ids": ids, "attention_mask": mask}
        call = lambda m: fn(m(**inputs), mask)  # noqa: E731
    pm.eval()
    fake_finetune(pm)
    before = _snapshot(pm)
    lora = BayesianLoRA(pm, prior=0.05)
    assert [n for n in lora.random_names if ".lora_" in n] == _lora_names(pm)
    if kind == "bert":  # the SEQ_CLS head (modules_to_save) is a point estimate
        assert lora.fixed_names == [n for n in before if "modules_to_save" in n]
    else:
        assert lora.fixed_names == []

    with torch.no_grad():
        out_peft = call(pm)
        with poutine.condition(data=lora.init_values()):
            out_init = call(lora)
        tr = poutine.trace(lambda: call(lora)).get_trace()  # a prior draw
        draw = {k: s["value"] for k, s in tr.nodes.items() if s["type"] == "sample"}
        with poutine.condition(data=draw):
            out_prior = call(lora)
    assert out_peft.shape == (4, 2)
    torch.testing.assert_close(out_init, out_peft, rtol=1e-5, atol=1e-5)
    assert (out_prior - out_peft).abs().max() > 1e-3
    # the draw injected by functional_call is the draw written into a copy of the model
    twin = copy.deepcopy(pm)
    BayesianLoRA(twin).write_to_peft(draw)
    with torch.no_grad():
        torch.testing.assert_close(call(twin), out_prior, rtol=1e-5, atol=1e-5)

    labels = torch.tensor([0, 1, 1, 0])

    def model(labels, **kw):
        out = lora(**kw) if kind != "mlp" else lora(kw["input"])
        mask = kw.get("attention_mask")
        likelihoods.categorical("y", fn(out, mask), labels, 4, torch.arange(4))

    res = fit_svi(model, "normal", [dict(inputs, labels=labels)], epochs=3, lr=0.01,
                  init_values=lora, init_scale=0.01, progress=False)
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    _assert_unchanged(pm, before)
    mean = GuidePosterior(res.guide).mean()
    assert set(mean) == set(lora.site_names)
    # Adam moves each parameter by at most ~lr per step: after 3 steps the guide mean is
    # within 3 lr of the fine-tuned adapter, while a prior draw is far from it
    init = lora.init_values()
    moved = max(float((mean[n] - init[n]).abs().max()) for n in mean)
    assert 0 < moved <= 3 * 0.01 * 1.01
    assert max(float((draw[n] - init[n]).abs().max()) for n in mean) > 10 * moved
    with torch.no_grad(), poutine.condition(data=mean):
        out_mean = call(lora)
    assert not torch.equal(out_mean, out_peft)
    assert not torch.allclose(out_mean, out_prior, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- plates, dropout, mode
def test_first_call_inside_plate_raises_and_shared_draw_works():
    pm = mlp_peft()
    lora = BayesianLoRA(pm)

    def bad(x):
        with pyro.plate("data", x.shape[0]):
            return lora(x)

    with pytest.raises(RuntimeError, match="first called inside a pyro.plate"):
        poutine.trace(bad).get_trace(X)

    def good(x):
        with lora.shared_draw():
            out1 = lora(x)
            with pyro.plate("data", x.shape[0]):
                out2 = lora(x)
        return out1, out2

    tr = poutine.trace(good).get_trace(X)
    out1, out2 = tr.nodes["_RETURN"]["value"]
    assert torch.equal(out1, out2)
    assert [k for k, s in tr.nodes.items() if s["type"] == "sample" and k != "data"] == \
        lora.site_names


def _modes(pm):
    return {n: m.training for n, m in pm.named_modules()}


@pytest.mark.parametrize("dropout", [False, True])
def test_dropout_flag_and_mode_restored(dropout):
    # peft leaves a mixed state: base model in eval mode, its new LoRA modules in train mode
    pm, _ = tiny_transformer("bert")
    modes = _modes(pm)
    assert len(set(modes.values())) == 2
    ids, mask = token_batch()
    lora = BayesianLoRA(pm, dropout=dropout)
    lora(input_ids=ids, attention_mask=mask)
    assert _modes(pm) == modes
    for train in (True, False):
        pm.train(train)
        modes = _modes(pm)
        lora(input_ids=ids, attention_mask=mask)
        assert _modes(pm) == modes


def test_dropout_off_is_deterministic_and_on_is_random():
    pm = mlp_peft(lora_dropout=0.5)
    fake_finetune(pm)
    x = torch.randn(64, 4)
    pm.train()
    lora = BayesianLoRA(pm)  # dropout=False: eval mode inside, so lora_dropout is off
    fixed = lora.init_values()
    with torch.no_grad(), poutine.condition(data=fixed):
        a, b = lora(x), lora(x)
    assert torch.equal(a, b)
    assert pm.training
    pm.eval()
    lora = BayesianLoRA(pm, dropout=True)
    with torch.no_grad(), poutine.condition(data=fixed):
        c, d = lora(x), lora(x)
    assert not torch.equal(c, d)
    assert not pm.training


# ---------------------------------------------------------------- bad input
def test_model_without_lora_is_rejected():
    with pytest.raises(ValueError, match="has no LoRA layers; adapt it first"):
        BayesianLoRA(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        BayesianLoRA("model")


def test_unknown_adapter_is_rejected():
    match = r"unknown adapter 'nope'; the model has LoRA adapters \['default'\]"
    with pytest.raises(ValueError, match=match):
        BayesianLoRA(mlp_peft(), adapter_name="nope")


def test_select_matching_nothing_is_rejected():
    with pytest.raises(ValueError, match="nothing would be random"):
        BayesianLoRA(mlp_peft(), select=priors.select(layers=[7]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inputs_are_rejected(bad):
    lora = BayesianLoRA(mlp_peft())
    x = X.clone()
    x[2, 1] = bad
    with pytest.raises(ValueError, match="argument 0 contains NaN or inf"):
        lora(x)
    pm, _ = tiny_transformer("bert")
    ids, mask = token_batch()
    emb = torch.zeros(4, 6, 32)
    emb[0, 0, 0] = bad
    with pytest.raises(ValueError, match="keyword 'inputs_embeds' contains NaN or inf"):
        BayesianLoRA(pm)(inputs_embeds=emb, attention_mask=mask)


@pytest.mark.parametrize("scale", [-1.0, 0.0, float("nan")])
def test_bad_prior_scale_is_rejected(scale):
    with pytest.raises(ValueError, match="prior scale must be a finite number > 0"):
        BayesianLoRA(mlp_peft(), prior=scale)


def test_categorical_likelihood_rejects_bad_labels_and_index():
    logits = torch.zeros(4, 3)
    idx = torch.arange(4)
    with pytest.raises(ValueError, match=r"y: labels must have shape \(4,\), got \(4, 1\)"):
        likelihoods.categorical("y", logits, torch.zeros(4, 1, dtype=torch.long), 10, idx)
    with pytest.raises(ValueError, match=r"y: labels must have shape \(4,\), got \(3,\)"):
        likelihoods.categorical("y", logits, torch.zeros(3, dtype=torch.long), 10, idx)
    with pytest.raises(ValueError, match=r"y: labels must lie in \[0, 2\], got \[0, 3\]"):
        likelihoods.categorical("y", logits, torch.tensor([0, 1, 2, 3]), 10, idx)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\], got \[-1, 1\]"):
        likelihoods.categorical("y", logits, torch.tensor([0, 1, -1, 1]), 10, idx)
    with pytest.raises(ValueError, match=r"index must have shape \(4,\)"):
        likelihoods.categorical("y", logits, None, 10, torch.arange(3))
    with pytest.raises(ValueError, match=r"index must lie in \[0, 10\)"):
        likelihoods.categorical("y", logits, None, 10, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"logits must be \(batch, classes\)"):
        likelihoods.categorical("y", torch.zeros(4, 2, 3), None, 10, idx)


def test_categorical_likelihood_scales_minibatch():
    logits = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 1])
    tr = poutine.trace(likelihoods.categorical).get_trace("y", logits, y, 100,
                                                           torch.tensor([3, 50, 7, 99]))
    tr.compute_log_prob()
    want = torch.distributions.Categorical(logits=logits).log_prob(y).sum() * 100 / 4
    torch.testing.assert_close(tr.log_prob_sum(), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_input_dtype_mismatch_and_integer_base_are_explained(dtype):
    pm = mlp_peft()
    base = pm.base_model.model[0].base_layer
    base.weight.data = base.weight.data.to(dtype)
    match = "integer dtype cannot run" if dtype == torch.int8 else f"input is torch.float32.*{dtype}"
    with pytest.raises(ValueError, match=match):
        BayesianLoRA(pm, prior=0.1)(X)
