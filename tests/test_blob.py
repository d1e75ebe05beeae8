"""BLoB (fit_blob, BLoBGuide): closed-form KL in the loss, A-only guide, the KL schedule,
flipout's per-example statistics, and a short fit on tiny models."""

from __future__ import annotations

import math

import peft
import pyro
import pytest
import torch
from conftest import fake_finetune, mlp_peft, tiny_transformer, token_batch
from pyro import poutine
from safetensors.torch import load_file

from pyro_llm import BayesianLoRA, predict_probs, to_arviz
from pyro_llm.infer.blob import (
    BLoBGuide,
    _Objective,
    fit_blob,
    flipout_forward,
    kl_weights,
)
from pyro_llm.readout import default_labels, default_logits

N, D_IN, CLASSES = 48, 4, 3


def _loader(n=N, batch_size=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)  # order: fit's seed


def _closed_form_kl(guide, prior_scale):
    total = 0.0
    for site in guide.site_names:
        m = guide.loc(site).detach().double()
        s = guide.scales()[site].double()
        total += float((math.log(prior_scale) - s.log() + (s**2 + m**2) / (2 * prior_scale**2) - 0.5).sum())
    return total


@pytest.mark.parametrize("flipout", [True, False])
def test_loss_kl_term_is_the_closed_form(flipout):
    pm = mlp_peft(d_in=D_IN, classes=CLASSES).double()
    fake_finetune(pm)
    lora = BayesianLoRA(pm, prior=0.2, select="A")
    guide = BLoBGuide(lora, init_scale=0.05)
    with torch.no_grad():  # spread the scales and means beyond their start
        for g in guide.gs:
            g.mul_(torch.rand(g.shape, dtype=g.dtype) * 4 + 0.5)
        for m in guide.locs:
            m.add_(0.1 * torch.randn_like(m))
    obj = _Objective(lora, guide, N, default_logits, default_labels, flipout)
    batch = next(iter(_loader(dtype=torch.float64)))
    w = 2.7
    pyro.set_rng_seed(11)
    loss = float(obj.loss(batch, w).detach())
    pyro.set_rng_seed(11)  # the same draws: the guide, then the model (and its flipout signs)
    gtr = poutine.trace(obj.guide).get_trace(batch, w)
    mtr = poutine.trace(poutine.replay(obj.model, trace=gtr)).get_trace(batch, w)
    mtr.compute_log_prob()
    nll = -float(mtr.nodes["blob.y"]["log_prob_sum"].detach())  # includes the N / B scale
    kl = _closed_form_kl(guide, 0.2)
    assert kl > 1.0
    assert (loss - nll) / w == pytest.approx(kl, rel=1e-10)
    assert float(guide.kl().detach()) == pytest.approx(kl, rel=1e-10)
    # and the likelihood is scaled by N / B: the per-example NLL times N
    logits = mtr.nodes["blob.y"]["fn"].logits.detach()
    per_example = -logits.log_softmax(-1).gather(1, batch[1][:, None]).mean()
    assert nll == pytest.approx(N * float(per_example), rel=1e-10)


def test_guide_samples_only_A_and_B_head_are_params():
    pm, _ = tiny_transformer("bert")
    fake_finetune(pm)
    lora = BayesianLoRA(pm, prior=0.2, select="A")
    guide = BLoBGuide(lora)
    gtr = poutine.trace(guide).get_trace()
    samples = [n for n, s in gtr.nodes.items() if s["type"] == "sample"]
    assert samples and all(".lora_A." in n for n in samples)
    assert sorted(samples) == sorted(lora.site_names)
    assert len(samples) == sum(".lora_A." in n for n in lora.lora_names)
    ids, mask = token_batch()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0])}
    obj = _Objective(lora, guide, 10, default_logits, default_labels, flipout=True)
    mtr = poutine.trace(poutine.replay(obj.model, trace=gtr)).get_trace(batch)
    latent = [n for n, s in mtr.nodes.items() if s["type"] == "sample" and not s["is_observed"]
              and n != "blob.data"]  # the plate's subsample site
    params = {n for n, s in mtr.nodes.items() if s["type"] == "param"}
    assert sorted(latent) == sorted(samples)
    b_names = {n for n in lora.lora_names if ".lora_B." in n}
    assert b_names and b_names <= params
    assert any("classifier" in n for n in params)  # the modules_to_save head


def test_kl_schedule_sums_to_one_and_doubles():
    for m in (1, 3, 10, 2000):  # 2000: 2^M overflows a float, the weights must not
        pi = kl_weights(m)
        assert float(pi.sum()) == pytest.approx(1.0, abs=1e-12)
        assert torch.isfinite(pi).all() and (pi >= 0).all()
        if m <= 10:
            expected = torch.tensor([2.0 ** (i - 1) / (2.0**m - 1) for i in range(1, m + 1)],
                                    dtype=torch.float64)
            assert torch.allclose(pi, expected, rtol=1e-14)
        tail = pi[-min(m, 60):]  # the first of 2000 underflow to 0 (2^-2000): no ratio there
        assert torch.allclose(tail[1:] / tail[:-1], torch.full((len(tail) - 1,), 2.0, dtype=torch.float64))
    assert torch.allclose(kl_weights(4, "uniform"), torch.full((4,), 0.25, dtype=torch.float64))
    assert float(kl_weights(5, lambda i, m: i / 15).sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kl_schedule"):
        kl_weights(3, "annealed")
    with pytest.raises(ValueError, match="num_batches"):
        kl_weights(0)
    with pytest.raises(ValueError, match="finite"):
        kl_weights(3, lambda i, m: -1.0)


def test_flipout_per_example_mean_and_variance():
    """One layer ``y = W x + s B A x``: flipout's output over sign draws has mean ``s B M x`` and
    variance ``sum_jk (s B_ij x_k dA_jk)^2`` per output (E[s_j r_k s_j' r_k'] = delta delta)."""
    torch.manual_seed(0)
    net = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(5, 3)),
                              peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"])).double()
    fake_finetune(net)
    a_name = "base_model.model.0.lora_A.default.weight"
    b = net.get_parameter("base_model.model.0.lora_B.default.weight").detach()
    m = net.get_parameter(a_name).detach()
    da = 0.3 * torch.randn(2, 5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    n = 20_000  # copies of one example: each row gets its own signs
    xs = x.expand(n, 5).clone()
    torch.manual_seed(1)
    out = flipout_forward(net, {a_name: m}, {a_name: da}, (xs,))
    mean_out = net(x[None])[0].detach()
    scaling = 2.0
    var = ((scaling * b[:, :, None] * (da * x)[None]) ** 2).sum((1, 2))  # (3,)
    # mean: within 5 standard errors; variance: the sign products are bounded, so the sample
    # variance's relative error is < sqrt(2 / n) * (kurtosis term <= 3) -> 5 % is > 5 SE
    assert torch.all((out.mean(0) - mean_out).abs() < 5 * (var / n).sqrt())
    assert torch.allclose(out.var(0), var, rtol=0.05)
    assert out.std(0).min() > 0  # rows differ: signs are per example, not shared


def _fit(**kw):
    pyro.clear_param_store()
    pm = mlp_peft(d_in=D_IN, classes=CLASSES, hidden=16)
    fake_finetune(pm)
    args = dict(prior_scale=0.2, epochs=6, lr=2e-2, progress=False, seed=3, optimizer="joint")
    args.update(kw)
    return pm, fit_blob(pm, _loader(), **args)


def test_fit_lowers_loss_trains_b_and_is_reproducible(tmp_path):
    pm, res = _fit()
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    losses = torch.tensor(res.losses)
    assert len(losses) == 36 and res.fit.method == "blob"
    assert losses[-6:].mean() < 0.7 * losses[:6].mean()  # one epoch at the end vs the first
    # sigma = G^2 stays positive, and the guide moved
    for s in res.guide.scales().values():
        assert (s > 0).all() and torch.isfinite(s).all()
    # KL weights: M * pi_i, mean 1 over every epoch
    w = torch.tensor(res.kl_weights).reshape(6, 6)
    assert torch.allclose(w.mean(1), torch.ones(6, dtype=w.dtype), atol=1e-12)
    # B are trained point estimates (in the record); the peft model itself is untouched
    for n in res.lora.fixed_names:
        assert not torch.allclose(res.fit.params[res.lora.site_name(n)], before[n])
    assert all(torch.equal(p, before[n]) for n, p in pm.named_parameters())
    # seeded runs are identical
    _, again = _fit()
    assert again.losses == res.losses
    for k, v in res.fit.params.items():
        assert torch.equal(v, again.fit.params[k])
    # the predictive of the result is predict_probs under the posterior
    test = _loader(n=16, seed=5)
    probs = res.predict(test, num_samples=6, progress=False)
    assert probs.shape == (6, 16, CLASSES)
    direct = predict_probs(lambda x, y: res.lora(x).softmax(-1), test, posterior=res.posterior,
                           num_samples=6, progress=False)
    assert torch.allclose(probs, direct, atol=1e-6)
    assert (probs.std(0) > 0).any()  # A is random
    _fit(seed=4)  # another fit on the same peft model replaces B in the param store ...
    assert torch.allclose(res.predict(test, num_samples=6, progress=False), probs, atol=1e-6)  # ... not here
    idata = to_arviz(res.posterior, num_samples=5, lora=res.lora)
    assert any(k.endswith(":delta_norm") for k in idata.posterior.data_vars)


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    _, full = _fit(max_steps=10, flipout=False)
    _fit(max_steps=7, flipout=False, checkpoint=str(tmp_path / "ck"), checkpoint_every=7)
    _, resumed = _fit(max_steps=10, flipout=False, checkpoint=str(tmp_path / "ck"))
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    assert resumed.kl_weights == full.kl_weights[7:]


def test_transformer_head_trained_and_mean_saves(tmp_path):
    pm, _ = tiny_transformer("bert")
    fake_finetune(pm)
    ids, mask = token_batch(n=8, t=6)
    y = torch.tensor([0, 1] * 4)
    data = [{"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4], "labels": y[i:i + 4]}
            for i in (0, 4)]
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    res = fit_blob(pm, data, epochs=2, lr=1e-2, num_data=8, progress=False)
    head = [n for n in res.lora.fixed_names if "classifier" in n]
    assert head
    for n in head + [n for n in res.lora.fixed_names if ".lora_B." in n]:
        assert not torch.allclose(res.fit.params[res.lora.site_name(n)], before[n]), n
    probs = res.predict(data, num_samples=3, progress=False)
    assert probs.shape == (3, 8, 2) and torch.allclose(probs.sum(-1), torch.ones(3, 8))
    written = res.write_to_peft()
    assert set(written) == set(res.lora.random_names) | set(res.lora.fixed_names)
    pm.save_pretrained(tmp_path / "blob_mean")
    saved = load_file(str(tmp_path / "blob_mean" / "adapter_model.safetensors"))
    mean = res.mean()
    for name in (res.lora.random_names[0], res.lora.fixed_names[0]):  # an A mean, a fitted B
        assert torch.equal(saved[name.replace(".default.", ".")], mean[res.lora.site_name(name)])


def test_bad_inputs_raise():
    pm = mlp_peft()
    with pytest.raises(ValueError, match="init_scale"):
        BLoBGuide(BayesianLoRA(pm, select="A"), init_scale=0.0)
    from pyro_llm.priors import HierarchicalNormal

    with pytest.raises(ValueError, match="hyper-sites"):
        BLoBGuide(BayesianLoRA(pm, prior=HierarchicalNormal(), select="A"))
    with pytest.raises(ValueError, match="kl_scale"):
        fit_blob(pm, _loader(), kl_scale=-1.0, progress=False)
    gen = (b for b in list(_loader()))
    with pytest.raises(ValueError, match="len"):
        fit_blob(pm, gen, progress=False)
