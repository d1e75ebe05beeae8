"""Two small diagnostic figures: a reliability diagram and an ELBO (loss) trace.

Both build a :class:`matplotlib.figure.Figure` directly (no pyplot state, no global
backend switch), so they work in scripts, tests and notebooks alike; in a notebook,
``display(fig)`` or leaving the figure as a cell's last value shows it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from matplotlib.figure import Figure

from .metrics import ece, reliability_bins

__all__ = ["reliability_diagram", "elbo_trace"]


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
    y = torch.as_tensor(y).long().cpu()
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for name, probs in probs_by_method.items():
        probs = torch.as_tensor(probs).detach().cpu().double()
        conf, acc, count = reliability_bins(probs, y, n_bins)
        keep = count > 0
        err = float(ece(probs, y, n_bins))
        line, = ax.plot(conf[keep].numpy(), acc[keep].numpy(), marker="o", ms=0,
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

