"""The main job, end to end at toy size: files written, table printed, bad options refused."""

import json

import pytest

import pyro_llm
from pyro_llm import demo

TINY = ["--n-train", "24", "--n-test", "24", "--map-epochs", "1", "--svi-epochs", "1",
        "--samples", "2", "--batch-size", "8", "--no-progress", "--labelled-fraction", "0.5",
        "--regress-epochs", "2"]


@pytest.mark.slow
def test_demo_runs_and_writes_its_files(tmp_path, capsys):
    import arviz as az
    from peft import PeftConfig

    from pyro_llm import load_laplace

    report = demo.run(demo.parse_args(TINY + ["--out", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "MAP (LoRA)" in out and "Bayesian LoRA (SVI, S=2)" in out and "Laplace-LoRA (kfac, GLM)" in out
    assert "PoLAR-VBLL" in out and "RegressionResult(method='dr'" in out
    for name in ("posterior.nc", "predictions.nc", "reliability.png", "metrics.json", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    for d in ("adapter_map", "adapter_posterior_mean"):
        assert PeftConfig.from_pretrained(tmp_path / d).r == 8
    la = load_laplace(tmp_path / "laplace")
    assert la.meta["structure"] == "kfac" and len(la.site_names) == 24  # A and B of 12 adapters
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["results"].keys() == report["results"].keys()
    for row in saved["results"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["nll"] > 0 and row["fit_s"] > 0
    text = (tmp_path / "report.md").read_text()  # one report: both tables and the figure
    assert "| PoLAR-VBLL |" in text and "![reliability diagram](reliability.png)" in text
    assert "| doubly robust (default) |" in text and "| naive plug-in of the coder |" in text
    reg = saved["regression"]
    assert reg["n"] == 24 and reg["truth"] == 0.5 and set(reg["rows"]) == {
        "doubly robust (default)", "labelled rows only", "naive plug-in of the coder"}
    pred = az.from_netcdf(tmp_path / "predictions.nc")
    assert pred.log_likelihood["label"].shape == (1, 2, 24)  # S = 2 draws: too few for 2 chains
    idata = az.from_netcdf(tmp_path / "posterior.nc")  # 400 fresh draws in 4 chains: diagnostics work
    assert idata.posterior.sizes["chain"] == 4 and idata.posterior.sizes["draw"] == 100
    summary = az.summary(idata)
    assert summary["r_hat"].between(0.98, 1.05).all() and (summary["ess_bulk"] > 100).all()
    back = pyro_llm.load(tmp_path / "svi_posterior")  # the saved posterior reads back, B sites only
    names = list(back.sample(1)[0])
    assert len(names) == 12 and all(".lora_B." in n for n in names)
    # the Bayesian row is a posterior over B only: A and the head are point estimates
    sites = [idata.posterior[n].attrs["site"] for n in idata.posterior.data_vars]
    assert any(".lora_B." in n for n in sites) and not any(".lora_A." in n for n in sites)


@pytest.mark.parametrize("argv, match", [
    (["--n-train", "0"], "--n-train must be >= 1"),
    (["--samples", "-2"], "--samples must be >= 1"),
    (["--prior-scale", "0"], "must be > 0"),
    (["--labelled-fraction", "1"], "--labelled-fraction must be in"),
    (["--regress-folds", "1"], "--regress-folds must be >= 2"),
])
def test_bad_options_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(argv)
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("csv, error, match", [
    ("text,stance\nhello,1\n", SystemExit, "missing columns \\['label'\\]"),
    ("text,label\ngood film,pos\nbad film,neg\n", ValueError, "requested 48 rows"),
])
def test_bad_csv_is_a_clear_error(tmp_path, csv, error, match):
    f = tmp_path / "texts.csv"
    f.write_text(csv)
    args = demo.parse_args(TINY + ["--data", str(f), "--out", str(tmp_path / "o")])
    with pytest.raises(error, match=match):
        demo.run(args)


@pytest.mark.parametrize("load, want", [(0.3, None), (1.5, 1)])
def test_busy_machine_gets_one_torch_thread(monkeypatch, load, want, capsys):
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    assert demo.busy_threads() == want
    assert ("busy" in capsys.readouterr().out) == (want == 1)
