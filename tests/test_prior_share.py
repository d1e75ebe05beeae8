"""The Laplace predictive's prior-ruled share: how much of its variance comes from directions
where the data's curvature is below the prior precision (the posterior there is the prior)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_laplace import _split
from test_laplace_prior import _finetuned_llama, _logits

from pyro_llm.infer.laplace import fit_laplace, gridsearch_prior_precision
from pyro_llm.infer.laplace.blocks import DiagBlock, FullBlock, KronBlock


def _brute(H: torch.Tensor, dv: torch.Tensor, Jf: torch.Tensor):
    """``J Sigma J^T`` and its part from the directions with generalised eigenvalue
    ``H v = mu D v``, ``mu < 1``, by dense linear algebra."""
    r = dv.rsqrt()
    mu, U = torch.linalg.eigh(r[:, None] * H * r[None, :])
    V = r[:, None] * U  # columns: D-orthonormal generalised eigenvectors
    cov = V @ torch.diag(1 / (mu + 1)) @ V.T
    low = V @ torch.diag((mu < 1) / (mu + 1)) @ V.T
    assert torch.allclose(cov, torch.linalg.inv(H + torch.diag(dv)), atol=1e-10)
    return Jf @ cov @ Jf.transpose(1, 2), Jf @ low @ Jf.transpose(1, 2)


def _spd(n, g, scale=1.0):
    X = torch.randn(n, n, generator=g, dtype=torch.float64)
    return scale * X @ X.T / n


@pytest.mark.parametrize("lowrank", [False, True])
def test_the_kronecker_split_equals_dense_algebra(lowrank):
    g = torch.Generator().manual_seed(0)
    G, A = _spd(3, g), _spd(4, g)
    lG, QG = torch.linalg.eigh(G)
    lA, QA = torch.linalg.eigh(A)
    if lowrank:  # keep the top 2 x 3 eigenpairs: the rest of the block has the prior's precision
        lG, QG, lA, QA = lG[1:], QG[:, 1:], lA[1:], QA[:, 1:]
    block = KronBlock(0, (3, 4), QG, lG, QA, lA)
    d = torch.tensor([0.3], dtype=torch.float64)  # between the products' eigenvalues
    E = torch.outer(lG, lA)
    assert (E < d).any() and (E > d).any()
    J = [torch.randn(5, 2, 3, 4, generator=g, dtype=torch.float64)]
    total, prior = block.variance(J, d, split=True)
    want_total, want_prior = _brute(block.dense(), d.expand(12), J[0].flatten(2))
    assert torch.allclose(total, want_total, rtol=1e-10)
    assert torch.allclose(prior, want_prior, rtol=1e-10, atol=1e-12)
    assert torch.equal(block.variance(J, d), total)


def test_the_diagonal_split_equals_dense_algebra():
    g = torch.Generator().manual_seed(1)
    h = torch.rand(2, 3, generator=g, dtype=torch.float64) * 2
    block = DiagBlock(0, (2, 3), h)
    d = torch.tensor([1.0], dtype=torch.float64)
    J = [torch.randn(4, 2, 2, 3, generator=g, dtype=torch.float64)]
    total, prior = block.variance(J, d, split=True)
    want_total, want_prior = _brute(torch.diag(h.reshape(-1)), d.expand(6), J[0].flatten(2))
    assert torch.allclose(total, want_total, rtol=1e-10)
    assert torch.allclose(prior, want_prior, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("deltas", [[0.8, 0.8], [0.2, 3.0]])
def test_the_full_block_split_equals_dense_algebra_with_one_or_two_precisions(deltas):
    g = torch.Generator().manual_seed(2)
    H = _spd(7, g)
    block = FullBlock([0, 1], [(2, 2), (3,)], H)
    d = torch.tensor(deltas, dtype=torch.float64)
    dv = torch.cat([d[0].expand(4), d[1].expand(3)])
    J = [torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64),
         torch.randn(4, 3, 3, generator=g, dtype=torch.float64)]
    total, prior = block.variance(J, d, split=True)
    want_total, want_prior = _brute(H, dv, torch.cat([J[0].flatten(2), J[1]], -1))
    assert torch.allclose(total, want_total, rtol=1e-10)
    assert torch.allclose(prior, want_prior, rtol=1e-10, atol=1e-12)
    assert 0 < float(prior.diagonal(dim1=1, dim2=2).sum()) < float(total.diagonal(dim1=1, dim2=2).sum())


def _share(la, batch, link="mc"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        la.predict([batch], num_samples=4, link=link, logits_fn=_logits, progress=False)
    warned = [w for w in caught if "of the Laplace predictive's variance" in str(w.message)]
    return la.meta["prior_variance_share"], bool(warned)


def test_the_share_is_recorded_and_a_wide_prior_ruled_predictive_warns():
    pm, batch = _finetuned_llama()
    kw = dict(logits_fn=_logits, progress=False, prior_groups="one")
    la = fit_laplace(pm, _split(batch, 4), structure="lowrank_kfac", **kw)
    share, _ = _share(la, batch)
    assert 0 <= share <= 1 and la.meta["spread_over_margin"] > 0
    # a tiny precision: the directions the low-rank curvature leaves out get variance 1 / delta,
    # so the prior rules a spread far beyond the margin, and the predictive says so
    la.prior_precision = 1e-6
    share, warned = _share(la, batch)
    assert share > 0.99 and la.meta["spread_over_margin"] > 100 and warned
    for link in ("probit", "bridge"):  # the per-logit links read the centred covariance
        share, warned = _share(la, batch, link)
        assert share > 0.99 and warned
    # a huge precision: prior-ruled too, but narrow; nothing to warn about
    la.prior_precision = 1e8
    share, warned = _share(la, batch)
    assert share > 0.999 and la.meta["spread_over_margin"] < 0.01 and not warned
    # a full-rank curvature above a tiny precision everywhere: the data rule
    full = fit_laplace(pm, _split(batch, 4), structure="kfac", **kw)
    full.prior_precision = 1e-10
    share, _ = _share(full, batch)
    assert share < 0.05
    # a grid search visits wide precisions on purpose: no warning, and no stale diagnostics
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".* of the Laplace predictive's variance")
        gridsearch_prior_precision(la, [batch], grid=[1e-6, 1e8], logits_fn=_logits)
    assert "prior_variance_share" not in la.meta and "spread_over_margin" not in la.meta
