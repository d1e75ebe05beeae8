"""Coverage benchmark: Monte Carlo over R replications.

Run from the repository root::

    .venv/bin/python benchmarks/coverage.py --quick --out /tmp/coverage_quick.json
    .venv/bin/python benchmarks/coverage.py --out benchmarks/results/coverage.json       # R = 1000
    .venv/bin/python benchmarks/coverage.py --markdown benchmarks/results/coverage.json  # the table

Each replication draws a corpus (``benchmarks/scenarios.py``, ``benchmarks/scenarios_more.py``),
runs every method through ``pyro_llm.regress`` and records the target coefficient's estimate and
95% interval. Reported per method: bias, RMSE, coverage with its Monte Carlo s.e.
``sqrt(c (1 - c) / R)``, mean interval width, seconds per replication (wall and CPU; the method's
own time; the replicate's LLM fitting time is reported once as ``llm_s``). Replications run in
``--workers`` processes (one torch thread each); replication r of the i-th scenario uses seed
``1000 * i + r``, so results do not depend on the number of workers.

Each scenario object also names the default estimator (``"default": "dr"``) and the PPI++ run the
widths are compared with (``"reference"``), and gives the semiparametric efficiency bound's 95%
width of the target coefficient for the corpus (``"bound_width"``: the mean over replications of
``2 · 1.96 · sd`` from :mod:`benchmarks.bound`, with ``"bound_kind"``: ``"analytic"`` when the true
law p(z | s, W) is known from the data-generating process, ``"fitted on all rows"`` for the
fine-tuned classifiers of B3 and S1). Every method gets ``"width_over_bound"`` and
``"width_over_ppi"`` (ratios of mean widths). A method that raises in a replication is recorded
as a failure (``"failures"``, ``"first_error"``) and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)  # so that ``import coverage`` (numba does) is not this file
from benchmarks import scenarios  # noqa: E402

QUICK_R, FULL_R = 200, 1000
JOINT_DRAWS = 200  # posterior draws per joint fit (the interval's quantiles)


def _kwargs(kwargs: dict, coef: str) -> dict:
    """The ``regress`` keywords of a run; ``method="dr"`` falls back to PPI++ (``ptd`` on the same
    predictions) while the library has no ``dr`` (the result then says ``"stand_in": "ptd"``)."""
    import inspect

    from pyro_llm.regression import api

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if kwargs["method"] == "dr" and "dr" not in api.METHODS:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("fold_ids", "prob", "cluster")}
        kwargs.update(method="ptd", tune_for=coef)
    if kwargs["method"] == "joint":
        kwargs = {"num_draws": JOINT_DRAWS, **kwargs}
    if kwargs["method"] == "dr":   # sandwich intervals: the bootstrap draws are not needed here
        kwargs = {"num_draws": 0, **kwargs}
    if "progress" in inspect.signature(api.regress).parameters:
        kwargs.setdefault("progress", False)
    return kwargs


def _one(args):
    name, variant, seed, methods, slow_every = args
    import torch

    from benchmarks import bound
    from pyro_llm.regression import regress

    torch.set_num_threads(1)
    fn, _ = scenarios.SCENARIOS[name]
    start = time.perf_counter()
    rep = fn(seed, **variant)
    out = {"llm_s": rep.llm_s, "build_s": time.perf_counter() - start, "info": rep.info, "methods": {},
           "default": rep.default,
           "reference": rep.reference, "errors": {}}
    if rep.oracle is not None:
        start = time.perf_counter()
        sd, impl = bound.bound_sd(rep)
        out.update(bound_width=2 * bound.Z975 * sd, bound_kind=rep.oracle.kind, bound_impl=impl,
                   bound_s=time.perf_counter() - start)
    for label, kwargs in rep.runs.items():
        if methods and label not in methods:
            continue
        slow = label.startswith("joint") or label.startswith("mi")
        if slow and seed % slow_every:
            continue          # the slow generative methods run on every slow_every-th replication
        start, cpu = time.perf_counter(), time.process_time()
        try:
            if callable(kwargs):  # a method outside regress (B3's end-to-end model)
                res = kwargs()
            else:
                call = _kwargs(kwargs, rep.coef)
                res = regress(rep.df, rep.formula, label=rep.label, role=rep.role, seed=seed, **call)
        except Exception as err:  # noqa: BLE001 - one failed fit is a result, not the end of the run
            out["errors"][label] = f"{type(err).__name__}: {err}"[:300]
            continue
        secs, cpu = time.perf_counter() - start, time.process_time() - cpu
        est = res[rep.coef]
        # the point estimate: the posterior median for draw-based methods (robust to tails)
        out["methods"][label] = {"est": est["median"], "lower": est["lower"], "upper": est["upper"],
                                 "truth": rep.truth, "s": secs, "cpu_s": cpu}
        if not callable(kwargs) and call["method"] != kwargs["method"]:
            out["methods"][label]["stand_in"] = call["method"]
    return out


def summarise(reps: list[dict]) -> dict:
    out = {}
    labels = dict.fromkeys(label for r in reps for label in [*r["methods"], *r.get("errors", {})])
    for label in labels:  # a method may run on a subset of replications (its own R)
        rows = [r["methods"][label] for r in reps if label in r["methods"]]
        failures = [r["errors"][label] for r in reps if label in r.get("errors", {})]
        if not rows:
            out[label] = {"R": 0, "failures": len(failures), "first_error": failures[0]}
            continue
        err = np.array([x["est"] - x["truth"] for x in rows])
        cover = np.array([x["lower"] <= x["truth"] <= x["upper"] for x in rows])
        c, R = float(cover.mean()), len(rows)
        out[label] = {"bias": float(err.mean()),
                      "bias_mcse": float(err.std(ddof=1) / math.sqrt(R)) if R > 1 else float("nan"),
                      "rmse": float(np.sqrt((err ** 2).mean())), "coverage": c,
                      "coverage_mcse": math.sqrt(max(c * (1 - c), 1e-12) / R),
                      "width": float(np.mean([x["upper"] - x["lower"] for x in rows])),
                      "width_median": float(np.median([x["upper"] - x["lower"] for x in rows])),
                      "sec_per_rep": float(np.mean([x["s"] for x in rows])),
                      "cpu_sec_per_rep": float(np.mean([x.get("cpu_s", np.nan) for x in rows])), "R": R}
        stand_in = {x["stand_in"] for x in rows if "stand_in" in x}
        if stand_in:
            out[label]["stand_in"] = sorted(stand_in)[0]
        if failures:
            out[label].update(failures=len(failures), first_error=failures[0])
    return out


def _ratios(result: dict) -> None:
    """``width_over_bound`` and ``width_over_ppi`` of every method (mean widths over replications)."""
    ref = result["methods"].get(result.get("reference") or "", {})
    for m in result["methods"].values():
        if "width" not in m:
            continue
        m["width_over_bound"] = m["width"] / result["bound_width"] if result.get("bound_width") else None
        m["width_over_ppi"] = m["width"] / ref["width"] if ref.get("width") else None


def run_scenario(name: str, variant: dict, R: int, workers: int, index: int, methods=None,
                 slow_every: int = 1) -> dict:
    jobs = [(name, variant, 1000 * index + r, methods, slow_every) for r in range(R)]
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            reps = list(pool.map(_one, jobs, chunksize=max(1, R // (8 * workers))))
    else:
        reps = [_one(j) for j in jobs]
    result = {"scenario": name, "variant": variant, "R": R, "default": reps[0]["default"],
              "reference": reps[0]["reference"], "methods": summarise(reps),
              "llm_s": float(np.mean([r["llm_s"] for r in reps])),
              "build_s": float(np.mean([r["build_s"] for r in reps])),
              "wall_s": time.perf_counter() - start,
              "info": {k: float(np.mean([r["info"][k] for r in reps])) for k in reps[0]["info"]}}
    if "bound_width" in reps[0]:
        result.update(bound_width=float(np.mean([r["bound_width"] for r in reps])),
                      bound_kind=reps[0]["bound_kind"], bound_impl=reps[0]["bound_impl"],
                      bound_s=float(np.mean([r["bound_s"] for r in reps])))
    _ratios(result)
    return result


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _reference(res: dict):
    """The PPI++ run widths are compared with (older JSON: the first PPI++ that is not "reuse")."""
    if res.get("reference") in res["methods"]:
        return res["methods"][res["reference"]]
    return next((m for k, m in res["methods"].items() if k.startswith("ppi++") and "reuse" not in k), None)


def _relative(res: dict, m: dict) -> tuple[str, str]:
    ppi, bw = _reference(res), res.get("bound_width")
    over_bound = m["width"] / bw if bw else None
    over_ppi = m["width"] / ppi["width"] if ppi and ppi.get("width") else None
    return _ratio(over_bound), _ratio(over_ppi)


def table(result: dict) -> str:
    bound = (f"  bound width={result['bound_width']:.4f} ({result['bound_kind']}, {result['bound_impl']})"
             if result.get("bound_width") else "")
    lines = [f"{result['scenario']} {result['variant']}  R={result['R']}  "
             + "  ".join(f"{k}={v:.3f}" for k, v in result["info"].items())
             + (f"  llm_s={result['llm_s']:.1f}" if result["llm_s"] else "") + bound,
             f"  {'method':<26}{'R':>5}{'bias':>9}{'rmse':>8}{'coverage':>10}{'(mcse)':>8}"
             f"{'width':>8}{'(median)':>9}{'/bound':>8}{'/PPI++':>8}{'s/rep':>8}"]
    for label, m in result["methods"].items():
        name = label + (" *" if label == result.get("default") else "")
        if not m["R"]:
            lines.append(f"  {name:<26}{0:>5}  all {m['failures']} failed: {m['first_error'][:80]}")
            continue
        rb, rp = _relative(result, m)
        note = (f"  [{m['failures']} failed]" if m.get("failures") else "") + (
            f"  [stand-in: {m['stand_in']}]" if m.get("stand_in") else "")
        lines.append(f"  {name:<26}{m['R']:>5}{m['bias']:>9.4f}{m['rmse']:>8.4f}{m['coverage']:>10.3f}"
                     f"{m['coverage_mcse']:>8.3f}{m['width']:>8.4f}{m['width_median']:>9.4f}{rb:>8}{rp:>8}"
                     f"{m['sec_per_rep']:>8.2f}{note}")
    return "\n".join(lines)


def markdown(results: list[dict], methods: list[str] | None = None) -> str:
    """The docs' table: one row per scenario and method (the default in bold; only ``methods`` when
    given), and a row with the efficiency bound's width; widths also as ratios to the bound and to
    PPI++."""
    lines = ["| scenario | method | R | bias (MC s.e.) | RMSE | coverage (MC s.e.) | width (median) "
             "| width ÷ bound "
             "| width ÷ PPI++ | s/rep |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for res in results:
        name = res["scenario"] + ("" if not res["variant"] else " " + ", ".join(
            f"{k}={v}" for k, v in res["variant"].items()))
        ppi = _reference(res)
        if res.get("bound_width"):
            rel = _ratio(res["bound_width"] / ppi["width"]) if ppi and ppi.get("width") else "-"
            lines.append(f"| {name} | efficiency bound ({res['bound_kind']}) | {res['R']} | | | | "
                         f"{res['bound_width']:.4f} | 1.00 | {rel} | |")
        for label, m in res["methods"].items():
            if methods and label not in methods and label != res.get("default"):
                continue
            shown = f"**{label}**" if label == res.get("default") else label
            if not m["R"]:
                lines.append(f"| {name} | {shown} | 0 | failed ({m['failures']}) | | | | | | |")
                continue
            rb, rp = _relative(res, m)
            bse = m.get("bias_mcse", float("nan"))
            lines.append(f"| {name} | {shown} | {m['R']} | {m['bias']:+.4f} ({bse:.4f}) | {m['rmse']:.4f} | "
                         f"{m['coverage']:.3f} ({m['coverage_mcse']:.3f}) | {m['width']:.4f} "
                         f"({m['width_median']:.4f}) | {rb} | {rp} | {m['sec_per_rep']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"R = {QUICK_R} (S1 smaller) instead of {FULL_R}")
    p.add_argument("--reps", type=int, help="override R for every scenario")
    p.add_argument("--scenarios", nargs="+", default=list(scenarios.SCENARIOS),
                   choices=list(scenarios.SCENARIOS))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--methods", nargs="+", help="run only these methods (labels as in the table)")
    p.add_argument("--slow-every", type=int, default=1, metavar="K",
                   help="run the slow generative methods (joint*, mi*) on every K-th replication only")
    p.add_argument("--variants", nargs="+", type=int, metavar="I",
                   help="run only these variants (indices into each scenario's list, e.g. 2 for B3 n=1000)")
    p.add_argument("--out", type=Path, help="write the results as JSON here (after every scenario)")
    p.add_argument("--markdown", type=Path, nargs="+", metavar="JSON",
                   help="print the results in these JSON files as a Markdown table and exit")
    p.add_argument("--resume", action="store_true",
                   help="keep the scenarios already in --out (same variant and R) and run the rest")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown([r for f in args.markdown for r in json.loads(f.read_text())], args.methods))
        return None
    results = []
    if args.resume:
        if not args.out or not args.out.exists():
            p.error("--resume needs an existing --out file")
        results = json.loads(args.out.read_text())
    for index, name in enumerate(scenarios.SCENARIOS):
        if name not in args.scenarios:
            continue
        _, variants = scenarios.SCENARIOS[name]
        for v, variant in enumerate(variants):
            if args.variants is not None and v not in args.variants:
                continue
            R = args.reps or scenarios.reps(name, args.quick, QUICK_R, FULL_R)
            done = [r for r in results if (r["scenario"], r["variant"], r["R"]) == (name, variant, R)]
            if done:
                print(table(done[0]), "(kept from --out)", flush=True)
                continue
            res = run_scenario(name, variant, R, args.workers, index, args.methods, args.slow_every)
            results.append(res)
            print(table(res), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
