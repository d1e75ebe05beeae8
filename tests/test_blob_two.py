"""BLoB with two optimisers (``fit_blob(optimizer="two")``, the authors' recipe): the NLL's and
the KL's gradients reach their own optimisers only, a KL step of size 0 leaves a pure-NLL AdamW
fit, a resumed fit equals the uninterrupted one, and ``"joint"`` is one AdamW on the ELBO."""

from __future__ import annotations

import pyro
import pytest
import torch
from conftest import fake_finetune, mlp_peft
from safetensors import safe_open

import pyro_llm.infer.blob as blob_mod
from pyro_llm import BayesianLoRA
from pyro_llm.infer.blob import BLoBGuide, _Objective, fit_blob
from pyro_llm.infer.blob_step import TwoOptimizers

N, D_IN, CLASSES = 48, 4, 3


def _loader(n=N, batch_size=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True)


def _fit(**kw):
    pyro.clear_param_store()
    pm = mlp_peft(d_in=D_IN, classes=CLASSES, hidden=16).double()
    fake_finetune(pm)
    args = dict(prior_scale=0.2, epochs=2, lr=2e-2, kl_lr=2e-3, progress=False, seed=3)
    args.update(kw)
    return pm, fit_blob(pm, _loader(), **args)


def _grads(opt):
    return {id(p): p.grad.detach().clone() for g in opt.param_groups for p in g["params"]
            if p.grad is not None}


class _Spy:
    """Records each step's gradients as each optimiser sees them and, by replaying the step's
    draw (the RNG state before ``_Objective.nll``), the NLL's own gradient; at the SGD step the
    KL's own gradient at the values it sees."""

    def __init__(self, monkeypatch):
        self.adam, self.sgd, self.nll_ref, self.kl_ref, self.names = [], [], [], [], {}
        nll, adam_step, sgd_step = _Objective.nll, torch.optim.AdamW.step, torch.optim.SGD.step

        def spy_nll(obj, batch):
            self.obj, self.batch, self.rng = obj, batch, torch.get_rng_state()
            return nll(obj, batch)

        def spy_adam(opt, *a, **k):
            self.adam.append(_grads(opt))
            self._name_all()
            params = list(self.names)  # the tensors by id
            state = torch.get_rng_state()
            torch.set_rng_state(self.rng)
            ref = torch.autograd.grad(nll(self.obj, self.batch), [self.tensors[i] for i in params],
                                      allow_unused=True)
            torch.set_rng_state(state)
            self.nll_ref.append({i: g for i, g in zip(params, ref, strict=True) if g is not None})
            return adam_step(opt, *a, **k)

        def spy_sgd(opt, *a, **k):
            self.sgd.append(_grads(opt))
            guide = self.obj.bguide
            ps = list(guide.named_tensors().values())
            self.kl_ref.append(dict(zip(map(id, ps), torch.autograd.grad(guide.kl(), ps), strict=True)))
            return sgd_step(opt, *a, **k)

        monkeypatch.setattr(_Objective, "nll", spy_nll)
        monkeypatch.setattr(torch.optim.AdamW, "step", spy_adam)
        monkeypatch.setattr(torch.optim.SGD, "step", spy_sgd)

    def _name_all(self):
        named = dict(self.obj.bguide.named_tensors())
        named.update(dict(pyro.get_param_store().named_parameters()))
        self.tensors = {id(p): p for p in named.values()}
        self.names = {id(p): n for n, p in named.items()}


def test_nll_gradient_only_to_adamw_kl_gradient_only_to_sgd(monkeypatch):
    spy = _Spy(monkeypatch)
    _, res = _fit(max_steps=8)  # flipout on: the replayed draw includes the signs
    assert len(spy.adam) == len(spy.sgd) == 8
    adam_names = {spy.names[i] for i in spy.adam[0]}
    sgd_names = {spy.names[i] for i in spy.sgd[0]}
    means = {n for n in spy.names.values() if n.startswith("blob.loc.")}
    spreads = {n for n in spy.names.values() if n.startswith("blob.G.")}
    rest = set(spy.names.values()) - means - spreads  # B and the head
    assert means and spreads and any(".lora_B." in n for n in rest)
    assert adam_names == means | rest  # AdamW: M, B, head; never G
    assert sgd_names == means | spreads  # SGD: M and G; never B or the head
    for k, w in enumerate(res.kl_weights):
        # AdamW sees the NLL's gradient alone (M too: no KL part)
        assert spy.adam[k].keys() == spy.nll_ref[k].keys() - {i for i in spy.nll_ref[k]
                                                               if spy.names[i] in spreads}
        for i, g in spy.adam[k].items():
            assert torch.equal(g, spy.nll_ref[k][i]), spy.names[i]
        # SGD: M moves by w * dKL/dM alone; G by its NLL gradient plus w * dKL/dG
        for i, g in spy.sgd[k].items():
            expected = w * spy.kl_ref[k][i]
            if spy.names[i] in spreads:
                expected = expected + spy.nll_ref[k][i]
            assert torch.allclose(g, expected, rtol=1e-12, atol=0), spy.names[i]
    assert 0 < res.kl_weights[0] < 1 and res.optimizer == "two"


def test_two_optimizers_unit():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    c = torch.nn.Parameter(torch.ones(2))  # in both
    opt = TwoOptimizers({"a": a, "c": c}, {"b": b, "c": c}, lambda: (b**2).sum() + (c**2).sum(),
                        lr=0.1, second_lr=0.5)
    opt.zero_grad()
    (3 * a + 5 * b + 7 * c).sum().backward()
    c_before_sgd = {}
    sgd_step = opt.second.step

    def look():
        c_before_sgd["grad"] = c.grad.clone()
        c_before_sgd["value"] = c.detach().clone()
        sgd_step()

    opt.second.step = look
    opt.step()
    assert torch.allclose(a.detach(), torch.full((2,), 0.9))  # Adam's first step: lr * sign
    assert torch.allclose(b.detach(), 1 - 0.5 * (5 + 2 * torch.ones(2)))  # its leftover + own
    assert torch.allclose(c_before_sgd["grad"], 2 * c_before_sgd["value"])  # the 7 was spent
    assert opt.last_second_loss == pytest.approx(2 + 2 * 0.9**2)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.5] and opt.defaults["second_lr"] == 0.5
    with pytest.raises(ValueError, match="kl_lr"):
        TwoOptimizers({"a": a}, {"b": b}, lambda: b.sum(), lr=0.1, second_lr=-1.0)


def test_kl_lr_zero_is_a_pure_nll_adamw_fit(monkeypatch):
    _, two = _fit(kl_lr=0.0)
    captured = {}

    def adamw_only(params, guide, kl_loss, lr, kl_lr):
        spreads = {f"blob.G.{s}" for s in guide.site_names}
        captured["nll"] = {n: p for n, p in params.items() if n not in spreads}
        return torch.optim.AdamW(list(captured["nll"].values()), lr=lr, weight_decay=0.0)

    monkeypatch.setattr(blob_mod, "_two_optimizers", adamw_only)
    _, ref = _fit(kl_lr=0.0)
    assert len(two.losses) == 12 and two.losses == ref.losses
    for n, v in ref.fit.params.items():
        assert torch.equal(two.fit.params[n], v), n
    pm = mlp_peft(d_in=D_IN, classes=CLASSES, hidden=16).double()
    fake_finetune(pm)
    start = BLoBGuide(BayesianLoRA(pm, prior=0.2, select="A"), init_scale=0.05, seed=3)
    for n, g in two.guide.named_tensors().items():  # G never moves at kl_lr 0; M does (AdamW)
        moved = not torch.equal(g, start.named_tensors()[n])
        assert moved == n.startswith("blob.loc."), n
    monkeypatch.undo()
    _, other = _fit(kl_lr=2e-3)
    assert other.losses[:1] == two.losses[:1] and other.losses != two.losses


def test_two_resumed_equals_uninterrupted(tmp_path):
    ck = str(tmp_path / "ck")
    _, full = _fit(max_steps=10)
    _fit(max_steps=7, checkpoint=ck, checkpoint_every=7)
    with safe_open(f"{ck}/state.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("optim/blob.loc.") and k.endswith("/exp_avg") for k in keys)
    assert any(k.startswith("optim/") and ".lora_B." in k for k in keys)
    _, resumed = _fit(max_steps=10, checkpoint=ck)
    assert resumed.losses == full.losses
    assert resumed.kl_weights == full.kl_weights[7:]
    for n, v in full.fit.params.items():
        assert torch.equal(resumed.fit.params[n], v), n
    for kw in (dict(kl_lr=1e-3), dict(optimizer="joint")):  # another KL step: refused
        with pytest.raises(ValueError, match="different fit"):
            _fit(max_steps=12, checkpoint=ck, **kw)


def test_joint_is_one_adamw_on_the_elbo(monkeypatch):
    steps = []
    sgd_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda *a, **k: steps.append(1) or sgd_step(*a, **k))
    _, joint = _fit(optimizer="joint")
    _, two = _fit()
    assert len(steps) == len(two.losses) == len(joint.losses) == 12  # SGD: "two" only
    w_joint, w_two = (torch.tensor(w, dtype=torch.float64) for w in (joint.kl_weights, two.kl_weights))
    assert torch.allclose(w_joint, 6 * w_two) and torch.allclose(w_two.reshape(2, 6).sum(1),
                                                                 torch.ones(2, dtype=torch.float64))
    assert joint.optimizer == "joint" and min(joint.losses) > 10 * max(two.losses)  # N * NLL + KL


def test_bad_optimizer_raises():
    with pytest.raises(ValueError, match="optimizer"):
        _fit(optimizer="three")
    with pytest.raises(ValueError, match="kl_lr"):
        _fit(kl_lr=-0.1)
