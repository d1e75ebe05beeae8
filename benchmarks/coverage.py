"""Coverage benchmark (``/work/shared/BENCHMARKS.md`` section 1): Monte Carlo over R replications.

Run from the repository root::

    .venv/bin/python benchmarks/coverage.py --quick --out benchmarks/results/coverage_quick.json
    .venv/bin/python benchmarks/coverage.py --out benchmarks/results/coverage.json       # R = 1000

Each replication draws a corpus (``benchmarks/scenarios.py``), runs every method through
``pyro_llm.regress`` and records the target coefficient's estimate and 95% interval. Reported
per method: bias, RMSE, coverage with its Monte Carlo s.e. ``sqrt(c (1 - c) / R)``, mean
interval width, seconds per replication (the method's own time; the replicate's LLM fitting
time is reported once as ``llm_s``). Replications run in ``--workers`` processes (one torch
thread each); replication r of a scenario uses seed ``1000 * scenario_index + r``, so results
do not depend on the number of workers.
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


def _one(args):
    name, variant, seed, methods = args
    import torch

    from pyro_llm.regression import regress

    torch.set_num_threads(1)
    fn, _ = scenarios.SCENARIOS[name]
    rep = fn(seed, **variant)
    out = {"llm_s": rep.llm_s, "info": rep.info, "methods": {}}
    for label, kwargs in rep.runs.items():
        if methods and label not in methods:
            continue
        start = time.perf_counter()
        if callable(kwargs):  # a method outside regress (B3's end-to-end model)
            res = kwargs()
        else:
            res = regress(rep.df, rep.formula, label=rep.label, role=rep.role, seed=seed,
                          **{"num_draws": JOINT_DRAWS, **kwargs} if kwargs["method"] == "joint" else kwargs)
        secs = time.perf_counter() - start
        est = res[rep.coef]
        # the point estimate: the posterior median for draw-based methods (robust to tails)
        out["methods"][label] = {"est": est["median"], "lower": est["lower"], "upper": est["upper"],
                                 "truth": rep.truth, "s": secs}
    return out


def summarise(reps: list[dict]) -> dict:
    out = {}
    labels = dict.fromkeys(label for r in reps for label in r["methods"])
    for label in labels:  # a method may run on a subset of replications (its own R)
        rows = [r["methods"][label] for r in reps if label in r["methods"]]
        err = np.array([x["est"] - x["truth"] for x in rows])
        cover = np.array([x["lower"] <= x["truth"] <= x["upper"] for x in rows])
        c, R = float(cover.mean()), len(rows)
        out[label] = {"bias": float(err.mean()), "bias_mcse": float(err.std(ddof=1) / math.sqrt(R)),
                      "rmse": float(np.sqrt((err ** 2).mean())), "coverage": c,
                      "coverage_mcse": math.sqrt(max(c * (1 - c), 1e-12) / R),
                      "width": float(np.mean([x["upper"] - x["lower"] for x in rows])),
                      "width_median": float(np.median([x["upper"] - x["lower"] for x in rows])),
                      "sec_per_rep": float(np.mean([x["s"] for x in rows])), "R": R}
    return out


def run_scenario(name: str, variant: dict, R: int, workers: int, index: int, methods=None) -> dict:
    jobs = [(name, variant, 1000 * index + r, methods) for r in range(R)]
    start = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            reps = list(pool.map(_one, jobs, chunksize=max(1, R // (8 * workers))))
    else:
        reps = [_one(j) for j in jobs]
    return {"scenario": name, "variant": variant, "R": R, "methods": summarise(reps),
            "llm_s": float(np.mean([r["llm_s"] for r in reps])),
            "wall_s": time.perf_counter() - start,
            "info": {k: float(np.mean([r["info"][k] for r in reps])) for k in reps[0]["info"]}}


def table(result: dict) -> str:
    lines = [f"{result['scenario']} {result['variant']}  R={result['R']}  "
             + "  ".join(f"{k}={v:.3f}" for k, v in result["info"].items())
             + (f"  llm_s={result['llm_s']:.1f}" if result["llm_s"] else ""),
             f"  {'method':<26}{'R':>5}{'bias':>9}{'rmse':>8}{'coverage':>10}{'(mcse)':>8}"
             f"{'width':>8}{'(median)':>9}{'s/rep':>8}"]
    for label, m in result["methods"].items():
        lines.append(f"  {label:<26}{m['R']:>5}{m['bias']:>9.4f}{m['rmse']:>8.4f}{m['coverage']:>10.3f}"
                     f"{m['coverage_mcse']:>8.3f}{m['width']:>8.4f}{m['width_median']:>9.4f}"
                     f"{m['sec_per_rep']:>8.2f}")
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    """The README's table: one row per scenario and method."""
    lines = ["| scenario | method | R | bias | RMSE | coverage (MC s.e.) | width (median) | width / PPI++ "
             "| s/rep |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for res in results:
        name = res["scenario"] + ("" if not res["variant"] else " " + ", ".join(
            f"{k}={v}" for k, v in res["variant"].items()))
        ppi = next((m for k, m in res["methods"].items() if k.startswith("ppi++") and "reuse" not in k), None)
        for label, m in res["methods"].items():
            rel = f"{m['width'] / ppi['width']:.2f}" if ppi else "-"
            lines.append(f"| {name} | {label} | {m['R']} | {m['bias']:+.4f} | {m['rmse']:.4f} | "
                         f"{m['coverage']:.3f} ({m['coverage_mcse']:.3f}) | {m['width']:.4f} "
                         f"({m['width_median']:.4f}) | {rel} | {m['sec_per_rep']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"R = {QUICK_R} (S1 smaller) instead of {FULL_R}")
    p.add_argument("--reps", type=int, help="override R for every scenario")
    p.add_argument("--scenarios", nargs="+", default=list(scenarios.SCENARIOS),
                   choices=list(scenarios.SCENARIOS))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--methods", nargs="+", help="run only these methods (labels as in the table)")
    p.add_argument("--out", type=Path, help="write the results as JSON here (after every scenario)")
    p.add_argument("--markdown", type=Path, nargs="+", metavar="JSON",
                   help="print the results in these JSON files as a Markdown table and exit")
    p.add_argument("--resume", action="store_true",
                   help="keep the scenarios already in --out (same variant and R) and run the rest")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown([r for f in args.markdown for r in json.loads(f.read_text())]))
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
        for variant in variants:
            R = args.reps or scenarios.reps(name, args.quick, QUICK_R, FULL_R)
            done = [r for r in results if (r["scenario"], r["variant"], r["R"]) == (name, variant, R)]
            if done:
                print(table(done[0]), "(kept from --out)", flush=True)
                continue
            res = run_scenario(name, variant, R, args.workers, index, args.methods)
            results.append(res)
            print(table(res), flush=True)
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
