"""The result of a regression: a coefficient table, an ArviZ object and a forest plot."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

__all__ = ["RegressionResult", "compare", "forest_plot"]


@dataclass(frozen=True)
class RegressionResult:
    """Coefficients of one estimator.

    ``coef`` (p,) and ``cov`` (p, p) give the estimate and its covariance; ``draws`` (S, p), when
    present, are posterior (or Bayesian bootstrap) draws that :meth:`to_arviz` exports.
    ``interval`` says how intervals are formed: ``"normal"`` (estimate ± z·se) or
    ``"quantile"`` (equal-tailed quantiles of the draws). ``level`` is their coverage.
    """

    method: str
    coef_names: tuple[str, ...]
    coef: np.ndarray
    cov: np.ndarray
    level: float = 0.95
    draws: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    interval_kind: str = "auto"

    def __post_init__(self):
        if not 0 < self.level < 1:
            raise ValueError(f"level must be in (0, 1), got {self.level}")
        if self.interval_kind not in ("auto", "normal", "quantile"):
            raise ValueError("interval_kind must be 'auto', 'normal' or 'quantile', got "
                             f"{self.interval_kind!r}")
        if self.interval_kind == "quantile" and self.draws is None:
            raise ValueError("interval_kind='quantile' needs draws")

    @property
    def sd(self) -> np.ndarray:
        return np.sqrt(np.diag(self.cov))

    se = sd

    @property
    def quantile_intervals(self) -> bool:
        return self.interval_kind == "quantile" or (self.interval_kind == "auto" and self.draws is not None)

    def interval(self, level: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        level = self.level if level is None else level
        tail = (1 - level) / 2
        if self.quantile_intervals:
            lo, hi = np.quantile(self.draws, [tail, 1 - tail], axis=0)
            return lo, hi
        half = NormalDist().inv_cdf(1 - tail) * self.sd
        return self.coef - half, self.coef + half

    @property
    def z(self) -> np.ndarray:
        return self.coef / self.sd

    @property
    def p(self) -> np.ndarray:
        """Two-sided p-values of the normal approximation, H0: coefficient = 0."""
        return np.array([math.erfc(abs(v) / math.sqrt(2)) for v in self.z])

    def __getitem__(self, name: str) -> dict:
        """``result["stance"]`` -> {"mean", "median", "sd", "z", "p", "lower", "upper"} for one
        coefficient."""
        if name not in self.coef_names:
            raise KeyError(f"no coefficient {name!r}; the coefficients are {list(self.coef_names)}")
        i = self.coef_names.index(name)
        lo, hi = self.interval()
        return {"mean": float(self.coef[i]), "median": float(self.median[i]), "sd": float(self.sd[i]),
                "z": float(self.z[i]), "p": float(self.p[i]), "lower": float(lo[i]), "upper": float(hi[i])}

    @property
    def median(self) -> np.ndarray:
        """The posterior median (quantile intervals) or the estimate (normal intervals)."""
        return np.median(self.draws, axis=0) if self.quantile_intervals else self.coef

    def summary(self) -> pd.DataFrame:
        """One row per coefficient: estimate, standard error, z, p and the interval's bounds (named by
        their quantiles); the table's ``attrs`` carry N, the labelled rows and the effective gain."""
        lo, hi = self.interval()
        tail = (1 - self.level) / 2
        table = pd.DataFrame({"estimate": self.coef, "se": self.sd, "z": self.z, "p": self.p,
                              f"{tail:.3g}": lo, f"{1 - tail:.3g}": hi},
                             index=pd.Index(self.coef_names, name=self.method))
        eff = self.info.get("effective_labelled")
        if eff is not None:
            table["eff. labelled n"] = eff
        table.attrs.update({k: self.info[k] for k in ("n", "n_labelled", "lam") if k in self.info})
        return table

    def header(self) -> str:
        """The lines above the table: method, rows, labelled rows, and the method's own diagnostics."""
        info = self.info
        parts = [f"method={self.method!r}", f"level={self.level}"]
        if "n" in info:
            parts.append(f"N={info['n']}, labelled n={info.get('n_labelled')}")
        lines = ["RegressionResult(" + ", ".join(parts) + ")"]
        if "lam" in info:
            lines.append(f"  PPI++ power-tuning lambda = {info['lam']:.3f}")
        if "completion_log_loss" in info:
            lines.append("  completion model, held-out labelled rows: log-loss "
                         f"{info['completion_log_loss']:.4f} "
                         f"(class frequencies alone {info['marginal_log_loss']:.4f}), "
                         f"Brier {info['completion_brier']:.4f}")
        if "completion_r2" in info:
            lines.append(f"  completion model, held-out labelled rows: R^2 {info['completion_r2']:.3f}")
        if "effective_labelled" in info:
            lines.append("  eff. labelled n = labelled n x Var(labelled only) / Var(this estimate)")
        if "fold_accuracy" in info:
            acc = ", ".join(f"{a:.3f}" for a in np.atleast_1d(info["fold_accuracy"]))
            lines.append(f"  coder's cross-fitted accuracy per fold: {acc}")
        if "hausman_p" in info:
            lines.append("  Hausman check against 'dr': p = "
                         + ", ".join(f"{p:.3g}" for p in np.atleast_1d(info["hausman_p"])))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"{self.header()}\n{self.summary().round(4).to_string()}"

    def to_arviz(self, num_samples: int = 1000, seed: int = 0):
        """An ArviZ object with one variable per coefficient (one chain).

        Draw-based methods export their draws; the frequentist baselines export draws from
        their normal sampling distribution (marked in the attributes), so ``az.summary`` and
        ``az.plot_forest`` work on all of them alike.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import arviz as az
        if self.draws is not None:
            draws, source = self.draws, "posterior draws"
        else:
            rng = np.random.default_rng(seed)
            draws = rng.multivariate_normal(self.coef, self.cov, size=num_samples)
            source = "normal approximation"
        return az.from_dict(posterior={n: draws[None, :, i] for i, n in enumerate(self.coef_names)},
                            attrs={"method": self.method, "draws": source})

    def plot_forest(self, *others: RegressionResult, path: str | os.PathLike | None = None) -> Figure:
        return forest_plot([self, *others], path=path)


def compare(results: Sequence[RegressionResult], coef: str | None = None) -> pd.DataFrame:
    """Stack several results' summaries (optionally one coefficient) into one table."""
    tables = [r.summary().rename_axis("coef").reset_index().assign(method=r.method) for r in results]
    out = pd.concat(tables, ignore_index=True)
    if coef is not None:
        out = out[out["coef"] == coef]
    return out.set_index(["coef", "method"])


def forest_plot(results: Sequence[RegressionResult], coefs: Sequence[str] | None = None,
                path: str | os.PathLike | None = None, title: str | None = None) -> Figure:
    """Point estimates and intervals, one row per coefficient, one colour per method."""
    results = list(results)
    if not results:
        raise ValueError("forest_plot needs at least one result")
    coefs = list(coefs or results[0].coef_names)
    fig = Figure(figsize=(6.5, 0.55 * len(coefs) * len(results) ** 0.5 + 1.2))
    ax = fig.subplots()
    offsets = np.linspace(-0.25, 0.25, len(results)) if len(results) > 1 else [0.0]
    for off, res in zip(offsets, results, strict=True):
        keep = [res.coef_names.index(c) for c in coefs if c in res.coef_names]
        rows = [coefs.index(res.coef_names[i]) for i in keep]
        lo, hi = res.interval()
        pos = np.array(rows) + off
        ax.errorbar(res.coef[keep], pos, xerr=[res.coef[keep] - lo[keep], hi[keep] - res.coef[keep]],
                    fmt="o", capsize=3, label=f"{res.method} ({res.level:.0%})")
    ax.set_yticks(range(len(coefs)), coefs)
    ax.invert_yaxis()
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("coefficient")
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120, bbox_inches="tight")
    return fig
