"""The Laplace prior: centred where fine-tuning started, one precision per A / B group."""

from __future__ import annotations

import pytest
import torch
from conftest import LABEL_TOKENS, tiny_transformer, token_batch
from test_laplace import _split

from pyro_llm.adapter_state import initial_values, record_init
from pyro_llm.features import label_token_logits
from pyro_llm.infer.laplace import fit_laplace, load_laplace
from pyro_llm.infer.laplace.posterior import prior_groups


def _logits(model, b):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return label_token_logits(out, b["attention_mask"], LABEL_TOKENS)


@torch.no_grad()
def _finetuned_llama(seed=0):
    """A tiny causal LM whose adapter moved a little from peft's start, as after a short fit:
    B from zero to small values, A by a small step from its random initialisation."""
    pm, _ = tiny_transformer("llama", seed=seed)
    record_init(pm)
    g = torch.Generator().manual_seed(seed + 1)
    for n, p in pm.named_parameters():
        if ".lora_B." in n:
            p.copy_(0.01 * torch.randn(p.shape, generator=g))
        elif ".lora_A." in n:
            p.add_(0.003 * torch.randn(p.shape, generator=g))
    ids, mask = token_batch(24, 7, seed=seed)
    y = torch.randint(0, 2, (24,), generator=g)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
    return pm, batch


def _logit_difference_sd(la, batch):
    p = la.predict([batch], num_samples=2000, link="mc", logits_fn=_logits, progress=False)
    d = p[..., 1].clamp(1e-6, 1 - 1e-6).logit()  # logit of p1 = f1 - f0 for two classes
    return d.std(0).mean()


def test_a_prior_centred_at_the_initialisation_is_tighter_than_the_zero_centred_one():
    pm, batch = _finetuned_llama()
    kw = dict(structure="kfac", logits_fn=_logits, progress=False, prior_groups="one")
    zero = fit_laplace(pm, _split(batch, 4), prior_mean="zero", **kw)
    init = fit_laplace(pm, _split(batch, 4), prior_mean="init", **kw)
    assert zero.meta["prior_mean"] == "zero" and init.meta["prior_mean"] == "init"
    # A's random start counts as fitted signal under the zero-centred prior: a far smaller delta
    assert float(init.prior_precision[0]) > 5 * float(zero.prior_precision[0])
    assert _logit_difference_sd(init, batch) < 0.6 * _logit_difference_sd(zero, batch)
    # "auto" takes the recorded start
    auto = fit_laplace(pm, _split(batch, 4), **kw)
    assert auto.meta["prior_mean"] == "init"
    assert torch.allclose(auto.prior_precision, init.prior_precision)


def test_the_evidence_with_a_and_b_groups_is_at_least_the_one_group_evidence():
    pm, batch = _finetuned_llama(seed=3)
    kw = dict(structure="diag", logits_fn=_logits, progress=False, prior_mean="init")
    one = fit_laplace(pm, _split(batch, 4), prior_groups="one", **kw)
    ab = fit_laplace(pm, _split(batch, 4), **kw)  # the default
    assert ab.meta["prior_groups"] == "AB"
    groups = prior_groups(ab.site_names, "AB")
    assert groups.tolist() == [0 if "lora_A" in n else 1 for n in ab.site_names]
    d = ab.prior_precision
    assert len(set(d[groups == 0].tolist())) == 1 and len(set(d[groups == 1].tolist())) == 1
    assert float(d[groups == 0][0]) != pytest.approx(float(d[groups == 1][0]), rel=0.05)
    assert float(ab.log_marginal_likelihood()) >= float(one.log_marginal_likelihood()) - 1e-6
    # the optimum is a stationary point of the evidence in each group's log delta
    log_d = torch.stack([d[groups == k][0] for k in range(2)]).log().requires_grad_()
    ab.log_marginal_likelihood(log_d.exp()[groups]).backward()
    assert log_d.grad.abs().max() < 1e-3 * abs(float(ab.log_marginal_likelihood()))


def test_the_prior_mean_is_saved_and_read_back(tmp_path):
    pm, batch = _finetuned_llama(seed=5)
    la = fit_laplace(pm, _split(batch, 4), structure="diag", logits_fn=_logits, progress=False,
                     prior_groups="AB")
    la.save(tmp_path / "la")
    back = load_laplace(tmp_path / "la")
    assert all(torch.equal(back.prior_mean[n], la.prior_mean[n]) for n in la.site_names)
    assert float(back.log_marginal_likelihood()) == pytest.approx(float(la.log_marginal_likelihood()))
    assert torch.equal(back.prior_precision, la.prior_precision)


def test_a_missing_or_wrong_prior_mean_gets_a_clear_error():
    pm, _ = tiny_transformer("llama")
    ids, mask = token_batch(8, 7)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1] * 4)}
    kw = dict(structure="diag", logits_fn=_logits, progress=False)
    with pytest.raises(ValueError, match="record_init"):
        fit_laplace(pm, [batch], prior_mean="init", **kw)
    assert fit_laplace(pm, [batch], **kw).meta["prior_mean"] == "zero"  # auto: nothing recorded
    with pytest.raises(ValueError, match="not Laplace sites"):
        fit_laplace(pm, [batch], prior_mean={"nope": torch.zeros(2)}, **kw)
    with pytest.raises(ValueError, match="'middle'"):
        fit_laplace(pm, [batch], prior_mean="middle", **kw)
    with pytest.raises(ValueError, match="prior groups"):
        fit_laplace(pm, [batch], prior_groups="AC", **kw)
    with pytest.raises(ValueError, match="no recorded initial"):
        initial_values(pm)
