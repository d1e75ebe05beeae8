"""to_arviz: draws of a tiny peft model's BayesianLoRA plus a regression head, to ArviZ."""

import warnings

import numpy as np
import peft
import pyro
import pytest
import torch

from pyro_llm import BayesianLoRA, GuidePosterior, fit_svi, likelihoods, stack_draws
from pyro_llm.arviz_io import to_arviz

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

S, N, C = 12, 9, 3


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
    assert {f"{n}:norm" for n in lora.site_names} <= names
    assert {"base_model.model.0:delta_norm", "base_model.model.2:delta_norm"} <= names
    assert not any(n in names for n in lora.site_names)  # no raw matrices by default
    assert idata.posterior.sizes["chain"] == 1 and idata.posterior.sizes["draw"] == S


def test_summary_rows_and_values(idata, draws, lora):
    summ = az.summary(idata, kind="stats")
    site = lora.site_names[1]
    expected = {"head.intercept", "head.sigma", "head.coef[0]", "head.coef[2]", f"{site}:norm",
                "base_model.model.2:delta_norm"}
    assert expected <= set(summ.index)
    assert summ.loc["head.sigma", "mean"] == pytest.approx(draws["head.sigma"].mean().item(),
                                                           abs=1e-3)
    full = az.summary(idata, var_names=["head.sigma"], kind="stats", round_to="none")
    np.testing.assert_allclose(full.loc["head.sigma", "mean"],
                               draws["head.sigma"].double().mean().item(), rtol=1e-12)
    norm = idata.posterior[f"{site}:norm"].values[0]
    np.testing.assert_allclose(norm, torch.linalg.norm(draws[site].double(), dim=(-2, -1)))


def test_delta_norm_uses_peft_scaling(idata, draws, lora):
    layer = lora.peft_model.base_model.model[2]
    scaling = layer.scaling["default"]
    assert scaling == 2.0  # lora_alpha / r
    a = draws["base_model.model.2.lora_A.default.weight"].double()
    b = draws["base_model.model.2.lora_B.default.weight"].double()
    expected = torch.linalg.norm(scaling * b @ a, dim=(-2, -1))
    np.testing.assert_allclose(idata.posterior["base_model.model.2:delta_norm"].values[0],
                               expected, rtol=1e-10)


def test_raw_matrices_on_request(lora, draws):
    site = lora.site_names[0]
    idata = to_arviz(draws, lora=lora, var_names=[site])
    assert idata.posterior[site].shape == (1, S, *draws[site].shape[1:])
    np.testing.assert_array_equal(idata.posterior[site].values[0], draws[site].double().numpy())
    assert f"{site}:norm" in idata.posterior
    none = to_arviz(draws, lora_summary=None)
    assert not any(":" in n or ".lora_" in n for n in none.posterior.data_vars)


def test_log_likelihood_exact_and_loo(idata, probs_y):
    probs, y = probs_y
    ll = idata.log_likelihood["y"]
    assert ll.dims == ("chain", "draw", "obs") and ll.shape == (1, S, N)
    expected = probs.double().gather(-1, y.expand(S, -1).unsqueeze(-1)).squeeze(-1).log()
    np.testing.assert_array_equal(ll.values[0], expected.numpy())
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
    assert pp.shape == (1, S, N)
    np.testing.assert_array_equal(pp.values[0], onehot.argmax(-1).numpy())


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
    idata = to_arviz(post, num_samples=5, lora=lora)
    assert idata.posterior["head.coef"].shape == (1, 5, C)
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
    np.testing.assert_allclose(idata.posterior["base_model.model.0:delta_norm"].values[0],
                               expected, rtol=1e-10)
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
    with pytest.raises(ValueError, match="num_samples"):
        to_arviz(GuidePosterior(lambda: None))
    with pytest.raises(TypeError, match="list of"):
        to_arviz(3.0)
    with pytest.raises(ValueError, match="obs_name"):
        to_arviz({"y": torch.zeros(2)}, y=torch.zeros(3, dtype=torch.long))


def test_stack_draws_input(draws):
    listed = [{"head.sigma": draws["head.sigma"][s]} for s in range(S)]
    idata = to_arviz(stack_draws(listed))
    assert idata.posterior["head.sigma"].shape == (1, S)
