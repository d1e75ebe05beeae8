"""The one call on real text (S1 at full size): ``pyro_llm.regress`` from reviews to a table.

10,000 Rotten Tomatoes reviews, fresh vs rotten as the gold z, of which 500 are labelled at
random; Q and Y simulated around the real z as in B1 (``Y = 1 + z + 0.5 Q + ε``, so the target
coefficient is 1); MiniLM with LoRA fine-tuned five times inside ``regress`` (cross-fitting), every
review coded, then the doubly robust estimate. Run from the repository root::

    .venv/bin/python benchmarks/one_call.py --out benchmarks/results/one_call.json
    .venv/bin/python benchmarks/one_call.py --interrupt-after 150 --out ...   # then resume

``--interrupt-after S`` runs the call in a child process, kills it (SIGKILL) after S seconds,
then runs it again on the same cache folder and checks that the resumed table equals an
uninterrupted one (``--reference`` names that run's JSON).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)


def corpus(n_docs: int = 10_000, n_labelled: int = 500, seed: int = 0):
    import pandas as pd

    from pyro_llm import data

    texts, gold = data.rotten_tomatoes(seed=0)
    texts, gold = list(texts[:n_docs]), np.asarray(gold[:n_docs])
    rng = np.random.default_rng(seed)
    q = rng.normal(size=n_docs) + 0.8 * (gold - gold.mean())        # Q related to z
    y = 1 + gold + 0.5 * q + rng.normal(size=n_docs)
    lab = np.zeros(n_docs, bool)
    lab[rng.choice(n_docs, n_labelled, replace=False)] = True
    return pd.DataFrame({"text": texts, "y": y, "q": q, "z": np.where(lab, gold, np.nan)})


def one_call(cache: str, n_docs: int, n_labelled: int, max_length: int, seed: int, threads: int,
             posterior: str) -> dict:
    import torch

    import pyro_llm

    torch.set_num_threads(threads)
    df = corpus(n_docs, n_labelled, seed)
    model, tok = pyro_llm.models.lora_classifier(seed=seed)
    start = time.perf_counter()
    res = pyro_llm.regress(df, "y ~ z + q", label="z", text="text", model=model, tokenizer=tok,
                           posterior=posterior, folds=5, cache_dir=cache, seed=seed,
                           coder={"max_length": max_length}, num_draws=1000)
    secs = time.perf_counter() - start
    z = res["z"]
    return {"seconds": secs, "estimate": z["mean"], "se": z["sd"], "lower": z["lower"], "upper": z["upper"],
            "covers_truth": bool(z["lower"] <= 1.0 <= z["upper"]), "truth": 1.0,
            "fold_accuracy": [float(a) for a in res.info["fold_accuracy"]],
            "effective_labelled": float(res.info["effective_labelled"][1]),
            "labelled_only_se": float(res.info["labelled_only_se"][1]),
            "completion_log_loss": res.info["completion_log_loss"],
            "coder_seconds": res.info["coder"]["total_seconds"], "summary": repr(res),
            "n_docs": n_docs, "n_labelled": n_labelled, "max_length": max_length, "posterior": posterior,
            "threads": threads}


def _child(args, queue):
    queue.put(one_call(*args))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=10_000)
    p.add_argument("--labelled", type=int, default=500)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--posterior", default="map")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="outputs/one_call_cache")
    p.add_argument("--interrupt-after", type=float, help="kill the first run after this many seconds")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    call = (args.cache, args.docs, args.labelled, args.max_length, args.seed, args.threads, args.posterior)
    record = {}
    if args.interrupt_after:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_child, args=(call, queue))
        child.start()
        child.join(args.interrupt_after)
        record["killed"] = child.is_alive()
        if child.is_alive():
            child.kill()
            child.join()
        record["killed_after_s"] = args.interrupt_after
    out = one_call(*call)
    out.update(record)
    print(out["summary"])
    print(json.dumps({k: v for k, v in out.items() if k != "summary"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
