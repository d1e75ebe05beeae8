"""benchmarks/calibration.py reads SmolLM2's label tokens through a BayesianLoRA without forming
the full-vocabulary logits at every position: the same numbers as the full path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from conftest import LABEL_TOKENS, fake_finetune, tiny_transformer, token_batch
from pyro import poutine

import pyro_llm
from pyro_llm.features import label_token_logits
from pyro_llm.posterior import stack_draws

CAL = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration.py"


def _module():
    spec = importlib.util.spec_from_file_location("pyro_llm_bench_calibration_readout", CAL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_drawn_label_logits_equal_the_full_vocabulary_path():
    cal = _module()
    net, _ = tiny_transformer("llama")
    fake_finetune(net)
    lora = pyro_llm.BayesianLoRA(net, prior=0.3, select="B")
    ids, mask = token_batch(5, 7)  # right padding: the last attended positions differ by row
    batch = {"input_ids": ids, "attention_mask": mask}
    g = torch.Generator().manual_seed(0)
    draws = [{lora.site_name(n): 0.3 * torch.randn(lora._shapes[n], generator=g) for n in lora.random_names}
             for _ in range(3)]
    for data in (stack_draws(draws), draws[1]):  # three stacked draws, and one
        with torch.no_grad(), poutine.condition(data=data):
            got = cal._drawn_label_logits(lora, batch, LABEL_TOKENS)
            want = label_token_logits(lora(input_ids=ids, attention_mask=mask), mask, LABEL_TOKENS)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)
    fn = cal.smollm2_logits_fn(LABEL_TOKENS)  # the peft model takes the restricted-head path
    torch.testing.assert_close(fn(net, batch), label_token_logits(net(input_ids=ids, attention_mask=mask),
                                                                   mask, LABEL_TOKENS), rtol=1e-5, atol=1e-5)
