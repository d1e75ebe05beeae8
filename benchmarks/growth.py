"""How cost grows with the work: four sweeps, each with a fitted slope, a plot and its floor.

Run from the repository root (one heavy job at a time; a quiet machine for the timed parts)::

    .venv/bin/python benchmarks/growth.py                      # every part, ~25 min on 2 cores
    .venv/bin/python benchmarks/growth.py --parts memory predictive --quick

Parts (all on all-MiniLM-L6-v2 with LoRA r = 8 on query/value and real Rotten Tomatoes reviews,
batches of 8 x 64 tokens, as ``benchmarks/cost.py``):

* ``predictive`` - seconds of an S-draw posterior predictive of one batch (one sample-batched
  forward, frozen prefix shared) against S, for the adapter on the top 1, top 2 or all 6 blocks;
  slope in MAP forwards per extra draw. Floor: one backbone pass; drawn against it, the cost of
  the random blocks at every position, k / 6 of a forward per draw (the top block of a BERT
  classifier runs at the position its head reads, so it can come in under that line).
* ``memory`` - bytes of each Laplace structure's curvature (``la.memory_bytes``) against the
  number of adapted blocks and the LoRA rank; slope as an exponent (log-log). Floor: the
  adapter's own float32 parameters; a dense (full) curvature's P^2 float64 bytes are drawn,
  computed, not fitted.
* ``corpus`` - seconds to fit a KFAC Laplace (sampled Fisher) on N training reviews, and to code a
  corpus of N reviews (``code_corpus``: tokenising, forwards, safetensors shards) with the MAP
  adapter (1,000 to 20,000 reviews, the corpus cycled past its 12,808; streamed: shards written as
  they fill) and with S = 16 draws of the top block's adapter (to 10,000); slope in seconds per
  1,000 documents.
  Floor: one MAP training step per batch for the fit; one MAP forward per batch for coding.
* ``regress`` - seconds of the one call ``pyro_llm.regress`` (cross-fitted fine-tunes, every
  review coded, the doubly robust estimate) against N (5 folds) and against the number of folds
  (N = 1,000); 200 labelled rows, ``FineTune`` defaults. Floor: coding N reviews once.

Results go to ``benchmarks/results/growth.json`` (a part's entry is replaced when it is rerun,
the file written atomically after each part) and ``results/figures/growth_<part>.png``;
``benchmarks/tables.py`` renders :func:`table` into docs/speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path[0] = str(HERE.parent)  # benchmarks/coverage.py must not shadow the coverage package

from benchmarks.cost_scale import perturbed_draws  # noqa: E402

RESULTS = HERE / "results"
OUT = RESULTS / "growth.json"
BLOCKS = 6  # MiniLM's transformer blocks

FULL = dict(
    predictive=dict(draws=[1, 2, 4, 8, 16, 32, 64], tops=[1, 2, 6], repeats=5),
    memory=dict(blocks=[1, 2, 3, 4, 5, 6], ranks=[2, 4, 8, 16, 32, 64], batches=2),
    corpus=dict(fit_docs=[250, 500, 1000, 2000],
                code_docs={"map": [1000, 3000, 10000, 20000], "s16": [1000, 3000, 10000]}),
    regress=dict(docs=[1000, 2000, 4000], folds=[2, 5], fold_docs=1000, labelled=200),
)
QUICK = dict(
    predictive=dict(draws=[1, 2, 4], tops=[1, 6], repeats=2),
    memory=dict(blocks=[1, 2], ranks=[2, 4], batches=1),
    corpus=dict(fit_docs=[16, 32], code_docs={"map": [16, 32], "s16": [16, 32]}),
    regress=dict(docs=[120, 240], folds=[2, 5], fold_docs=120, labelled=60),
)


# ---------------------------------------------------------------------------- shared helpers
def slope(x, y, log: bool = False) -> dict:
    """Least-squares line ``y = a + b x`` (``log``: ``log y = a + b log x``, b an exponent)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        raise ValueError(f"a slope needs at least 2 points, got {len(x)}")
    if log:
        x, y = np.log(x), np.log(y)
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    return {"intercept": float(a), "slope": float(b), "log": log,
            "max_abs_residual": float(np.abs(resid).max())}


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cost():
    from benchmarks import cost

    return cost


def _net(top: int | None = None, r: int | None = None):
    """MiniLM with LoRA on the top ``top`` blocks (None: all), rank ``r``; B seeded non-zero."""
    cost = _cost()
    lora = {}
    if top is not None and top < BLOCKS:
        lora["layers_to_transform"] = list(range(BLOCKS - top, BLOCKS))
    if r is not None:
        lora.update(r=r, lora_alpha=r)
    return cost._seed_lora_b(cost._peft_minilm(**lora))


def _texts(n: int):
    """``n`` reviews as a stream (a generator), cycling the corpus when ``n`` exceeds it."""
    import pyro_llm

    texts, _ = pyro_llm.data.rotten_tomatoes(seed=0)
    texts = [str(t) for t in texts]
    return (texts[i % len(texts)] for i in range(n))


def _predictor(lora, inputs: dict, draws: list):
    """One call: the S-draw predictive of one batch, sample-batched, frozen prefix shared."""
    import pyro_llm

    def fn(input_ids, attention_mask):
        return lora(input_ids=input_ids, attention_mask=attention_mask).logits.softmax(-1)

    return lambda: pyro_llm.predict_probs(fn, [inputs], draws, progress=False, seed=None, vectorize=True)


# ---------------------------------------------------------------------------- parts
def part_predictive(cfg: dict) -> dict:
    import torch

    import pyro_llm

    cost = _cost()
    cost._seed_all()
    batch = cost._minilm_batches(1)[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = {"series": {}}
    with torch.no_grad():
        net = _net(1)
        out["map_forward_s"] = median_seconds(lambda: net(**inputs).logits.softmax(-1), 3 * cfg["repeats"], 2)
    for top in cfg["tops"]:
        lora = pyro_llm.BayesianLoRA(_net(top), prior=1.0, share_prefix=True)
        secs = []
        for s in cfg["draws"]:
            secs.append(median_seconds(_predictor(lora, inputs, perturbed_draws(lora, s)), cfg["repeats"]))
            print(f"  predictive top {top}, S = {s}: {secs[-1]:.3f} s", flush=True)
        forwards = [t / out["map_forward_s"] for t in secs]
        out["series"][f"top{top}"] = {
            "draws": cfg["draws"], "seconds": secs, "map_forwards": forwards,
            "fit": slope(cfg["draws"], forwards), "floor_per_draw": top / BLOCKS}
    return out


def part_memory(cfg: dict) -> dict:
    import pyro_llm

    cost = _cost()
    cost._seed_all()
    batches = cost._minilm_batches(cfg["batches"])
    out = {}
    for axis, values in (("blocks", cfg["blocks"]), ("rank", cfg["ranks"])):
        rows = {"kfac": [], "lowrank_kfac": [], "diag": [], "parameters": []}
        for v in values:
            net = _net(top=v) if axis == "blocks" else _net(r=v)
            for structure in ("kfac", "lowrank_kfac", "diag"):
                la = pyro_llm.fit_laplace(net, batches, structure=structure, optimize_prior=None,
                                          progress=False)
                rows[structure].append(la.memory_bytes)
            rows["parameters"].append(la.num_parameters)
            print(f"  memory {axis} = {v}: " + ", ".join(f"{k} {rows[k][-1]:,}" for k in rows), flush=True)
        p = np.asarray(rows["parameters"], float)
        out[axis] = {"values": values, "bytes": {k: rows[k] for k in ("kfac", "lowrank_kfac", "diag")},
                     "parameters": rows["parameters"],
                     "adapter_float32_bytes": (4 * p).tolist(), "full_float64_bytes": (8 * p * p).tolist(),
                     "fit": {k: slope(values, rows[k], log=True) for k in ("kfac", "lowrank_kfac", "diag")}}
    return out


def part_corpus(cfg: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    import pyro_llm
    from pyro_llm import stream

    cost = _cost()
    cost._seed_all()
    out = {}
    # the fit: KFAC Laplace (defaults: sampled Fisher, one backward per batch) on N reviews
    step_batches = cost._minilm_batches(4)
    map_step = cost._map_step(step_batches, dropout=False)
    step_s = median_seconds(map_step, 8, 2)
    fit_s = []
    for n in cfg["fit_docs"]:
        batches = cost._minilm_batches(n // cost.BATCH)
        net = _net()
        t0 = time.perf_counter()
        pyro_llm.fit_laplace(net, batches, optimize_prior=None, progress=False)
        fit_s.append(time.perf_counter() - t0)
        print(f"  KFAC fit on {n} reviews: {fit_s[-1]:.1f} s", flush=True)
    out["fit"] = {"docs": cfg["fit_docs"], "seconds": fit_s, "map_step_s": step_s,
                  "floor_seconds": [n / cost.BATCH * step_s for n in cfg["fit_docs"]],
                  "fit": slope(np.asarray(cfg["fit_docs"]) / 1000, fit_s)}
    # coding: code_corpus with the MAP adapter and with 16 draws of the top block's adapter
    tok = AutoTokenizer.from_pretrained(pyro_llm.data.minilm_path())
    batch = cost._minilm_batches(1)[0]
    with torch.no_grad():
        top_net = _net(1)
        fwd_s = median_seconds(lambda: top_net(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).logits, 10, 2)
    lora = pyro_llm.BayesianLoRA(_net(1), prior=1.0)
    predictors = {"map": (stream.map_predictor(top_net, tok, max_length=cost.SEQ_LEN), "mean"),
                  "s16": (stream.posterior_predictor(lora, perturbed_draws(lora, 16), tok,
                                                     max_length=cost.SEQ_LEN, vectorize=True),
                          "uncertainty")}
    for name, (predict, keep) in predictors.items():
        secs = []
        for n in cfg["code_docs"][name]:
            folder = tempfile.mkdtemp(prefix="pyro_llm_growth_")
            try:
                t0 = time.perf_counter()
                pyro_llm.code_corpus(_texts(n), predict, folder, batch_size=cost.BATCH, keep=keep,
                                     progress=False)
                secs.append(time.perf_counter() - t0)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            print(f"  coding {n} reviews ({name}): {secs[-1]:.1f} s", flush=True)
        out[f"code_{name}"] = {"docs": cfg["code_docs"][name], "seconds": secs,
                               "fit": slope(np.asarray(cfg["code_docs"][name]) / 1000, secs)}
    out["map_forward_s"] = fwd_s
    out["code_floor_seconds"] = [n / cost.BATCH * fwd_s for n in cfg["code_docs"]["map"]]
    return out


def part_regress(cfg: dict) -> dict:
    import pyro_llm
    from benchmarks.one_call import corpus

    cost = _cost()
    cost._seed_all()

    done = {}

    def call(n: int, folds: int) -> float:
        if (n, folds) in done:  # the two sweeps share a point
            return done[n, folds]
        df = corpus(n, cfg["labelled"], seed=0)
        model, tok = pyro_llm.models.lora_classifier(seed=0)
        folder = tempfile.mkdtemp(prefix="pyro_llm_growth_")
        try:
            t0 = time.perf_counter()
            pyro_llm.regress(df, "y ~ z + q", label="z", text="text", model=model, tokenizer=tok,
                             folds=folds, cache_dir=folder, seed=0, coder={"max_length": cost.SEQ_LEN},
                             progress=False)
            secs = time.perf_counter() - t0
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"  regress N = {n}, {folds} folds: {secs:.1f} s", flush=True)
        done[n, folds] = secs
        return secs

    by_n = [call(n, 5) for n in cfg["docs"]]
    by_folds = [call(cfg["fold_docs"], k) for k in cfg["folds"]]
    return {"labelled": cfg["labelled"],
            "docs": {"values": cfg["docs"], "folds": 5, "seconds": by_n,
                     "fit": slope(np.asarray(cfg["docs"]) / 1000, by_n)},
            "folds": {"values": cfg["folds"], "docs": cfg["fold_docs"], "seconds": by_folds,
                      "fit": slope(cfg["folds"], by_folds)}}


PARTS = {"predictive": part_predictive, "memory": part_memory, "corpus": part_corpus,
         "regress": part_regress}


# ---------------------------------------------------------------------------- output
def save(results: dict, path: Path) -> None:
    """Write ``results`` atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, not a result)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--figures", default=str(RESULTS / "figures"),
                   help="folder for growth_<part>.png ('' for none)")
    args = p.parse_args(argv)
    import torch

    from benchmarks import growth_plots

    cost = _cost()
    cost.THREADS = args.threads
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.parts:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        t0 = time.perf_counter()
        res = PARTS[name](sizes[name])
        res.update(settings=sizes[name], quick=args.quick, threads=args.threads,
                   wall_s=time.perf_counter() - t0, load_average_1min=os.getloadavg()[0],
                   versions=cost._versions())
        results[name] = res
        save(results, args.out)
        if args.figures:
            growth_plots.plot(name, res, Path(args.figures) / f"growth_{name}.png")
    return results


if __name__ == "__main__":
    main()
