"""The results tables of the docs, generated from the benchmark result files.

    .venv/bin/python benchmarks/tables.py              # rewrite every table in docs/*.md
    .venv/bin/python benchmarks/tables.py --check      # exit 1 naming each table that differs
    .venv/bin/python benchmarks/tables.py merge cost --run NAME NEW.json   # a new run into cost.json

One JSON per benchmark in ``benchmarks/results/`` (figures in ``results/figures/``):

* ``calibration.json`` - ``benchmarks/calibration.py`` rows; ``run`` is ``"v3"`` (the current
  table: 3 seeds on both models after the Laplace prior, BLoB, SVI and causal-LM PoLAR-VBLL
  changes; a row with ``carried_from`` is an unchanged method's row of that earlier run),
  ``"v2"`` (every method, OOD, 3 seeds on MiniLM, before those changes), ``"v1_laplace"`` (the
  earlier Laplace-only run, n = 1,000 and SmolLM2 included) or ``"v2_superseded"`` (PoLAR-VBLL
  before its feature normalisation);
* ``cost.json`` - ``benchmarks/cost.py`` rows (SVI, Laplace and speed-and-scale rows), ``run``
  naming the command that produced each (``RUNS`` below);
* ``coverage.json`` - ``benchmarks/coverage.py`` scenarios;
* ``one_call.json`` - ``benchmarks/one_call.py``;
* ``growth.json`` - ``benchmarks/growth.py`` (one entry per part; figures ``growth_<part>.png``).

A table sits in a page between ``<!-- table: NAME -->`` and ``<!-- /table -->``; NAME is a key of
``TABLES``. ``tests/test_tables.py`` fails when a page's table is not what this script makes of the
JSON, so the text cannot drift from the numbers. Prose that quotes a number is not checked: quote
sparingly, and rerun this script after a benchmark.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))

from benchmarks import calibration, coverage, growth_plots  # noqa: E402

# The commands behind each run of cost.json (the docs quote them).
RUNS = {
    "svi": "benchmarks/cost.py --rows svi_step_over_map_step svi_step_over_map_step_no_dropout",
    "laplace_2threads": "benchmarks/cost.py --rows laplace_fit_over_map_epoch "
                        "laplace_fit_ours_over_laplace_torch laplace_glm_predict_over_map_forward",
    "laplace_1thread": "benchmarks/cost.py --threads 1 --rows laplace_fit_over_map_epoch "
                       "laplace_fit_ours_over_laplace_torch laplace_glm_predict_over_map_forward",
    "laplace_quick": "benchmarks/cost.py --quick --rows laplace_fit_over_map_epoch "
                     "laplace_fit_ours_over_laplace_torch laplace_glm_predict_over_map_forward",
    "laplace_torch_c1_2threads": "benchmarks/cost.py --rows laplace_fit_ours_over_laplace_torch",
    "laplace_torch_c1_1thread": "benchmarks/cost.py --threads 1 --rows laplace_fit_ours_over_laplace_torch",
    "glm_c1": "benchmarks/cost.py --threads 2 --rows laplace_glm_predict_over_map_forward",
    "read_positions": "benchmarks/cost.py --threads 2 --rows predict_s16_top1_over_map_forward",
    "svi_diagonal": "benchmarks/cost.py --threads 2 --rows svi_step_over_map_step_no_dropout "
                    "svi_step_diagonal_over_map_step_no_dropout",
    "laplace_torch_gram_1thread": "benchmarks/cost.py --threads 1 "
                                  "--rows laplace_fit_ours_over_laplace_torch",
    "laplace_torch_gram_2threads": "benchmarks/cost.py --threads 2 "
                                   "--rows laplace_fit_ours_over_laplace_torch",
    "scale": "benchmarks/cost.py --threads 2 --rows predict_s16_top1_over_map_forward "
             "predict_s16_loop_top1_over_map_forward predict_s16_all_over_map_forward "
             "svi_step_top1_cached_over_map_step coding_bayes_s16_over_map "
             "svi_step_over_map_step_no_dropout predict_s16_top1_smollm2_over_map_forward",
}


def load(name: str):
    return json.loads((RESULTS / f"{name}.json").read_text())


def _cost(run: str, name: str) -> dict:
    rows = [r for r in load("cost") if r["run"] == run and r["name"] == name]
    if len(rows) != 1:
        raise KeyError(f"cost.json has {len(rows)} rows named {name!r} in run {run!r}")
    return rows[0]


def _s(x: float) -> str:
    return f"{x:.1f} s" if x >= 10 else f"{x:.3f} s"


def _r(x: float) -> str:
    return f"{x:.3g}"


def _verdict(ratio: float, goal: float | None) -> str:
    return "" if goal is None else ("met" if ratio <= goal else "missed")


def _mb(r: dict) -> str:
    return f"{r['peak_mb']:.0f} / {r['peak_mb_denominator']:.0f}"


# ---------------------------------------------------------------------------- calibration
def _drop(text: str, drop: set[int]) -> str:
    """The Markdown table without the columns at these indices."""
    return "\n".join("|" + "|".join(c for i, c in enumerate(line.split("|")[1:-1]) if i not in drop) + "|"
                     for line in text.splitlines())


def _method_table(methods: list[str]) -> str:
    """A method page's table: run v3, both models, without the columns every row shares
    (n_train, n_test, peak MB)."""
    return _drop(_calibration_v3(methods), {1, 2, 15})


def _calibration_v3(methods=None) -> str:
    """Run v3, MiniLM then SmolLM2, in one table."""
    minilm = _calibration("v3", MINILM, methods).splitlines()
    smol = _calibration("v3", SMOLLM2, methods).splitlines()
    return "\n".join(minilm + smol[2:])


PAIRED_MC, AUROC = {9, 10}, {11, 12}  # column indices of calibration.markdown's table


def _calibration(run: str, model: str, methods=None, drop: set[int] = frozenset()) -> str:
    rows = [r for r in load("calibration") if r["run"] == run and r["model"] == model
            and (methods is None or r["method"] in methods)]
    if methods is not None:  # in the order asked for
        rows.sort(key=lambda r: methods.index(r["method"]))
    return _drop(calibration.markdown(rows), drop) if drop else calibration.markdown(rows)


MINILM, SMOLLM2 = "all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"
LAPLACE = ["map", "laplace_kfac", "laplace_lowrank_kfac", "laplace_diag", "laplace_llla", "answer_laplace",
           "laplace_kfac_zero"]


def calibration_v1() -> str:
    rows = _calibration("v1_laplace", MINILM, drop=PAIRED_MC | AUROC).splitlines()
    smol = _calibration("v1_laplace", SMOLLM2, drop=PAIRED_MC | AUROC).splitlines()
    return "\n".join(rows + smol[2:])


def laplace_agreement() -> str:
    """Our Laplace-LoRA against laplace-torch on one SmolLM2 adapter (``laplace_agreement.py``)."""
    r = load("laplace_agreement")
    (ll_ours, ll_ref), (lm_ours, lm_ref) = r["log_likelihood"], r["log_marglik"]
    sec = r["seconds"]
    return "\n".join([
        "| quantity | ours | laplace-torch | difference |", "| --- | ---: | ---: | ---: |",
        f"| {r['blocks']} Kronecker blocks | | | {r['kron_block_rel_error_max']:.1e} (worst, relative) |",
        f"| training log-likelihood | {ll_ours:.4f} | {ll_ref:.4f} | {abs(ll_ours - ll_ref):.1e} |",
        f"| log marginal likelihood, δ = {r['prior_precision']:.1f} | {lm_ours:.4f} | {lm_ref:.4f} "
        f"| {r['log_marglik_rel_diff']:.1e} (relative) |",
        f"| probit predictive, {r['n_test']} held-out | | | {r['probit_max_abs_diff']:.1e} (worst) |",
        f"| fit seconds (MAP {sec['map']:.0f} s) | {sec['ours']:.0f} | {sec['laplace_torch']:.0f} "
        f"| {sec['ours'] / sec['laplace_torch']:.2f} × |"])


# ---------------------------------------------------------------------------- cost
SVI_LABELS = {  # (run, row): label
    ("svi", "svi_step_over_map_step"): "SVI step / peft MAP training step (train mode, as users train)",
    ("svi", "svi_step_over_map_step_no_dropout"): "SVI step / MAP step with dropout off (like for like)",
    ("svi_diagonal", "svi_step_over_map_step_no_dropout"):
        "the same, rerun beside the next row (run `svi_diagonal`)",
    ("svi_diagonal", "svi_step_diagonal_over_map_step_no_dropout"):
        "SVI step with `guide=\"diagonal\"` (one flat site) / MAP step with dropout off",
}


def cost_svi() -> str:
    lines = ["| row | SVI step | MAP step | ratio | goal | peak MB (SVI / MAP) |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for (run, name), label in SVI_LABELS.items():
        r = _cost(run, name)
        lines.append(f"| {label} | {r['numerator_s']:.4f} s | {r['denominator_s']:.4f} s | "
                     f"**{r['ratio']:.3f}** | ≤ {r['goal']}: {_verdict(r['ratio'], r['goal'])} | {_mb(r)} |")
    return "\n".join(lines)


LAPLACE_LABELS = {
    "laplace_fit_over_map_epoch": ("KFAC fit (defaults) / one MAP epoch",
                                   "~1 (a tenth of a 10-epoch fine-tune)"),
    "laplace_fit_ours_over_laplace_torch": ("KFAC fit, exact GGN / laplace-torch 0.3 KFAC fit", "≤ 0.5"),
    "laplace_glm_predict_over_map_forward": ("GLM predictive, MC S = 16, one batch / one MAP forward", "≤ 3"),
}


def cost_laplace() -> str:
    lines = ["| row (1 thread; 2 threads in parentheses) | ours | reference | ratio | goal "
             "| peak MB (ours / ref) |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for name, (label, goal) in LAPLACE_LABELS.items():
        r, r2 = _cost("laplace_1thread", name), _cost("laplace_2threads", name)
        lines.append(f"| {label} | {_s(r['numerator_s'])} | {_s(r['denominator_s'])} | **{_r(r['ratio'])}** "
                     f"({_r(r2['ratio'])}) | {goal}: {_verdict(r['ratio'], r['goal'])} | {_mb(r)} |")
    return "\n".join(lines)


AFTER = (("laplace_torch_c1_1thread", "laplace_fit_ours_over_laplace_torch", 1, "C − 1"),
         ("laplace_torch_c1_2threads", "laplace_fit_ours_over_laplace_torch", 2, "C − 1"),
         ("glm_c1", "laplace_glm_predict_over_map_forward", 2, "C − 1"),
         ("laplace_torch_gram_1thread", "laplace_fit_ours_over_laplace_torch", 1, "+ shared Gram"),
         ("laplace_torch_gram_2threads", "laplace_fit_ours_over_laplace_torch", 2, "+ shared Gram"))


def cost_laplace_after() -> str:
    """The Laplace rows rerun after the GGN / GLM predictive backpropagated C - 1 vectors, and the
    KFAC fit again after adapters reading one input shared its Gram matrix."""
    lines = ["| row | change | threads | ours | reference | ratio | goal |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for run, name, threads, change in AFTER:
        r = _cost(run, name)
        label, goal = LAPLACE_LABELS[name]
        lines.append(f"| {label} | {change} | {threads} | {_s(r['numerator_s'])} | "
                     f"{_s(r['denominator_s'])} | **{_r(r['ratio'])}** | {goal}: "
                     f"{_verdict(r['ratio'], r['goal'])} |")
    return "\n".join(lines)


# (run, row, label, goal text or None for the computed verdict, bold ratio)
SCALE = [
    ("read_positions", "predict_s16_top1_over_map_forward",
     "predictive S = 16, top block random, one sample-batched forward, that block at the position "
     "the head reads / one MAP forward", None, True),
    ("scale", "predict_s16_top1_over_map_forward",
     "the same before the read-position path (every position of the top block)", "(run `scale`)", False),
    ("scale", "predict_s16_loop_top1_over_map_forward",
     "the same the naive way, 16 forwards / one MAP forward", "(16: the naive cost)", False),
    ("scale", "predict_s16_top1_smollm2_over_map_forward",
     "predictive S = 16 on SmolLM2-135M (30 blocks), top block random, batched / one MAP forward",
     None, True),
    ("scale", "predict_s16_all_over_map_forward",
     "predictive S = 16, every block random, sample-batched / one MAP forward", "no prefix to share", False),
    ("glm_c1", "laplace_glm_predict_over_map_forward",
     "linearised Laplace (KFAC, MC, S = 16) / one MAP forward", None, True),
    ("scale", "svi_step_top1_cached_over_map_step",
     "SVI step, top block, prefix cached / peft MAP step of the same adapter", None, True),
    ("scale", "svi_step_over_map_step_no_dropout",
     "SVI step, every block random / MAP step, dropout off (like for like)", None, False),
    ("scale", "coding_bayes_s16_over_map",
     "`code_corpus` of 256 reviews, S = 16 (top block) / the same with the MAP", "—", True),
]


def cost_scale() -> str:
    lines = ["| row | numerator | denominator | ratio | goal | peak MB (num / den) |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for run, name, label, goal, bold in SCALE:
        r = _cost(run, name)
        if goal is None:
            goal = f"≤ {r['goal']:g}: {_verdict(r['ratio'], r['goal'])}"
        ratio = f"**{_r(r['ratio'])}**" if bold else _r(r["ratio"])
        lines.append(f"| {label} | {_s(r['numerator_s'])} | {_s(r['denominator_s'])} | {ratio} | {goal} "
                     f"| {_mb(r)} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- coverage
COVERAGE_METHODS = ["dr", "naive", "labelled_only", "ppi++", "joint", "dr (π ignored)",
                    "dr (clusters ignored)", "ppi++ (reuse)", "joint (end-to-end LoRA)", "dr (MAP coder)",
                    "dr (MAP coder + downstream term)", "ppi++ (MAP coder)"]


def coverage_all() -> str:
    return coverage.markdown(load("coverage"), COVERAGE_METHODS)


def _scenario(res: dict) -> str:
    return res["scenario"] + ("" if not res["variant"] else " " + ", ".join(
        f"{k}={v}" for k, v in res["variant"].items()))


def coverage_default() -> str:
    lines = ["| scenario | R | coverage (MC s.e.) | bias (MC s.e.) | width ÷ bound | width ÷ PPI++ | bound "
             "| s/call |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for res in load("coverage"):
        if res.get("default") != "dr" or "dr" not in res["methods"]:
            continue
        m = res["methods"]["dr"]
        rb, rp = coverage._relative(res, m)
        lines.append(f"| {_scenario(res)} | {m['R']} | {m['coverage']:.3f} ({m['coverage_mcse']:.3f}) | "
                     f"{m['bias']:+.4f} ({m['bias_mcse']:.4f}) | {rb} | {rp} | {res['bound_kind']} | "
                     f"{m['sec_per_rep']:.2f} |")
    return "\n".join(lines)


def one_call() -> str:
    d = load("one_call")
    u, k = d["uninterrupted"], d["killed_and_resumed"]
    acc = ", ".join(f"{a:.2f}" for a in u["fold_accuracy"])
    same = d["same_table"]
    killed_after = re.search(r"--interrupt-after (\d+)", d["command"]).group(1)
    return "\n".join([
        "| run | seconds | estimate of z [95% interval] | fold accuracies | eff. labelled n |",
        "| --- | ---: | --- | --- | ---: |",
        f"| uninterrupted | {u['seconds']:.0f} | {u['estimate']:.3f} [{u['lower']:.3f}, {u['upper']:.3f}] | "
        f"{acc} | {u['effective_labelled']:,.0f} |",
        f"| killed (SIGKILL) after {killed_after} s, then rerun on the same `cache_dir` | "
        f"{killed_after} + {k['seconds']:.0f} | {'identical to the last digit' if same else 'different'} | "
        f"{'identical' if same else 'different'} | {'identical' if same else 'different'} |"])


HEADLINE = [("map", "MAP (plain LoRA)", "fit_map", "guide.md"), ("svi", "SVI", "fit_svi", "guide.md"),
            ("laplace_kfac", "Laplace-LoRA (KFAC)", "fit_laplace", "laplace.md"),
            ("ensemble_m5", "LoRA ensemble (M = 5)", "fit_ensemble", "ensembles.md"),
            ("blob", "BLoB", "fit_blob", "blob.md"),
            ("polar_vbll", "PoLAR-VBLL", "fit_polar_vbll", "polar_vbll.md"),
            ("temperature", "temperature scaling (500 extra labels)", "fit_temperature", "baselines.md"),
            ("mc_dropout", "MC dropout", "mc_dropout_predict", "baselines.md")]


def headline() -> str:
    """One line per method: its page, its call, accuracy, ECE and NLL (run v3, MiniLM, n = 200)."""
    agg = calibration.aggregate([r for r in load("calibration") if r["run"] == "v3" and r["model"] == MINILM
                                 and r["n_train"] == 200])
    by_method = {k[3]: v for k, v in agg.items()}
    lines = ["| method | call | accuracy | ECE | NLL |", "| --- | --- | ---: | ---: | ---: |"]
    for key, label, call, page in HEADLINE:
        a = by_method[key]
        lines.append(f"| [{label}]({page}) | `{call}` | "
                     + " | ".join(calibration._pm(a[m], " ± ") for m in ("accuracy", "ece", "nll")) + " |")
    return "\n".join(lines)


TABLES = {
    "headline": headline,
    "calibration-minilm": lambda: _calibration("v2", MINILM, drop=PAIRED_MC),  # v2 rows had neither
    "calibration-smollm2": lambda: _calibration("v2", SMOLLM2, drop=PAIRED_MC),
    "calibration-v3": _calibration_v3,
    "calibration-v1-laplace": calibration_v1,
    "calibration-laplace": lambda: _method_table(LAPLACE),
    "calibration-svi": lambda: _method_table(["map", "svi"]),
    "calibration-ensemble": lambda: _method_table(["map", "ensemble_m5", "ensemble_m10", "ensemble_m20"]),
    "calibration-blob": lambda: _method_table(["map", "blob"]),
    "calibration-polar-vbll": lambda: _method_table(["map", "polar_vbll"]),
    "calibration-baselines": lambda: _method_table(["map", "temperature", "mc_dropout"]),
    "laplace-agreement": laplace_agreement,
    "cost-svi": cost_svi,
    "cost-laplace": cost_laplace,
    "cost-laplace-after": cost_laplace_after,
    "cost-scale": cost_scale,
    "coverage-default": coverage_default,
    "coverage-all": coverage_all,
    "one-call": one_call,
    "growth": growth_plots.table,
}

MARK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str) -> tuple[str, list[str]]:
    """The page with its tables regenerated, and the names of those that changed."""
    changed = []

    def one(m: re.Match) -> str:
        name = m.group(2)
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}")
        body = TABLES[name]() + "\n"
        if body != m.group(3):
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return MARK.sub(one, text), changed


def pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def merge(benchmark: str, run: str, new: Path) -> None:
    """Replace the rows of ``run`` in ``results/<benchmark>.json`` by the rows of ``new``."""
    rows = [r for r in load(benchmark) if r.get("run") != run]
    rows += [dict(r, run=run) for r in json.loads(new.read_text())]
    (RESULTS / f"{benchmark}.json").write_text(json.dumps(rows, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    m = sub.add_parser("merge", help="put a new run's rows into a benchmark's JSON file")
    m.add_argument("benchmark", choices=["calibration", "cost"])
    m.add_argument("--run", required=True)
    m.add_argument("new", type=Path)
    p.add_argument("--check", action="store_true", help="exit 1 if a page's table differs; write nothing")
    args = p.parse_args(argv)
    if args.cmd == "merge":
        merge(args.benchmark, args.run, args.new)
        return 0
    stale = []
    for page in pages():
        text = page.read_text()
        new, changed = render(text)
        stale += [f"{page.relative_to(ROOT)}: {name}" for name in changed]
        if changed and not args.check:
            page.write_text(new)
    if stale:
        print(("stale tables (run benchmarks/tables.py):\n  " if args.check else "rewrote:\n  ")
              + "\n  ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    raise SystemExit(main())
