"""to_arviz: draws of a tiny peft model's BayesianLoRA plus a regression head, to ArviZ."""

import warnings

import numpy as np
import peft
import pyro
import pytest
import torch

from pyro_llm import BayesianLoRA, GuidePosterior, fit_svi, likelihoods, stack_draws
from pyro_llm.arviz_io import short_site_names, to_arviz

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

S, N, C = 12, 9, 3


def flat(da):
    """A posterior variable's draws in the order drawn: (S, ...) from (chain, draw, ...)."""
    return da.values.reshape(-1, *da.shape[2:])


@pytest.fixture(scope="module")
def lora():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, C))
    net = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    return BayesianLoRA(net, prior=0.1)


@pytest.fixture(scope="module")
def draws(lora):
    g = torch.Generator().manual_seed(1)
    out = {n: torch.randn(S, *lora._shapes[lora.peft_name(n)], generator=g)
           for n in lora.site_names}
    out["head.intercept"] = torch.randn(S, generator=g)
    out["head.sigma"] = torch.rand(S, generator=g) + 0.5
    out["head.coef"] = torch.randn(S, 3, generator=g)
    return out


@pytest.fixture(scope="module")
def probs_y():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(S, N, C, generator=g), -1)
    return probs, torch.randint(0, C, (N,), generator=g)


@pytest.fixture(scope="module")
def idata(lora, draws, probs_y):
    return to_arviz(draws, lora=lora, sample_probs=probs_y[0], y=probs_y[1])


def test_groups_and_variable_names(idata, lora):
    groups = idata.groups() if callable(idata.groups) else [g.strip("/") for g in idata.groups]
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data"} <= set(groups)
    names = set(idata.posterior.data_vars)
    assert {"head.intercept", "head.sigma", "head.coef"} <= names
    assert {"0.A:norm", "0.B:norm", "2.A:norm", "2.B:norm"} <= names
    assert {"0:delta_norm", "2:delta_norm"} <= names
    assert not any(n in names for n in ["0.A", "0.B", *lora.site_names])  # no raw matrices by default
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == S // 2


def test_summary_rows_and_values(idata, draws, lora):
    summ = az.summary(idata, kind="stats")
    site = lora.site_names[1]
    assert site == "base_model.model.0.lora_B.default.weight"
    expected = {"head.intercept", "head.sigma", "head.coef[0]", "head.coef[2]", "0.B:norm",
                "2:delta_norm"}
    assert expected <= set(summ.index)
    assert summ.loc["head.sigma", "mean"] == pytest.approx(draws["head.sigma"].mean().item(),
                                                           abs=1e-3)
    full = az.summary(idata, var_names=["head.sigma"], kind="stats", round_to="none")
    np.testing.assert_allclose(full.loc["head.sigma", "mean"],
                               draws["head.sigma"].double().mean().item(), rtol=1e-12)
    norm = flat(idata.posterior["0.B:norm"])
    np.testing.assert_allclose(norm, torch.linalg.norm(draws[site].double(), dim=(-2, -1)))


def test_delta_norm_uses_peft_scaling(idata, draws, lora):
    layer = lora.peft_model.base_model.model[2]
    scaling = layer.scaling["default"]
    assert scaling == 2.0  # lora_alpha / r
    a = draws["base_model.model.2.lora_A.default.weight"].double()
    b = draws["base_model.model.2.lora_B.default.weight"].double()
    expected = torch.linalg.norm(scaling * b @ a, dim=(-2, -1))
    np.testing.assert_allclose(flat(idata.posterior["2:delta_norm"]), expected, rtol=1e-10)


def test_raw_matrices_on_request(lora, draws):
    site = lora.site_names[0]
    for key in (site, "0.A"):  # the site name or the short name
        idata = to_arviz(draws, lora=lora, var_names=[key])
        assert idata.posterior["0.A"].shape == (2, S // 2, *draws[site].shape[1:])
        np.testing.assert_array_equal(flat(idata.posterior["0.A"]), draws[site].double().numpy())
        assert idata.posterior["0.A"].attrs["site"] == site and "0.A:norm" in idata.posterior
    none = to_arviz(draws, lora_summary=None)
    assert not any(":" in n or ".lora_" in n for n in none.posterior.data_vars)


def test_log_likelihood_exact_and_loo(idata, probs_y):
    probs, y = probs_y
    ll = idata.log_likelihood["y"]
    assert ll.dims == ("chain", "draw", "obs") and ll.shape == (2, S // 2, N)
    expected = probs.double().gather(-1, y.expand(S, -1).unsqueeze(-1)).squeeze(-1).log()
    np.testing.assert_array_equal(flat(ll), expected.numpy())
    loo = az.loo(idata)
    lppd = torch.logsumexp(expected, 0).sub(np.log(S)).sum().item()
    assert np.isfinite(loo.elpd_loo)
    assert loo.elpd_loo + loo.p_loo == pytest.approx(lppd, rel=1e-8)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())


def test_posterior_predictive_follows_probs(draws):
    onehot = torch.nn.functional.one_hot(torch.randint(0, C, (S, N)), C).float()
    y = torch.zeros(N, dtype=torch.long)
    idata = to_arviz(draws, sample_probs=onehot, y=y)
    pp = idata.posterior_predictive["y"]
    assert pp.shape == (2, S // 2, N)
    np.testing.assert_array_equal(flat(pp), onehot.argmax(-1).numpy())


def test_plot_forest(idata):
    axes = az.plot_forest(idata, var_names=["head.coef", "head.sigma"], combined=True)
    assert len(np.ravel(axes)) >= 1
    import matplotlib.pyplot as plt

    plt.close("all")


def test_netcdf_round_trip(idata, tmp_path):
    path = tmp_path / "post.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path)) if hasattr(az, "from_netcdf") else None
    if back is None:  # arviz >= 1: DataTree
        import xarray as xr

        back = xr.open_datatree(path)
    for name in idata.posterior.data_vars:
        np.testing.assert_array_equal(back.posterior[name].values, idata.posterior[name].values)
    np.testing.assert_array_equal(back.log_likelihood["y"].values, idata.log_likelihood["y"].values)


def test_input_forms_agree(draws):
    small = {k: v for k, v in draws.items() if k.startswith("head.")}
    as_list = [{k: v[s] for k, v in small.items()} for s in range(S)]
    a, b = to_arviz(small), to_arviz(as_list)
    for name in a.posterior.data_vars:
        np.testing.assert_array_equal(a.posterior[name].values, b.posterior[name].values)


def test_from_fitted_guide(lora):
    """End to end: SVI over adapter + regression head, then Posterior -> ArviZ."""
    pyro.clear_param_store()
    x, t = torch.randn(16, 4), torch.randn(16)

    def model(x, t, idx):
        out = lora(x)
        likelihoods.gaussian_regression("head", out, t[idx], size=16, index=idx)

    batches = [(x[i:i + 8], t, torch.arange(i, i + 8)) for i in (0, 8)]
    res = fit_svi(model, "normal", batches, lr=0.01, progress=False, init_values=lora)
    post = GuidePosterior(res.guide)
    idata = to_arviz(post, num_samples=6, lora=lora)
    assert idata.posterior["head.coef"].shape == (2, 3, C)
    assert {"head.sigma", "head.intercept"} <= set(idata.posterior.data_vars)
    assert len([n for n in idata.posterior.data_vars if n.endswith(":delta_norm")]) == 2
    pyro.clear_param_store()


def test_fixed_half_read_from_param_store():
    net = torch.nn.Sequential(torch.nn.Linear(3, 5))
    net = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"]))
    lora = BayesianLoRA(net, prior=0.1, select="A")
    a_site = lora.site_names[0]
    draws = {a_site: torch.randn(4, 2, 3)}
    b = torch.randn(5, 2)
    pyro.clear_param_store()
    pyro.param(lora.site_name("base_model.model.0.lora_B.default.weight"), b)
    idata = to_arviz(draws, lora=lora)
    scaling = net.base_model.model[0].scaling["default"]
    delta = scaling * b.detach().double() @ draws[a_site].double()
    expected = torch.linalg.norm(delta, dim=(-2, -1))
    np.testing.assert_allclose(flat(idata.posterior["0:delta_norm"]), expected, rtol=1e-10)
    pyro.clear_param_store()


@pytest.mark.parametrize("kwargs, match", [
    ({"sample_probs": torch.rand(S, N)}, r"\(S, N, C\)"),
    ({"sample_probs": torch.rand(S + 1, N, C)}, "draws"),
    ({"sample_probs": torch.full((S, N, C), float("nan"))}, "finite"),
    ({"sample_probs": torch.rand(S, N, C), "y": torch.zeros(N + 2, dtype=torch.long)}, "labels"),
    ({"sample_probs": torch.rand(S, N, C), "y": torch.full((N,), C)}, r"lie in \[0, 2\]"),
    ({"y": torch.zeros(N, 2)}, "1-d"),
    ({"var_names": ["nope"]}, "not among"),
    ({"lora_summary": "mean"}, "lora_summary"),
])
def test_bad_inputs(draws, kwargs, match):
    with pytest.raises(ValueError, match=match):
        to_arviz(draws, **kwargs)


def test_bad_draws():
    with pytest.raises(ValueError, match="no draws"):
        to_arviz([])
    with pytest.raises(ValueError, match="no draws"):
        to_arviz({})
    with pytest.raises(ValueError, match="same leading"):
        to_arviz({"a": torch.zeros(3), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="same sites"):
        to_arviz([{"a": torch.zeros(())}, {"b": torch.zeros(())}])
    with pytest.raises(ValueError, match="no sites"):
        to_arviz(GuidePosterior(lambda: None))
    with pytest.raises(ValueError, match="num_samples"):
        to_arviz(GuidePosterior(lambda: None), num_samples=0)
    with pytest.raises(ValueError, match="divide"):
        to_arviz({"a": torch.zeros(6)}, chains=4)
    with pytest.raises(TypeError, match="must return a list"):
        to_arviz(type("Bad", (), {"sample": lambda self, n: torch.zeros(n)})(), num_samples=2)
    with pytest.raises(TypeError, match="list of"):
        to_arviz(3.0)
    with pytest.raises(ValueError, match="obs_name"):
        to_arviz({"y": torch.zeros(2)}, y=torch.zeros(3, dtype=torch.long))


def test_stack_draws_input(draws):
    listed = [{"head.sigma": draws["head.sigma"][s]} for s in range(S)]
    idata = to_arviz(stack_draws(listed))
    assert idata.posterior["head.sigma"].shape == (2, S // 2)


# ------------------------------------------------------------------ diagnostics at default settings
def _fitted_posterior(lora):
    x, t = torch.randn(16, 4), torch.randn(16)

    def model(x, t, idx):
        likelihoods.gaussian_regression("head", lora(x), t[idx], size=16, index=idx)

    batches = [(x[i:i + 8], t, torch.arange(i, i + 8)) for i in (0, 8)]
    res = fit_svi(model, "normal", batches, lr=0.01, progress=False, init_values=lora)
    return GuidePosterior(res.guide)


def test_default_export_gives_finite_rhat_and_ess(lora):
    """A posterior object at default settings: several chains of iid draws, no ArviZ warning."""
    idata = to_arviz(_fitted_posterior(lora), lora=lora)
    assert idata.posterior.sizes["chain"] >= 2 and idata.posterior.sizes["draw"] >= 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summ = az.summary(idata, round_to="none")
    assert [str(w.message) for w in caught if not issubclass(w.category, FutureWarning)] == []
    assert np.isfinite(summ["r_hat"]).all() and (summ["r_hat"] < 1.05).all()
    assert (summ["ess_bulk"] > 50).all()
    assert {"head.sigma", "0.B:norm", "2:delta_norm"} <= set(summ.index)


def test_default_export_is_deterministic_and_leaves_the_rng(lora):
    post = _fitted_posterior(lora)
    state = torch.get_rng_state()
    a, b = to_arviz(post, num_samples=16), to_arviz(post, num_samples=16)
    assert torch.equal(state, torch.get_rng_state())
    assert a.posterior.sizes["chain"] == 4
    np.testing.assert_array_equal(a.posterior["head.coef"].values, b.posterior["head.coef"].values)


# ------------------------------------------------------------------ names
PEFT_NAMES = {  # peft parameter name -> short name
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight":
        "layer0.query.A",
    "base_model.model.bert.encoder.layer.11.attention.self.value.lora_B.default.weight":
        "layer11.value.B",
    "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight": "layers3.q_proj.A",
    "base_model.model.transformer.h.1.attn.c_attn.lora_B.default.weight": "h1.c_attn.B",
    "base_model.model.classifier.modules_to_save.default.weight": "classifier.weight",
    "head.sigma": "head.sigma",
}


def test_short_names_are_short_unique_and_deterministic():
    names = short_site_names(PEFT_NAMES)
    assert names == PEFT_NAMES
    assert short_site_names(reversed(list(PEFT_NAMES))) == names
    # BERT's attention.output.dense and output.dense would both be layer0.dense.A: whole paths
    clash = ["base_model.model.encoder.layer.0.attention.output.dense.lora_A.default.weight",
             "base_model.model.encoder.layer.0.output.dense.lora_A.default.weight"]
    assert list(short_site_names(clash).values()) == ["encoder.layer0.attention.output.dense.A",
                                                      "encoder.layer0.output.dense.A"]
    prefixed = "llm.base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight"
    assert short_site_names([prefixed]) == {prefixed: "llm.layers0.up_proj.B"}


def test_variable_names_short_with_site_attrs(idata, lora, draws):
    post = idata.posterior
    assert all(len(name) <= 24 for name in post.data_vars)
    sites = {name: post[name].attrs["site"] for name in post.data_vars}
    for site in lora.site_names:
        assert sites[f"{short_site_names([site])[site]}:norm"] == site
    assert sites["2:delta_norm"] == "base_model.model.2"
    assert sites["head.coef"] == "head.coef"
    assert set(sites.values()) - {"base_model.model.0", "base_model.model.2"} == set(draws)
    long = to_arviz(draws, lora=lora, short_names=False)
    assert f"{lora.site_names[0]}:norm" in long.posterior
    assert long.posterior[f"{lora.site_names[0]}:norm"].attrs["site"] == lora.site_names[0]


def test_real_peft_names_export_short(tmp_path):
    from conftest import tiny_transformer

    net, _ = tiny_transformer("bert")
    lora = BayesianLoRA(net, prior=0.1, select="B")
    g = torch.Generator().manual_seed(0)
    draws = {n: torch.randn(8, *lora._shapes[lora.peft_name(n)], generator=g) for n in lora.site_names}
    idata = to_arviz(draws, lora=lora)
    names = sorted(idata.posterior.data_vars)
    assert names == sorted([f"layer{i}.{m}.B:norm" for i in (0, 1) for m in ("query", "value")]
                           + [f"layer{i}.{m}:delta_norm" for i in (0, 1) for m in ("query", "value")])
    idata.to_netcdf(str(tmp_path / "p.nc"))
    back = az.from_netcdf(str(tmp_path / "p.nc"))
    site = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.default.weight"
    assert back.posterior["layer1.value.B:norm"].attrs["site"] == site


# ------------------------------------------------------------------ every posterior class
def _mlp_data(n=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return [(x[i:i + 8], (x[i:i + 8, 0] > 0).long()) for i in range(0, n, 8)]


def _laplace():
    from conftest import fake_finetune, mlp_peft

    from pyro_llm import fit_laplace

    net = mlp_peft()
    fake_finetune(net)
    return fit_laplace(net, _mlp_data(), progress=False)


def _ensemble():
    from conftest import mlp_peft

    from pyro_llm import EnsemblePosterior

    net = mlp_peft()
    g = torch.Generator().manual_seed(0)
    members = [{n: torch.randn(p.shape, generator=g) for n, p in net.named_parameters() if p.requires_grad}
               for _ in range(6)]
    return EnsemblePosterior(members, peft_model=net)


def _polar_vbll():
    from pyro_llm import PolarVBLL, VBLLClassification

    return PolarVBLL(None, VBLLClassification(5, 3, num_data=10), None)


def _blob():
    from conftest import mlp_peft

    from pyro_llm import fit_blob

    return fit_blob(mlp_peft(), _mlp_data(), max_steps=2, progress=False,
                    logits_fn=lambda m, b: m(b[0]), labels_fn=lambda b: b[1])


@pytest.mark.parametrize("make", [_laplace, _ensemble, _polar_vbll, _blob])
def test_every_posterior_exports(make):
    post = make()
    idata = to_arviz(post)
    post_vars = idata.posterior
    assert post_vars.sizes["chain"] >= 2
    assert all(len(n) <= 24 and "site" in post_vars[n].attrs for n in post_vars.data_vars)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        summ = az.summary(idata, round_to="none")
    if make is _ensemble:  # M members, each once, in order, chain-major
        assert post_vars.sizes["chain"] * post_vars.sizes["draw"] == 6
        site = "base_model.model.2.lora_B.default.weight"
        norms = torch.stack([m[site].double().norm() for m in post.members])
        np.testing.assert_allclose(flat(post_vars["2.B:norm"]), norms.numpy(), rtol=1e-12)
    else:
        assert post_vars.sizes["draw"] * post_vars.sizes["chain"] == 400
        assert (summ["ess_bulk"] > 50).all() and np.isfinite(summ["r_hat"]).all()
    if make in (_laplace, _blob):
        assert {"0:delta_norm", "2:delta_norm"} <= set(post_vars.data_vars)


@pytest.mark.parametrize("s, chains, expected", [
    (16, None, 4), (12, None, 2), (6, None, 2), (6, 3, 3), (5, None, 1), (2, None, 1)])
def test_chain_layout(s, chains, expected):
    draws = {"w": torch.arange(float(s))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = to_arviz(draws, chains=chains)
    assert idata.posterior.sizes["chain"] == expected
    np.testing.assert_array_equal(flat(idata.posterior["w"]), np.arange(s))  # chain-major order
    assert any("1 chain" in str(w.message) for w in caught) == (expected == 1)


def test_point_posterior_is_one_draw_and_fixed_values_enter_the_update_norm():
    """A degenerate posterior (MAP) exports its one draw; a posterior's ``fixed`` point estimates
    (here B of an A-only posterior) enter ``:delta_norm``, not whatever the param store holds."""
    from pyro_llm.point import PointPosterior

    net = torch.nn.Sequential(torch.nn.Linear(3, 5))
    net = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"]))
    point = PointPosterior({"w": torch.ones(2)}, model=net)
    assert to_arviz(point).posterior["w"].shape == (1, 1, 2)
    lora = BayesianLoRA(net, prior=0.1, select="A")
    a_site, b_site = lora.site_names[0], lora.site_name("base_model.model.0.lora_B.default.weight")
    b = torch.randn(5, 2)
    post = GuidePosterior(lambda: {a_site: pyro.sample(a_site, pyro.distributions.Normal(
        torch.zeros(2, 3), 1.0).to_event(2))}, lora=lora, fixed={b_site: b})
    pyro.clear_param_store()
    pyro.param(b_site, torch.zeros(5, 2))  # stale: must not be read
    idata = to_arviz(post, num_samples=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = torch.stack([d[a_site] for d in post.sample(16)]).double()
    scaling = net.base_model.model[0].scaling["default"]
    expected = torch.linalg.norm(scaling * b.double() @ a, dim=(-2, -1))
    np.testing.assert_allclose(flat(idata.posterior["0:delta_norm"]), expected, rtol=1e-10)
