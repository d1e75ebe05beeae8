"""TrainConfig and Readout: one training configuration and one callback convention for every fit."""

from __future__ import annotations

import pytest
import torch
from conftest import mlp_peft

from pyro_llm import Readout, TrainConfig, fit_blob, fit_laplace, fit_map, mc_dropout_predict

N, D_IN, C, B = 32, 4, 3, 8


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [(x[i:i + B], y[i:i + B]) for i in range(0, N, B)]


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_config_equals_the_same_keywords():
    cfg = TrainConfig(epochs=2, lr=0.05, progress=False, seed=3)
    a = fit_map(mlp_peft(d_in=D_IN, classes=C), _data(), loss=_loss, config=cfg)
    b = fit_map(mlp_peft(d_in=D_IN, classes=C), _data(), loss=_loss, epochs=2, lr=0.05, progress=False,
                seed=3)
    assert a.losses == b.losses and a.steps == 8
    for n in a.params:
        assert torch.equal(a.params[n], b.params[n])


def test_config_conflicts_and_unknown_fields_are_refused():
    pm = mlp_peft(d_in=D_IN, classes=C)
    with pytest.raises(ValueError, match="lr is set both in config= and as a keyword"):
        fit_map(pm, _data(), loss=_loss, config=TrainConfig(lr=0.1), lr=0.2)
    with pytest.raises(ValueError, match="fit_laplace has no setting 'epochs'"):
        fit_laplace(pm, _data(), config=TrainConfig(epochs=2))
    with pytest.raises(TypeError, match="config must be a pyro_llm.TrainConfig"):
        fit_map(pm, _data(), loss=_loss, config={"epochs": 2})
    with pytest.raises(ValueError, match="trains nothing"):
        mc_dropout_predict(pm, _data(), config=TrainConfig(epochs=1))


def test_readout_stands_for_logits_fn_and_labels_fn():
    calls = []

    def logits(model, batch):
        calls.append(1)
        return model(batch[0])

    r = Readout(logits=logits, labels=lambda batch: batch[1])
    pm = mlp_peft(d_in=D_IN, classes=C, lora_dropout=0.2)
    p1 = mc_dropout_predict(pm, _data(), 3, readout=r, progress=False)
    p2 = mc_dropout_predict(pm, _data(), 3, logits_fn=logits, progress=False)
    assert torch.equal(p1, p2) and len(calls) == 2 * 3 * len(_data())
    res = fit_blob(mlp_peft(d_in=D_IN, classes=C), _data(), config=TrainConfig(epochs=1, progress=False),
                   readout=r, kl_schedule="uniform")
    assert res.fit.steps == len(_data()) and res.posterior.readout.logits is logits
    with pytest.raises(ValueError, match="readout= or logits_fn="):
        mc_dropout_predict(pm, _data(), 3, readout=r, logits_fn=logits)


def test_svi_scales_warm_started_from_laplace_are_not_a_point_mass():
    import pyro

    from pyro_llm import BayesianLoRA, fit_svi, likelihoods
    from pyro_llm.metrics import decompose

    pyro.clear_param_store()
    pm = mlp_peft(d_in=D_IN, classes=C)
    data = _data()
    fit_map(pm, data, loss=_loss, epochs=3, lr=0.05, progress=False)
    lora = BayesianLoRA(pm, prior=1.0, select="AB")
    la = fit_laplace(lora, data, structure="diag", progress=False)
    batches = [(x, y, torch.arange(i * B, (i + 1) * B)) for i, (x, y) in enumerate(data)]

    def model(x, y, idx):
        likelihoods.categorical("y", lora(x), y, N, idx)

    def mi(init_scale):
        pyro.clear_param_store()
        fit = fit_svi(model, "normal", batches, max_steps=1, lr=1e-6, init_values=lora,
                      init_scale=init_scale, progress=False)
        scales = {s: fit.posterior.tensors["scale"] for s in fit.posterior.site_names}
        probs = fit.posterior.predict(data, num_samples=64, progress=False)
        return float(decompose(probs)["epistemic"].mean()), fit.posterior, scales

    mi_small, _, _ = mi(1e-3)
    mi_warm, post, _ = mi(la)
    draws = la.sample(256)
    sd_la = torch.cat([torch.stack([d[s] for d in draws]).std(0).reshape(-1) for s in post.site_names])
    ratio = post.tensors["scale"] / sd_la
    assert abs(float(ratio.median()) - 1) < 0.05  # one step of lr 1e-6 leaves the warm start
    print(f"epistemic: init_scale=1e-3 {mi_small:.2e}, Laplace-warm {mi_warm:.2e}")
    assert mi_warm > 20 * mi_small and mi_warm > 1e-4


def test_label_token_readout_names_a_batch_it_cannot_read():
    with pytest.raises(ValueError, match="dict batches with input_ids and attention_mask"):
        Readout.label_tokens([1, 2]).logits(torch.nn.Linear(2, 2), (torch.zeros(1, 2), torch.zeros(1)))
