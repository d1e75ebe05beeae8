"""Reliability diagram and loss trace figures."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyro_llm import FitResult
from pyro_llm.metrics import ece, reliability_bins
from pyro_llm.plots import elbo_trace, reliability_diagram


@pytest.fixture(scope="module")
def probs_y():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (200,), generator=g)
    sharp = torch.softmax(3 * torch.randn(200, 3, generator=g), -1)
    soft = torch.softmax(0.5 * torch.randn(200, 3, generator=g), -1)
    return {"MAP": sharp, "Bayesian": soft}, y


def test_reliability_png_written(probs_y, tmp_path):
    probs, y = probs_y
    path = tmp_path / "rel.png"
    fig = reliability_diagram(probs, y, n_bins=10, path=path)
    assert isinstance(fig, Figure)
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_reliability_bins_and_legend_match_metrics(probs_y):
    probs, y = probs_y
    fig = reliability_diagram(probs, y, n_bins=10)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("perfect")]
    assert [ln.get_label() for ln in lines] == [
        f"{name} (ECE {float(ece(p.double(), y, 10)):.3f})" for name, p in probs.items()]
    for line, p in zip(lines, probs.values(), strict=True):
        conf, acc, count = reliability_bins(p.double(), y, 10)
        keep = (count > 0).numpy()
        np.testing.assert_allclose(line.get_xdata(), conf.numpy()[keep])
        np.testing.assert_allclose(line.get_ydata(), acc.numpy()[keep])
    diag = [ln for ln in ax.get_lines() if ln.get_label().startswith("perfect")][0]
    np.testing.assert_array_equal(diag.get_xdata(), [0, 1])
    assert ax.get_xlabel() == "confidence" and ax.get_ylabel() == "accuracy"


def test_reliability_bad_inputs(probs_y):
    probs, y = probs_y
    with pytest.raises(ValueError, match="empty"):
        reliability_diagram({}, y)
    with pytest.raises(ValueError, match="labels must have shape"):
        reliability_diagram(probs, y[:5])


def test_elbo_trace(tmp_path):
    losses = tuple(float(v) for v in 100 * torch.exp(-torch.arange(50) / 10.0) + 5)
    res = FitResult(method="svi", guide=None, params={}, losses=losses)
    fig = elbo_trace(res, path=tmp_path / "elbo.png", smooth=5)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), losses)
    assert len(ax.get_lines()) == 2 and ax.get_ylabel() == "negative ELBO"
    assert (tmp_path / "elbo.png").stat().st_size > 1000
    fig2 = elbo_trace({"map": [3.0, 2.0, 1.0], "svi": res})
    assert len(fig2.axes[0].get_lines()) == 2
    assert [t.get_text() for t in fig2.axes[0].get_legend().get_texts()] == ["map", "svi"]
    with pytest.raises(ValueError, match="no losses"):
        elbo_trace([])
