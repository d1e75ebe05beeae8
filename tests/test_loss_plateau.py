"""LossPlateau: SVI runs until its loss stops falling, judged against minibatch noise."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_llm import LossPlateau, fit_svi


def _conjugate(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 1.5 + torch.randn(n, generator=g)

    def model(idx):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", n, subsample=idx):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])

    batches = [(torch.arange(i, i + 16),) for i in range(0, n, 16)]
    post_sd = (1 / (1 / 100 + n)) ** 0.5
    post_mean = x.sum() / (n + 1 / 100)
    return model, batches, float(post_mean), post_sd


def test_svi_stops_when_the_elbo_plateaus_and_lands_on_the_exact_posterior():
    pyro.clear_param_store()
    model, batches, mean, sd = _conjugate()
    res = fit_svi(model, "normal", batches, epochs=400, lr=0.05, progress=False, seed=0,
                  early_stopping=LossPlateau(every=len(batches), patience=3))
    assert res.stopped_early and res.steps < 400 * len(batches)
    post = res.posterior.sample(4000, torch.Generator().manual_seed(1))
    mu = torch.stack([d["mu"] for d in post])
    assert abs(float(mu.mean()) - mean) < 4 * sd  # the conjugate posterior: sd 0.125
    assert 0.5 * sd < float(mu.std()) < 2 * sd


def test_a_falling_loss_does_not_stop_and_noise_is_not_progress():
    rule = LossPlateau(every=4, patience=1, z=2.0, rtol=0.0)
    falling = [10.0, 9.9, 9.8, 9.7, 5.0, 4.9, 4.8, 4.7]
    v1, m1 = rule.value(falling[:4])
    v2, _ = rule.value(falling)
    assert v2 < v1 - m1  # a clear fall is an improvement
    noisy = [10.0, 12.0, 8.0, 10.0, 9.0, 11.0, 7.0, 11.0]  # mean 10 then 9.5: inside the noise
    v1, m1 = rule.value(noisy[:4])
    v2, _ = rule.value(noisy)
    assert v2 > v1 - m1
    assert m1 == pytest.approx(2.0 * torch.tensor(noisy[:4]).std().item() / 2 * 2 ** 0.5)
    with pytest.raises(ValueError, match="every and patience"):
        LossPlateau(every=0)


def test_fit_svi_auto_stopping_compares_epoch_means():
    pyro.clear_param_store()
    model, batches, mean, sd = _conjugate(seed=2)
    res = fit_svi(model, "normal", batches, epochs=400, lr=0.05, progress=False, seed=0,
                  early_stopping="auto")
    assert res.stopped_early and res.steps % len(batches) == 0
    with pytest.raises(ValueError, match="'soon'"):
        fit_svi(model, "normal", batches, epochs=1, progress=False, early_stopping="soon")
    with pytest.raises(ValueError, match="len"):
        fit_svi(model, "normal", iter(batches), epochs=1, progress=False, early_stopping="auto")
