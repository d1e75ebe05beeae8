"""The downstream term of fold-wise fine-tuning (``pyro_llm.regression.downstream``)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from pyro_llm.regression import build_design
from pyro_llm.regression.downstream import downstream_term, mixture_nll


def frame(seed=0, N=200, n=60):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=N)
    z = (rng.random(N) < 0.5).astype(int)
    y = 1 + z + 0.5 * q + rng.normal(size=N)
    lab = np.zeros(N, bool)
    lab[:n] = True
    return pd.DataFrame({"y": y, "q": q, "z": np.where(lab, z, np.nan)})


def test_mixture_nll_is_the_regression_likelihood_with_z_summed_out():
    design = build_design(frame(), "y ~ z + q", label="z")
    logits = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    beta = torch.tensor([0.9, 1.1, 0.4], dtype=torch.float64)
    log_sigma = torch.tensor(math.log(1.3), dtype=torch.float64)
    X = torch.as_tensor(design.X_by_class)
    y = torch.as_tensor(design.y)
    ours = float(mixture_nll(logits, X, y, beta, log_sigma.double()))
    p = torch.softmax(logits, -1).numpy()
    dens = sum(p[:, k] * stats.norm.pdf(design.y, design.X_by_class[k] @ beta.numpy(), 1.3) for k in range(2))
    assert ours == pytest.approx(-np.log(dens).mean(), rel=1e-10)
    yb = (design.y > 1.5).astype(float)
    mu = [1 / (1 + np.exp(-design.X_by_class[k] @ beta.numpy())) for k in range(2)]
    dens_b = sum(p[:, k] * np.where(yb == 1, mu[k], 1 - mu[k]) for k in range(2))
    ours_b = float(mixture_nll(logits, X, torch.as_tensor(yb), beta, family="binomial"))
    assert ours_b == pytest.approx(-np.log(dens_b).mean(), rel=1e-10)


def test_the_term_starts_at_the_labelled_fit_and_trains_its_parameters():
    design = build_design(frame(), "y ~ z + q", label="z")
    term = downstream_term(design)
    X, y = design.gold()
    np.testing.assert_allclose(term.beta.detach().numpy(), np.linalg.lstsq(X, y, rcond=None)[0], rtol=1e-5)
    rows = torch.arange(60, 200)
    logits = torch.zeros(140, 2, requires_grad=True)
    term.loss(logits, rows).backward()
    assert logits.grad.abs().sum() > 0 and term.beta.grad is not None and term.log_sigma.grad is not None


def test_the_outcome_role_and_bad_weights_are_refused():
    df = frame()
    with pytest.raises(ValueError, match="role='covariate'"):
        downstream_term(build_design(df, "z ~ q", label="z", role="outcome"))
    with pytest.raises(ValueError, match="positive number"):
        downstream_term(build_design(df, "y ~ z + q", label="z"), weight=-1.0)
