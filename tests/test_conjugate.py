"""Conjugate oracle: SVI over a LoRA B matrix recovers a closed-form Gaussian posterior.

Set-up: a linear base model ``f(x) = x W0^T`` adapted by peft LoRA (rank R) with A frozen
(``requires_grad=False``) and only B random (``select="B"``). Then

    y = x W0^T + s * x A^T B^T + eps,  eps ~ N(0, SIG^2),  vec(B) ~ N(0, TAU^2 I)

is Bayesian linear regression in ``b = vec(B)`` with features ``phi = s * A x``, so

    Lambda = I / TAU^2 + Phi^T Phi / SIG^2,   Sigma = Lambda^{-1},
    mu     = Sigma Phi^T (y - x W0^T) / SIG^2.

The guide family (full-rank MVN) contains the exact posterior, so the ELBO optimum *is*
(mu, Sigma); what remains is SVI jitter around the optimum and Monte Carlo error of draws.
The prior is strong enough (TAU small) that dropping it, or scaling a minibatch likelihood
wrongly, moves the posterior by many times the tolerance (checked in the test).
"""

from __future__ import annotations

import math

import peft
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_llm import BayesianLoRA, GuidePosterior, fit_svi, stack_draws

D, R, N = 6, 2, 200
SIG, TAU, ALPHA = 1.0, 0.05, 4  # scaling s = ALPHA / R = 2
BATCH = 50
# (lr, steps): a fast phase to reach the optimum, then smaller learning rates to shrink
# the SVI jitter (its variance is proportional to lr); each phase is long enough for the
# previous phase's jitter to decay (checked in the test through _svi_sd)
PHASES = ((0.02, 150), (0.004, 300), (0.001, 250), (1.5e-4, 250))
INIT_SCALE = 0.03
NUM_DRAWS = 2000
Z = 4.0  # tolerance = Z standard errors


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, 1, bias=False)

    def forward(self, x):
        return self.lin(x)


A_NAME = "base_model.model.lin.lora_A.default.weight"
B_NAME = "base_model.model.lin.lora_B.default.weight"


def _problem():
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"])
    pm = peft.get_peft_model(Linear(), cfg)
    A = pm.get_parameter(A_NAME)
    with torch.no_grad():
        A.copy_(0.5 * torch.randn(R, D, generator=g))
        W0 = pm.get_parameter("base_model.model.lin.base_layer.weight")
        W0.copy_(torch.randn(1, D, generator=g))
    A.requires_grad_(False)  # A is fixed: neither random nor fitted
    s = pm.base_model.model.lin.scaling["default"]
    assert s == ALPHA / R
    W0 = pm.get_parameter("base_model.model.lin.base_layer.weight").detach().clone()
    x = torch.randn(N, D, generator=g)
    b_true = torch.tensor([0.5, -0.3])
    Phi = s * x @ A.detach().T  # (N, R)
    y = (x @ W0.T).squeeze(-1) + Phi @ b_true + SIG * torch.randn(N, generator=g)
    resid = y - (x @ W0.T).squeeze(-1)
    prec = torch.eye(R, dtype=torch.float64) / TAU**2 + Phi.double().T @ Phi.double() / SIG**2
    cov = torch.linalg.inv(prec)
    mean = cov @ Phi.double().T @ resid.double() / SIG**2
    return pm, x, y, Phi.double(), resid.double(), prec, cov, mean


def _svi_sd(prec, cov, Phi, resid, mean, batch):
    """Predicted SVI error (sd) at the end of PHASES of the guide's parameters.

    Near the optimum Adam's step is ``-lr * m / sqrt(v)`` with ``sqrt(v)`` ~ the gradient
    noise sd ``sg``, so each parameter follows an AR(1)/OU process with restoring rate
    ``kappa = lr * H / sg`` (H = curvature of the loss in that parameter) and per-step
    noise variance ``lr^2``: its stationary variance is ``lr^2 / (2 kappa) = lr sg / (2 H)``,
    and an error left by the previous phase decays like ``exp(-kappa * steps)``.
    The guide is ``b = loc + diag(scale) T eps`` (T unit lower triangular; scale through
    softplus ~ exp at these sizes). At the optimum, with v = b - loc ~ N(0, Sigma):

    * loc_i: H = Lambda_ii; the reparametrised noise ``(Lambda v)_i`` has variance Lambda_ii.
    * u_i = log scale_i: gradient ``(Lambda v)_i v_i``, variance ``1 + Lambda_ii Sigma_ii``
      = H (scale_i is the Cholesky diagonal of Sigma).
    * t = T[1, 0]: gradient ``(Lambda v)_2 scale_2 eps_1``, variance
      ``Lambda_22 scale_2^2 = 1`` = H. In coordinates whitened by the exact posterior,
      t's error is the off-diagonal error and 2 u_i's error is the i-th variance's.

    A minibatch of b of N points (without replacement) adds ``N^2/b (1 - b/N) Var_j(g_j)``
    to the loc's gradient variance (g_j = per-point gradient); the scale parameters' noise
    is inflated by the same factor (an approximation). The first phase starts from the
    initial error (loc at peft's B = 0, scale at INIT_SCALE, T = I), a pessimistic bound:
    far from the optimum Adam moves ~lr per step, faster than the linear decay.
    """
    lam = prec.diagonal()
    noise_var = lam.clone()
    if batch < N:
        g = Phi * ((resid - Phi @ mean) / SIG**2).unsqueeze(-1)  # (N, R) per-point gradients
        noise_var = noise_var + N**2 / batch * (1 - batch / N) * g.var(0)
    inflation = noise_var / lam  # >= 1
    L = torch.linalg.cholesky(cov)
    h_u = 1 + lam * cov.diagonal()
    groups = {  # name: (curvature H, gradient noise variance, initial error)
        "loc": (lam, noise_var, mean.abs()),
        "log_scale": (h_u, h_u * inflation, (L.diagonal() / INIT_SCALE).log().abs()),
        "tril": (torch.ones(1, dtype=lam.dtype), inflation.max().reshape(1),
                 (L[1, 0] / L[1, 1]).abs().reshape(1)),
    }
    out = {}
    for name, (H, var, err0) in groups.items():
        sd = err0
        sg = var.sqrt()
        for lr, steps in PHASES:
            kappa = lr * H / sg
            assert (kappa < 1).all()
            sd = (lr * sg / (2 * H) + (sd * torch.exp(-kappa * steps)) ** 2).sqrt()
        out[name] = sd
    return out


@pytest.mark.parametrize("batch", [N, BATCH], ids=["full_batch", "minibatch"])
def test_svi_recovers_closed_form_posterior(batch):
    pm, x, y, Phi, resid, prec, cov, mean = _problem()
    lora = BayesianLoRA(pm, prior=TAU, select="B")
    assert lora.random_names == [B_NAME]
    assert lora.fixed_names == []  # the frozen A is a constant, not a pyro.param
    A_before = pm.get_parameter(A_NAME).detach().clone()

    def model(x, y, idx):
        out = lora(x).squeeze(-1)
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("y", dist.Normal(out, SIG), obs=y)

    if batch == N:
        data = [(x, y, torch.arange(N))]
    else:
        ds = torch.utils.data.TensorDataset(x, y, torch.arange(N))
        data = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True)
    guide = "mvn"
    for k, (lr, steps) in enumerate(PHASES):
        res = fit_svi(model, guide, data, epochs=10**6, max_steps=steps, lr=lr,
                      init_values=lora, init_scale=INIT_SCALE, progress=False, seed=k)
        guide = res.guide
    assert all(math.isfinite(v) for v in res.losses)
    assert set(res.params) == {"AutoMultivariateNormal.loc", "AutoMultivariateNormal.scale",
                               "AutoMultivariateNormal.scale_tril"}
    assert torch.equal(pm.get_parameter(A_NAME), A_before)

    sd = cov.diagonal().sqrt()
    err = _svi_sd(prec, cov, Phi, resid, mean, batch)
    loc_sd, logscale_sd, tril_sd = err["loc"], err["log_scale"], float(err["tril"])
    loc_tol = Z * loc_sd
    L = torch.linalg.cholesky(cov)

    def whiten(c):  # L^-1 c L^-T: the identity for the exact posterior covariance
        return torch.linalg.solve_triangular(
            L, torch.linalg.solve_triangular(L, c, upper=False).T, upper=False)

    # The test has power: the mean tolerance is a fraction of the posterior sd, the
    # prior-free (OLS) solution lies far outside it, and so does the posterior of a
    # minibatch likelihood left unscaled by N / batch, in mean and in covariance.
    assert (loc_tol < 0.6 * sd).all(), (loc_tol, sd)
    ols = torch.linalg.solve(Phi.T @ Phi, Phi.T @ resid)
    assert ((ols - mean).abs() > 3 * loc_tol).all(), (ols, mean, loc_tol)
    f = BATCH / N
    cov_bad = torch.linalg.inv(torch.eye(R, dtype=cov.dtype) / TAU**2 + f * Phi.T @ Phi / SIG**2)
    mean_bad = cov_bad @ Phi.T @ resid * f / SIG**2
    assert ((mean_bad - mean).abs() > 5 * loc_tol).all(), (mean_bad, mean, loc_tol)
    assert (whiten(cov_bad).diagonal() - 1 > Z * 2 * logscale_sd).all()

    # (a) exact guide moments vs the closed form: SVI error only
    q = guide.get_posterior()
    q_mean = q.mean.detach().double()
    q_cov = q.covariance_matrix.detach().double()
    assert ((q_mean - mean).abs() < loc_tol).all(), (q_mean, mean, loc_tol)
    # covariance in coordinates whitened by the exact posterior: W = L^-1 q_cov L^-T ~ I.
    # W_ii - 1 ~ 2 * (error of log scale_i) to first order, W_10 ~ error of T[1, 0].
    W = whiten(q_cov)
    assert ((W.diagonal() - 1).abs() < Z * 2 * logscale_sd).all(), (W, logscale_sd)
    assert abs(float(W[1, 0])) < Z * tril_sd, (W, tril_sd)

    # (b) draws through GuidePosterior vs the guide's exact moments: Monte Carlo error only.
    # Whitened by the guide's own covariance the draws are iid N(0, I): the sample mean has
    # sd 1/sqrt(S), a sample variance sqrt(2/(S-1)), a sample covariance 1/sqrt(S-1).
    pyro.set_rng_seed(7)
    draws = stack_draws(GuidePosterior(guide).sample(NUM_DRAWS))
    assert set(draws) == {lora.site_names[0]}
    b = draws[lora.site_names[0]].reshape(NUM_DRAWS, R).double()
    Lq = torch.linalg.cholesky(q_cov)
    z = torch.linalg.solve_triangular(Lq, (b - q_mean).T, upper=False).T
    S = NUM_DRAWS
    assert (z.mean(0).abs() < Z / math.sqrt(S)).all(), z.mean(0)
    zc = torch.cov(z.T)
    assert ((zc.diagonal() - 1).abs() < Z * math.sqrt(2 / (S - 1))).all(), zc
    assert abs(float(zc[0, 1])) < Z / math.sqrt(S - 1), zc
    # and therefore the draws' moments match the closed form within both errors combined
    assert ((b.mean(0) - mean).abs() < loc_tol + Z * sd / math.sqrt(S)).all()
