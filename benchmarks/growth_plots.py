"""Figures and the docs table of ``benchmarks/growth.py`` (its results JSON in, PNG / Markdown out)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _line(ax, x, fit: dict, per: float = 1.0, **kw):
    """The fitted line at ``x`` (the fit took ``x / per``: e.g. thousands of documents)."""
    x = np.asarray(x, float)
    u = x / per
    y = np.exp(fit["intercept"]) * u ** fit["slope"] if fit["log"] else fit["intercept"] + fit["slope"] * u
    ax.plot(x, y, **kw)


def _predictive(res, fig):
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, s) in enumerate(res["series"].items()):
        c = f"C{i}"
        ax.plot(s["draws"], s["map_forwards"], "o-", color=c,
                label=f"{name}: {s['fit']['slope']:.2f} fwd/draw")
        d = np.asarray(s["draws"], float)
        ax.plot(d, 1 + s["floor_per_draw"] * d, ":", color=c, lw=1)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="posterior draws S",
           ylabel="seconds / one MAP forward",
           title="predictive of one batch\n(black: one backbone pass; dotted: + k/6 per draw,\n"
                 "the random blocks at every position)")
    ax.legend(fontsize=8)


def _memory(res, fig):
    for j, axis in enumerate(("blocks", "rank")):
        ax = fig.add_subplot(1, 2, j + 1)
        r = res[axis]
        for i, (k, ys) in enumerate(r["bytes"].items()):
            ax.plot(r["values"], np.asarray(ys) / 2**20, "o-", color=f"C{i}",
                    label=f"{k}: exponent {r['fit'][k]['slope']:.2f}")
        ax.plot(r["values"], np.asarray(r["adapter_float32_bytes"]) / 2**20, "k:", label="adapter (float32)")
        ax.plot(r["values"], np.asarray(r["full_float64_bytes"]) / 2**20, "k--", lw=0.8,
                label="full (computed)")
        ax.set(xscale="log", yscale="log", ylabel="MiB",
               xlabel="adapted blocks (r = 8)" if axis == "blocks" else "LoRA rank (6 blocks)")
        ax.legend(fontsize=7)
    fig.suptitle("Laplace curvature memory")


def _corpus(res, fig):
    ax = fig.add_subplot(1, 2, 1)
    f = res["fit"]
    ax.plot(f["docs"], f["seconds"], "o-", label=f"KFAC fit: {f['fit']['slope']:.1f} s / 1k")
    ax.plot(f["docs"], f["floor_seconds"], "k:", label="floor: MAP steps")
    ax.set(xlabel="training reviews", ylabel="seconds", title="fit")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    for i, name in enumerate(("code_map", "code_s16")):
        c = res[name]
        ax.plot(c["docs"], c["seconds"], "o-", color=f"C{i}",
                label=f"{name[5:]}: {c['fit']['slope']:.1f} s / 1k")
    ax.plot(res["code_map"]["docs"], res["code_floor_seconds"], "k:", label="floor: MAP forwards")
    ax.set(xlabel="reviews coded", ylabel="seconds", title="coding a corpus")
    ax.legend(fontsize=8)


def _regress(res, fig):
    for j, axis in enumerate(("docs", "folds")):
        ax = fig.add_subplot(1, 2, j + 1)
        r = res[axis]
        x = np.asarray(r["values"], float)
        ax.plot(x, r["seconds"], "o")
        _line(ax, x, r["fit"], per=1000 if axis == "docs" else 1, color="C0", lw=0.8)
        unit = "s / 1k reviews" if axis == "docs" else "s / fold"
        ax.set(xlabel="reviews N (5 folds)" if axis == "docs" else f"folds (N = {r['docs']})",
               ylabel="seconds", title=f"regress: {r['fit']['slope']:.1f} {unit}")
    fig.suptitle(f"one call, {res['labelled']} labelled rows")


PLOTS = {"predictive": _predictive, "memory": _memory, "corpus": _corpus, "regress": _regress}


def plot(name: str, res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(5 if name == "predictive" else 9, 3.8))
    PLOTS[name](res, fig)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rows(name: str, res: dict) -> list[str]:
    if name == "predictive":
        return [f"| predictive, adapter on top {k[3:]} block(s) | S = {s['draws'][0]}–{s['draws'][-1]} "
                f"| {s['fit']['slope']:.3f} MAP forwards / draw | 1 pass + {s['floor_per_draw']:.3f} / draw "
                "(the blocks at every position) |"
                for k, s in res["series"].items()]
    if name == "memory":
        out = []
        for axis in ("blocks", "rank"):
            r = res[axis]
            for k, fit in r["fit"].items():
                mib = r["bytes"][k][-1] / 2**20
                out.append(f"| {k} curvature memory vs {axis} | {r['values'][0]}–{r['values'][-1]} "
                           f"| exponent {fit['slope']:.2f} ({mib:.2f} MiB at {r['values'][-1]}) "
                           f"| adapter {r['adapter_float32_bytes'][-1] / 2**20:.2f} MiB |")
        return out
    if name == "corpus":
        f = res["fit"]
        floor = 1000 * f["floor_seconds"][-1] / f["docs"][-1]
        out = [f"| KFAC fit vs training reviews | {f['docs'][0]}–{f['docs'][-1]} "
               f"| {f['fit']['slope']:.1f} s / 1k | {floor:.1f} s / 1k (MAP steps) |"]
        code_floor = 1000 * res["code_floor_seconds"][-1] / res["code_map"]["docs"][-1]
        for key, label in (("code_map", "MAP"), ("code_s16", "S = 16, top block")):
            c = res[key]
            out.append(f"| coding a corpus ({label}) | {c['docs'][0]}–{c['docs'][-1]} "
                       f"| {c['fit']['slope']:.1f} s / 1k | {code_floor:.1f} s / 1k (MAP forwards) |")
        return out
    r = res["docs"]
    k = res["folds"]
    return [f"| `regress` vs N (5 folds, {res['labelled']} labelled) | {r['values'][0]}–{r['values'][-1]} "
            f"| {r['fit']['slope']:.1f} s / 1k | coding once |",
            f"| `regress` vs folds (N = {k['docs']}) | {k['values'][0]}–{k['values'][-1]} "
            f"| {k['fit']['slope']:.1f} s / fold | — |"]


def table(path: Path = RESULTS / "growth.json") -> str:
    """The docs table: one row per fitted slope, with the floor it is measured against."""
    res = json.loads(path.read_text())
    lines = ["| what grows | range | fitted slope | measured against |", "| --- | --- | ---: | ---: |"]
    for name in ("predictive", "memory", "corpus", "regress"):
        if name in res:
            lines += _rows(name, res[name])
    return "\n".join(lines)
