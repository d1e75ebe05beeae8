"""PoLAR-VBLL that keeps a causal LM's answer-token readout: logits = the LM's own label-token
logits + a Bayesian correction on standardised features, with the prior scale by type-II ML."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LABEL_TOKENS, mlp_peft, tiny_transformer, token_batch

from pyro_llm import features
from pyro_llm.infer.answer_head import FeatureMap
from pyro_llm.infer.polar_vbll import answer_readout, fit_polar_vbll, load_polar_vbll
from pyro_llm.polar import PolarAdapter


def _lm_data(n=16, batch=8, seed=0, left=False):
    ids, mask = token_batch(n, 7, seed)
    if left:  # the same tokens, padded on the left
        ids, mask = ids.clone(), mask.clone()
        for i, k in enumerate(mask.sum(-1).tolist()):
            ids[i] = torch.cat([ids[i, k:].new_zeros(7 - k), ids[i, :k]])
            mask[i] = torch.cat([mask.new_zeros(7 - k), mask.new_ones(k)])
    y = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return [dict(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch], labels=y[i:i + batch])
            for i in range(0, n, batch)]


def _lm_adapter(seed=0, kind="llama"):
    peft_model, logits_fn = tiny_transformer(kind)
    return PolarAdapter(peft_model, seed=seed), logits_fn


def _set_theta(adapter, seed=3):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for t in adapter.Theta:
            t.copy_(0.5 * torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("left", [False, True])
def test_answer_readout_is_the_models_own_label_token_logits(kind, left):
    adapter, _ = _lm_adapter(kind=kind)
    _set_theta(adapter)  # a trained-looking adapter: the readout goes through it
    batch = _lm_data(left=left)[0]
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    phi, offset = answer_readout(LABEL_TOKENS)(adapter, batch)
    out = adapter(**inputs, output_hidden_states=True)
    want = features.label_token_logits(out, batch["attention_mask"], LABEL_TOKENS)
    torch.testing.assert_close(offset, want, rtol=0, atol=1e-6)
    # the features are what the LM head reads: the final hidden state, after the final norm
    torch.testing.assert_close(phi, features.pool(out, batch["attention_mask"], "last"), rtol=0, atol=0)
    w = adapter.peft_model.get_output_embeddings().weight[LABEL_TOKENS]
    torch.testing.assert_close(phi @ w.T, offset, rtol=0, atol=1e-5)
    # both carry gradients to the adapter
    (offset.sum() + phi.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.stiefel_parameters())


def test_answer_readout_rejects_bad_inputs():
    adapter, _ = _lm_adapter()
    with pytest.raises(ValueError, match="distinct"):
        answer_readout([5, 5])
    with pytest.raises(ValueError, match="dict batches"):
        answer_readout(LABEL_TOKENS)(adapter, (torch.ones(2, 3, dtype=torch.long), None))
    with pytest.raises(ValueError, match="exceed the vocabulary"):
        answer_readout([5, 500])(adapter, _lm_data()[0])


def test_at_initialisation_the_model_is_the_lms_answer():
    """Before any step (learning rates of 1e-12), PoLAR-VBLL predicts the base model's label-token
    softmax, flattened only by the head's initial variance ``v = |phi|^2 / D``: same argmax,
    probabilities ``softmax(z / sqrt(1 + pi v / 8))``, within ``|z| (1 - 1/kappa) / 4`` of the base's."""
    data = _lm_data()
    adapter, logits_fn = _lm_adapter()
    base = torch.cat([logits_fn(adapter.peft_model(input_ids=b["input_ids"],
                                                   attention_mask=b["attention_mask"]), b["attention_mask"])
                      for b in data]).detach()
    m = fit_polar_vbll(adapter, data, answer_readout(LABEL_TOKENS), 2, lr=1e-12, vbll_lr=1e-12,
                       prior_scale="auto", standardize_features=True, progress=False)
    p = m.predictive(data, progress=False)
    assert torch.equal(p.argmax(-1), base.argmax(-1))
    phi, offset = m.features(data, progress=False, offset=True)
    d = phi.shape[1]
    torch.testing.assert_close(offset, base, rtol=0, atol=1e-5)
    kappa = (1 + math.pi / 8 * phi.pow(2).sum(-1, keepdim=True) / d).sqrt()
    torch.testing.assert_close(p, torch.softmax(base / kappa, -1), rtol=0, atol=1e-5)
    gap = (base[:, 1] - base[:, 0]).abs()[:, None]
    assert ((p - base.softmax(-1)).abs() <= gap * (1 - 1 / kappa) / 4 + 1e-5).all()
    # standardised: per-dimension mean 0 and sd 1 / sqrt(D) over the training set
    torch.testing.assert_close(phi.mean(0), torch.zeros(d), rtol=0, atol=1e-4)
    torch.testing.assert_close(phi.std(0, unbiased=False) * math.sqrt(d), torch.ones(d), rtol=0, atol=1e-3)
    assert m.config["offset"] and m.config["standardize_features"] and m.config["prior_scale"] == "auto"


@pytest.mark.parametrize("alternate", ["epoch", "step"])
def test_a_fit_trains_the_head_and_the_backbone_through_the_answer(alternate, tmp_path):
    data = _lm_data(32)
    adapter, _ = _lm_adapter()
    before = [t.detach().clone() for t in adapter.stiefel_parameters()]
    m = fit_polar_vbll(adapter, data, answer_readout(LABEL_TOKENS), 2, epochs=3, lr=0.01, vbll_lr=0.05,
                       alternate=alternate, inner_steps=3, prior_scale="auto", standardize_features=True,
                       progress=False)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(adapter.stiefel_parameters(), before, strict=True))
    assert m.head.mean.abs().max() > 0 and math.isfinite(float(m.head.prior_variance().detach()))
    # save / load: identical predictions, the standardisation read back from its own file
    m.save(tmp_path / "pv")
    assert (tmp_path / "pv" / FeatureMap.FILE).exists()
    fresh, _ = _lm_adapter(seed=5)
    back = load_polar_vbll(tmp_path / "pv", fresh, answer_readout(LABEL_TOKENS))
    torch.testing.assert_close(back.predictive(data, progress=False), m.predictive(data, progress=False),
                               rtol=0, atol=0)
    torch.testing.assert_close(back.predict_samples(data, 3, progress=False),
                               m.predict_samples(data, 3, progress=False), rtol=0, atol=0)
    assert back.config == m.config and back.head.prior_scale == "auto"
    (tmp_path / "pv" / FeatureMap.FILE).unlink()
    with pytest.raises(FileNotFoundError, match="standardised"):
        load_polar_vbll(tmp_path / "pv", fresh, answer_readout(LABEL_TOKENS))


def _mlp_data(n=64, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (3 * x @ torch.randn(4, 3, generator=g)).argmax(-1)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("alternate", ["epoch", "step"])
def test_backbone_gradients_flow_through_the_offset(alternate):
    """Features without a graph (the raw inputs), the MLP's 3 outputs as the offset: the backbone
    can only learn through the offset, and it does."""
    data = _mlp_data()
    ad = PolarAdapter(mlp_peft(classes=3), seed=0)
    fn = lambda a, b: (b[0], a(b[0]))  # noqa: E731
    m = fit_polar_vbll(ad, data, fn, 3, epochs=20, lr=0.02, alternate=alternate, progress=False)
    per_epoch = torch.tensor(m.losses).view(20, len(data)).mean(-1)
    assert per_epoch[-3:].mean() < 0.8 * per_epoch[:3].mean(), per_epoch
    assert any(t.abs().max() > 1e-3 for t in ad.Theta)


def test_standardising_costs_no_extra_forward_and_plain_features_keep_their_head():
    """``alternate="epoch"``: the statistics' pass is the first head block's cache (2 forwards per
    batch per epoch in all, as without it); without an offset the head starts as before."""
    data = _mlp_data()
    ad = PolarAdapter(mlp_peft(classes=6), seed=0)
    calls = []
    hook = ad.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        m = fit_polar_vbll(ad, data, lambda a, b: a(b[0]), 3, epochs=2, lr=0.02,
                           standardize_features=True, progress=False)
    finally:
        hook.remove()
    assert len(calls) == 2 * 2 * len(data)
    assert not m.config["offset"] and m.head.mean.abs().min() > 0  # the random N(0, 1/D) start
    with pytest.raises(ValueError, match=r"offset must be \(16, 3\) logits"):
        fit_polar_vbll(PolarAdapter(mlp_peft(classes=6)), data, lambda a, b: (a(b[0]), a(b[0])), 3,
                       progress=False)
