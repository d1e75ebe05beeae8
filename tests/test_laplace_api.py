"""The Laplace posterior as a Posterior and a Pyro guide; files; errors; real models."""

from __future__ import annotations

import json

import pyro
import pytest
import torch
from conftest import LABEL_TOKENS, fake_finetune, tiny_transformer, token_batch
from test_laplace import _mlp, _split

from pyro_llm import BayesianLoRA, GuidePosterior, predict_probs, to_arviz
from pyro_llm.features import label_token_logits
from pyro_llm.infer.laplace import estimate_memory, fit_laplace, gridsearch_prior_precision, load_laplace
from pyro_llm.likelihoods import categorical


def _fitted(structure="kfac", **kw):
    pm, X, y = _mlp(n=30)
    data = [(X[i:i + 10], y[i:i + 10]) for i in range(0, 30, 10)]
    la = fit_laplace(pm, data, structure=structure, progress=False, **kw)
    return pm, data, la


def test_fit_leaves_the_peft_weights_untouched_and_predicts_around_the_map():
    pm, X, y = _mlp(n=30)
    before = {n: p.detach().clone() for n, p in pm.state_dict().items()}
    flags = {n: p.requires_grad for n, p in pm.named_parameters()}
    la = fit_laplace(pm, [(X, y)], progress=False)
    probs = la.predict([(X, y)], num_samples=50, progress=False)
    nn = la.predict([(X, y)], pred_type="nn", num_samples=50, progress=False)
    for n, p in pm.state_dict().items():
        assert torch.equal(p, before[n]), n
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == flags
    assert probs.shape == nn.shape == (50, 30, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(50, 30), atol=1e-5)
    assert la.prior_precision.shape == (len(la.site_names),)
    assert la.marglik_trace and la.marglik_trace[-1] >= la.marglik_trace[0]


def test_the_posterior_plugs_into_predict_probs_guides_predictive_and_arviz():
    pm, data, la = _fitted()
    lora = la.lora
    assert la.site_names == lora.site_names

    def fn(x, y):
        return lora(x).softmax(-1)

    draws = la.sample(8, generator=torch.Generator().manual_seed(0))
    assert set(draws[0]) == set(lora.site_names)
    p1 = predict_probs(fn, data, la, num_samples=8, progress=False)
    assert p1.shape == (8, 30, 3)
    g = GuidePosterior(la.guide).sample(3)
    assert set(g[0]) == set(lora.site_names)
    X = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])

    def model(x, y=None):
        categorical("y", lora(x), y, len(x), torch.arange(len(x)))

    pred = pyro.infer.Predictive(model, guide=la.guide, num_samples=5)(X)
    assert pred["y"].shape == (5, 30)
    idata = to_arviz(draws, lora=lora, sample_probs=predict_probs(fn, data, draws, progress=False), y=y)
    assert "posterior" in idata.groups() and "posterior_predictive" in idata.groups()
    assert "posterior" in to_arviz(la, num_samples=10, lora=lora).groups()
    # sampled weights give the same predictive mean as the GLM when the posterior is tight
    la.prior_precision = 1e6
    glm = la.predict(data, num_samples=200, progress=False).mean(0)
    nn = la.predict(data, pred_type="nn", num_samples=20, progress=False).mean(0)
    assert (glm - nn).abs().max() < 1e-3


def test_the_last_layer_draw_writes_into_a_peft_adapter_that_round_trips(tmp_path):
    import peft

    pm, X, y = _mlp(head=True)
    la = fit_laplace(pm, [(X, y)], structure="full", select="last_layer", progress=False)
    assert la.lora.write_to_peft(la.sample(1)[0]) == la.lora.random_names
    pm.save_pretrained(tmp_path / "adapter")
    from conftest import mlp_base

    back = peft.PeftModel.from_pretrained(mlp_base(0, 6, 16, 3), tmp_path / "adapter")
    name = la.lora.random_names[0]
    assert torch.equal(back.get_parameter(name), pm.get_parameter(name))


@pytest.mark.parametrize("structure", ["kfac", "lowrank_kfac", "diag", "full"])
def test_save_and_load_give_the_same_posterior(tmp_path, structure):
    pm, data, la = _fitted(structure, n_kfac=3)
    la.save(tmp_path / "la")
    files = sorted(p.name for p in (tmp_path / "la").iterdir())
    assert files == ["laplace.json", "laplace.safetensors"]
    json.loads((tmp_path / "la" / "laplace.json").read_text())
    back = load_laplace(tmp_path / "la", lora=BayesianLoRA(pm))
    assert torch.equal(back.prior_precision, la.prior_precision)
    assert float(back.log_marginal_likelihood()) == pytest.approx(float(la.log_marginal_likelihood()))
    a = la.deviations(4, torch.Generator().manual_seed(3))
    b = back.deviations(4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa = la.predict(data, link="probit", progress=False)
    pb = back.predict(data, link="probit", progress=False)
    assert torch.allclose(pa, pb)


def test_load_refuses_a_model_with_other_sites_and_predict_needs_a_model(tmp_path):
    pm, data, la = _fitted()
    la.save(tmp_path / "la")
    with pytest.raises(ValueError, match="same select"):
        load_laplace(tmp_path / "la", lora=BayesianLoRA(pm, select="B"))
    bare = load_laplace(tmp_path / "la")
    assert len(bare.sample(2)) == 2
    with pytest.raises(ValueError, match="no model attached"):
        bare.predict(data, progress=False)
    with pytest.raises(FileNotFoundError, match="not a saved Laplace"):
        load_laplace(tmp_path)


def test_gridsearch_picks_the_prior_with_the_lowest_validation_nll():
    pm, data, la = _fitted(optimize_prior=None)
    grid = [1e-2, 1.0, 1e2]
    nlls = []
    y = torch.cat([d[1] for d in data])
    for d in grid:
        la.prior_precision = d
        p = la.predict(data, link="probit", progress=False).mean(0)
        nlls.append(float(-p.log().gather(1, y[:, None]).mean()))
    best = gridsearch_prior_precision(la, data, grid=grid)
    assert float(best[0]) == grid[min(range(3), key=nlls.__getitem__)]
    assert la.meta["gridsearch_nll"] == pytest.approx(min(nlls), rel=1e-5)


def test_a_causal_lm_with_label_token_logits():
    pm, _ = tiny_transformer("llama")
    fake_finetune(pm, scale=0.5)
    ids, mask = token_batch(6, 7)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1, 1, 0])}

    def logits_fn(model, b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return label_token_logits(out, b["attention_mask"], LABEL_TOKENS)

    for structure, select in (("lowrank_kfac", "AB"), ("full", "last_layer")):
        la = fit_laplace(pm, _split(batch, 3), structure=structure, select=select, n_kfac=4,
                         logits_fn=logits_fn, progress=False)
        p = la.predict([batch], num_samples=10, progress=False)  # the fit's logits_fn is remembered
        assert p.shape == (10, 6, 2) and torch.isfinite(p).all()
    assert la.site_names == BayesianLoRA(pm).site_names[-2:]  # LLLA: the last adapted layer


def test_bad_input_gets_clear_errors():
    pm, X, y = _mlp(n=10, head=True)
    data = [(X, y)]
    with pytest.raises(ValueError, match="unknown structure 'kron'"):
        fit_laplace(pm, data, structure="kron", progress=False)
    with pytest.raises(ValueError, match="unknown curvature"):
        fit_laplace(pm, data, curvature="hessian", progress=False)
    with pytest.raises(ValueError, match="use structure='diag' or 'full' for biases"):
        fit_laplace(pm, data, select="last_layer", progress=False)
    with pytest.raises(ValueError, match="no labels"):
        fit_laplace(pm, [X], progress=False)
    with pytest.raises(ValueError, match=r"labels must be \(batch,\) class indices in \[0, 3\)"):
        fit_laplace(pm, [(X, y + 3)], progress=False)
    with pytest.raises(ValueError, match="logits_fn must return"):
        fit_laplace(pm, data, logits_fn=lambda m, b: m(b[0])[:, :1], progress=False)
    with pytest.raises(ValueError, match="n_kfac must be a positive int"):
        fit_laplace(pm, data, structure="lowrank_kfac", n_kfac=0, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        fit_laplace(pm, [], progress=False)
    la = fit_laplace(pm, data, progress=False)
    with pytest.raises(ValueError, match="prior_precision must be finite and > 0"):
        la.prior_precision = -1.0
    with pytest.raises(ValueError, match="1 or 2 values"):
        la.prior_precision = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="unknown link"):
        la.predict(data, link="logit", progress=False)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        la.sample(0)


def test_a_structure_that_would_not_fit_is_refused_before_any_work_with_the_estimate():
    pm, _ = tiny_transformer("bert")
    ids, mask = token_batch(2, 4)
    calls = []

    class Data:
        def __iter__(self):
            calls.append(1)
            yield {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}

    need = estimate_memory([(4, 32), (32, 4)] * 4, "kfac")
    with pytest.raises(MemoryError, match=r"needs about .*KiB.*lowrank_kfac.*n_kfac=2: about"):
        fit_laplace(pm, Data(), max_memory=need // 2, n_kfac=2, progress=False)
    assert not calls
    la = fit_laplace(pm, Data(), structure="lowrank_kfac", n_kfac=2, max_memory=need // 2, progress=False)
    assert la.memory_bytes < need // 2
    assert estimate_memory([(8, 4096)], "lowrank_kfac", 10) < estimate_memory([(8, 4096)], "kfac") / 100


@pytest.mark.slow
def test_real_minilm_laplace_widens_the_map_predictive(minilm_tokenizer):
    """MiniLM (all-MiniLM-L6-v2, a real pretrained model) on real Rotten Tomatoes reviews."""
    from pyro_llm.data import TextDataset, collate, rotten_tomatoes
    from pyro_llm.infer import fit_map
    from pyro_llm.metrics import entropy
    from pyro_llm.models import lora_classifier

    texts, labels = rotten_tomatoes()
    pm, tok = lora_classifier()
    train = TextDataset(texts[:48], tok, labels[:48], 48, 2)
    test = TextDataset(texts[48:80], tok, labels[48:80], 48, 2)
    dl = torch.utils.data.DataLoader(train, 16, collate_fn=collate)
    fit_map(pm, dl, epochs=2, lr=2e-3, progress=False)
    pm.eval()
    test_dl = torch.utils.data.DataLoader(test, 16, collate_fn=collate)
    la = fit_laplace(pm, dl, structure="lowrank_kfac", progress=False)
    assert len(la.site_names) == 24 and la.memory_bytes < 0.05 * 4 * sum(
        p.numel() for p in pm.parameters())
    p_map = la.predict(test_dl, link="probit", progress=False)[0]
    la.prior_precision = 1e8
    p_tight = la.predict(test_dl, link="probit", progress=False)[0]
    la.prior_precision = 1.0
    p_wide = la.predict(test_dl, link="probit", progress=False)[0]
    with torch.no_grad():
        logits = torch.cat([pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                            for b in test_dl])
    assert torch.allclose(p_tight, logits.softmax(-1), atol=1e-4)  # no posterior mass: the MAP
    assert entropy(p_wide).mean() > entropy(logits.softmax(-1)).mean()
    assert torch.isfinite(p_map).all()


def test_laplace_predictions_feed_the_downstream_regression():
    import numpy as np
    import pandas as pd

    from pyro_llm import regress
    from pyro_llm.infer import fit_map

    pm, X, _ = _mlp(n=80, classes=2)
    y = (X[:, 0] + 0.5 * torch.randn(80, generator=torch.Generator().manual_seed(0)) > 0).long()
    fit_map(pm, [(X[:40], y[:40])], epochs=150, lr=3e-2, progress=False,
            loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    la = fit_laplace(pm, [(X[:40], y[:40])], progress=False)
    draws = la.predict([(X, y)], num_samples=30, progress=False)  # (S, N, C) for every row
    rng = np.random.default_rng(0)
    q = rng.normal(size=80)
    df = pd.DataFrame({"out": y.numpy() + 0.5 * q + rng.normal(size=80), "q": q,
                       "z": np.where(np.arange(80) < 40, y.numpy(), np.nan)})
    for method in ("mi", "ptd"):
        res = regress(df, "out ~ C(z) + q", label="z", predictions=draws, method=method)
        table = res.summary()
        assert np.isfinite(table.to_numpy(dtype=float)).all(), method


@pytest.mark.parametrize("structure", ["kfac", "diag", "full"])
def test_curvature_above_prior_counts_the_dense_spectrum(structure):
    pm, X, y = _mlp()
    la = fit_laplace(pm, [(X, y)], structure=structure, optimize_prior=None, prior_precision=1e-3,
                     progress=False)
    for delta in (1e-3, 0.5, 5.0):
        dense = sum(int((torch.linalg.eigvalsh(b.dense()) > delta).sum()) for b in la.blocks)
        assert la.curvature_above_prior(delta) == pytest.approx(dense / la.num_parameters)
    assert la.meta["curvature_above_prior"] == pytest.approx(la.curvature_above_prior())
    ruled = fit_laplace(pm, [(X, y)], structure=structure, optimize_prior=None, prior_precision=1e9,
                        progress=False)
    assert ruled.meta["curvature_above_prior"] == 0.0
