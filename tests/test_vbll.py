"""VBLL heads against closed forms (regression), the reference ``vbll`` package and a second
optimiser (classification), and their KL, draws, checks and files."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_llm.vbll import VBLLClassification, VBLLRegression, load_head, save_head

D, N = 3, 40


def _data(seed=0, n=N, d=D, out=1, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    y = phi @ w.T + noise * torch.randn(n, out, generator=g, dtype=torch.float64)
    return phi, y


def _exact_posterior(phi, y, s, sigma):
    """Bayesian linear regression, prior N(0, s^2 I), known noise sigma: (mean, cov, log p(y))."""
    prec = torch.eye(phi.shape[1], dtype=phi.dtype) / s**2 + phi.T @ phi / sigma**2
    cov = torch.linalg.inv(prec)
    mean = cov @ phi.T @ y / sigma**2
    eye = torch.eye(len(y), dtype=phi.dtype)
    marg = torch.distributions.MultivariateNormal(torch.zeros(len(y), dtype=phi.dtype),
                                                  s**2 * phi @ phi.T + sigma**2 * eye)
    return mean.T, cov, marg.log_prob(y.squeeze(-1))


def _lbfgs(head, loss_fn, steps=200):
    opt = torch.optim.LBFGS([p for p in head.parameters() if p.requires_grad], lr=1, max_iter=steps,
                            tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return head


def test_regression_bound_is_tight_at_exact_posterior():
    """With weight 1/N and the full batch, -N * loss at the exact posterior = log p(y) (no optimiser)."""
    phi, y = _data()
    s, sigma = 0.8, 0.3
    head = VBLLRegression(D, prior_scale=s, noise=sigma, num_data=N).double()
    mean, cov, logml = _exact_posterior(phi, y, s, sigma)
    L = torch.linalg.cholesky(cov)
    with torch.no_grad():
        head.mean.copy_(mean)
        head.cov.log_diag.copy_(L.diagonal().log().unsqueeze(0))
        head.cov.off.copy_(L.unsqueeze(0))
        head.log_noise.fill_(math.log(sigma))  # built in float32: set it again in float64
    torch.testing.assert_close(-N * head.loss(phi, y), logml, rtol=0, atol=1e-9)
    # and anywhere else it is a strict lower bound
    with torch.no_grad():
        head.mean.add_(0.01)
    assert -N * head.loss(phi, y) < logml - 1e-6


@pytest.mark.parametrize("cov", ["dense", "diag"])
def test_regression_optimum_matches_closed_form(cov):
    phi, y = _data(1)
    s, sigma = 1.0, 0.3
    head = VBLLRegression(D, prior_scale=s, noise=sigma, cov=cov, num_data=N).double()
    with torch.no_grad():
        head.log_noise.fill_(math.log(sigma))
    _lbfgs(head, lambda: head.loss(phi, y))
    mean, exact_cov, _ = _exact_posterior(phi, y, s, sigma)
    # L-BFGS to a gradient of ~1e-12 on a smooth strictly convex-in-(mu) bound: 1e-6 is loose
    torch.testing.assert_close(head.mean.detach(), mean, rtol=0, atol=1e-6)
    if cov == "dense":  # the bound is tight, so q = the exact posterior
        torch.testing.assert_close(head.covariance()[0].detach(), exact_cov, rtol=0, atol=1e-6)
        x = torch.randn(5, D, dtype=torch.float64)
        pred = head.predictive(x)
        torch.testing.assert_close(pred.mean, x @ mean.T, rtol=0, atol=1e-6)
        exact_var = (x @ exact_cov * x).sum(-1, keepdim=True) + sigma**2
        torch.testing.assert_close(pred.variance, exact_var, rtol=0, atol=1e-6)
    else:  # mean-field optimum: the diagonal of the posterior precision, inverted
        prec = torch.linalg.inv(exact_cov)
        torch.testing.assert_close(head.covariance()[0].diagonal().detach(), 1 / prec.diagonal(),
                                   rtol=0, atol=1e-6)


def test_lowrank_covariance_algebra():
    head = VBLLRegression(4, 2, cov="lowrank", cov_rank=2, num_data=10).double()
    with torch.no_grad():
        head.cov.factor.normal_()
    S = head.covariance()
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(head.cov.quad(x), torch.einsum("bd,ode,be->bo", x, S, x))
    torch.testing.assert_close(head.cov.logdet(), torch.logdet(S))
    torch.testing.assert_close(head.cov.trace(), S.diagonal(dim1=-2, dim2=-1).sum(-1))


@pytest.mark.parametrize("cov", ["dense", "diag", "lowrank"])
def test_kl_matches_closed_form_and_draws_match_moments(cov):
    head = VBLLClassification(3, 2, prior_scale=0.7, cov=cov, cov_rank=1, num_data=10).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q = torch.distributions.MultivariateNormal(head.mean, head.covariance())
    p = torch.distributions.MultivariateNormal(torch.zeros(2, 3, dtype=torch.float64),
                                               0.49 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(head.kl(), torch.distributions.kl_divergence(q, p).sum())
    w = head.sample_weights(20000, torch.Generator().manual_seed(0)).detach()
    assert w.shape == (20000, 2, 3)
    # Monte Carlo error of a mean: sd / sqrt(S) <~ 0.01 here; 5 sigma
    torch.testing.assert_close(w.mean(0), head.mean.detach(), rtol=0, atol=0.05)
    emp = torch.einsum("soi,soj->oij", w - w.mean(0), w - w.mean(0)) / 20000
    torch.testing.assert_close(emp, head.covariance().detach(), rtol=0, atol=0.06)


def _class_data(seed=0, n=60, d=D, c=3):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = 2 * torch.randn(c, d, generator=g, dtype=torch.float64)
    y = torch.distributions.Categorical(logits=phi @ w.T).sample()
    return phi, y


def test_classification_loss_equals_vbll_package():
    """Same parameters in the reference ``vbll`` DiscClassification (its logit noise switched off):
    the losses differ only by a parameter-free constant."""
    vbll = pytest.importorskip("vbll")
    phi, y = _class_data()
    ref = vbll.DiscClassification(D, 3, regularization_weight=1 / 60, parameterization="dense",
                                  prior_scale=1.0).double()
    head = VBLLClassification(D, 3, prior_scale=math.sqrt(2 / D), num_data=60).double()
    with torch.no_grad():
        ref.noise_logdiag.fill_(-40.0)  # logit noise variance e^-80: nil
    diffs = []
    for _ in range(3):
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(0.5 * torch.randn_like(p))
            ref.W_mean.copy_(head.mean)
            ref.W_logdiag.copy_(head.cov.log_diag)
            ref.W_offdiag.copy_(head.cov.off)
        with torch.no_grad():
            diffs.append(float(head.loss(phi, y) - ref(phi).train_loss_fn(y)))
    assert max(diffs) - min(diffs) < 1e-10, diffs


def test_classification_lbfgs_matches_adam_minibatches():
    """The same bound minimised two ways: L-BFGS on the full batch, Adam on minibatches with a
    decaying step. Adam's minibatch noise at the final step size bounds the agreement."""
    phi, y = _class_data(1)
    a = VBLLClassification(D, 3, cov="dense", num_data=60).double()
    _lbfgs(a, lambda: a.loss(phi, y))
    b = VBLLClassification(D, 3, cov="dense", num_data=60, seed=1).double()
    opt = torch.optim.Adam(b.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t / 50))
    g = torch.Generator().manual_seed(0)
    for _ in range(3000):
        idx = torch.randperm(60, generator=g)[:30]
        opt.zero_grad()
        b.loss(phi[idx], y[idx]).backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(b.mean.detach(), a.mean.detach(), rtol=0, atol=0.05)
    torch.testing.assert_close(b.covariance().detach(), a.covariance().detach(), rtol=0, atol=0.01)
    assert 0 <= float((b.loss(phi, y) - a.loss(phi, y)).detach()) < 5e-4  # L-BFGS found the lower point


def test_classification_predictive():
    head = VBLLClassification(D, 3, num_data=10).double()
    x = torch.randn(7, D, dtype=torch.float64)
    with torch.no_grad():  # no covariance: every predictive is the plug-in softmax
        head.cov.log_diag.fill_(-30.0)
    plug = head.logits_mean(x).softmax(-1)
    torch.testing.assert_close(head.predict_probs(x), plug)
    torch.testing.assert_close(head.predict_probs(x, 8), plug)
    with torch.no_grad():
        head.cov.log_diag.fill_(-0.7)  # logit sd ~ 0.5 |x|
    exact = head.predict_probs(x, 200000, torch.Generator().manual_seed(0))  # MC se <~ 1e-3
    w = head.sample_weights(200000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(head.sample_probs(x, w).mean(0), exact, rtol=0, atol=5e-3)
    mf = head.predict_probs(x)
    torch.testing.assert_close(mf.sum(-1), torch.ones(7, dtype=torch.float64))
    # the mean-field approximation is much closer to the exact integral than the plug-in is,
    # and less confident than the plug-in
    assert (mf - exact).norm() < 0.5 * (plug - exact).norm()
    assert (mf.max(-1).values <= head.logits_mean(x).softmax(-1).max(-1).values + 1e-12).all()


def test_input_errors():
    head = VBLLClassification(4, 3, num_data=10)
    with pytest.raises(ValueError, match=r"\(batch, 4\)"):
        head.loss(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class labels"):
        head.loss(torch.randn(5, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        head.loss(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="num_data"):
        VBLLRegression(4)
    with pytest.raises(ValueError, match="prior_scale"):
        VBLLRegression(4, prior_scale=-1.0, num_data=3)
    with pytest.raises(ValueError, match="cov must be"):
        VBLLRegression(4, cov="full", num_data=3)
    with pytest.raises(ValueError, match=r"y must have shape \(5, 2\)"):
        VBLLRegression(4, 2, num_data=3).loss(torch.randn(5, 4), torch.randn(5))


@pytest.mark.parametrize("cls", ["regression", "classification"])
def test_save_load_round_trip(tmp_path, cls):
    if cls == "regression":
        head = VBLLRegression(4, 2, noise=0.5, learn_noise=True, cov="lowrank", cov_rank=2, num_data=9)
    else:
        head = VBLLClassification(4, 3, cov="diag", prior_scale=0.5, regularization_weight=0.01, seed=3)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    save_head(head, tmp_path / "h")
    back = load_head(tmp_path / "h")
    assert type(back) is type(head) and back.config() == head.config()
    for k, v in head.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    x = torch.randn(3, 4)
    y = torch.randn(3, 2) if cls == "regression" else torch.tensor([0, 2, 1])
    assert torch.equal(back.loss(x, y), head.loss(x, y))
    with pytest.raises(FileNotFoundError, match="not a saved VBLL head"):
        load_head(tmp_path)


# ---------------------------------------------------------------- logit offset, prior_scale="auto"
def test_offset_shifts_the_logit_mean_only_and_carries_its_gradient():
    """``offset + W phi``: every classification quantity is the plain one with ``m + b``."""
    head = VBLLClassification(4, 3, num_data=10).double()
    with torch.no_grad():
        head.cov.log_diag.fill_(-0.5)
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(5, 4, generator=g, dtype=torch.float64)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    m, v = head.logit_moments(phi)
    mb, vb = head.logit_moments(phi, b)
    torch.testing.assert_close(mb, m + b, rtol=0, atol=1e-12)
    assert torch.equal(vb, v)
    torch.testing.assert_close(head.logits_mean(phi, b), m + b, rtol=0, atol=1e-12)
    torch.testing.assert_close(head.predict_probs(phi, offset=b),
                               torch.softmax((m + b) / (1 + math.pi / 8 * v).sqrt(), -1))
    jensen = (m + b).gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(m + b + v / 2, -1)
    torch.testing.assert_close(head.jensen_bound(phi, y, b), jensen)
    w = head.sample_weights(4, g)
    torch.testing.assert_close(head.sample_probs(phi, w, b),
                               torch.softmax(torch.einsum("bd,scd->sbc", phi, w) + b, -1))
    head.loss(phi, y, b).backward()  # the backbone block trains through the offset
    assert b.grad is not None and b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"offset must be a \(5, 3\) tensor"):
        head.loss(phi, y, b[:, :2])


@pytest.mark.parametrize("cov", ["dense", "diag", "lowrank"])
def test_auto_prior_kl_is_the_kl_to_the_type2_ml_scale_which_minimises_it(cov):
    head = VBLLClassification(4, 3, prior_scale="auto", cov=cov, cov_rank=2, num_data=10).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.4 * torch.randn_like(p))
    S = head.covariance().detach()
    s2 = head.prior_variance()
    torch.testing.assert_close(s2, (S.diagonal(dim1=-2, dim2=-1).sum() + head.mean.pow(2).sum()) / 12)
    q = torch.distributions.MultivariateNormal(head.mean, S)

    def kl_to(var):
        p = torch.distributions.MultivariateNormal(torch.zeros(3, 4, dtype=torch.float64),
                                                   var * torch.eye(4, dtype=torch.float64))
        return torch.distributions.kl_divergence(q, p).sum()

    torch.testing.assert_close(head.kl(), kl_to(s2))
    for f in (0.8, 0.95, 1.05, 1.25):  # s^2 is the minimiser of the KL over the prior scale
        assert kl_to(f * s2) > head.kl() + 1e-9, f
    # the same head with that scale fixed: the same KL, and the same gradient in q (dKL/ds = 0)
    fixed = VBLLClassification(4, 3, prior_scale=float(s2.detach().sqrt()), cov=cov, cov_rank=2,
                               num_data=10).double()
    fixed.load_state_dict(head.state_dict())
    head.kl().backward()
    fixed.kl().backward()
    torch.testing.assert_close(head.kl(), fixed.kl())
    for a, b in zip(head.parameters(), fixed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def _fit_auto(phi, y, steps=600):
    head = VBLLClassification(phi.shape[1], 3, prior_scale="auto", num_data=len(y)).double()
    s0 = float(head.prior_variance().detach().sqrt())
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        head.loss(phi, y).backward()
        opt.step()
    return s0, float(head.prior_variance().detach().sqrt())


def test_auto_prior_scale_grows_with_a_signal_and_shrinks_without_one():
    """Type-II ML on a known truth: labels drawn from softmax(W phi) want a prior sd near the
    root mean square of the true W (here 0.99; s starts at 0.62); labels independent of phi
    want none (s -> 0, the head switches off)."""
    g = torch.Generator().manual_seed(0)
    n, d = 400, 5
    phi = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = 2 * torch.randn(3, d, generator=g, dtype=torch.float64)
    signal = torch.distributions.Categorical(logits=phi @ w.T).sample()
    noise = torch.randint(0, 3, (n,), generator=g)
    s0, s_signal = _fit_auto(phi, signal)
    _, s_noise = _fit_auto(phi, noise)
    truth = float(w.pow(2).mean().sqrt())
    assert s0 < s_signal and abs(math.log(s_signal / truth)) < math.log(1.25), (s0, s_signal, truth)
    assert s_noise < 0.5 * s0, (s0, s_noise)


def test_auto_prior_head_saves_and_loads(tmp_path):
    head = VBLLClassification(4, 3, prior_scale="auto", num_data=10)
    with torch.no_grad():
        head.mean.add_(1.0)
    save_head(head, tmp_path / "h")
    back = load_head(tmp_path / "h")
    assert back.prior_scale == "auto" and back.config() == head.config()
    assert torch.equal(back.kl(), head.kl()) and torch.equal(back.prior_variance(), head.prior_variance())
    with pytest.raises(ValueError, match="prior_scale must be > 0 or 'auto'"):
        VBLLClassification(4, 3, prior_scale="big", num_data=10)
