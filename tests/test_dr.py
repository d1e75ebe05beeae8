"""The cut, cross-fitted doubly robust estimator (``regress(method="dr")``, the default).

Simulations are seeded; tolerances come from Monte Carlo standard errors (bias within a few
MC s.e.; standard deviations within the MC error of an estimated sd, ~1/sqrt(2R))."""

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pyro_llm.regression import build_design, efficiency_bound, fit_dr, regress
from pyro_llm.regression.calibration import Completion, crossfit_completion, features, fit_multinomial
from pyro_llm.regression.dr import combine_splits, dr_solve


def expit(x):
    return 1 / (1 + np.exp(-x))


def b1_like(seed, N=2000, n=300, a=2.0, leak=0.5, pi=None):
    """B1 of the coverage benchmark: z binary from Q, Y = 1 + z + 0.5Q + ε, score s leaking ε."""
    rng = np.random.default_rng(seed)
    q, eps = rng.normal(size=N), rng.normal(size=N)
    z = (rng.random(N) < expit(-0.5 + 0.8 * q)).astype(int)
    y = 1 + z + 0.5 * q + eps
    s = a * (2 * z - 1) + 0.6 * q + leak * eps + rng.normal(size=N)
    if pi is None:
        lab = np.zeros(N, bool)
        lab[rng.choice(N, n, replace=False)] = True
    else:
        lab = rng.random(N) < pi(q)
    df = pd.DataFrame({"y": y, "q": q, "z": np.where(lab, z, np.nan)})
    return df, s, z


def oracle_probs(df, s, a=2.0, leak=0.5):
    """The true p(z | s, Q, Y) of :func:`b1_like`, by Bayes' rule."""
    q, y = df["q"].to_numpy(), df["y"].to_numpy()
    lp = []
    for k in (0, 1):
        e = y - 1 - k - 0.5 * q
        prior = expit(-0.5 + 0.8 * q) if k else 1 - expit(-0.5 + 0.8 * q)
        lp.append(np.log(prior) + stats.norm.logpdf(e)
                  + stats.norm.logpdf(s - a * (2 * k - 1) - 0.6 * q - leak * e))
    lp = np.array(lp).T
    return np.exp(lp - np.logaddexp.reduce(lp, 1, keepdims=True))


def test_doubly_robust_stays_unbiased_with_a_wrong_completion_model_where_the_plug_in_does_not():
    """Scores shuffled across rows make the completion model wrong (it ignores the LLM and W's link
    to z through the score); the correction term keeps the estimate unbiased; the plug-in (the same
    completion model, no correction) is biased."""
    R, dr_est, plug = 150, [], []
    for r in range(R):
        df, s, _ = b1_like(r, N=1500, n=300)
        design = build_design(df, "y ~ z + q", label="z")
        wrong = np.random.default_rng(10_000 + r).permutation(s)
        W = design.F[:, 1:-1]
        F = features(wrong[:, None], None, None, W[:, :0], None, design.labelled)   # no W, wrong score
        comp = crossfit_completion(F, design.z_filled, design.labelled, num_classes=2, splits=1, seed=r)
        pi = np.full(len(df), design.labelled.mean())
        dr_est.append(dr_solve(design, comp, pi).coef[1])
        none = dataclasses.replace(design, labelled=np.zeros(len(df), bool))
        plug.append(dr_solve(none, comp, np.ones(len(df))).coef[1])
    dr_est, plug = np.array(dr_est), np.array(plug)
    mcse = dr_est.std(ddof=1) / np.sqrt(R)
    assert abs(dr_est.mean() - 1.0) < 3 * mcse, (dr_est.mean(), mcse)
    assert abs(plug.mean() - 1.0) > 10 * plug.std(ddof=1) / np.sqrt(R), plug.mean()


def test_impute_then_fit_equals_doubly_robust_when_the_completion_model_has_the_scores_terms():
    """With the completion model fitted by maximum likelihood on the labelled rows and features
    spanning ψ(1) − ψ(0) (here 1, q, y), its score equations make the correction term vanish: the
    doubly robust estimate equals the regression on the completed data, to rounding."""
    df, s, _ = b1_like(3, N=1200, n=300)
    design = build_design(df, "y ~ z + q", label="z")
    W, y = design.F[:, 1:-1], design.F[:, -1]
    F = np.column_stack([np.ones(len(df)), W, y, s])
    comp = crossfit_completion(F, design.z_filled, design.labelled, num_classes=2, prior_sd=np.inf,
                               crossfit=False)
    pi = np.full(len(df), design.labelled.mean())
    dr = dr_solve(design, comp, pi).coef
    impute = dr_solve(design, comp, np.ones(len(df))).coef      # gold where labelled, E over z elsewhere
    np.testing.assert_allclose(dr, impute, rtol=1e-10, atol=1e-12)
    # and with a cross-fitted completion model they differ: the correction term is not zero
    cf = crossfit_completion(F, design.z_filled, design.labelled, num_classes=2, splits=1)
    assert np.abs(dr_solve(design, cf, pi).coef - dr_solve(design, cf, np.ones(len(df))).coef).max() > 1e-6


@pytest.mark.parametrize("family", ["gaussian", "binomial"])
def test_sandwich_and_bayesian_bootstrap_agree(family):
    rng = np.random.default_rng(5)
    df, s, z = b1_like(5, N=4000, n=500)
    if family == "binomial":
        df["y"] = (rng.random(len(df)) < expit(-0.5 + z + 0.5 * df["q"])).astype(int)
    design = build_design(df, "y ~ z + q", label="z")
    fit, draws, _ = fit_dr(design, scores=s[:, None], labels=None, family=family, num_draws=2000, seed=1)
    sd_boot, se = draws.std(0, ddof=1), np.sqrt(np.diag(fit.cov))
    # the bootstrap sd of 2000 draws has relative MC error ~1.6%; the two differ by O(1/n) terms
    np.testing.assert_allclose(sd_boot, se, rtol=0.12)
    np.testing.assert_allclose(draws.mean(0), fit.coef, atol=4 * se.max() / np.sqrt(2000) + 0.2 * se.max())


def test_an_oracle_completion_model_reaches_the_efficiency_bound():
    """With the true p(z | s, Q, Y), the doubly robust estimate's spread over replications equals the
    efficiency bound within 5% plus Monte Carlo error; its sandwich estimates the bound too."""
    R, est, se, bound = 300, [], [], []
    for r in range(R):
        df, s, z = b1_like(100 + r, N=3000, n=300)
        design = build_design(df, "y ~ z + q", label="z")
        probs = oracle_probs(df, s)
        comp = Completion(np.broadcast_to(np.arange(2), probs.shape).copy(), probs, {})
        fit = dr_solve(design, comp, np.full(len(df), design.labelled.mean()))
        est.append(fit.coef[1])
        se.append(np.sqrt(fit.cov[1, 1]))
        if r < 20:
            bound.append(efficiency_bound(df, "y ~ z + q", label="z", truth=z, probs=probs)["z"])
    est = np.array(est)
    b = np.mean(bound)
    sd, rel_mc = est.std(ddof=1), 1 / np.sqrt(2 * (R - 1))
    assert abs(sd / b - 1) < 0.05 + 3 * rel_mc, (sd, b)
    assert abs(np.mean(se) / b - 1) < 0.05, (np.mean(se), b)
    assert abs(est.mean() - 1) < 3 * sd / np.sqrt(R)


def test_known_unequal_labelling_probabilities_are_weighted_in():
    """Rows with large Q are labelled more often. The target ``y ~ z`` omits Q, so the labelled rows
    alone give a biased slope; with π known, dr is unbiased for the corpus's slope."""
    def pi(q):
        return 0.05 + 0.25 * expit(2 * q)

    R, mean_dr, mean_naive = 120, [], []
    for r in range(R):
        df, s, _ = b1_like(500 + r, N=2000, pi=pi)
        df["pi"] = pi(df["q"])
        res = regress(df, "y ~ z", label="z", predictions=s, prob="pi", num_draws=0, progress=False)
        mean_dr.append(res["z"]["mean"])
        mean_naive.append(regress(df, "y ~ z", label="z", predictions=s, method="labelled_only")["z"]["mean"])
    df_big, _, z_big = b1_like(1, N=400_000, n=10)
    truth = np.polyfit(z_big, df_big["y"], 1)[0]                                  # the population slope
    mean_dr, mean_naive = np.array(mean_dr), np.array(mean_naive)
    mcse = mean_dr.std(ddof=1) / np.sqrt(R)
    assert abs(mean_dr.mean() - truth) < 3 * mcse + 0.002, (mean_dr.mean(), truth, mcse)
    assert abs(mean_naive.mean() - truth) > 5 * mean_naive.std(ddof=1) / np.sqrt(R)


def test_clustered_standard_errors_match_statsmodels_on_the_labelled_only_fit():
    """Without the completion term and with equal π, the equation is OLS on the labelled rows; its
    cluster-robust covariance equals statsmodels' up to its (N−1)/(N−p) small-sample factor."""
    sm = pytest.importorskip("statsmodels.api")
    df, s, z = b1_like(8, N=3000, n=600)
    g = np.random.default_rng(0).integers(0, 60, len(df))
    design = build_design(df, "y ~ z + q", label="z")
    comp = Completion(np.zeros((len(df), 1), int), np.ones((len(df), 1)), {})
    fit = dr_solve(design, comp, np.ones(len(df)), cluster=g, use_completion=False)
    X, y = design.gold()
    ref = sm.OLS(y, X).fit(cov_type="cluster", cov_kwds={"groups": g[design.labelled]})
    n, p = X.shape
    np.testing.assert_allclose(fit.coef, ref.params, rtol=1e-10)
    np.testing.assert_allclose(fit.cov * (n - 1) / (n - p), ref.cov_params(), rtol=1e-8)


def test_clusters_widen_the_interval_when_rows_share_a_random_effect():
    rng = np.random.default_rng(2)
    N, G = 4000, 80
    g = rng.integers(0, G, N)
    u = rng.normal(size=G)[g]
    q = rng.normal(size=N) + u
    z = (rng.random(N) < expit(q)).astype(int)
    y = 1 + z + 0.5 * q + 1.5 * u + rng.normal(size=N)
    s = 2 * (2 * z - 1) + rng.normal(size=N)
    lab = rng.random(N) < 0.15
    df = pd.DataFrame({"y": y, "q": q, "g": g, "z": np.where(lab, z, np.nan)})
    plain = regress(df, "y ~ z + q", label="z", predictions=s, num_draws=0)
    clustered = regress(df, "y ~ z + q", label="z", predictions=s, cluster="g", num_draws=0)
    assert np.all(np.abs(plain.coef - clustered.coef) < 0.5 * plain.sd)   # folds now hold whole clusters
    assert clustered["Intercept"]["sd"] > 1.5 * plain["Intercept"]["sd"]
    boot = regress(df, "y ~ z + q", label="z", predictions=s, cluster="g", interval="bootstrap",
                   num_draws=1000)
    assert boot.draws.shape == (1000, 3)
    np.testing.assert_allclose(boot.draws.std(0), clustered.sd, rtol=0.25)
    with pytest.warns(UserWarning, match="only 5 clusters"):
        regress(df.assign(g=g % 5), "y ~ z + q", label="z", predictions=s, cluster="g", num_draws=0)


@pytest.mark.parametrize("case", ["interaction", "logistic", "three_class", "outcome", "continuous"])
def test_dr_recovers_the_coefficients_of_every_kind_of_target(case):
    """One large data set per case: the estimate is within 4 standard errors of the truth and
    narrower than the labelled-only fit."""
    rng = np.random.default_rng(11)
    N, n = 20_000, 1000
    q = rng.normal(size=N)
    lab = np.zeros(N, bool)
    lab[rng.choice(N, n, replace=False)] = True
    family, role = "gaussian", "covariate"
    if case == "three_class":
        logits = np.column_stack([np.zeros(N), 0.8 * q, -0.5 * q])
        z = (np.exp(logits).cumsum(1) / np.exp(logits).sum(1, keepdims=True) < rng.random(N)[:, None]).sum(1)
        y = 1 + np.array([0.0, 1.0, -0.5])[z] + 0.5 * q + rng.normal(size=N)
        preds = 2.5 * np.eye(3)[z] + 0.5 * q[:, None] * np.array([0, 1, 0]) + rng.normal(size=(N, 3))
        formula, coef, truth = "y ~ C(z) + q", "C(z)[T.1.0]", 1.0
    elif case == "continuous":
        z = 0.5 * q + rng.normal(size=N)
        y = 1 + 0.8 * z + 0.5 * q + rng.normal(size=N)
        preds = z + 0.3 * q + 0.6 * rng.normal(size=N)
        formula, coef, truth = "y ~ z + q", "z", 0.8
    else:
        z = (rng.random(N) < expit(-0.3 + 0.8 * q)).astype(int)
        eps = rng.normal(size=N)
        preds = 2 * (2 * z - 1) + 0.6 * q + 0.4 * eps + rng.normal(size=N)
        formula, coef, truth = "y ~ z + q", "z", 1.0
        if case == "interaction":
            y = 1 + z + 0.5 * q + 0.7 * z * q + eps
            formula, coef, truth = "y ~ z * q", "z:q", 0.7
        elif case == "logistic":
            y = (rng.random(N) < expit(-0.5 + z + 0.5 * q + eps)).astype(int)
            family = "binomial"
            big = rng.normal(size=400_000)
            zb = (rng.random(400_000) < expit(-0.3 + 0.8 * big)).astype(int)
            yb = (rng.random(400_000) < expit(-0.5 + zb + 0.5 * big + rng.normal(size=400_000))).astype(int)
            from pyro_llm.regression.estimators import logistic
            truth = logistic(np.column_stack([np.ones(400_000), zb, big]), yb).coef[1]
        else:   # the outcome role: z regressed on q
            formula, coef, role, truth = "z ~ q", "q", "outcome", None
            big = rng.normal(size=400_000)
            zb = (rng.random(400_000) < expit(-0.3 + 0.8 * big)).astype(int)
            truth = np.polyfit(big, zb, 1)[0]
            y = None
    df = pd.DataFrame({"q": q, "z": np.where(lab, z, np.nan)})
    if y is not None:
        df["y"] = y
    kind = "continuous" if case == "continuous" else "auto"
    res = regress(df, formula, label="z", role=role, predictions=preds, family=family, kind=kind, num_draws=0)
    only = regress(df, formula, label="z", role=role, predictions=preds, family=family, kind=kind,
                   method="labelled_only")
    assert abs(res[coef]["mean"] - truth) < 4 * res[coef]["sd"], (res[coef], truth)
    assert res[coef]["sd"] < only[coef]["sd"]


def test_a_useless_coder_leaves_dr_valid_and_as_wide_as_the_labelled_rows():
    df, _, _ = b1_like(4, N=4000, n=400)
    noise = np.random.default_rng(0).normal(size=len(df))
    res = regress(df, "y ~ z + q", label="z", predictions=noise, num_draws=0)
    only = regress(df, "y ~ z + q", label="z", predictions=noise, method="labelled_only")
    assert abs(res["z"]["mean"] - 1.0) < 4 * res["z"]["sd"]
    # Y and Q still inform z a little, so dr may be slightly narrower, never much
    assert 0.7 * only["z"]["sd"] < res["z"]["sd"] < 1.15 * only["z"]["sd"]


def test_ptd_uses_probabilities_and_is_narrower_than_with_labels():
    df, s, _ = b1_like(6, N=6000, n=500, a=1.5, leak=0.0)
    hard = regress(df, "y ~ z + q", label="z", predictions=(s > 0).astype(int), method="ptd", tune_for="z")
    soft = regress(df, "y ~ z + q", label="z", predictions=s, predictions_kind="log_odds", method="ptd",
                   tune_for="z")
    assert hard.info["predictions_used"] == "labels" and soft.info["predictions_used"] == "probabilities"
    assert soft["z"]["sd"] < hard["z"]["sd"]


def test_mi_conditions_on_the_outcome():
    """Imputing z from p(z | text) alone shrinks γ by about Var(E[z | text]) / Var(z); imputing from
    the completion model, which conditions on Y too, does not."""
    df, s, _ = b1_like(9, N=8000, n=800, a=0.8, leak=0.0)
    res = regress(df, "y ~ z + q", label="z", predictions=s, method="mi")
    assert abs(res["z"]["mean"] - 1.0) < 4 * res["z"]["sd"], res["z"]
    assert res.info["imputations"] == 50


def test_the_joint_model_is_checked_against_dr():
    df, s, _ = b1_like(12, N=4000, n=400, leak=0.0)
    res = regress(df, "y ~ z + q", label="z", predictions=s, method="joint", num_draws=200)
    assert res.info["hausman_p"].shape == (3,) and res.info["hausman_p"].min() > 0.001
    assert "Hausman" in repr(res)


def test_summary_reports_z_p_and_the_effective_labelled_rows():
    df, s, _ = b1_like(13, N=3000, n=300)
    res = regress(df, "y ~ z + q", label="z", predictions=s, num_draws=200)
    table = res.summary()
    assert list(table.columns) == ["estimate", "se", "z", "p", "0.025", "0.975", "eff. labelled n"]
    assert table.attrs["n"] == 3000 and table.attrs["n_labelled"] == 300
    assert (table["eff. labelled n"] > 300).all()
    z = table["estimate"] / table["se"]
    np.testing.assert_allclose(table["z"], z)
    np.testing.assert_allclose(table["p"], 2 * stats.norm.sf(np.abs(z)))
    text = repr(res)
    assert "N=3000, labelled n=300" in text and "completion model" in text
    idata = res.to_arviz()
    assert idata.posterior["z"].shape == (1, 200) and idata.attrs["draws"] == "posterior draws"


def test_predictions_kind_and_index_alignment():
    df, s, _ = b1_like(14, N=1000, n=200)
    p1 = expit(s)
    probs = np.column_stack([1 - p1, p1])
    with pytest.raises(ValueError, match="predictions_kind='probs' or 'log_odds'"):
        regress(df, "y ~ z + q", label="z", predictions=p1, num_draws=0)
    a = regress(df, "y ~ z + q", label="z", predictions=p1, predictions_kind="probs", num_draws=0)
    b = regress(df, "y ~ z + q", label="z", predictions=probs, num_draws=0)
    np.testing.assert_allclose(a.coef, b.coef)
    # two-decimal probabilities are renormalised with a warning, not read as logits
    rounded = np.round(probs, 2)
    rounded[0] = [0.33, 0.66]
    with pytest.warns(UserWarning, match="renormalised"):
        c = regress(df, "y ~ z + q", label="z", predictions=rounded, num_draws=0)
    assert abs(c["z"]["mean"] - b["z"]["mean"]) < 0.2 * b["z"]["sd"]
    off = probs.copy()
    off[5] = [0.5, 0.7]
    with pytest.raises(ValueError, match="row 5 sums to 1.2000"):
        regress(df, "y ~ z + q", label="z", predictions=off, predictions_kind="probs", num_draws=0)
    # a pandas Series is aligned on the DataFrame's index, not used by position
    ser = pd.Series(s, index=df.index).sample(frac=1.0, random_state=0)
    d = regress(df, "y ~ z + q", label="z", predictions=ser, num_draws=0)
    e = regress(df, "y ~ z + q", label="z", predictions=s, num_draws=0)
    np.testing.assert_allclose(d.coef, e.coef)
    with pytest.raises(ValueError, match="index of predictions does not match"):
        regress(df, "y ~ z + q", label="z", predictions=pd.Series(s, index=df.index + 7), num_draws=0)


def test_predictions_from_a_model_that_saw_the_labels_are_flagged():
    df, s, z = b1_like(15, N=3000, n=400, a=1.0)
    lab = df["z"].notna().to_numpy()
    leaky = s.copy()
    leaky[lab] = 6 * (2 * z[lab] - 1)               # in-sample: confident and right on the labelled rows
    with pytest.warns(UserWarning, match="more confident on the labelled rows"):
        regress(df, "y ~ z + q", label="z", predictions=leaky, num_draws=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = regress(df, "y ~ z + q", label="z", predictions=s, num_draws=0)
    assert res.info["insample_p"] > 1e-4
    with pytest.warns(UserWarning, match="codes every row with one model"):
        regress(df.assign(text="t"), "y ~ z + q", label="z", llm=lambda t: s, text="text", num_draws=0)


def test_fit_multinomial_matches_statsmodels_mle():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(0)
    F = np.column_stack([np.ones(600), rng.normal(size=(600, 2))])
    logits = np.column_stack([np.zeros(600), F @ [0.2, 1.0, -0.5], F @ [-0.3, 0.5, 0.8]])
    z = (np.exp(logits).cumsum(1) / np.exp(logits).sum(1, keepdims=True) < rng.random(600)[:, None]).sum(1)
    ours = fit_multinomial(F, z, 3, prior_sd=np.inf)
    ref = sm.MNLogit(z, F).fit(disp=0, method="newton", tol=1e-12).params
    np.testing.assert_allclose(ours, np.asarray(ref), rtol=1e-6, atol=1e-8)


def test_fits_are_reproducible_and_splits_are_combined_by_the_median():
    df, s, _ = b1_like(16, N=1500, n=300)
    design = build_design(df, "y ~ z + q", label="z")
    fit, d1, _ = fit_dr(design, scores=s[:, None], labels=None, num_draws=50, seed=3)
    again, d2, _ = fit_dr(design, scores=s[:, None], labels=None, num_draws=50, seed=3)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(fit.coef, again.coef)
    coefs = fit.extra["split_coefs"]
    assert coefs.shape == (5, 3) and len(np.unique(coefs[:, 1])) == 5
    np.testing.assert_allclose(fit.coef, np.median(coefs, 0))
    one, _, _ = fit_dr(design, scores=s[:, None], labels=None, num_draws=0, splits=1, seed=3)
    assert fit.cov[1, 1] >= 0.8 * one.cov[1, 1]
    theta, V = combine_splits([np.array([0.0]), np.array([1.0]), np.array([2.0])],
                              [np.eye(1)] * 3)
    assert theta[0] == 1.0 and V[0, 0] == 2.0          # the median of 1 + (1, 0, 1)
