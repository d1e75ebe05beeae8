"""Reliability diagram, loss trace, selective prediction, entropy-MI and stable-rank figures."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyro_llm import FitResult
from pyro_llm.metrics import aurc, ece, entropy, mutual_information, reliability_bins, selective_accuracy
from pyro_llm.plots import (
    elbo_trace,
    entropy_mi_scatter,
    reliability_diagram,
    selective_prediction,
    stable_rank_plot,
)


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


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def samples_y():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (150,), generator=g)
    logits = 2 * torch.randn(150, 3, generator=g)
    logits[torch.arange(150), y] += 1.5
    noise = torch.randn(4, 150, 3, generator=g) * torch.rand(150, 1, generator=g)
    return torch.softmax(logits + 2 * noise, -1).double(), y


def _by_gid(ax, gid):
    return [ln for ln in ax.get_lines() if ln.get_gid() == gid][0]


def test_selective_prediction_curves(samples_y, tmp_path):
    sp, y = samples_y
    extra = {"1 - max prob": {"MAP": 1 - sp[0].max(-1).values}}
    fig = selective_prediction({"ensemble": sp, "MAP": sp[0]}, y, scores=extra,
                               min_kept=1, path=tmp_path / "sel.png")
    assert _is_png(tmp_path / "sel.png")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [
        "by predictive entropy", "by mutual information", "by 1 - max prob"]
    mean = sp.mean(0)
    for method, probs, score, ax, kind in [
            ("ensemble", mean, entropy(mean), axes[0], "predictive entropy"),
            ("MAP", sp[0], entropy(sp[0]), axes[0], "predictive entropy"),
            ("ensemble", mean, mutual_information(sp), axes[1], "mutual information"),
            ("MAP", sp[0], extra["1 - max prob"]["MAP"], axes[2], "1 - max prob")]:
        cov, acc = selective_accuracy(probs, y, score)
        line = _by_gid(ax, f"{kind}:{method}")
        np.testing.assert_allclose(line.get_xdata(), (1 - cov).numpy())
        np.testing.assert_allclose(line.get_ydata(), acc.numpy())
        assert line.get_label() == f"{method} (AURC {float(aurc(probs, y, score)):.3f})"
        # oracle: all errors set aside first; random: the overall accuracy
        n_right = int((probs.argmax(-1) == y).sum())
        oracle = _by_gid(ax, f"oracle:{method}").get_ydata()
        np.testing.assert_allclose(oracle, np.minimum(1, n_right / (cov.numpy() * 150)))
        assert oracle[0] == pytest.approx(n_right / 150) and oracle[-1] == 1.0
        np.testing.assert_allclose(_by_gid(ax, f"random:{method}").get_ydata(),
                                   [n_right / 150] * 2)
        assert line.get_color() == _by_gid(ax, f"oracle:{method}").get_color()
    # MAP has no samples: it is absent from the mutual-information panel
    assert not [ln for ln in axes[1].get_lines() if ln.get_gid() == "mutual information:MAP"]
    # one colour per method across panels
    assert (_by_gid(axes[0], "predictive entropy:ensemble").get_color()
            == _by_gid(axes[1], "mutual information:ensemble").get_color())


def test_selective_prediction_min_kept_and_bad_input(samples_y):
    sp, y = samples_y
    fig = selective_prediction({"MAP": sp[0]}, y)  # no samples: entropy panel only
    assert len(fig.axes) == 1
    line = _by_gid(fig.axes[0], "predictive entropy:MAP")
    assert len(line.get_xdata()) == 150 - 9  # stops where fewer than 10 remain
    with pytest.raises(ValueError, match="empty"):
        selective_prediction({}, y)
    with pytest.raises(ValueError, match=r"names methods \['Laplace'\] that are not in"):
        selective_prediction({"MAP": sp[0]}, y, scores={"x": {"Laplace": y.double()}})
    with pytest.raises(ValueError, match=r"must have shape \(N, C\) or \(S, N, C\)"):
        selective_prediction({"MAP": sp[0, 0]}, y)


def test_entropy_mi_scatter_histograms(samples_y, tmp_path):
    sp, y = samples_y
    fig = entropy_mi_scatter(sp, y, bins=12, path=tmp_path / "emi.png")
    assert _is_png(tmp_path / "emi.png")
    correct = (sp.mean(0).argmax(-1) == y).numpy()
    left, right = fig.axes[:2]
    assert len(fig.axes) == 3  # two panels and a shared colour bar
    assert left.get_title() == f"correct (n = {correct.sum()})"
    assert right.get_title() == f"incorrect (n = {(~correct).sum()})"
    assert left.get_ylabel() == "mutual information (nats)"
    h, mi = entropy(sp.mean(0)).numpy(), mutual_information(sp).numpy()
    for ax, m in [(left, correct), (right, ~correct)]:
        counts = ax.collections[0].get_array()
        assert counts.sum() == m.sum()  # every example lands in a bin of its panel
        # the bins hold exactly these points (numpy recomputes the histogram)
        edges = np.linspace(0, np.log(3) * 1.0001, 13)
        ref, _, _ = np.histogram2d(h[m], mi[m], bins=[edges, edges])
        np.testing.assert_array_equal(np.ma.filled(counts, 0).reshape(12, 12), ref.T)
    assert (mi <= h + 1e-12).all()  # the MI = entropy line bounds the points
    with pytest.raises(ValueError, match=r"sample_probs must have shape \(S, N, C\)"):
        entropy_mi_scatter(sp[0], y)
    with pytest.raises(ValueError, match=r"labels must have shape \(150,\)"):
        entropy_mi_scatter(sp, y[:10])


def test_stable_rank_plot(tmp_path):
    ranks = {"MAP": {"base_model.model.enc.0.query": 1.5, "base_model.model.enc.0.value": 2.5},
             "posterior mean": {"base_model.model.enc.0.query": 1.2,
                                "base_model.model.enc.1.query": 3.0}}
    fig = stable_rank_plot(ranks, rank=4, path=tmp_path / "sr.png")
    assert _is_png(tmp_path / "sr.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.query", "0.value", "1.query"]
    assert len(ax.containers) == 2
    heights = [[b.get_height() for b in c] for c in ax.containers]
    np.testing.assert_array_equal(heights[0], [1.5, 2.5, np.nan])  # missing layer: no bar
    np.testing.assert_array_equal(heights[1], [1.2, np.nan, 3.0])
    assert [c.get_label() for c in ax.containers] == ["MAP", "posterior mean"]
    assert ax.get_lines()[0].get_ydata()[0] == 4  # the LoRA rank r
    with pytest.raises(ValueError, match="empty"):
        stable_rank_plot({})


def test_many_methods_get_distinct_colours():
    from matplotlib.colors import to_rgba

    from pyro_llm.plots import reliability_diagram

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (50,), generator=g)
    probs = {f"m{i}": torch.softmax(torch.randn(50, 2, generator=g), -1) for i in range(13)}
    fig = reliability_diagram(probs, y)
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("m")]
    assert len(lines) == 13
    assert len({to_rgba(ln.get_color()) for ln in lines}) == 13
