"""Adapter priors and the selection predicates."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from conftest import mlp_peft
from pyro import poutine

from pyro_llm import BayesianLoRA, priors

A = "base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.default.weight"
B = "base_model.model.bert.encoder.layer.3.attention.self.query.lora_B.default.weight"
B11 = "base_model.model.bert.encoder.layer.11.attention.self.value.lora_B.default.weight"
HEAD = "base_model.model.classifier.modules_to_save.default.weight"


def test_isotropic_normal_log_prob():
    d = priors.IsotropicNormal(0.3).distribution(B, (4, 2), hyper={})
    assert d.event_shape == (4, 2) and d.batch_shape == ()
    x = torch.randn(4, 2)
    want = torch.distributions.Normal(0.0, 0.3).log_prob(x).sum()
    torch.testing.assert_close(d.log_prob(x), want)


def test_prior_follows_dtype_of_like():
    like = torch.zeros(3, 2, dtype=torch.float64)
    d = priors.IsotropicNormal(0.3).distribution(B, (3, 2), hyper={}, like=like)
    assert d.sample().dtype == torch.float64


def test_per_matrix_normal():
    p = priors.PerMatrixNormal({A: 0.5, B: 0.1}, default=2.0)
    assert p.scale_for(A) == 0.5 and p.scale_for(B) == 0.1 and p.scale_for(B11) == 2.0
    assert float(p.distribution(B, (2, 2), {}).base_dist.scale.unique()) == pytest.approx(0.1)
    p = priors.PerMatrixNormal(lambda n: 0.2 if ".lora_A." in n else 0.4)
    assert p.scale_for(A) == 0.2 and p.scale_for(B) == 0.4
    with pytest.raises(KeyError, match="no scale for"):
        priors.PerMatrixNormal({A: 0.5}).scale_for(B)
    with pytest.raises(ValueError, match=r"prior scale for .* must be a finite number > 0"):
        priors.PerMatrixNormal({A: -0.5})
    with pytest.raises(ValueError, match="prior scale for"):
        priors.PerMatrixNormal(lambda n: 0.0).scale_for(A)
    with pytest.raises(TypeError, match="mapping or a callable"):
        priors.PerMatrixNormal(0.5)


def test_hierarchical_normal_sites_and_validation():
    p = priors.HierarchicalNormal()
    assert p.hyperpriors([A, B]) == {"lora_prior_scale": p.hyperprior}
    p = priors.HierarchicalNormal(per="matrix")
    assert list(p.hyperpriors([A, B])) == [A.removesuffix(".weight") + ".prior_scale",
                                           B.removesuffix(".weight") + ".prior_scale"]
    d = p.distribution(A, (2, 3), {A.removesuffix(".weight") + ".prior_scale": torch.tensor(0.7)})
    assert torch.equal(d.base_dist.scale, torch.full((2, 3), 0.7))
    with pytest.raises(ValueError, match="per must be 'global' or 'matrix'"):
        priors.HierarchicalNormal(per="layer")
    with pytest.raises(ValueError, match="positive support"):
        priors.HierarchicalNormal(dist.Normal(0.0, 1.0))
    with pytest.raises(TypeError, match="must be a Distribution"):
        priors.HierarchicalNormal(0.1)


@pytest.mark.parametrize("scale", [-1, 0, float("nan"), float("inf")])
def test_bad_scale_raises(scale):
    with pytest.raises(ValueError, match="prior scale must be a finite number > 0"):
        priors.IsotropicNormal(scale)
    with pytest.raises(ValueError, match="prior scale must be a finite number > 0"):
        priors.as_prior(scale)


def test_as_prior_conversions():
    p = priors.as_prior(0.25)
    assert isinstance(p, priors.IsotropicNormal) and p.scale == 0.25
    assert priors.as_prior(p) is p
    lap = priors.as_prior(dist.Laplace(0.0, 0.5))
    d = lap.distribution(A, (2, 3), {})
    assert d.event_shape == (2, 3)
    x = torch.randn(2, 3)
    torch.testing.assert_close(d.log_prob(x), dist.Laplace(0.0, 0.5).log_prob(x).sum())
    with pytest.raises(ValueError, match="must be univariate"):
        priors.as_prior(dist.Normal(torch.zeros(3), 1.0))
    with pytest.raises(TypeError, match="prior must be an AdapterPrior"):
        priors.as_prior(True)
    with pytest.raises(TypeError, match="prior must be an AdapterPrior"):
        priors.as_prior("normal")


def test_callable_prior():
    p = priors.as_prior(lambda name, shape: dist.Normal(torch.zeros(shape), 0.1))
    d = p.distribution(A, (2, 3), {})
    assert d.batch_shape == () and d.event_shape == (2, 3)  # batch dims become event dims
    bad_shape = priors.as_prior(lambda name, shape: dist.Normal(torch.zeros(3), 1.0))
    with pytest.raises(ValueError, match=r"has shape \(3,\), expected \(2, 3\)"):
        bad_shape.distribution(A, (2, 3), {})
    not_dist = priors.as_prior(lambda name, shape: torch.zeros(shape))
    with pytest.raises(TypeError, match="expected a pyro Distribution"):
        not_dist.distribution(A, (2, 3), {})


def test_layer_index_and_select():
    assert priors.layer_index(A) == 3 and priors.layer_index(B11) == 11
    assert priors.layer_index("lin.lora_A.default.weight") is None
    assert priors.select("A")(A) and not priors.select("A")(B)
    assert priors.select("b")(B) and not priors.select("B")(A)
    assert priors.select("AB")(A) and priors.select("AB")(B)
    assert not priors.select("AB")(HEAD)  # only LoRA matrices
    assert priors.select(layers=[11])(B11) and not priors.select(layers=[11])(B)
    assert priors.select(layers=[1])(B) is False  # 1 is not 11 nor 3
    assert priors.select("B", pattern=r"\.value\.")(B11) and not priors.select(pattern="value")(B)
    assert priors.select(names=[A])(A) and not priors.select(names=[A])(B)
    for bad in ("C", "", "AC"):
        with pytest.raises(ValueError, match="matrices must be 'A', 'B' or 'AB'"):
            priors.select(bad)


def test_prior_draws_have_the_prior_scale():
    """Draws of a 64 x 32 matrix under Normal(0, 0.1): the sample sd is 0.1 within MC error.

    With n iid normal entries the sample sd has relative sd sqrt(1 / (2 (n - 1))) and the
    sample mean has sd 0.1 / sqrt(n); 4 of those is the tolerance.
    """
    import peft

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64))
    pm = peft.get_peft_model(net, peft.LoraConfig(r=32, target_modules=["0"]))
    lora = BayesianLoRA(pm, prior=0.1)
    tr = poutine.trace(lora).get_trace(torch.zeros(1, 64))
    for name in lora.site_names:
        v = tr.nodes[name]["value"]
        n = v.numel()
        assert n == 2048
        assert abs(float(v.std()) / 0.1 - 1) < 4 * math.sqrt(1 / (2 * (n - 1)))
        assert abs(float(v.mean())) < 4 * 0.1 / math.sqrt(n)
        # and the site's log density is the isotropic normal one
        want = torch.distributions.Normal(0.0, 0.1).log_prob(v).sum()
        torch.testing.assert_close(tr.nodes[name]["fn"].log_prob(v), want)


def test_hierarchical_prior_in_model():
    pm = mlp_peft()
    lora = BayesianLoRA(pm, prior=priors.HierarchicalNormal(dist.LogNormal(math.log(0.2), 0.1)))
    tr = poutine.trace(lora).get_trace(torch.zeros(1, 4))
    tr.compute_log_prob()
    s = tr.nodes["lora_prior_scale"]["value"]
    want = dist.LogNormal(math.log(0.2), 0.1).log_prob(s)
    for n in lora.site_names:
        v = tr.nodes[n]["value"]
        want = want + torch.distributions.Normal(0.0, s).log_prob(v).sum()
    torch.testing.assert_close(tr.log_prob_sum(), want)
