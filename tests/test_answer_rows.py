"""Last-layer Laplace over a causal LM's answer rows (``fit_answer_laplace``)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import LABEL_TOKENS, tiny_transformer, token_batch

import pyro_llm
from pyro_llm.infer.answer_head import answer_readout
from pyro_llm.infer.laplace.answer_rows import (
    AnswerRowsLaplace,
    _evidence,
    _hessian,
    _newton,
    fit_answer_laplace,
    load_answer_laplace,
)


def _problem(N=60, D=3, C=3, seed=0, W=None):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(N, D, generator=g, dtype=torch.float64)
    offset = torch.randn(N, C, generator=g, dtype=torch.float64)
    W = torch.randn(C, D, generator=g, dtype=torch.float64) if W is None else torch.as_tensor(W).double()
    y = torch.multinomial((offset + phi @ W.T).softmax(-1), 1, generator=g)[:, 0]
    return phi, offset, y


def _objective(W, phi, offset, y, delta):
    return -(offset + phi @ W.T).log_softmax(-1).gather(1, y[:, None]).sum() + 0.5 * delta * W.square().sum()


def test_newton_finds_the_map_and_the_exact_hessian():
    phi, offset, y = _problem()
    delta = 0.7
    W, H, ll = _newton(phi, offset, y, 3, delta, torch.zeros(3, 3, dtype=torch.float64))
    # a second optimiser on the same objective
    V = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([V], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _objective(V, phi, offset, y, delta)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(W, V.detach(), atol=1e-6)
    # the Hessian of the negative log-likelihood by autograd (row-major vec of W)
    nll = lambda w: _objective(w.reshape(3, 3), phi, offset, y, 0.0)  # noqa: E731
    want = torch.autograd.functional.hessian(nll, W.reshape(-1))
    assert torch.allclose(H, want, atol=1e-10)
    assert ll == pytest.approx(-float(_objective(W, phi, offset, y, 0.0)), rel=1e-12)


def test_the_evidence_is_maximised_and_matches_the_laplace_formula_in_one_dimension():
    phi, offset, y = _problem(N=80, D=1, C=2, seed=1, W=[[-1.0], [1.0]])
    la = fit_answer_laplace(None, [(phi, offset, y)], lambda m, b: (b[0], b[1]),
                            labels_fn=lambda b: b[2], progress=False)
    best = la.log_marginal_likelihood()
    assert 1e-3 < la.prior_precision < 1e5  # inside the search range
    for factor in (0.5, 2.0):  # refitted at a different precision, the evidence is lower
        d = la.prior_precision * factor
        W, H, ll = _newton(phi, offset, y, 2, d, torch.zeros(2, 1, dtype=torch.float64))
        assert _evidence(ll, W, H, d) < best
    # the Laplace evidence by hand: log p(y|W) + log N(W; 0, I/d) + P/2 log 2 pi - 1/2 log det(H + d I)
    d, W, P = la.prior_precision, la.map, 2
    prior = -0.5 * d * float(W.square().sum()) + 0.5 * P * math.log(d / (2 * math.pi))
    by_hand = la.log_likelihood + prior + 0.5 * P * math.log(2 * math.pi) \
        - 0.5 * float(torch.logdet(la.H + d * torch.eye(P, dtype=torch.float64)))
    assert best == pytest.approx(by_hand, rel=1e-10)
    # against the exact evidence: the likelihood reads only u = W_1 - W_0 ~ N(0, 2 / d) (the common
    # shift integrates out), a 1-D integral by quadrature; Laplace's error is O(1 / N)
    u = torch.linspace(-6, 6, 20001, dtype=torch.float64) * math.sqrt(2 / d) + float(W[1, 0] - W[0, 0])
    dlogit = (offset[:, 1] - offset[:, 0])[None] + u[:, None] * phi[:, 0][None]
    loglik = torch.where(y[None] == 1, torch.nn.functional.logsigmoid(dlogit),
                         torch.nn.functional.logsigmoid(-dlogit)).sum(1)
    logprior = -u.square() * d / 4 - 0.5 * math.log(4 * math.pi / d)
    exact = float(torch.logsumexp(loglik + logprior, 0) + math.log(float(u[1] - u[0])))
    assert best == pytest.approx(exact, abs=0.02)


def test_without_signal_in_the_features_the_evidence_asks_for_no_correction():
    phi, offset, y = _problem(N=200, D=1, C=2, seed=0, W=[[0.0], [0.0]])
    la = fit_answer_laplace(None, [(phi, offset, y)], lambda m, b: (b[0], b[1]), labels_fn=lambda b: b[2],
                            progress=False)
    assert la.meta["evidence_at_edge"] == "upper" and la.meta["logit_prior_sd"] < 2e-3
    assert float(la.map.abs().max()) < 1e-4  # the model's own answer
    strong = fit_answer_laplace(None, [_problem(N=200, D=1, C=2, seed=0, W=[[-1.0], [1.0]])],
                                lambda m, b: (b[0], b[1]), labels_fn=lambda b: b[2], progress=False)
    assert strong.meta["evidence_at_edge"] is None and strong.meta["logit_prior_sd"] > 0.3


def test_the_logit_moments_are_those_of_the_draws():
    phi, offset, y = _problem(N=40, D=4, C=3, seed=2)
    la = fit_answer_laplace(None, [(phi, offset, y)], lambda m, b: (b[0], b[1]), labels_fn=lambda b: b[2],
                            prior_precision=2.0, progress=False)
    f, var = la.logit_moments(phi[:5], offset[:5])
    S = 40000
    draws = torch.stack([d["answer_rows"] for d in la.sample(S, torch.Generator().manual_seed(3))])
    logits = offset[:5] + torch.einsum("nd,scd->snc", phi[:5], draws)
    sd = var.diagonal(dim1=1, dim2=2).sqrt()
    assert ((logits.mean(0) - f).abs() <= 5 * sd / math.sqrt(S)).all()
    emp = torch.einsum("snc,snk->nck", logits - f, logits - f) / S
    se = ((var.diagonal(dim1=1, dim2=2)[:, :, None] * var.diagonal(dim1=1, dim2=2)[:, None, :]
           + var.square()) / S).sqrt()
    assert ((emp - var).abs() <= 5 * se).all()
    # the density is the Gaussian the draws come from: the MAP is its mode
    assert float(la.log_prob(la.mean())) > float(la.log_prob(la.sample(1)[0]))


def test_a_huge_prior_precision_keeps_the_lms_answer_on_a_tiny_causal_lm(tmp_path):
    pm, _ = tiny_transformer("llama")
    ids, mask = token_batch(16, 7)
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8], "labels": y[i:i + 8]}
               for i in (0, 8)]
    fn = answer_readout(LABEL_TOKENS)
    with torch.no_grad():
        lm = torch.cat([fn(pm, b)[1] for b in batches]).softmax(-1)
    tight = fit_answer_laplace(pm, batches, fn, prior_precision=1e10, progress=False)
    p = tight.predict(batches, num_samples=8, progress=False)
    assert p.shape == (8, 16, 2) and torch.allclose(p.mean(0), lm.float(), atol=1e-4)
    la = fit_answer_laplace(pm, batches, fn, progress=False)
    assert la.map.shape == (2, 32) and la.meta["offset"] and la.prior_precision > 0
    for link, S in (("mc", 50), ("probit", 1)):
        q = la.predict(batches, num_samples=50, link=link, progress=False)
        assert q.shape == (S, 16, 2) and torch.allclose(q.sum(-1), torch.ones(S, 16), atol=1e-5)
    la.save(tmp_path / "rows")
    back = load_answer_laplace(tmp_path / "rows", pm, fn)
    assert back.prior_precision == la.prior_precision and torch.equal(back.map, la.map)
    assert torch.equal(back.predict(batches, progress=False), la.predict(batches, progress=False))
    again = pyro_llm.load(tmp_path / "rows", pm, features_fn=fn)  # the one reader of saved posteriors
    assert isinstance(again, AnswerRowsLaplace) and torch.equal(again.H, la.H)


def test_bad_inputs_get_clear_errors():
    phi, offset, y = _problem(N=10, D=2, C=2)
    fn = lambda m, b: (b[0], b[1])  # noqa: E731
    with pytest.raises(ValueError, match="'marglik' or a number"):
        fit_answer_laplace(None, [(phi, offset, y)], fn, labels_fn=lambda b: b[2], prior_precision="evidence")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_answer_laplace(None, [(phi * float("nan"), offset, y)], fn, labels_fn=lambda b: b[2])
    with pytest.raises(ValueError, match="class indices"):
        fit_answer_laplace(None, [(phi, offset, y - 5)], fn, labels_fn=lambda b: b[2])
    with pytest.raises(ValueError, match="no labels"):
        fit_answer_laplace(None, [(phi, offset, y)], fn, labels_fn=lambda b: None)
    la = fit_answer_laplace(None, [(phi, offset, y)], fn, labels_fn=lambda b: b[2], prior_precision=1.0,
                            progress=False)
    with pytest.raises(ValueError, match="link must be"):
        la.predict([(phi, offset, y)], link="bridge")
    with pytest.raises(ValueError, match="needs the model"):
        AnswerRowsLaplace(la.map, la.H, 1.0, 0.0, 10).predict([(phi, offset, y)])
    with pytest.raises(ValueError, match="Hessian must be"):
        AnswerRowsLaplace(la.map, la.H[:2, :2], 1.0, 0.0, 10)
    assert torch.equal(_hessian(phi, torch.full((10, 2), 0.5, dtype=torch.float64)),
                       _hessian(phi, torch.full((10, 2), 0.5, dtype=torch.float64)))
