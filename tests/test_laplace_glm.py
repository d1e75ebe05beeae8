"""The linearised (GLM) predictive in C - 1 backward passes: the logit differences' covariance
against the full C x C path, the MC predictive against Gauss-Hermite quadrature, and the cost
(backward passes, weights written) of one ``predict`` call."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_laplace import _bert, _fit, _max_rel, _mlp

from pyro_llm.infer.laplace import mc_softmax
from pyro_llm.infer.laplace.capture import LayerTap, tapped
from pyro_llm.infer.laplace.predictive import (
    _at_map,
    glm_logit_moments,
    logit_contrasts,
    mc_softmax_differences,
)

# Both covariances come from the same float32 activations and backward passes (the difference
# path backpropagates e_c - e_0 in float32 instead of subtracting two float64 Jacobians), then
# float64 block algebra: they agree to a few float32 ulps of the largest entry.
RTOL = 1e-5


def _posterior(model: str, classes: int):
    if model == "bert":
        pm, batch = _bert(n=6)
        la = _fit(pm, [batch], structure="kfac", curvature="ggn", prior_precision=0.5)
        return la, batch
    pm, X, y = _mlp(n=12, classes=classes)
    la = _fit(pm, [(X, y)], structure="kfac", curvature="ggn", prior_precision=0.5)
    return la, (X, y)


def _moments(la, batch, contrasts):
    """``(f, K J Sigma J^T K^T)`` at the MAP for one batch, with ``contrasts`` K."""
    logits_fn = la.logits_fn
    with _at_map(la) as (peft, names), tapped(peft, names) as tap:
        logits = logits_fn(peft, batch)
        return logits.detach().double(), glm_logit_moments(la, tap, logits, names, contrasts)


CASES = [("mlp", 2), ("mlp", 3), ("bert", 2)]


@pytest.mark.parametrize("model,classes", CASES)
def test_difference_covariance_is_k_v_kt_of_the_full_logit_covariance(model, classes):
    la, batch = _posterior(model, classes)
    K = logit_contrasts(classes, "mc")
    assert K.shape == (classes - 1, classes) and torch.equal(K.sum(-1), torch.zeros(classes - 1).double())
    f, V = _moments(la, batch, None)  # C passes: the full C x C covariance
    f2, Vd = _moments(la, batch, K)  # C - 1 passes: the differences directly
    assert torch.equal(f, f2)
    assert V.shape[-1] == classes and Vd.shape[-1] == classes - 1
    assert float(V.diagonal(dim1=-2, dim2=-1).min()) > 1e-3  # a covariance worth comparing
    assert _max_rel(Vd, K @ V @ K.T) < RTOL


def _gauss_hermite_softmax(m: torch.Tensor, S: torch.Tensor, n: int = 60) -> torch.Tensor:
    """``E softmax([0, d])`` for ``d ~ N(m, S)`` (B, K <= 2) by tensor-product Gauss-Hermite
    quadrature on ``d = m + sqrt(2) L x`` (exact to ~1e-10 for these smooth integrands)."""
    x, w = (torch.as_tensor(a, dtype=torch.float64) for a in np.polynomial.hermite.hermgauss(n))
    K = m.shape[-1]
    grid = torch.stack(torch.meshgrid(*[x] * K, indexing="ij"), -1).reshape(-1, K)  # (n^K, K)
    wts = torch.stack(torch.meshgrid(*[w] * K, indexing="ij"), -1).prod(-1).reshape(-1) / math.pi ** (K / 2)
    L = torch.linalg.cholesky(S)
    d = m[:, None, :] + math.sqrt(2) * torch.einsum("bij,nj->bni", L, grid)  # (B, n^K, K)
    p = torch.cat([torch.zeros_like(d[..., :1]), d], -1).softmax(-1)
    return (wts[None, :, None] * p).sum(1)


@pytest.mark.parametrize("model,classes", CASES)
def test_mc_predictive_from_differences_has_the_full_gaussian_predictive_mean(model, classes):
    """``la.predict(link="mc")`` (C - 1 dimensions) and ``mc_softmax`` over the full C x C
    Gaussian (the previous path) both estimate the quadrature value, within 5 Monte Carlo
    standard errors (plus 1e-6 for the quadrature and the covariances' float32 origin)."""
    la, batch = _posterior(model, classes)
    f, V = _moments(la, batch, None)
    K = logit_contrasts(classes, "mc")
    exact = _gauss_hermite_softmax(f @ K.T, K @ V @ K.T)
    S = 4000
    new = la.predict([batch], link="mc", num_samples=S, progress=False, seed=1).double()
    old = mc_softmax(f, V, S, torch.Generator().manual_seed(2))
    assert torch.allclose(exact.sum(-1), torch.ones(len(f), dtype=torch.float64), atol=1e-10)
    for draws in (new, old):
        se = draws.std(0) / math.sqrt(S)
        assert ((draws.mean(0) - exact).abs() <= 5 * se + 1e-6).all()
    # the test can fail: the variance moves the predictive away from the MAP softmax by more than
    # the tolerance, so a sampler that dropped (or misplaced) it would be caught
    assert float((exact - f.softmax(-1)).abs().max()) > 5 * float(new.std(0).max()) / math.sqrt(S)


def test_mc_predict_is_the_difference_sampler_with_the_same_seed():
    la, batch = _posterior("mlp", 3)
    K = logit_contrasts(3, "mc")
    f, Vd = _moments(la, batch, K)
    ours = la.predict([batch], link="mc", num_samples=7, progress=False, seed=5)
    ref = mc_softmax_differences(f @ K.T, Vd, 7, torch.Generator().manual_seed(5)).float()
    assert ours.shape == (7, len(f), 3)
    assert torch.equal(ours, ref)


def _count_backward_passes(monkeypatch) -> list[int]:
    calls = []
    original = LayerTap.output_grads

    def counted(self, logits, v, retain_graph=True):
        calls.append(1)
        return original(self, logits, v, retain_graph=retain_graph)

    monkeypatch.setattr(LayerTap, "output_grads", counted)
    return calls


@pytest.mark.parametrize("link,classes,passes", [("mc", 2, 1), ("mc", 3, 2), ("probit", 3, 3),
                                                 ("bridge", 2, 2)])
def test_backward_passes_per_batch(monkeypatch, link, classes, passes):
    la, (X, y) = _posterior("mlp", classes)
    calls = _count_backward_passes(monkeypatch)
    la.predict([(X[:6], y[:6]), (X[6:], y[6:])], link=link, num_samples=4, progress=False)
    assert len(calls) == 2 * passes


def test_predict_writes_no_weights_when_the_map_is_in_place_and_restores_them_otherwise():
    la, (X, y) = _posterior("mlp", 3)
    peft = la.lora.peft_model
    params = {n: peft.get_parameter(la.lora.peft_name(n)) for n in la.site_names}
    flags = {n: p.requires_grad for n, p in peft.named_parameters()}
    versions = {n: p._version for n, p in params.items()}
    p_map = la.predict([(X, y)], link="probit", progress=False)
    assert {n: p._version for n, p in params.items()} == versions  # not even a copy_ of equal values
    assert {n: p.requires_grad for n, p in peft.named_parameters()} == flags
    # other weights in the model: predict still uses the MAP, and puts the others back
    other = {n: p.detach().clone() + 0.1 for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(other[n])
    p_other = la.predict([(X, y)], link="probit", progress=False)
    assert torch.equal(p_other, p_map)
    for n, p in params.items():
        assert torch.equal(p.detach(), other[n]), n


def test_bad_contrasts_and_missing_names_get_clear_errors():
    la, (X, y) = _posterior("mlp", 3)
    with _at_map(la) as (peft, names), tapped(peft, names) as tap:
        logits = peft(X)
        with pytest.raises(ValueError, match=r"contrasts must be \(K, 3\)"):
            glm_logit_moments(la, tap, logits, names, torch.ones(2, 2))
    peft = la.lora.peft_model
    modes = [m.training for m in peft.modules()]
    with pytest.raises(ValueError, match="has no parameters"):
        with tapped(peft, ["base_model.model.0.lora_A.default.bias"]):  # a LoRA Linear without bias
            pass
    assert [m.training for m in peft.modules()] == modes  # nothing was changed before the error


def test_mc_draws_are_antithetic_and_keep_the_map_decision_for_two_classes():
    from pyro_llm.infer.laplace.predictive import mc_softmax_differences

    g = torch.Generator().manual_seed(0)
    d = torch.tensor([[0.01], [-0.02], [0.3], [-1e-3]])  # MAP margins near the boundary
    var = torch.full((4, 1, 1), 25.0, dtype=torch.float64)  # sd 5: independent draws flip these
    p = mc_softmax_differences(d, var, 100, g)
    assert p.shape == (100, 4, 2)
    logit = p[..., 1].logit()
    assert torch.allclose(logit[:50], 2 * d.T.double() - logit[50:], atol=1e-8)  # pairs m + e, m - e
    assert ((p[..., 1].mean(0) > 0.5) == (d[:, 0] > 0)).all()
    # each draw is still N(m, V): the sd of the drawn margins matches 5 within Monte Carlo error
    var = torch.full((1, 1, 1), 25.0, dtype=torch.float64)
    many = mc_softmax_differences(torch.zeros(1, 1), var, 4000, g)[..., 1].logit()
    assert abs(float(many.std()) - 5.0) < 4 * 5.0 / (2 * 2000) ** 0.5
