"""Diagnostic figures: reliability diagram, ELBO (loss) trace, selective prediction,
entropy against mutual information (seed 004), and per-layer adapter stable ranks.

Both build a :class:`matplotlib.figure.Figure` directly (no pyplot state, no global
backend switch), so they work in scripts, tests and notebooks alike; in a notebook,
``display(fig)`` or leaving the figure as a cell's last value shows it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure

from .metrics import as_labels, aurc, ece, entropy, mutual_information, reliability_bins, selective_accuracy

__all__ = ["reliability_diagram", "elbo_trace", "selective_prediction", "entropy_mi_scatter",
           "stable_rank_plot"]


def _palette(names) -> dict:
    """One distinct colour per name: matplotlib's tab10 up to 10 names, tab20 up to 20."""
    from matplotlib import colormaps

    names = list(names)
    if len(names) <= 10:
        return {n: f"C{i}" for i, n in enumerate(names)}
    cmap = colormaps["tab20"]
    return {n: cmap(i % 20) for i, n in enumerate(names)}


def _save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120, bbox_inches="tight")
    return fig


def reliability_diagram(
    probs_by_method: Mapping[str, torch.Tensor],
    y: torch.Tensor,
    n_bins: int = 15,
    path: str | os.PathLike | None = None,
    title: str = "Reliability diagram",
) -> Figure:
    """Accuracy against confidence per method, with the diagonal and each ECE in the legend.

    Parameters
    ----------
    probs_by_method:
        ``{method name: (N, C) predictive probabilities}``; one line per method.
    y:
        Integer labels ``(N,)``.
    n_bins:
        Equal-width confidence bins (as in :func:`pyro_llm.metrics.reliability_bins`);
        empty bins are not drawn. Marker area grows with the bin's count.
    path:
        If given, the figure is also saved there (PNG by the suffix).

    Example
    -------
    >>> import torch
    >>> p = torch.softmax(torch.randn(100, 2), -1)
    >>> fig = reliability_diagram({"MAP": p}, torch.randint(0, 2, (100,)))
    >>> fig.axes[0].get_xlabel()
    'confidence'
    """
    if not probs_by_method:
        raise ValueError("probs_by_method is empty: give at least one {name: (N, C) probs}")
    y = as_labels(y).cpu()
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    colors = _palette(probs_by_method)
    for name, probs in probs_by_method.items():
        probs = torch.as_tensor(probs).detach().cpu().double()
        conf, acc, count = reliability_bins(probs, y, n_bins)
        keep = count > 0
        err = float(ece(probs, y, n_bins))
        line, = ax.plot(conf[keep].numpy(), acc[keep].numpy(), marker="o", ms=0, color=colors[name],
                        label=f"{name} (ECE {err:.3f})")
        sizes = 200 * (count[keep] / count.sum()).numpy() + 10
        ax.scatter(conf[keep].numpy(), acc[keep].numpy(), s=sizes, color=line.get_color())
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def elbo_trace(
    losses, path: str | os.PathLike | None = None, smooth: int = 0, title: str | None = None
) -> Figure:
    """The training loss per step (negative ELBO for SVI) of a ``FitResult`` or a sequence.

    ``losses`` may also be ``{name: FitResult or sequence}`` for several curves. ``smooth``
    adds a running mean over that many steps. The y axis is symmetric-log when the losses
    span several orders of magnitude.
    """
    curves = dict(losses) if isinstance(losses, Mapping) else {None: losses}
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    span = []
    for name, c in curves.items():
        values = torch.as_tensor(list(getattr(c, "losses", c)), dtype=torch.float64)
        if values.numel() == 0:
            raise ValueError(f"no losses to plot{f' for {name!r}' if name else ''}")
        steps = torch.arange(1, values.numel() + 1).numpy()
        line, = ax.plot(steps, values.numpy(), lw=1, alpha=0.5 if smooth > 1 else 1.0,
                        label=name)
        if smooth > 1 and values.numel() >= smooth:
            kernel = torch.ones(1, 1, smooth, dtype=torch.float64) / smooth
            run = torch.nn.functional.conv1d(values[None, None], kernel)[0, 0]
            ax.plot(steps[smooth - 1:], run.numpy(), color=line.get_color(), lw=2)
        span.append(values.abs().max() / values.abs().clamp_min(1e-12).min())
    if max(float(s) for s in span) > 1e3:
        ax.set_yscale("symlog")
    method = getattr(next(iter(curves.values())), "method", None)
    ylabel = "negative ELBO" if method == "svi" else "loss"
    ax.set(xlabel="step", ylabel=ylabel, title=title or "Training loss")
    if any(n is not None for n in curves):
        ax.legend(fontsize=8)
    return _save(fig, path)



def _mean_and_samples(probs: torch.Tensor, name: str):
    probs = torch.as_tensor(probs).detach().cpu().double()
    if probs.dim() == 3:
        return probs.mean(0), probs
    if probs.dim() == 2:
        return probs, None
    raise ValueError(f"probabilities for {name!r} must have shape (N, C) or (S, N, C), got "
                     f"{tuple(probs.shape)}")


def _selective_panel(ax, curves, y: torch.Tensor, kind: str, colors, min_kept: int) -> None:
    """One panel: accuracy against the fraction set aside, with oracle and random lines."""
    for name, (probs, scores) in curves.items():
        cov, acc = selective_accuracy(probs, y, scores)
        kept = cov * y.numel()
        show = (kept >= min(min_kept, y.numel())).numpy()
        frac = (1 - cov).numpy()[show]
        area = float(aurc(probs, y, scores))
        line, = ax.plot(frac, acc.numpy()[show], lw=1.5, color=colors[name],
                        label=f"{name} (AURC {area:.3f})")
        line.set_gid(f"{kind}:{name}")
        n_correct = float((probs.argmax(-1) == y).sum())
        oracle = (n_correct / kept).clamp(max=1.0)
        o, = ax.plot(frac, oracle.numpy()[show], ls=":", lw=1, color=colors[name])
        o.set_gid(f"oracle:{name}")
        r = ax.axhline(n_correct / y.numel(), ls="--", lw=0.8, color=colors[name], alpha=0.6)
        r.set_gid(f"random:{name}")
    ax.plot([], [], ls=":", color="black", label="oracle (errors set aside first)")
    ax.plot([], [], ls="--", color="black", alpha=0.6, label="random (expected)")
    ax.set(xlim=(0, 1), xlabel="fraction set aside (most uncertain first)",
           ylabel="accuracy on the rest", title=f"by {kind}")
    ax.legend(fontsize=7, loc="lower right")


def selective_prediction(
    probs_by_method: Mapping[str, torch.Tensor],
    y: torch.Tensor,
    scores: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    min_kept: int = 10,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Accuracy on the examples kept after setting aside the most uncertain ones.

    One panel per uncertainty score: predictive entropy for every method, mutual
    information for the methods given as samples, then one panel per extra ``scores`` kind.
    Each method's curve (legend: its AURC, lower is better) comes with its oracle (dotted:
    the errors are set aside first) and its random-order expectation (dashed: the overall
    accuracy), in the same colour.

    Parameters
    ----------
    probs_by_method:
        ``{name: (N, C) probabilities or (S, N, C) per-sample probabilities}``.
    y:
        Integer labels ``(N,)``.
    scores:
        Optional extra scores ``{kind: {method name: (N,) scores}}`` (higher = more
        uncertain), e.g. ``{"1 - max prob": {...}}``; each kind gets a panel.
    min_kept:
        Curves stop where fewer examples than this remain (accuracy on a handful of
        examples is noise). The AURC in the legend uses every point.
    path:
        If given, the figure is also saved there.

    Example
    -------
    >>> import torch
    >>> s = torch.softmax(torch.randn(5, 100, 3), -1)
    >>> fig = selective_prediction({"ensemble": s}, torch.randint(0, 3, (100,)))
    >>> [ax.get_title() for ax in fig.axes]
    ['by predictive entropy', 'by mutual information']
    """
    if not probs_by_method:
        raise ValueError("probs_by_method is empty: give at least one {name: probs}")
    y = as_labels(y).cpu()
    split = {n: _mean_and_samples(p, n) for n, p in probs_by_method.items()}
    if min_kept < 1:
        raise ValueError(f"min_kept must be >= 1, got {min_kept}")
    colors = _palette(split)  # one colour per method throughout
    panels = {"predictive entropy": {n: (m, entropy(m)) for n, (m, _) in split.items()}}
    mi = {n: (m, mutual_information(s)) for n, (m, s) in split.items() if s is not None}
    if mi:
        panels["mutual information"] = mi
    for kind, by_method in (scores or {}).items():
        unknown = sorted(set(by_method) - set(split))
        if unknown:
            raise ValueError(f"scores[{kind!r}] names methods {unknown} that are not in "
                             f"probs_by_method {list(split)}")
        panels[kind] = {n: (split[n][0], torch.as_tensor(v).detach().cpu().double())
                        for n, v in by_method.items()}
    fig = Figure(figsize=(5 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (kind, curves) in zip(axes, panels.items(), strict=True):
        _selective_panel(ax, curves, y, kind, colors, min_kept)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def entropy_mi_scatter(
    sample_probs: torch.Tensor,
    y: torch.Tensor,
    bins: int = 30,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Seed 004's view: predictive entropy (x) against mutual information (y), as 2-D
    histograms in two panels, correct and incorrect predictions.

    Histograms rather than a scatter: test sets have thousands of points piled up near the
    origin, which a scatter overplots, while the errors are few; two panels on the same
    bins and one logarithmic colour scale (counts) keep both readable. The line ``MI =
    entropy`` bounds the points from above (MI = entropy - expected entropy), and
    ``entropy = log C`` on the right (a uniform prediction). Points near the diagonal are
    "unknown" (members disagree), points low on the right "known-uncertain" (members agree
    on a flat prediction).

    Parameters
    ----------
    sample_probs:
        ``(S, N, C)`` per-sample (or per-member) probabilities.
    y:
        Integer labels ``(N,)``; correctness is judged on the mean prediction.
    bins:
        Bins per axis.

    Example
    -------
    >>> import torch
    >>> s = torch.softmax(torch.randn(5, 200, 3), -1)
    >>> fig = entropy_mi_scatter(s, torch.randint(0, 3, (200,)))
    >>> [ax.get_xlabel() for ax in fig.axes[:2]]
    ['predictive entropy (nats)', 'predictive entropy (nats)']
    """
    from matplotlib.colors import LogNorm

    sample_probs = torch.as_tensor(sample_probs).detach().cpu().double()
    if sample_probs.dim() != 3:
        raise ValueError(f"sample_probs must have shape (S, N, C), got "
                         f"{tuple(sample_probs.shape)}; for one prediction per example use "
                         "reliability_diagram")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    y = as_labels(y).cpu()
    probs = sample_probs.mean(0)
    correct = probs.argmax(-1) == y if y.shape == probs.shape[:1] else None
    if correct is None:
        raise ValueError(f"labels must have shape ({probs.shape[0]},) to match sample_probs, "
                         f"got {tuple(y.shape)}")
    h, mi = entropy(probs).numpy(), mutual_information(sample_probs).numpy()
    h_max = float(torch.tensor(float(probs.shape[-1])).log())
    edges = torch.linspace(0, h_max * 1.0001, bins + 1).numpy()
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    groups = [("correct", correct.numpy()), ("incorrect", ~correct.numpy())]
    counts = [np.histogram2d(h[m], mi[m], bins=[edges, edges])[0] for _, m in groups]
    norm = LogNorm(vmin=1, vmax=max(2.0, *(float(c.max()) for c in counts)))
    mesh = None
    for ax, (name, m), c in zip(axes, groups, counts, strict=True):
        # rows of c are entropy bins (x); pcolormesh wants (y, x); empty bins stay blank
        mesh = ax.pcolormesh(edges, edges, np.ma.masked_equal(c.T, 0), norm=norm,
                             cmap="viridis")
        ax.plot([0, h_max], [0, h_max], ls="--", color="grey", lw=1, label="MI = entropy")
        ax.axvline(h_max, ls=":", color="grey", lw=1, label="log C")
        ax.set(xlabel="predictive entropy (nats)", title=f"{name} (n = {int(m.sum())})",
               xlim=(0, h_max * 1.02), ylim=(0, h_max * 1.02))
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("mutual information (nats)")
    fig.colorbar(mesh, ax=list(axes), label="examples per bin")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def stable_rank_plot(
    ranks_by_adapter: Mapping[str, Mapping[str, float]],
    rank: int | None = None,
    path: str | os.PathLike | None = None,
    title: str = "Stable rank of each LoRA update",
) -> Figure:
    """Grouped bars: the stable rank of ``Delta W`` per layer, one colour per adapter.

    ``ranks_by_adapter`` is ``{name: {layer: stable rank}}`` as returned by
    :func:`pyro_llm.diagnostics.adapter_stable_ranks` (e.g. MAP vs a posterior mean).
    Layers are in order of first appearance; the common prefix of their names is dropped
    from the tick labels. ``rank`` draws the LoRA rank ``r``, the largest possible value.

    Example
    -------
    >>> fig = stable_rank_plot({"MAP": {"q": 1.5, "v": 2.0}, "mean": {"q": 1.2, "v": 1.8}},
    ...                        rank=8)
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['q', 'v']
    """
    if not ranks_by_adapter or not any(ranks_by_adapter.values()):
        raise ValueError("ranks_by_adapter is empty: give {name: {layer: stable rank}}")
    layers = list(dict.fromkeys(k for r in ranks_by_adapter.values() for k in r))
    prefix = os.path.commonprefix(layers) if len(layers) > 1 else ""
    prefix = prefix[:prefix.rfind(".") + 1]  # cut at a dot, keep whole name parts
    labels = [name[len(prefix):] for name in layers]
    k = len(ranks_by_adapter)
    width = 0.8 / k
    fig = Figure(figsize=(max(5.0, 0.45 * len(layers) * k + 2), 4), layout="constrained")
    ax = fig.add_subplot()
    x = torch.arange(len(layers), dtype=torch.float64)
    for i, (name, ranks) in enumerate(ranks_by_adapter.items()):
        heights = [float(ranks.get(layer, float("nan"))) for layer in layers]
        ax.bar((x + (i - (k - 1) / 2) * width).numpy(), heights, width, label=name)
    if rank is not None:
        ax.axhline(rank, ls="--", color="grey", lw=1, label=f"LoRA rank r = {rank}")
    ax.set_xticks(x.numpy(), labels, rotation=90 if len(layers) > 8 else 0, fontsize=7)
    ax.set(ylabel="stable rank ||dW||_F^2 / ||dW||_2^2", title=title, ylim=(0, None))
    ax.legend(fontsize=8)
    return _save(fig, path)
