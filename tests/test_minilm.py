"""The real all-MiniLM-L6-v2 (shipped in a PyPI package) on real Rotten Tomatoes reviews."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from pyro import poutine

from pyro_llm import (
    BayesianLoRA,
    GuidePosterior,
    data,
    features,
    fit_svi,
    likelihoods,
    predict_probs,
)

pytestmark = pytest.mark.slow

N_TRAIN, BATCH, STEPS = 64, 8, 3


def test_minilm_svi_on_rotten_tomatoes(minilm_tokenizer):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    path = str(data.minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    pm = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], task_type=peft.TaskType.SEQ_CLS))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}

    texts, labels = data.rotten_tomatoes(seed=0)
    ds = data.TextDataset(texts[:N_TRAIN], minilm_tokenizer, labels=labels[:N_TRAIN],
                          max_length=48, num_classes=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True,
                                         collate_fn=data.collate)

    lora = BayesianLoRA(pm, prior=0.1)
    query_a = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight"
    assert query_a in lora.site_names
    assert len(lora.site_names) == 6 * 2 * 2  # 6 layers x (query, value) x (A, B)
    assert all(n.endswith(("lora_A.default.weight", "lora_B.default.weight"))
               for n in lora.site_names)

    def model(input_ids, attention_mask, index, labels=None):
        out = lora(input_ids=input_ids, attention_mask=attention_mask)
        likelihoods.categorical("y", features.class_logits(out), labels, len(ds), index)

    res = fit_svi(model, "normal", loader, max_steps=STEPS, lr=1e-3, init_values=lora,
                  progress=False)
    assert res.steps == STEPS
    assert all(math.isfinite(v) for v in res.losses)
    for n, p in pm.named_parameters():  # base weights and the peft adapter: bit-identical
        assert torch.equal(p, before[n]), n

    batch = next(iter(loader))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    fn = lambda **b: torch.softmax(features.class_logits(lora(**b)), -1)  # noqa: E731
    probs = predict_probs(fn, [inputs], GuidePosterior(res.guide), num_samples=3, progress=False)
    assert probs.shape == (3, BATCH, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, BATCH))
    # the guide mean is the fine-tuned adapter moved by at most ~lr per step
    mean = GuidePosterior(res.guide).mean()
    init = lora.init_values()
    assert max(float((mean[k] - init[k]).abs().max()) for k in mean) <= STEPS * 1e-3 * 1.01
    # with the fitted point estimates (the SEQ_CLS head) written back, the peft model computes
    # what BayesianLoRA computes at the fine-tuned adapter
    head = lora.write_to_peft(res.params)
    assert sorted(head) == sorted(lora.fixed_names) and all("classifier" in n for n in head)
    with torch.no_grad(), poutine.condition(data=init):
        out = features.class_logits(lora(**inputs))
        pm.eval()
        torch.testing.assert_close(out, pm(**inputs).logits, rtol=1e-5, atol=1e-5)
