"""Cost benchmarks (``/work/shared/BENCHMARKS.md`` section 3): ratios measured in one process.

Run from the repository root::

    .venv/bin/python benchmarks/cost.py [--quick] [--out FILE] [--rows NAME ...]

Each row is a registered :class:`Benchmark`: a ``setup(sides)`` function that returns two
zero-argument callables (the numerator's and the denominator's unit of work, e.g. one SVI
step and one MAP step) plus a ``settings`` dict. The harness

* times them **interleaved** in one process: ``warmup`` untimed rounds of both, then timed
  rounds (at least ``min_rounds``, then more while the row's time budget lasts, at most
  ``max_rounds``), each round running both callables, the order alternating (denominator
  first in even rounds, numerator first in odd ones) so that drift in machine load and cache
  state falls on both equally; per-call wall time is ``time.perf_counter`` (and CPU time
  ``time.process_time``, reported as ``cpu_ratio``);
* reports the median seconds per call of each and ``ratio = median(num) / median(den)``;
* measures peak memory of each side in its **own fresh subprocess** (``--probe``), which
  builds only that side, runs ``min(warmup, 2)`` calls, resets the kernel's peak-RSS mark
  (``/proc/self/clear_refs``, Linux) and runs ``memory_steps`` more: ``peak_mb`` is then
  ``VmHWM`` from ``/proc/self/status``, the peak resident set size of the whole
  process (Python, torch, model, data) during those steady-state calls, and ``baseline_mb``
  its RSS (psutil, if installed) just before them, so ``peak - baseline`` is the step's own
  working memory. (tracemalloc does not see torch's allocations.) Where the mark cannot be
  reset (not Linux) the peak is ``ru_maxrss`` over the whole process, model loading
  included, and the output says so.

Adding a row: write ``setup(sides) -> Pair`` and decorate it with :func:`register`.
Imports of torch and the library stay inside the setup functions, so this module imports fast.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)  # so that ``import coverage`` (numba does) is not benchmarks/coverage.py

SIDES = ("numerator", "denominator")
THREADS = 2  # torch.set_num_threads in every row's setup; --threads sets it
QUICK = False  # --quick; rows whose data size differs with it read this
PROBE_WARMUP = 2  # warm-up calls in a memory probe (optimiser state exists after the first)


@dataclass(frozen=True)
class Sizes:
    """Warm-up rounds; timed rounds (at least ``min_rounds``, then more until ``max_rounds``
    or until the timed rounds have taken ``budget_s`` seconds); calls in the memory probe."""

    warmup: int
    min_rounds: int
    max_rounds: int
    budget_s: float
    memory_steps: int


@dataclass
class Pair:
    """What a row's setup returns: the two units of work (absent sides are ``None``)."""

    numerator: Callable[[], object] | None
    denominator: Callable[[], object] | None
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    name: str
    setup: Callable[[Iterable[str]], Pair]
    goal: float  # the ratio must be <= goal
    numerator: str  # what the numerator measures, in words
    denominator: str
    quick: Sizes
    full: Sizes


REGISTRY: dict[str, Benchmark] = {}


def register(name: str, *, goal: float, numerator: str, denominator: str,
             quick: Sizes, full: Sizes):
    """Decorator: add ``setup(sides) -> Pair`` to :data:`REGISTRY` as row ``name``."""

    def deco(setup):
        if name in REGISTRY:
            raise ValueError(f"benchmark row {name!r} is registered twice")
        REGISTRY[name] = Benchmark(name, setup, goal, numerator, denominator, quick, full)
        return setup

    return deco


# ---------------------------------------------------------------------------- harness
def time_interleaved(num: Callable, den: Callable, sizes: Sizes,
                     clock: Callable[[], float] = time.perf_counter,
                     cpu_clock: Callable[[], float] = time.process_time) -> dict:
    """Per-call wall and CPU seconds of ``num`` and ``den``, run alternately (module docs)."""
    if sizes.min_rounds < 1 or sizes.warmup < 0 or sizes.max_rounds < sizes.min_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds and warmup >= 0, got {sizes}")
    for _ in range(sizes.warmup):
        num()
        den()
    out = {k: [] for k in ("num", "den", "num_cpu", "den_cpu")}
    start = clock()
    for r in range(sizes.max_rounds):
        if r >= sizes.min_rounds and clock() - start > sizes.budget_s:
            break
        order = (("den", den), ("num", num)) if r % 2 == 0 else (("num", num), ("den", den))
        for key, fn in order:
            c0, t0 = cpu_clock(), clock()
            fn()
            out[key].append(clock() - t0)
            out[key + "_cpu"].append(cpu_clock() - c0)
    return out


def summarise(bench: Benchmark, times: dict, settings: dict,
              memory: dict | None = None) -> dict:
    """One JSON row from :func:`time_interleaved`'s output: medians, ratio, verdict."""
    num_s, den_s = times["num"], times["den"]
    if not num_s or not den_s:
        raise ValueError(f"{bench.name}: no timings to summarise")
    num, den = statistics.median(num_s), statistics.median(den_s)
    ratio = num / den
    memory = memory or {}
    cpu = {k: times.get(k + "_cpu") or [] for k in ("num", "den")}
    return {
        "name": bench.name,
        "ratio": ratio,
        "numerator_s": num,
        "denominator_s": den,
        "peak_mb": memory.get("numerator", {}).get("peak_mb"),
        "settings": settings,
        "goal": bench.goal,
        "verdict": "PASS" if ratio <= bench.goal else "MISS",
        "numerator": bench.numerator,
        "denominator": bench.denominator,
        "peak_mb_denominator": memory.get("denominator", {}).get("peak_mb"),
        "memory": memory,
        "cpu_ratio": (statistics.median(cpu["num"]) / statistics.median(cpu["den"])
                      if cpu["num"] and cpu["den"] and statistics.median(cpu["den"]) > 0
                      else None),
        "spread": {"numerator_s": _quartiles(num_s), "denominator_s": _quartiles(den_s)},
        "samples_s": {"numerator": num_s, "denominator": den_s,
                      "numerator_cpu": cpu["num"], "denominator_cpu": cpu["den"]},
    }


def _quartiles(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def _peak_rss_mb() -> float:
    """Peak RSS: Linux's ``VmHWM`` (which ``clear_refs`` resets), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    # ru_maxrss also keeps the peak of exited threads, so it is not reset by clear_refs
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


def _rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); ``False`` where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        Path("/proc/self/status").read_text()
    except OSError:
        return False
    return True


def run_probe(bench: Benchmark, side: str, sizes: Sizes) -> dict:
    """In this (fresh) process: build one side, warm it up, then measure peak RSS over
    ``sizes.memory_steps`` further calls."""
    pair = bench.setup((side,))
    fn = getattr(pair, side)
    warmup = min(sizes.warmup, PROBE_WARMUP)
    for _ in range(warmup):
        fn()
    gc.collect()
    baseline = _rss_mb()
    reset = _reset_peak_rss()
    for _ in range(sizes.memory_steps):
        fn()
    return {"peak_mb": _peak_rss_mb(), "baseline_mb": baseline,
            "calls": warmup + sizes.memory_steps, "peak_reset": reset}


def probe_memory(bench: Benchmark, quick: bool) -> dict:
    """Peak RSS of each side, each in its own subprocess of this script."""
    out = {}
    for side in SIDES:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", f"{bench.name}:{side}",
               "--threads", str(THREADS)]
        proc = subprocess.run(cmd + (["--quick"] if quick else []), capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {bench.name}:{side} failed:\n{proc.stderr[-3000:]}")
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    reset = all(out[s]["peak_reset"] for s in SIDES)
    window = ("over the post-warm-up calls only (peak mark reset through /proc/self/clear_refs "
              "after warm-up)" if reset else
              "over the whole process, model loading included (peak mark could not be reset)")
    out["method"] = (f"VmHWM (peak resident set size) of a fresh subprocess per side that "
                     f"builds only that side: absolute process RSS (Python, torch, model, data "
                     f"and the steps), {window}; baseline_mb is its RSS (psutil) just before "
                     f"those calls")
    return out


def run_row(bench: Benchmark, sizes: Sizes, quick: bool, memory: bool = True) -> dict:
    load0 = _loadavg()
    pair = bench.setup(SIDES)
    times = time_interleaved(pair.numerator, pair.denominator, sizes)
    settings = dict(
        pair.settings, warmup_rounds=sizes.warmup, timed_rounds=len(times["num"]),
        rounds_rule=f"min {sizes.min_rounds}, then until {sizes.budget_s:g} s or "
                    f"{sizes.max_rounds} rounds", memory_steps=sizes.memory_steps, quick=quick,
        timing="interleaved in one process, order alternating per round; median of per-call "
               "time.perf_counter wall seconds (cpu_ratio: same with time.process_time)",
        load_average_1min={"start": load0, "end": _loadavg()}, cpu_count=os.cpu_count())
    del pair
    gc.collect()
    mem = probe_memory(bench, quick) if memory else None
    return summarise(bench, times, settings, mem)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table (seconds are medians per call)."""
    w = max([24] + [len(r["name"]) for r in rows])  # the row-name column
    head = (f"{'row':<{w}} {'num s':>8} {'den s':>8} {'ratio':>6} {'goal':>6} {'verdict':>7} "
            f"{'cpu ratio':>9} {'rounds':>6} {'peak MB num/den':>15} {'load':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = "n/a"
        if r.get("peak_mb") is not None:
            peak = f"{r['peak_mb']:.0f}/{r['peak_mb_denominator']:.0f}"
        cpu = "n/a" if r.get("cpu_ratio") is None else f"{r['cpu_ratio']:.3f}"
        st = r.get("settings", {})
        load = st.get("load_average_1min") or {}
        load = f"{load.get('start')}->{load.get('end')}" if load else "n/a"
        lines.append(f"{r['name']:<{w}} {r['numerator_s']:>8.4f} {r['denominator_s']:>8.4f} "
                     f"{r['ratio']:>6.3f} {'<=' + format(r['goal'], 'g'):>6} "
                     f"{r['verdict']:>7} {cpu:>9} {st.get('timed_rounds', '?'):>6} "
                     f"{peak:>15} {load:>9}")
    return "\n".join(lines)


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def _notes(row: dict) -> str:
    """Memory method and a warning when the machine was too busy for honest wall timings."""
    lines = []
    mem = row.get("memory") or {}
    if mem:
        n, d = mem["numerator"], mem["denominator"]
        lines.append(f"{row['name']}: peak MB numerator {_mb(n['peak_mb'])} (baseline "
                     f"{_mb(n['baseline_mb'])}), denominator {_mb(d['peak_mb'])} (baseline "
                     f"{_mb(d['baseline_mb'])}); peak_mb = {mem['method']}")
    st = row.get("settings", {})
    loads = [v for v in (st.get("load_average_1min") or {}).values() if v is not None]
    cores = st.get("cpu_count") or 1
    if loads and max(loads) > cores and st.get("versions", {}).get("threads", 1) > 1:
        lines.append(f"{row['name']}: WARNING load average up to {max(loads)} on {cores} cores: "
                     "other processes compete for the CPU and every multi-threaded op waits for "
                     "its threads to be scheduled, so wall-clock ratios are unreliable; rerun on "
                     "an idle machine, or with --threads 1 (cpu_ratio is also affected)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="pyro_llm cost benchmarks (ratios in one process)")
    p.add_argument("--quick", action="store_true", help="small sizes (about 2 minutes)")
    p.add_argument("--out", type=Path, help="write the rows as a JSON list to this file")
    p.add_argument("--rows", nargs="+", choices=sorted(REGISTRY), help="rows to run (all)")
    p.add_argument("--rounds", type=int, help="a fixed number of timed rounds (no time budget)")
    p.add_argument("--warmup", type=int, help="override the number of warm-up rounds")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # NAME:SIDE, internal
    return p


def _sizes(bench: Benchmark, args) -> Sizes:
    s = bench.quick if args.quick else bench.full
    if args.rounds is not None:  # a fixed number of timed rounds
        s = Sizes(s.warmup, args.rounds, args.rounds, float("inf"), s.memory_steps)
    if args.warmup is not None:
        s = Sizes(args.warmup, s.min_rounds, s.max_rounds, s.budget_s, s.memory_steps)
    return s


def main(argv: list[str] | None = None) -> list[dict]:
    global THREADS, QUICK
    args = build_parser().parse_args(argv)
    THREADS, QUICK = args.threads, args.quick
    if args.probe:
        name, side = args.probe.split(":")
        print(json.dumps(run_probe(REGISTRY[name], side, _sizes(REGISTRY[name], args))))
        return []
    rows = []
    for name in args.rows or list(REGISTRY):
        bench = REGISTRY[name]
        print(f"running {name} ({'quick' if args.quick else 'full'}) ...", flush=True)
        rows.append(run_row(bench, _sizes(bench, args), args.quick, not args.no_memory))
    print(format_table(rows))
    for r in rows:
        print(_notes(r))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.out}")
    return rows


# ---------------------------------------------------------------------------- rows
# Shared MiniLM set-up (BENCHMARKS.md: MiniLM, batch 8 x 64 tokens, LoRA r = 8).
BATCH, SEQ_LEN, N_BATCHES, SEED = 8, 64, 16, 0
LORA = {"task_type": "SEQ_CLS", "r": 8, "lora_alpha": 8, "lora_dropout": 0.0,
        "target_modules": ["query", "value"]}


def _seed_all() -> None:
    import pyro
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)
    pyro.set_rng_seed(SEED)  # seeds torch, numpy and random


def _minilm_batches(n_batches: int | None = None) -> list[dict]:
    """``n_batches`` (default ``N_BATCHES``) batches of ``BATCH`` real reviews, padded/truncated
    to ``SEQ_LEN``."""
    import torch
    from transformers import AutoTokenizer

    import pyro_llm

    texts, labels = pyro_llm.data.rotten_tomatoes(seed=SEED)
    n = BATCH * (n_batches or N_BATCHES)
    tok = AutoTokenizer.from_pretrained(pyro_llm.data.minilm_path())
    enc = tok(texts[:n], padding="max_length", truncation=True, max_length=SEQ_LEN,
              return_tensors="pt")
    y = torch.as_tensor(labels[:n])
    out = []
    for i in range(0, n, BATCH):
        sl = slice(i, i + BATCH)
        out.append({"input_ids": enc["input_ids"][sl], "attention_mask": enc["attention_mask"][sl],
                    "labels": y[sl], "index": torch.arange(i, i + BATCH)})
    if any(tuple(b["input_ids"].shape) != (BATCH, SEQ_LEN) for b in out):
        raise RuntimeError(f"tokenised batches are not {BATCH} x {SEQ_LEN}")
    return out


def _peft_minilm(**lora):
    """A fresh peft MiniLM classifier, identical across calls (seeded head and LoRA init);
    ``lora`` overrides entries of ``LORA`` (e.g. ``layers_to_transform=[5]``)."""
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    import pyro_llm

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
    torch.manual_seed(SEED)
    base = AutoModelForSequenceClassification.from_pretrained(pyro_llm.data.minilm_path(),
                                                              num_labels=2)
    return peft.get_peft_model(base, peft.LoraConfig(**dict(LORA, **lora)))


def _seed_lora_b(net, std: float = 0.05):
    """Seeded ``N(0, std^2)`` values in every ``lora_B`` (peft starts them at zero): a stand-in for
    fine-tuned weights, so that adapters change the outputs. Returns ``net`` in eval mode."""
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_B." in name:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return net.eval()


def _defaults(fit: Callable) -> dict:
    """``lr``, ``weight_decay``, ``clip_norm``: the defaults of ``fit_svi`` or ``fit_map``."""
    import inspect

    sig = inspect.signature(fit).parameters
    return {k: sig[k].default for k in ("lr", "weight_decay", "clip_norm") if k in sig}


def _train_step(params: list, loss_fn: Callable, batches: list[dict], lr: float,
                weight_decay: float = 0.0, clip_norm: float | None = None) -> Callable:
    """One optimisation step per call, on the next batch: the loop body of ``fit_svi`` and
    ``fit_map`` (``pyro_llm.infer.svi.train_loop``)."""
    import itertools

    import torch

    it = itertools.cycle(batches)
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step():
        optim.zero_grad(set_to_none=True)
        value = loss_fn(next(it))
        if not torch.isfinite(value):
            raise FloatingPointError(f"loss is {float(value)}")
        value.backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optim.step()
        return float(value.detach())

    return step


def _map_step(batches: list[dict], dropout: bool = True) -> Callable:
    """peft LoRA fine-tuning: train mode (``dropout=False``: eval mode), HF loss, AdamW."""
    import pyro_llm

    net = _peft_minilm()
    net.train(dropout)
    params = [p for p in net.parameters() if p.requires_grad]
    keys = ("input_ids", "attention_mask", "labels")
    return _train_step(params, lambda b: net(**{k: b[k] for k in keys}).loss, batches,
                       **_defaults(pyro_llm.fit_map))


def _svi_step(batches: list[dict], lora=None, guide: str = "normal") -> Callable:
    """Bayesian LoRA: Trace_ELBO loss of model/AutoNormal guide, AdamW over the param store.
    ``lora`` defaults to ``BayesianLoRA`` of a fresh peft MiniLM (backbone in eval mode)."""
    import pyro
    from pyro.infer import Trace_ELBO

    import pyro_llm
    from pyro_llm.infer.svi import param_store_tensors

    pyro.clear_param_store()
    lora = lora if lora is not None else pyro_llm.BayesianLoRA(_peft_minilm())
    size = BATCH * N_BATCHES

    def model(input_ids, attention_mask, labels, index):
        logits = lora(input_ids=input_ids, attention_mask=attention_mask).logits
        pyro_llm.likelihoods.categorical("y", logits, labels, size, index)

    guide = pyro_llm.make_guide(model, guide, init_values=lora)
    elbo = Trace_ELBO()
    params = list(param_store_tensors(model, guide, batches[0], elbo).values())
    return _train_step(params, lambda b: elbo.differentiable_loss(model, guide, **b), batches,
                       **_defaults(pyro_llm.fit_svi))


def _versions() -> dict:
    import peft
    import pyro
    import torch
    import transformers

    return {"torch": torch.__version__, "pyro": pyro.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def _svi_settings() -> dict:
    import pyro_llm

    return {
        "model": "all-MiniLM-L6-v2 (AutoModelForSequenceClassification, num_labels=2)",
        "data": f"Rotten Tomatoes reviews, {N_BATCHES} batches cycled, padding='max_length'",
        "batch": BATCH, "seq_len": SEQ_LEN, "lora": LORA, "seed": SEED,
        "map": "peft model in train mode (backbone hidden/attention dropout 0.1 on, "
               "lora_dropout 0.0); loss = model(**batch, labels=...).loss; AdamW over the "
               "trainable peft tensors",
        "svi": "BayesianLoRA(prior=1.0, select='AB', dropout=False: backbone in eval mode); "
               "make_guide('normal', init_values=lora); Trace_ELBO(num_particles=1)"
               ".differentiable_loss; categorical likelihood in a subsample plate; AdamW over "
               "the param-store tensors (fit_svi's param_store_tensors)",
        "both": "zero_grad(set_to_none), loss, finite check, backward, clip_grad_norm_ if "
                "clip_norm, AdamW.step (the loop body of fit_svi/fit_map); separate identical "
                "peft models per side",
        "map_optim": _defaults(pyro_llm.fit_map), "svi_optim": _defaults(pyro_llm.fit_svi),
        "versions": _versions(),
    }


# sizes of the per-step rows: quick ~1 min, full <= 5 min of timed rounds per row
STEP_SIZES = dict(
    quick=Sizes(warmup=3, min_rounds=10, max_rounds=30, budget_s=45, memory_steps=3),
    full=Sizes(warmup=8, min_rounds=20, max_rounds=600, budget_s=300, memory_steps=5),
)


@register("svi_step_over_map_step", goal=1.15,
          numerator="one SVI step of Bayesian LoRA (as fit_svi)",
          denominator="one peft LoRA MAP training step",
          **STEP_SIZES)
def svi_step_over_map_step(sides: Iterable[str]) -> Pair:
    """SVI step (``fit_svi``'s per-step work) over a peft MAP step, on real MiniLM and reviews.

    Both steps: ``zero_grad(set_to_none=True)``, loss, finite check, ``backward``,
    ``clip_grad_norm_`` where ``clip_norm`` is set, ``AdamW.step`` -- the loop body that
    ``fit_svi`` and ``fit_map`` share, with each one's default ``lr``, ``weight_decay`` and
    ``clip_norm`` (read from their signatures). Two separate but identical peft models (one
    per side), so neither sees the other's updates.
    """
    sides = set(sides)
    _seed_all()
    batches = _minilm_batches()
    den = _map_step(batches) if "denominator" in sides else None
    num = _svi_step(batches) if "numerator" in sides else None
    return Pair(num, den, _svi_settings())


@register("svi_step_over_map_step_no_dropout", goal=1.15,
          numerator="one SVI step of Bayesian LoRA (as fit_svi)",
          denominator="one peft LoRA MAP training step with dropout off (eval mode)",
          **STEP_SIZES)
def svi_step_over_map_step_no_dropout(sides: Iterable[str]) -> Pair:
    """Like ``svi_step_over_map_step``, but like for like: the MAP step runs in eval mode.

    The SVI step runs the backbone without dropout (``BayesianLoRA(dropout=False)``), while
    a user's MAP step pays for BERT's dropout; this row takes that difference out, so the
    ratio is Pyro's own overhead (guide, site log-densities) on top of the same forward and
    backward.
    """
    sides = set(sides)
    _seed_all()
    batches = _minilm_batches()
    den = _map_step(batches, dropout=False) if "denominator" in sides else None
    num = _svi_step(batches) if "numerator" in sides else None
    settings = dict(_svi_settings(), map="peft model in eval mode (no dropout anywhere); loss = "
                    "model(**batch, labels=...).loss; AdamW over the trainable peft tensors")
    return Pair(num, den, settings)


@register("svi_step_diagonal_over_map_step_no_dropout", goal=1.15,
          numerator="one SVI step of Bayesian LoRA with the 'diagonal' guide (one flat site)",
          denominator="one peft LoRA MAP training step with dropout off (eval mode)",
          **STEP_SIZES)
def svi_step_diagonal_over_map_step_no_dropout(sides: Iterable[str]) -> Pair:
    """As ``svi_step_over_map_step_no_dropout`` with ``make_guide(model, "diagonal")``
    (``AutoDiagonalNormal``): the same mean-field family as the default ``"normal"``, its 24 sites
    as one flat latent, so the guide's per-site work (and the optimiser's 48 tensors) become one."""
    sides = set(sides)
    _seed_all()
    batches = _minilm_batches()
    den = _map_step(batches, dropout=False) if "denominator" in sides else None
    num = _svi_step(batches, guide="diagonal") if "numerator" in sides else None
    settings = dict(_svi_settings(), map="peft model in eval mode (no dropout anywhere); loss = "
                    "model(**batch, labels=...).loss; AdamW over the trainable peft tensors",
                    svi="as svi_step_over_map_step_no_dropout, but make_guide(model, 'diagonal', "
                        "init_values=lora): AutoDiagonalNormal")
    return Pair(num, den, settings)


def _add_rows(file: str) -> None:
    """Rows kept in another file (``register_rows(this module)``) join this REGISTRY."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{__name__}.{file}", _HERE / f"{file}.py")
    sys.modules[spec.name] = mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.register_rows(sys.modules[__name__])


_add_rows("cost_laplace")  # laplace_fit_over_map_epoch, laplace_fit_ours_over_laplace_torch, ...
_add_rows("cost_scale")  # predict_s16_top1_over_map_forward, svi_step_top1_cached_over_map_step, ...

if __name__ == "__main__":
    main()
