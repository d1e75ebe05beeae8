"""Downstream regression: the completion model's enumeration, recovery, the interface and its errors."""

import math

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from scipy import stats

from pyro_llm.regression import build_design, compare, completion, forest_plot, llm_outputs, regress
from pyro_llm.regression.crossfit import crossfit, fold_ids
from pyro_llm.regression.estimators import logistic
from pyro_llm.regression.joint import weighted_fit


def expit(x):
    return 1 / (1 + np.exp(-x))


def b1_frame(seed=0, N=4000, n=400, a=2.0, leak=0.0):
    rng = np.random.default_rng(seed)
    q, eps = rng.normal(size=N), rng.normal(size=N)
    z = (rng.random(N) < expit(-0.5 + 0.8 * q)).astype(int)
    y = 1 + z + 0.5 * q + eps
    s = a * (2 * z - 1) + 0.6 * q + leak * eps + rng.normal(size=N)
    lab = np.zeros(N, bool)
    lab[rng.choice(N, n, replace=False)] = True
    return pd.DataFrame({"y": y, "q": q, "z": np.where(lab, z, np.nan)}), s, z


# ---------------------------------------------------------------- enumeration is exact
def _tiny(measurement, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, K = 5, 2
    F = torch.cat([torch.ones(N, 1), torch.randn(N, 2, generator=g, dtype=torch.float64)], 1).double()
    z = torch.tensor([0, 1, 0, 0, 0])
    labelled = torch.tensor([True, True, False, False, False])
    dim = {"label": 1, "score": 1, "ordinal": 4}[measurement]
    m = {"label": torch.tensor([0, 1, 1, 0, 1]),
         "score": torch.randn(N, 1, generator=g, dtype=torch.float64),
         "ordinal": torch.tensor([0, 3, 2, 1, 3])}[measurement]
    shapes = completion.site_shapes(3, K, measurement, dim)
    params = {k: 0.7 * torch.randn(v, generator=g, dtype=torch.float64) for k, v in shapes.items()}
    return F, m, z, labelled, dim, params


def _hand_log_meas(measurement, F, m, params, i, k):
    """log p(m_i | z_i = k, F_i) written out with numpy / scipy."""
    Fi = F[i].numpy()
    c = {n: v.numpy() for n, v in params.items()}
    if measurement == "label":
        logits = np.concatenate([[0.0], Fi @ c["m_coef"][k]])
        return logits[int(m[i])] - np.log(np.exp(logits).sum())
    if measurement == "score":
        mean, sd = Fi @ c["m_coef"][k][:, 0], np.exp(c["m_log_scale"][k, 0])
        return stats.norm.logpdf(float(m[i, 0]), mean, sd)
    raw = c["m_cut"]
    cuts = np.concatenate([raw[:1], raw[0] + np.cumsum(np.log1p(np.exp(raw[1:])))])
    edges = np.concatenate([[-np.inf], cuts, [np.inf]])
    loc = (0.0 if k == 0 else c["m_shift"][k - 1]) + Fi[1:] @ c["m_coef"][k]
    sd = 1.0 if k == 0 else np.exp(c["m_log_scale"][k - 1])
    b = int(m[i])
    return np.log(stats.norm.cdf((edges[b + 1] - loc) / sd) - stats.norm.cdf((edges[b] - loc) / sd))


@pytest.mark.parametrize("measurement", ["label", "score", "ordinal"])
def test_enumerated_log_joint_equals_the_hand_sum_over_z(measurement):
    F, m, z, labelled, dim, params = _tiny(measurement)
    model = poutine.condition(completion.completion_model, data=params)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(
        model, lambda *a, **k: None, F, m, z, labelled, num_classes=2, measurement=measurement, dim=dim)

    scales = {n: 3.0 if n in ("m_log_scale", "m_cut", "m_shift") else 5.0 for n in params}
    prior = sum(stats.norm.logpdf(v.numpy(), 0, scales[n]).sum() for n, v in params.items())
    total = prior
    for i in range(5):
        logits = np.concatenate([[0.0], F[i].numpy() @ params["z_coef"].numpy()])
        log_pz = logits - np.log(np.exp(logits).sum())
        terms = [log_pz[k] + _hand_log_meas(measurement, F, m, params, i, k) for k in range(2)]
        total += terms[int(z[i])] if labelled[i] else np.logaddexp(*terms)
    assert float(-loss) == pytest.approx(total, rel=1e-10, abs=1e-9)
    # the batched log joint used for importance weights is the same density, also over draws
    post = completion.CompletionPosterior(torch.zeros(1), torch.eye(1), completion.site_shapes(
        3, 2, measurement, dim), measurement, 2, 0.0)
    m_in = m.double() if measurement == "score" else m
    assert float(post.log_joint(F, m_in, z, labelled, params)) == pytest.approx(total, rel=1e-10)
    two = {k: torch.stack([v, v]) for k, v in params.items()}
    assert torch.allclose(post.log_joint(F, m_in, z, labelled, two), torch.tensor(total).double())


def test_importance_resampled_draws_report_their_effective_sample_size():
    df, s, _ = b1_frame(seed=0, N=3000, n=300)
    res = regress(df, "y ~ z + q", label="z", predictions=s, method="joint", measurement="score",
                  importance=True, num_draws=200)
    assert 1 <= res.info["importance_ess"] <= 200
    assert abs(res["z"]["median"] - 1.0) < 4 * res["z"]["sd"]


@pytest.mark.parametrize("measurement", ["label", "ordinal"])
def test_imputation_probabilities_equal_pyros_enumerated_marginals(measurement):
    F, m, z, labelled, dim, params = _tiny(measurement, seed=1)
    model = poutine.condition(completion.completion_model, data=params)
    marg = TraceEnum_ELBO(max_plate_nesting=1).compute_marginals(
        model, lambda *a, **k: None, F, m, z, labelled, num_classes=2, measurement=measurement, dim=dim)
    shapes = completion.site_shapes(3, 2, measurement, dim)
    post = completion.CompletionPosterior(torch.zeros(1), torch.eye(1), shapes, measurement, 2, 0.0)
    ours = post.class_log_probs(F[~labelled], m[~labelled], params).exp()
    pyro_probs = marg["z_unl"].probs if hasattr(marg["z_unl"], "probs") else marg["z_unl"].log_prob(
        torch.arange(2)[:, None]).exp().T
    assert torch.allclose(ours, pyro_probs.reshape(ours.shape), atol=1e-10)


# ---------------------------------------------------------------- recovery and validity
@pytest.mark.parametrize("a, leak, sign", [(2.0, 0.0, -1), (2.5, 0.5, 1)])
def test_joint_recovers_the_coefficient_where_naive_is_biased(a, leak, sign):
    """The coverage benchmark's B1 at full size, one seed: the plug-in's bias flips sign between
    the variants (BENCHMARKS.md); the joint estimate is within 3 posterior sds of the truth."""
    df, s, _ = b1_frame(seed=1, N=10_000, n=500, a=a, leak=leak)
    res = regress(df, "y ~ z + q", label="z", predictions=s, method="joint", num_draws=400, seed=0)
    est = res["z"]
    assert abs(est["mean"] - 1.0) < 3 * est["sd"], est
    assert res.info["measurement"] == "ordinal"
    naive = regress(df, "y ~ z + q", label="z", predictions=(s > 0).astype(int), method="naive")["z"]
    assert sign * (naive["mean"] - 1.0) > naive["sd"]


def test_outcome_role_recovers_a_linear_probability_coefficient():
    rng = np.random.default_rng(5)
    N, n = 6000, 600
    q1, q2 = rng.normal(size=N), (rng.random(N) < 0.4).astype(float)
    z = (rng.random(N) < 0.2 + 0.1 * q1.clip(-2, 2) - 0.1 * q2).astype(int)     # exactly linear
    flip = rng.random(N) < np.where(z == 1, 0.05, expit(-3 + 0.8 * q2))
    zhat = np.where(flip, 1 - z, z)
    lab = np.zeros(N, bool)
    lab[rng.choice(N, n, replace=False)] = True
    df = pd.DataFrame({"q1": q1.clip(-2, 2), "q2": q2, "z": np.where(lab, z, np.nan)})
    res = regress(df, "z ~ q1 + q2", label="z", role="outcome", predictions=zhat, method="joint",
                  num_draws=400)
    assert res.info["measurement"] == "label"
    for name, truth in (("q1", 0.1), ("q2", -0.1)):
        assert abs(res[name]["mean"] - truth) < 3 * res[name]["sd"], (name, res[name])


# ---------------------------------------------------------------- the researcher's interface
def survey_frame(seed=0, N=800, n=200):
    rng = np.random.default_rng(seed)
    region = rng.choice(["north", "south", "west"], N)
    age = rng.normal(45, 12, N)
    stance = np.where(rng.random(N) < expit(-1 + 0.03 * (age - 45)), "pro", "con")
    y = 2 + 1.5 * (stance == "pro") + 0.02 * age + (region == "south") + rng.normal(size=N)
    logit = 3 * (2 * (stance == "pro") - 1) + rng.normal(size=N)
    lab = np.zeros(N, bool)
    lab[rng.choice(N, n, replace=False)] = True
    df = pd.DataFrame({"y": y, "age": age, "region": region, "stance": np.where(lab, stance, None),
                       "text": [f"statement {i}" for i in range(N)]})
    return df, logit


def test_regress_from_a_dataframe_with_string_labels_and_factors():
    df, logit = survey_frame()
    res = regress(df, "y ~ stance + age + C(region)", label="stance", predictions=logit, method="joint",
                  num_draws=300)
    table = res.summary()
    assert list(table.index) == ["Intercept", "stance[T.pro]", "age", "C(region)[T.south]",
                                 "C(region)[T.west]"]
    assert list(table.columns) == ["estimate", "se", "z", "p", "0.025", "0.975"]
    assert (table["0.025"] < table["estimate"]).all() and (table["estimate"] < table["0.975"]).all()
    assert res.info["classes"] == ("con", "pro")
    assert abs(res["stance[T.pro]"]["mean"] - 1.5) < 4 * res["stance[T.pro]"]["sd"]
    idata = res.to_arviz()
    assert set(idata.posterior.data_vars) == set(table.index)
    assert idata.posterior["age"].shape == (1, 300)
    naive = regress(df, "y ~ stance + age + C(region)", label="stance", predictions=logit, method="naive")
    assert regress(df, "y ~ stance + age", label="stance", predictions=logit).method == "dr"  # the default
    fig = forest_plot([res, naive], path=None)
    assert len(fig.axes) == 1 and len(fig.axes[0].get_yticks()) == 5
    both = compare([res, naive], coef="age")
    assert list(both.index.get_level_values("method")) == ["joint", "naive"]
    assert "joint" in repr(res)


def test_llm_callable_is_applied_to_the_text_column():
    df, logit = survey_frame()
    seen = {}

    def llm(texts):
        seen["n"] = len(texts)
        return np.stack([np.zeros(len(texts)), logit], -1)          # (N, 2) logits

    a = regress(df, "y ~ stance + age", label="stance", llm=llm, text="text", method="ptd")
    b = regress(df, "y ~ stance + age", label="stance", predictions=logit, method="ptd")
    assert seen["n"] == len(df)
    np.testing.assert_allclose(a.coef, b.coef)


def test_probabilities_and_logits_give_the_same_scores():
    df, logit = survey_frame()
    d = build_design(df, "y ~ stance + age", label="stance")
    logits = np.stack([np.zeros(len(df)), logit], -1)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    a, b, c = llm_outputs(logits, d), llm_outputs(probs, d), llm_outputs(logit, d)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-8)
    np.testing.assert_allclose(a.scores, c.scores, atol=1e-8)
    np.testing.assert_array_equal(a.labels, (logit > 0).astype(int))
    hard = llm_outputs(np.where(logit > 0, "pro", "con"), d)
    np.testing.assert_array_equal(hard.labels, a.labels)
    assert hard.scores is None
    draws = llm_outputs(np.stack([probs, probs]), d)
    assert draws.draws.shape == (2, len(df), 2)


def test_naive_equals_least_squares_on_the_coded_design():
    df, logit = survey_frame()
    coded = np.where(logit > 0, "pro", "con")
    res = regress(df, "y ~ stance + age", label="stance", predictions=coded, method="naive")
    X = np.column_stack([np.ones(len(df)), logit > 0, df["age"]])
    np.testing.assert_allclose(res.coef, np.linalg.lstsq(X, df["y"], rcond=None)[0], rtol=1e-10)
    # with scores, the baselines use the expected design E[X(z)] = X(P(pro))
    soft = regress(df, "y ~ stance + age", label="stance", predictions=logit, method="naive")
    X[:, 1] = expit(logit)
    np.testing.assert_allclose(soft.coef, np.linalg.lstsq(X, df["y"], rcond=None)[0], rtol=1e-10)
    assert soft.info["predictions_used"] == "probabilities"


def test_weighted_fit_matches_reference_fits():
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(300), rng.normal(size=(300, 2))])
    y = X @ [0.5, 1.0, -1.0] + rng.normal(size=300)
    w = rng.exponential(size=300)
    ref = np.linalg.lstsq(X * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
    np.testing.assert_allclose(weighted_fit(X[None], y[None], w[None])[0], ref, rtol=1e-10)
    yb = (rng.random(300) < expit(X @ [0.2, 1.0, -0.5])).astype(float)
    np.testing.assert_allclose(weighted_fit(X[None], yb[None], w[None], "binomial")[0],
                               logistic(X, yb, weights=w).coef, rtol=1e-7)


def test_crossfit_predicts_every_row_with_a_model_that_did_not_see_it():
    labelled = np.zeros(50, bool)
    labelled[::3] = True
    ids = fold_ids(labelled, 4, seed=0)
    assert np.bincount(ids[labelled]).tolist() in ([5, 4, 4, 4], [4, 5, 4, 4], [4, 4, 5, 4], [4, 4, 4, 5])
    calls = []

    def fit_predict(train, rows):
        assert not set(train) & set(rows) and labelled[train].all()
        calls.append(len(train))
        return np.stack([np.zeros(len(rows)), rows.astype(float)], -1)   # "logit" = row index

    out = crossfit(fit_predict, labelled, folds=4)
    assert out.shape == (50, 2) and len(calls) == 4
    np.testing.assert_array_equal(out[:, 1], np.arange(50))               # every row, in row order
    draws = crossfit(lambda tr, rows: np.ones((3, len(rows), 2)) / 2, labelled, folds=4)
    assert draws.shape == (3, 50, 2)
    with pytest.raises(ValueError, match="cannot be split"):
        fold_ids(labelled, 40)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, kwargs, match", [
    (None, {"formula": "y ~ stance + income"}, r"names columns \['income'\]"),
    (None, {"classes": ["con"]}, r"values \['pro'\] that are not among"),
    (lambda d: d.assign(stance=None), {}, "no labelled rows"),
    (lambda d: d.assign(age=d["age"].where(d.index != 7)), {}, r"missing values in columns \{'age': 1\}"),
    (lambda d: d.assign(text=d["text"].where(d.index != 3, "  ")), {"text": "text"}, "1 empty or missing"),
    (None, {"role": "outcome"}, "needs 'stance' alone on the left-hand side"),
    (None, {"method": "bayes"}, "method must be one of"),
    (None, {"predictions": np.zeros(5)}, r"one row per DataFrame row \(800\)"),
    (None, {"predictions": -np.ones((800, 3))}, "3 columns but 'stance' has 2 classes"),
    (None, {"predictions": np.where(np.arange(800) % 2, "pro", "maybe")}, r"\['maybe'\] are not among"),
    (None, {"method": "joint_dr"}, r"replaced by method='dr'"),
    (None, {"method": "ptd", "cluster": "region"}, r"method='dr' only"),
    (None, {"interval": "hpd"}, "interval must be one of"),
    (None, {"interval": "bootstrap", "num_draws": 0}, "needs num_draws > 0"),
    (None, {"prob": np.full(800, 1.5)}, r"must lie in \(0, 1\]"),
])
def test_bad_input_is_a_clear_error(change, kwargs, match):
    df, logit = survey_frame()
    if change is not None:
        df = change(df)
    args = {"formula": "y ~ stance + age", "label": "stance", "predictions": logit, **kwargs}
    with pytest.raises(ValueError, match=match):
        regress(df, **args)


def test_all_labelled_or_single_class_is_refused():
    df, logit = survey_frame()
    with pytest.raises(ValueError, match="every row of 'stance' is labelled"):
        regress(df.assign(stance="pro"), "y ~ stance + age", label="stance", predictions=logit)
    one = df.assign(stance=df["stance"].where(df["stance"] != "con"))
    with pytest.raises(ValueError, match="single class"):
        regress(one, "y ~ stance + age", label="stance", predictions=logit)


def test_result_level_is_used_for_intervals():
    df, logit = survey_frame()
    r90 = regress(df, "y ~ stance + age", label="stance", predictions=logit, method="ptd", level=0.9)
    r95 = regress(df, "y ~ stance + age", label="stance", predictions=logit, method="ptd")
    w90 = np.subtract(*r90.interval()[::-1])
    w95 = np.subtract(*r95.interval()[::-1])
    np.testing.assert_allclose(w90 / w95, 1.6448536 / 1.9599640, rtol=1e-6)
    assert list(r90.summary().columns)[-2:] == ["0.05", "0.95"]
    assert math.isclose(r95.level, 0.95)
    pyro.clear_param_store()


# ---------------------------------------------------------------- a continuous coded variable
def continuous_frame(seed=0, N=5000, n=400, leak=0.5):
    """z continuous (an LLM regression output codes it); the LLM's error depends on Q and ε."""
    rng = np.random.default_rng(seed)
    q, eps = rng.normal(size=N), rng.normal(size=N)
    z = 0.5 * q + rng.normal(size=N)
    y = 1 + 2.0 * z + 0.5 * q + eps
    pred = 0.8 * z + 0.3 * q + leak * eps + 0.5 * rng.normal(size=N)
    lab = np.zeros(N, bool)
    lab[rng.choice(N, n, replace=False)] = True
    return pd.DataFrame({"y": y, "q": q, "z": np.where(lab, z, np.nan)}), pred, z


def test_continuous_z_completion_is_recovered_and_naive_is_not():
    df, pred, _ = continuous_frame()
    res = regress(df, "y ~ z + q", label="z", predictions=pred, method="joint", num_draws=400)
    assert res.info["kind"] == "continuous" and res.info["measurement"] == "continuous"
    assert abs(res["z"]["mean"] - 2.0) < 3 * res["z"]["sd"], res["z"]
    naive = regress(df, "y ~ z + q", label="z", predictions=pred, method="naive")
    assert abs(naive["z"]["mean"] - 2.0) > 5 * naive["z"]["sd"]   # regression calibration bias
    ptd = regress(df, "y ~ z + q", label="z", predictions=pred, method="ptd")
    assert abs(ptd["z"]["mean"] - 2.0) < 3 * ptd["z"]["sd"]


def test_continuous_imputation_is_the_conjugate_posterior():
    """p(z | m, F) from ``impute`` matches its mean and variance over many draws."""
    g = torch.Generator().manual_seed(0)
    F = torch.cat([torch.ones(3, 1), torch.randn(3, 1, generator=g, dtype=torch.float64)], 1).double()
    m = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    params = {"z_coef": torch.tensor([[0.2, 0.5]]).double(), "z_log_scale": torch.tensor([0.1]).double(),
              "m_coef": torch.tensor([[-0.1, 0.3]]).double(), "m_slope": torch.tensor([0.9]).double(),
              "m_log_scale": torch.tensor([-0.5]).double()}
    shapes = completion.site_shapes(2, 0, "continuous", 1)
    post = completion.CompletionPosterior(torch.zeros(1), torch.eye(1), shapes, "continuous", 0, 0.0)
    S = 40_000
    draws = post.impute(F, m, {k: v.expand(S, *v.shape[1:]) for k, v in params.items()}, generator=g)
    sz2, tau2, b = math.exp(0.2), math.exp(-1.0), 0.9
    prior_mean = (F @ torch.tensor([0.2, 0.5]).double()).numpy()
    resid = (m - F @ torch.tensor([-0.1, 0.3]).double()).numpy()
    var = 1 / (1 / sz2 + b ** 2 / tau2)
    mean = var * (prior_mean / sz2 + b * resid / tau2)
    se = math.sqrt(var / S)
    np.testing.assert_allclose(draws.mean(0).numpy(), mean, atol=4 * se)
    np.testing.assert_allclose(draws.var(0).numpy(), var, rtol=4 * math.sqrt(2 / S))


def test_nonlinear_formula_in_a_continuous_label_is_refused():
    df, pred, _ = continuous_frame(N=300, n=50)
    with pytest.raises(ValueError, match="not linear in the continuous 'z'"):
        regress(df, "y ~ z + I(z**2) + q", label="z", predictions=pred)
    with pytest.raises(ValueError, match=r"\(N,\) values or \(S, N\) draws"):
        regress(df, "y ~ z + q", label="z", predictions=np.zeros((300, 2)))


# ---------------------------------------------------------------- the end-to-end (seed 000) model
def test_end_to_end_model_enumeration_equals_the_hand_sum():
    from pyro_llm.regression.structural import joint_lora_model

    g = torch.Generator().manual_seed(2)
    B, p = 6, 3
    logits = torch.randn(B, 2, generator=g)
    Xk = torch.randn(2, B, p, generator=g)
    y, z = torch.randn(B, generator=g), torch.tensor([1, 0, 0, 1, 0, 0])
    lab = torch.tensor([True, True, False, False, True, False])
    coef, sigma = torch.tensor([0.3, -0.2, 0.5]), torch.tensor(0.8)
    model = poutine.condition(joint_lora_model, data={"coef": coef, "sigma": sigma})
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(model, lambda *a, **k: None, lambda x: x, logits, Xk,
                                                    y, z, lab, (3, 3))
    total = stats.norm.logpdf(coef.numpy(), 0, 10).sum() + stats.halfnorm.logpdf(0.8, scale=10)
    lp = logits.log_softmax(-1).numpy()
    for i in range(B):
        terms = [lp[i, k] + stats.norm.logpdf(float(y[i]), float(Xk[k, i] @ coef), 0.8) for k in range(2)]
        total += terms[int(z[i])] if lab[i] else np.logaddexp(*terms)
    assert -loss == pytest.approx(total, rel=1e-5)


def test_fit_joint_lora_runs_on_a_peft_model_and_returns_coefficient_draws():
    import peft

    from pyro_llm import BayesianLoRA, fit_map
    from pyro_llm.regression import fit_joint_lora

    rng = np.random.default_rng(0)
    N, n = 400, 80
    q = rng.normal(size=N)
    z = (rng.random(N) < expit(q)).astype(int)
    x = np.column_stack([2 * z - 1 + 0.5 * rng.normal(size=N), q, rng.normal(size=(N, 2))])
    y = 1 + z + 0.5 * q + rng.normal(size=N)
    lab = np.zeros(N, bool)
    lab[:n] = True
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    pm = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    xt = torch.as_tensor(x, dtype=torch.float32)
    fit_map(pm, [(xt[:n], torch.as_tensor(z[:n]))], epochs=60, lr=2e-2, progress=False,
            loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    lora = BayesianLoRA(pm, prior=0.5, select="B")
    df = pd.DataFrame({"y": y, "q": q, "z": np.where(lab, z, np.nan)})
    res = fit_joint_lora(df, "y ~ z + q", label="z", lora=lora, inputs=xt, steps=150, lr=1e-2,
                         num_draws=200)
    assert res.coef_names == ("Intercept", "z", "q") and res.draws.shape == (200, 3)
    assert abs(res["z"]["mean"] - 1.0) < 4 * res["z"]["sd"] + 0.1
    with pytest.raises(ValueError, match="inputs has 10 rows"):
        fit_joint_lora(df, "y ~ z + q", label="z", lora=lora, inputs=xt[:10])
    with pytest.raises(TypeError, match="must be a pyro_llm.BayesianLoRA"):
        fit_joint_lora(df, "y ~ z + q", label="z", lora=pm, inputs=xt)


def test_logistic_target_regression_with_a_coded_covariate():
    """family="binomial": a binary outcome, z coded; joint and ptd recover the logistic coefficient."""
    rng = np.random.default_rng(4)
    N, n = 8000, 800
    q = rng.normal(size=N)
    z = (rng.random(N) < expit(0.5 * q)).astype(int)
    y = (rng.random(N) < expit(-0.5 + 1.0 * z + 0.5 * q)).astype(int)
    s = 2.5 * (2 * z - 1) + 0.5 * q + rng.normal(size=N)
    lab = np.zeros(N, bool)
    lab[rng.choice(N, n, replace=False)] = True
    df = pd.DataFrame({"y": y, "q": q, "z": np.where(lab, z, np.nan)})
    for method in ("joint", "ptd"):
        res = regress(df, "y ~ z + q", label="z", predictions=s, method=method, family="binomial",
                      num_draws=300)
        assert abs(res["z"]["mean"] - 1.0) < 3 * res["z"]["sd"], (method, res["z"])
