"""PoLAR adapters: closed-form Delta W, Stiefel optimisers (retraction exact, landing bounded),
peft round trips, MAP training, and the Laplace path on a PoLAR-trained model."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import mlp_base, mlp_peft, tiny_transformer, token_batch

from pyro_llm import BayesianLoRA
from pyro_llm.infer.laplace import fit_laplace
from pyro_llm.infer.polar_fit import fit_polar
from pyro_llm.polar import (
    PolarAdapter,
    landing_bound,
    landing_field,
    orthogonality_error,
    orthonormal,
    polar_optimizer,
    qr_retraction,
    riemannian_gradient,
)

D_IN, HIDDEN, CLASSES = 6, 16, 3


def _mlp(head: bool = False, seed: int = 0):
    if head:  # LoRA on the first layer, the last layer a trainable head (modules_to_save)
        net = mlp_base(seed, D_IN, HIDDEN, CLASSES)
        return peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                        modules_to_save=["2"]))
    return mlp_peft(seed, d_in=D_IN, hidden=HIDDEN, classes=CLASSES, r=2)


def _data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def _randomise_theta(adapter, seed=2):
    g = torch.Generator().manual_seed(seed)
    for t in adapter.Theta:
        t.copy_(torch.randn(t.shape, generator=g))


def _train(adapter, steps, **kw):
    """Full-batch steps on a real loss; returns (first loss, last loss, max orthogonality error)."""
    opt = polar_optimizer(adapter, **kw)
    X, y = _data()
    losses, worst = [], 0.0
    for _ in range(steps):
        opt.zero_grad()
        loss = _ce(adapter, (X, y))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        worst = max(worst, max(adapter.orthogonality_errors().values()))
    return losses[0], losses[-1], worst, opt


# ---------------------------------------------------------------- primitives
def test_stiefel_primitives_against_their_definitions():
    g = torch.Generator().manual_seed(0)
    x = orthonormal(10, 3, g, torch.float64)
    assert orthogonality_error(x) < 1e-12
    grad = torch.randn(10, 3, generator=g, dtype=torch.float64)
    xi = riemannian_gradient(x, grad)
    tangent = x.mT @ xi  # tangent vectors at X have X^T xi skew-symmetric
    assert torch.allclose(tangent, -tangent.mT, atol=1e-12)
    # on the manifold the landing field is skew(G X^T) X = (G - X G^T X) / 2: tangent, no normal part
    f = landing_field(x, grad, lam=5.0)
    assert torch.allclose(f, 0.5 * (grad - x @ grad.mT @ x), atol=1e-12)
    # off the manifold the normal part is lam X (X^T X - I)
    y = 1.1 * x
    f0, f1 = landing_field(y, grad, 0.0), landing_field(y, grad, 2.0)
    assert torch.allclose(f1 - f0, 2.0 * y @ (y.mT @ y - torch.eye(3, dtype=y.dtype)), atol=1e-12)
    # QR retraction: orthonormal, R with positive diagonal, the identity on orthonormal input
    q = qr_retraction(x + 0.3 * xi)
    assert orthogonality_error(q) < 1e-12
    assert (torch.diagonal(q.mT @ (x + 0.3 * xi)) > 0).all()
    assert torch.allclose(qr_retraction(x), x, atol=1e-12)


def test_landing_bound_is_the_fixed_point_of_the_recursion():
    lr, lam, L = 0.01, 1.0, 3.0
    n = landing_bound(lr, lam, L)
    assert n == pytest.approx((1 - 2 * lr * lam) * n + 2 * lr * lam * n**2 + lr**2 * L**2, rel=1e-9)
    assert n == pytest.approx(lr * L**2 / (2 * lam), rel=0.1)
    assert landing_bound(lr, 100.0, L) == float("inf")  # lr * lam > 1/2: no guarantee


# ---------------------------------------------------------------- the adapter
def test_init_is_orthonormal_seeded_and_leaves_the_model_unchanged():
    pm = _mlp()
    a, b = PolarAdapter(pm, seed=0), PolarAdapter(pm, seed=0)
    assert all(e < 1e-6 for e in a.orthogonality_errors().values())
    assert all(torch.equal(p, q) for p, q in zip(a.stiefel_parameters(), b.stiefel_parameters(), strict=True))
    assert not torch.equal(a.U[0], PolarAdapter(pm, seed=1).U[0])
    assert all(float(d.detach().abs().max()) == 0.0 for d in a.delta_weights().values())
    x, _ = _data(8)
    with pm.disable_adapter():
        base = pm(x)
    assert torch.equal(a(x), base)
    assert a.U[0].shape == (HIDDEN, 2) and a.V[0].shape == (D_IN, 2) and a.Theta[0].shape == (2, 2)


def test_delta_weight_is_closed_form_and_written_peft_forward_matches():
    pm = _mlp()
    ad = PolarAdapter(pm)
    _randomise_theta(ad)
    x, _ = _data(8)
    delta = ad.delta_weights()
    for m, u, v, t in zip(ad.layer_names, ad.U, ad.V, ad.Theta, strict=True):
        assert ad.scaling[m] == 2.0  # lora_alpha / r = 4 / 2
        assert torch.allclose(delta[m], 2.0 * u @ t @ v.T, atol=1e-6)
    # the MLP in closed form with W + Delta W
    w1, w2 = pm.base_model.model[0].base_layer, pm.base_model.model[2].base_layer
    h = torch.relu(x @ (w1.weight + delta["base_model.model.0"]).T + w1.bias)
    expected = h @ (w2.weight + delta["base_model.model.2"]).T + w2.bias
    out = ad(x)
    assert torch.allclose(out, expected, atol=1e-5)
    ad.write_to_peft()
    assert torch.allclose(pm(x), out, atol=1e-6)
    for m in ad.layer_names:
        assert torch.allclose(pm.get_submodule(m).get_delta_weight("default"), delta[m], atol=1e-6)


def test_gpt2_fan_in_fan_out_layers():
    pm, _ = tiny_transformer("gpt2")
    ad = PolarAdapter(pm)
    _randomise_theta(ad)
    ids, mask = token_batch()
    with torch.no_grad():
        out = ad(input_ids=ids, attention_mask=mask).logits
        ad.write_to_peft()
        assert torch.allclose(pm(input_ids=ids, attention_mask=mask).logits, out, atol=1e-5)
        for m, d in ad.delta_weights().items():  # Conv1D stores W transposed
            assert torch.allclose(pm.get_submodule(m).get_delta_weight("default"), d.T, atol=1e-6)


def test_init_from_lora_reproduces_the_update():
    pm = _mlp()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    ad = PolarAdapter(pm, init="lora")
    assert max(ad.orthogonality_errors().values()) < 1e-5
    for m, d in ad.delta_weights().items():
        assert torch.allclose(pm.get_submodule(m).get_delta_weight("default"), d, atol=1e-5)


# ---------------------------------------------------------------- optimisers
@pytest.mark.parametrize("precondition", ["adam", "none"])
def test_retraction_keeps_exact_orthonormality(precondition):
    ad = PolarAdapter(_mlp())
    lr = 0.02 if precondition == "adam" else 0.2
    first, last, worst, _ = _train(ad, 200, lr=lr, method="retraction", precondition=precondition)
    assert worst < 1e-5  # float32 QR: ~1e-6
    assert last < first - 0.2


def test_landing_stays_within_its_bound_which_shrinks_as_lambda_grows():
    # Every landing step is X - lr F with F a landing field, so from X on the manifold
    # ||X^T X - I||_F <= landing_bound(lr, lam, max ||F||) ~ lr max||F||^2 / (2 lam).
    worst = []
    for lam in (0.3, 1.0, 3.0):
        ad = PolarAdapter(_mlp())
        first, last, w, opt = _train(ad, 200, lr=0.01, method="landing", lam=lam)
        field = max(float(opt.state[p]["max_field_norm"]) for p in ad.stiefel_parameters())
        assert last < first - 0.3
        assert 1e-6 < w <= landing_bound(0.01, lam, field) < 0.2
        worst.append(w)
    assert worst[0] > worst[1] > worst[2]


def test_plain_landing_bound():
    ad = PolarAdapter(_mlp())
    first, last, w, opt = _train(ad, 200, lr=0.05, method="landing", lam=2.0, precondition="none")
    field = max(float(opt.state[p]["max_field_norm"]) for p in ad.stiefel_parameters())
    assert last < first
    assert w <= landing_bound(0.05, 2.0, field) < 0.2


def test_optimizer_rejects_bad_settings():
    ad = PolarAdapter(_mlp())
    with pytest.raises(ValueError, match="unknown method"):
        polar_optimizer(ad, method="cayley")
    with pytest.raises(ValueError, match="lam > 0"):
        polar_optimizer(ad, lam=0.0)
    with pytest.raises(ValueError, match="learning rate"):
        polar_optimizer(ad, lr=-1.0)
    with pytest.raises(ValueError, match="precondition"):
        polar_optimizer(ad, precondition="rmsprop")
    with pytest.raises(ValueError, match="unknown init"):
        PolarAdapter(_mlp(), init="zeros")
    net = mlp_base(0, 2, 8, 3)
    with pytest.raises(ValueError, match="rank 4 > min"):
        PolarAdapter(peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["0"])))


# ---------------------------------------------------------------- save / load
def test_save_pretrained_is_a_plain_peft_adapter_and_restores_exactly(tmp_path):
    pm = _mlp(head=True)
    ad = PolarAdapter(pm)
    assert ad.extra_names == ["base_model.model.2.modules_to_save.default.weight",
                              "base_model.model.2.modules_to_save.default.bias"]
    X, y = _data()
    fit_polar(ad, [(X[:32], y[:32]), (X[32:], y[32:])], loss=_ce, epochs=3, lr=0.02, progress=False)
    ad.save_pretrained(tmp_path)
    with torch.no_grad():
        out = ad(X)
    loaded = peft.PeftModel.from_pretrained(mlp_base(0, D_IN, HIDDEN, CLASSES), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(X), out, atol=1e-6)
    fresh = _mlp(head=True)
    back = PolarAdapter.from_pretrained(fresh, tmp_path)
    for p, q in zip(back.parameters(), ad.parameters(), strict=True):
        assert torch.equal(p, q)
    for n in ad.extra_names:
        assert torch.equal(fresh.get_parameter(n), pm.get_parameter(n))
    with torch.no_grad():
        assert torch.equal(back(X), out)
    with pytest.raises(FileNotFoundError, match="polar.json"):
        PolarAdapter.from_pretrained(_mlp(head=True), tmp_path / "missing")


# ---------------------------------------------------------------- training
def _bert_data(n_batches=3, seed=0):
    out = []
    for i in range(n_batches):
        ids, mask = token_batch(n=8, t=6, seed=seed + i)
        labels = (ids[:, 0] % 2).long()  # learnable from the first token
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _eval_loss(ad, data):
    ad.peft_model.eval()
    with torch.no_grad():
        return sum(float(ad(**b).loss) for b in data) / len(data)


def test_fit_polar_lowers_the_hf_loss_and_is_seeded():
    data = _bert_data()
    results, adapters = [], []
    for _ in range(2):
        pm, _ = tiny_transformer("bert")
        ad = PolarAdapter(pm)
        before = _eval_loss(ad, data)
        results.append(fit_polar(ad, data, epochs=15, lr=0.03, progress=False, seed=3))
        adapters.append(ad)
    assert _eval_loss(adapters[0], data) < before - 0.2  # 0.69 -> 0.35 here
    assert results[0].losses == results[1].losses and results[0].steps == 45
    assert all(torch.equal(results[0].params[k], results[1].params[k]) for k in results[0].params)
    assert max(results[0].extra["orthogonality"].values()) < 0.2  # near the manifold (0.07 here)
    # the peft model now holds A = Theta V^T, B = U
    lw = adapters[0].lora_weights()
    assert all(torch.equal(adapters[0].peft_model.get_parameter(n), v) for n, v in lw.items())


def test_fit_polar_resumes_from_a_checkpoint(tmp_path):
    X, y = _data()
    data = [(X[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    kw = dict(loss=_ce, epochs=2, lr=0.02, progress=False)
    full = fit_polar(PolarAdapter(_mlp()), data, **kw)
    fit_polar(PolarAdapter(_mlp()), data, max_steps=3, checkpoint=str(tmp_path), **kw)
    resumed = fit_polar(PolarAdapter(_mlp()), data, checkpoint=str(tmp_path), **kw)
    assert resumed.steps == full.steps == 8
    assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
    for k, v in full.params.items():
        assert torch.allclose(resumed.params[k], v, atol=1e-6), k


def test_fit_polar_rejects_a_nan_loss():
    X, y = _data(8)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        fit_polar(PolarAdapter(_mlp()), [(X, y)], loss=lambda m, b: m(b[0]).sum() * float("nan"),
                  progress=False)


# ---------------------------------------------------------------- posteriors on top
def test_laplace_and_bayesian_lora_on_a_polar_trained_model():
    pm = _mlp()
    ad = PolarAdapter(pm)
    X, y = _data()
    data = [(X[:32], y[:32]), (X[32:], y[32:])]
    fit_polar(ad, data, loss=_ce, epochs=20, lr=0.02, progress=False)
    la = fit_laplace(pm, data, progress=False)  # over A = Theta V^T and B = U
    for n, v in la.mean().items():  # centred on the PoLAR MAP
        assert torch.allclose(v, pm.get_parameter(n))
    draws = la.sample(200, generator=torch.Generator().manual_seed(0))
    for n in la.site_names:
        var = torch.stack([d[n] for d in draws]).var(0)
        assert torch.isfinite(var).all() and (var > 0).all(), n
    probs = la.predict(data, num_samples=20, progress=False)
    assert probs.shape == (20, 64, CLASSES) and torch.isfinite(probs).all()
    lora = BayesianLoRA(pm, prior=0.1)
    assert lora(X[:4]).shape == (4, CLASSES)
