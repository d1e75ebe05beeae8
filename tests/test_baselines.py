"""Temperature scaling and MC dropout, against closed-form answers."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import fake_finetune, mlp_peft

from pyro_llm import metrics
from pyro_llm.infer.baselines import (
    TemperatureScaling,
    collect_logits,
    fit_temperature,
    mc_dropout_predict,
)


def synthetic(n: int, c: int, scale: float, t_true: float, seed: int):
    """Logits z ~ N(0, scale^2) and labels drawn from softmax(z / t_true)."""
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.multinomial((z / t_true).softmax(-1), 1, generator=g).squeeze(-1)
    return z, y


def mle_sd_of_t(z: torch.Tensor, t: float) -> float:
    """Asymptotic sd of the MLE of T: with theta = 1/T the Fisher information is
    sum_n Var_{softmax(theta z_n)}(z_n), and sd(T) = T^2 sd(theta) by the delta method."""
    p = (z / t).softmax(-1)
    var = (p * z**2).sum(-1) - (p * z).sum(-1) ** 2
    return t**2 / float(var.sum()) ** 0.5


# ------------------------------------------------------------------ temperature scaling
def test_recovers_a_known_temperature():
    t_true = 2.5
    z, y = synthetic(20_000, 5, 3.0, t_true, seed=0)
    t = fit_temperature(z.float(), y)
    sd = mle_sd_of_t(z, t_true)
    assert sd < 0.03 * t_true  # N is large enough for the check to be sharp (sd ~ 0.04 here)
    assert abs(t - t_true) < 4 * sd  # 4 sd of the MLE: a false alarm about 1 in 16,000
    # the optimiser found the MLE itself: d NLL / d(1/T) = mean(E_p[z] - z_y) = 0 at T
    p = (z / t).softmax(-1)
    score = ((p * z).sum(-1) - z.gather(1, y[:, None]).squeeze(1)).mean()
    assert abs(float(score)) < 1e-5


def test_temperature_scaling_lowers_held_out_nll_of_an_overconfident_model():
    z, y = synthetic(8_000, 4, 2.0, 1.0, seed=1)  # a calibrated model ...
    over = 5 * z.float()  # ... made 5x overconfident
    ts = TemperatureScaling().fit(over[:4000], y[:4000])
    assert ts.fit(over[:4000], y[:4000]) is ts
    assert abs(ts.temperature - 5.0) < 4 * mle_sd_of_t(over[:4000].double(), 5.0)
    held_out = over[4000:], y[4000:]
    before = metrics.nll(held_out[0].softmax(-1), held_out[1])
    after = metrics.nll(ts.probs(held_out[0]), held_out[1])
    oracle = metrics.nll(z[4000:].float().softmax(-1), held_out[1])
    assert after < 0.8 * before
    assert abs(float(after - oracle)) < 0.01  # as good as the true model, up to T's estimation error
    assert torch.equal(ts.probs(held_out[0]).argmax(-1), held_out[0].argmax(-1))
    assert torch.allclose(ts.probs(over), (over / ts.temperature).softmax(-1))


def test_temperature_errors():
    with pytest.raises(ValueError, match="empty"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        fit_temperature(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        fit_temperature(torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="not fitted"):
        TemperatureScaling().probs(torch.zeros(2, 3))


def test_collect_logits_in_eval_mode_and_restores_modes():
    net = mlp_peft(lora_dropout=0.5)
    fake_finetune(net)
    net.train()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 0, 1])) for _ in range(3)]
    z, y = collect_logits(net, data, progress=False)
    net.eval()
    expected = torch.cat([net(x) for x, _ in data]).detach()
    net.train()
    assert torch.equal(z, expected)  # dropout off: deterministic
    assert y.tolist() == [0, 1, 2, 0, 1] * 3
    assert all(m.training for m in net.modules())
    with pytest.raises(ValueError, match="no labels"):
        collect_logits(net, [torch.randn(2, 4)], progress=False)


# ------------------------------------------------------------------ MC dropout
def lora_linear(p: float):
    """A single Linear layer 4 -> 3 with LoRA whose input goes through (inverted) lora_dropout."""
    torch.manual_seed(0)
    net = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 3)),
                              peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"], lora_dropout=p))
    fake_finetune(net, scale=1.0)
    return net


def plain_dropout_linear(p: float):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Dropout(p), torch.nn.Linear(4, 3))


@pytest.mark.parametrize("build", [lora_linear, plain_dropout_linear])
def test_mc_mean_of_linear_logits_converges_to_eval_logits(build):
    p, S = 0.5, 4000
    net = build(p)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)) * 2
    z = mc_dropout_predict(net, [x], S, progress=False, return_logits=True)  # (S, 6, 3)
    net.eval()
    exact = net(x).detach()
    # inverted dropout: E[mask / (1 - p)] = 1, and the logits are linear in the dropped input
    tol = 5 * z.std(0) / S**0.5 + 1e-6  # 5 MC standard errors per entry
    assert ((z.mean(0) - exact).abs() < tol).all()
    # the check has power: without the 1/(1 - p) rescaling the mean would miss by far more
    if build is plain_dropout_linear:
        b = net[1].bias.detach()
        wrong = (1 - p) * (exact - b) + b
    else:
        with net.disable_adapter():
            base = net(x).detach()
        wrong = base + (1 - p) * (exact - base)
    assert ((wrong - exact).abs() > 3 * tol).float().mean() > 0.5


def test_mc_dropout_samples_differ_are_seeded_and_restore_modes():
    net = mlp_peft(lora_dropout=0.3)
    fake_finetune(net)
    net.train()
    net.base_model.model[0].eval()  # a mixed state, as peft leaves models: it must come back as it was
    modes = [m.training for m in net.modules()]
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, module.training)
        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in net.named_modules()]
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    rng = torch.get_rng_state()
    probs = mc_dropout_predict(net, [(x, torch.zeros(5))], 10, progress=False)
    for h in hooks:
        h.remove()
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert probs.shape == (10, 5, 3)
    assert all((probs[0] - probs[s]).abs().max() > 1e-4 for s in range(1, 10))
    assert torch.equal(probs, mc_dropout_predict(net, [(x, None)], 10, progress=False))
    assert not torch.equal(probs, mc_dropout_predict(net, [(x, None)], 10, progress=False, seed=1))
    assert [m.training for m in net.modules()] == modes
    drops = {n for n, m in net.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert drops and all(seen[n] for n in drops)  # dropout on ...
    assert not any(t for n, t in seen.items() if n not in drops)  # ... everything else in eval mode


def test_mc_dropout_errors():
    with pytest.raises(ValueError, match="no dropout module with p > 0"):
        mc_dropout_predict(mlp_peft(), [torch.randn(2, 4)], 4, progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        mc_dropout_predict(mlp_peft(lora_dropout=0.1), [torch.randn(2, 4)], 0, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        mc_dropout_predict(mlp_peft(lora_dropout=0.1), [], 2, progress=False)
