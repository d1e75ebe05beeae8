"""Every method through the one posterior protocol: ``predict`` (S, N, C), ``sample``, ``mean``,
``save`` -> ``pyro_llm.load`` -> identical predictions, ``as_guide`` (inside ``Predictive`` where
the sites belong to a Pyro model), and ``log_prob`` where a density exists."""

from __future__ import annotations

import pyro
import pytest
import torch
from conftest import fake_finetune, mlp_peft
from pyro import poutine
from pyro.infer import Predictive

import pyro_llm
from pyro_llm import (
    BayesianLoRA,
    MCDropoutPosterior,
    PolarAdapter,
    Posterior,
    TemperaturePosterior,
    fit_blob,
    fit_ensemble,
    fit_laplace,
    fit_map,
    fit_polar_vbll,
    fit_svi,
    likelihoods,
)

N, D_IN, C, B = 32, 4, 3, 8
METHODS = ["svi_normal", "svi_lowrank", "map", "laplace", "ensemble", "blob", "polar_vbll", "mc_dropout",
           "temperature"]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y, [(x[i:i + B], y[i:i + B]) for i in range(0, N, B)]


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _features(adapter, batch):
    return adapter(batch[0])


def _build(method):
    """(posterior, what load needs as model=, extra load kwargs, the BayesianLoRA if any)."""
    pyro.clear_param_store()
    x, y, data = _data()
    pm = mlp_peft(d_in=D_IN, classes=C, lora_dropout=0.2 if method == "mc_dropout" else 0.0)
    fake_finetune(pm)
    if method.startswith("svi"):
        lora = BayesianLoRA(pm, prior=0.5, select="B")

        def model(x, y, idx):
            likelihoods.categorical("y", lora(x), y, N, idx)

        batches = [(xb, yb, torch.arange(i * B, (i + 1) * B)) for i, (xb, yb) in enumerate(data)]
        fit = fit_svi(model, "normal" if method == "svi_normal" else "low_rank", batches, epochs=2,
                      lr=0.02, init_values=lora, init_scale=0.05, progress=False)
        return fit.posterior, lora, {}, lora
    if method in ("map", "temperature"):
        fit = fit_map(pm, data, loss=_loss, epochs=2, lr=0.05, progress=False)
        post = fit.posterior if method == "map" else TemperaturePosterior(fit.posterior, 1.7)
        return post, pm, {}, None
    if method == "laplace":
        fit_map(pm, data, loss=_loss, epochs=2, lr=0.05, progress=False)
        lora = BayesianLoRA(pm, prior=1.0, select="AB")
        la = fit_laplace(lora, data, structure="kfac", progress=False)
        return la, lora, {}, lora
    if method == "ensemble":
        return fit_ensemble(pm, data, 2, loss=_loss, epochs=1, lr=0.05, progress=False), pm, {}, None
    if method == "blob":
        res = fit_blob(pm, data, epochs=2, lr=0.02, kl_schedule="uniform", progress=False)
        return res.posterior, res.lora, {}, res.lora
    if method == "polar_vbll":
        ad = PolarAdapter(mlp_peft(d_in=D_IN, classes=6), seed=0)
        post = fit_polar_vbll(ad, data, _features, C, epochs=2, lr=0.02, progress=False)
        return post, ad, {"features_fn": _features}, None
    if method == "mc_dropout":
        return MCDropoutPosterior(pm), pm, {}, None
    raise AssertionError(method)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_follows_the_protocol(method, tmp_path):
    post, model, load_kw, lora = _build(method)
    assert isinstance(post, Posterior)
    _, _, data = _data()
    probs = post.predict(data, num_samples=4, progress=False)
    S = 1 if post.degenerate else 4
    assert probs.shape == (S, N, C), probs.shape
    torch.testing.assert_close(probs.sum(-1), torch.ones(S, N))
    draws = post.sample(3)
    assert len(draws) == 3 and draws[0].keys() == post.mean().keys()
    assert all(torch.isfinite(v).all() for d in draws for v in d.values())

    post.save(tmp_path / "saved")
    back = pyro_llm.load(tmp_path / "saved", model=model, **load_kw)
    assert type(back).__name__ == type(post).__name__
    again = back.predict(data, num_samples=4, progress=False)
    torch.testing.assert_close(again, probs, rtol=0, atol=1e-6)

    # every method exports to ArviZ the same way (a point posterior, by default, as its one draw)
    idata = pyro_llm.to_arviz(post, num_samples=None if post.degenerate else 8)
    assert idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"] == (1 if post.degenerate else 8)
    assert all(idata.posterior[v].attrs.get("site") for v in idata.posterior.data_vars if ":" not in v)

    guide = post.as_guide()
    tr = poutine.trace(guide).get_trace()
    sites = {n for n, s in tr.nodes.items() if s["type"] == "sample" and not s["infer"].get("is_auxiliary")}
    assert sites == set(draws[0]), (sites, set(draws[0]))
    if lora is not None:  # the sites belong to a Pyro model: Predictive takes the guide
        x, y, _ = _data()

        def model_fn(x):
            logits = lora(x)  # the adapter is drawn once, outside the data plate
            with pyro.plate("data", x.shape[0]):
                return pyro.sample("y", pyro.distributions.Categorical(logits=logits))

        fixed = getattr(post, "fixed", {})
        run = poutine.substitute(model_fn, data=fixed) if fixed else model_fn
        out = Predictive(run, guide=guide, num_samples=2, return_sites=["y"])(x)
        assert out["y"].shape == (2, N)


@pytest.mark.parametrize("method", ["svi_normal", "svi_lowrank", "laplace", "blob"])
def test_log_prob_is_highest_at_the_mean(method):
    post, *_ = _build(method)
    mean, draw = post.mean(), post.sample(1)[0]
    lp_mean, lp_draw = post.log_prob(mean), post.log_prob(draw)
    assert torch.isfinite(lp_mean) and lp_mean > lp_draw


@pytest.mark.parametrize("method", ["map", "ensemble", "mc_dropout"])
def test_log_prob_where_no_density_says_so(method):
    post, *_ = _build(method)
    with pytest.raises(NotImplementedError, match="no density"):
        post.log_prob(post.mean())


def test_predict_without_a_model_says_how_to_attach(tmp_path):
    post, lora, _, _ = _build("svi_normal")
    post.save(tmp_path)
    back = pyro_llm.load(tmp_path)
    assert back.sample(2)[0].keys() == post.sample(1)[0].keys()
    _, _, data = _data()
    with pytest.raises(ValueError, match=r"attach\(lora\)"):
        back.predict(data)
    torch.testing.assert_close(back.attach(lora).predict(data, progress=False),
                               post.predict(data, progress=False), rtol=0, atol=1e-6)
