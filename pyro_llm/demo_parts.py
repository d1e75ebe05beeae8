"""The main job's later parts (see :mod:`pyro_llm.demo`): PoLAR-VBLL on a fresh adapter, the
one-call :func:`~pyro_llm.regress` on real reviews, and the Markdown report."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

__all__ = ["polar_vbll_row", "regression_rows", "write_report", "TRUE_EFFECT"]

TRUE_EFFECT = 0.5  # the simulated outcome's coefficient on the review's true label


def polar_vbll_row(args, num_classes: int, train_dl, test_dl, y_test, out: Path, progress: bool):
    """PoLAR-VBLL (an orthogonal adapter under a variational Bayesian last layer) on a fresh
    LoRA model: its metrics row, its predictive (N, C), saved to ``out/polar_vbll``."""
    from . import metrics
    from .features import pool
    from .infer.polar_vbll import fit_polar_vbll
    from .models import lora_classifier
    from .polar import PolarAdapter

    net, _ = lora_classifier(args.model, num_labels=num_classes, r=args.rank, seed=args.seed)
    adapter = PolarAdapter(net, seed=args.seed)

    def features(ad, batch):  # MiniLM's mean-pooled last hidden state, the pooling it was trained with
        o = ad(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               output_hidden_states=True)
        return pool(o, batch["attention_mask"], "mean")

    t = time.perf_counter()
    pv = fit_polar_vbll(adapter, train_dl, features, num_classes, epochs=args.map_epochs, lr=args.lr,
                        progress=progress, seed=args.seed)
    seconds = time.perf_counter() - t
    probs = pv.predictive(test_dl, progress=progress)
    draws = pv.predict(test_dl, num_samples=args.samples, progress=progress, seed=args.seed)
    pv.save(out / "polar_vbll")
    return dict(metrics.summarize(probs, y_test, draws), fit_s=seconds), probs


def regression_rows(args, texts, labels, idx, out: Path, progress: bool) -> dict:
    """``regress`` on ``len(idx)`` real reviews with a simulated outcome ``y = 1 + 0.5 fresh +
    0.02 age + noise``: the review's label ``fresh`` is hand-coded on a random 30%, and a LoRA
    coder fine-tuned per fold codes the rest. Rows: the default (doubly robust) estimate, the
    labelled rows alone, and the naive plug-in of the coder's labels, against the truth."""
    import pandas as pd

    from .models import lora_classifier
    from .regression import FineTune, regress

    rng, n = np.random.default_rng(args.seed), len(idx)
    fresh = np.asarray(labels)[idx].astype(float)
    df = pd.DataFrame({"text": [texts[i] for i in idx], "age": rng.normal(40, 10, n)})
    df["y"] = 1 + TRUE_EFFECT * fresh + 0.02 * df["age"] + rng.normal(size=n)
    df["fresh"] = np.where(rng.random(n) < args.labelled_fraction, fresh, np.nan)
    model, tok = lora_classifier(args.model, num_labels=2, r=args.rank, seed=args.seed)
    t = time.perf_counter()
    res = regress(df, "y ~ fresh + age", label="fresh", text="text", model=model, tokenizer=tok,
                  folds=args.regress_folds, cache_dir=out / "regress_cache", progress=progress,
                  seed=args.seed, train=FineTune(epochs=args.regress_epochs, lr=3e-3, val_fraction=0,
                                                 min_steps=0))
    seconds = time.perf_counter() - t
    coded = res.info["coded"]["probs"]
    rows = {"doubly robust (default)": res}
    for method, name in (("labelled_only", "labelled rows only"), ("naive", "naive plug-in of the coder")):
        rows[name] = regress(df, "y ~ fresh + age", label="fresh", predictions=coded,
                             predictions_kind="probs", method=method, progress=False, seed=args.seed)
    table = {}
    for name, r in rows.items():
        c = r["fresh"]
        table[name] = {"estimate": c["mean"], "se": c["sd"], "lower": c["lower"], "upper": c["upper"],
                       "covers": bool(c["lower"] <= TRUE_EFFECT <= c["upper"])}
    acc = [float(a) for a in np.atleast_1d(res.info.get("fold_accuracy", []))]
    return {"n": n, "n_labelled": int(df["fresh"].notna().sum()), "truth": TRUE_EFFECT,
            "fold_accuracy": acc, "seconds": seconds, "rows": table, "printed": str(res)}


def write_report(path: Path, args, rows: dict, regression: dict | None, files: list[str]) -> None:
    """``report.md``: the calibration table, the reliability diagram, the regression table."""
    cols = ["accuracy", "ece", "nll", "brier", "entropy", "fit_s"]
    lines = ["# pyro_llm main job", "",
             f"all-MiniLM-L6-v2 + LoRA r={args.rank} on Rotten Tomatoes reviews: {args.n_train} labelled "
             f"for training, {args.n_test} held out (seed {args.seed}).", "",
             "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.1f}" if c == "fit_s" else f"{r[c]:.4f}"
                                                  for c in cols) + " |")
    lines += ["", "fit_s of Laplace and SVI include the MAP fit they start from. ECE: expected "
              "calibration error (15 bins); entropy: mean predictive entropy.", "",
              "![reliability diagram](reliability.png)", ""]
    if regression is not None:
        acc = ", ".join(f"{a:.3f}" for a in regression["fold_accuracy"])
        lines += ["## An LLM-coded covariate in a regression", "",
                  f"{regression['n']} held-out reviews, the label hand-coded on {regression['n_labelled']}; "
                  f"outcome y = 1 + {regression['truth']} fresh + 0.02 age + noise. The coder (one LoRA "
                  f"fine-tune per fold, each coding only its own fold) reaches accuracy {acc}. "
                  f"Coefficient of `fresh` (truth {regression['truth']}), 95% intervals:", "",
                  "| estimator | estimate | se | interval | covers the truth |", "|---|---|---|---|---|"]
        for name, r in regression["rows"].items():
            lines.append(f"| {name} | {r['estimate']:.3f} | {r['se']:.3f} | "
                         f"[{r['lower']:.3f}, {r['upper']:.3f}] | {'yes' if r['covers'] else 'no'} |")
        lines += ["", "One draw of the data: coverage is a property over repeated draws "
                  "(docs/inference.md has it measured).", ""]
    lines += ["## Files", ""] + [f"- `{f}`" for f in files] + [""]
    path.write_text("\n".join(lines))

