"""The last BERT block at the one position its classifier head reads (pyro_llm.read_positions):
the same logits (and gradients) as the full path, for S stacked draws with padded rows."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import fake_finetune, tiny_transformer, token_batch
from pyro import poutine

import pyro_llm
from pyro_llm import read_positions
from pyro_llm.posterior import stack_draws

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 round-off; observed <= 1e-8
S = 4


def _top(kind):
    tag = {"bert": "layer.1.", "llama": "layers.1."}[kind]
    return lambda n: tag in n


def _draws(lora, s=S, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [{lora.site_name(n): scale * torch.randn(lora.peft_model.get_parameter(n).shape, generator=g)
             for n in lora.random_names} for _ in range(s)]


def _bert(impl="sdpa", select="top"):
    net, _ = tiny_transformer("bert")
    fake_finetune(net)
    net.get_base_model().set_attn_implementation(impl)
    return net, pyro_llm.BayesianLoRA(net, prior=0.3, select=_top("bert") if select == "top" else "AB")


def _batch():
    ids, mask = token_batch(5, 7)
    assert (mask == 0).any() and (mask == 1).all(-1).any()  # padded rows and a full one
    return ids, mask


def _loop(lora, draws, **inputs):
    """The full path: one plain forward per draw."""
    out = []
    for d in draws:
        with torch.no_grad(), poutine.condition(data=d):
            out.append(lora(**inputs).logits)
    return torch.stack(out)


def _stacked(lora, draws, **inputs):
    with torch.no_grad(), poutine.condition(data=stack_draws(draws)):
        return lora(**inputs).logits


@contextlib.contextmanager
def _positions_seen(modules: dict[str, torch.nn.Module]):
    """Sequence lengths each named module receives. A global hook: a hook on the module itself
    would send the block down the full path (its owner expects every position)."""
    seen = {name: [] for name in modules}
    by_id = {id(m): name for name, m in modules.items()}

    def hook(module, args):
        if id(module) in by_id and args:
            seen[by_id[id(module)]].append(args[0].shape[1])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _spied(net, kind="bert"):
    base = net.get_base_model()
    if kind == "bert":
        last = base.bert.encoder.layer[-1]
        return {"pooler": base.bert.pooler, "mlp": last.intermediate.dense,
                "key": last.attention.self.key, "query": last.attention.self.query}
    return {"mlp": base.model.layers[-1].mlp.down_proj}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("select", ["top", "all"])
def test_first_position_logits_equal_the_full_path(impl, select):
    net, lora = _bert(impl, select)
    ids, mask = _batch()
    draws = _draws(lora)
    with _positions_seen(_spied(net)) as full_seen:
        want = _loop(lora, draws, input_ids=ids, attention_mask=mask)
    assert (want[0] - want[1]).abs().max() > 1e-2  # the draws differ, so equality means something
    with _positions_seen(_spied(net)) as seen:
        got = _stacked(lora, draws, input_ids=ids, attention_mask=mask)
    assert got.shape == (S, 5, 2)
    torch.testing.assert_close(got, want, **TOL)
    assert full_seen["pooler"] == [7] * S
    assert seen["pooler"] == [1]  # the head read a one-position last hidden state


def test_the_last_block_runs_its_query_and_mlp_at_one_position():
    """Queries, attention output and MLP at position 0; keys and values at every position."""
    net, lora = _bert()
    ids, mask = _batch()
    draws = _draws(lora)
    with _positions_seen(_spied(net)) as seen:
        _stacked(lora, draws, input_ids=ids, attention_mask=mask)
    assert seen["mlp"] == [1] and seen["query"] == [1]
    assert seen["key"] == [7]


def test_rows_without_padding_equal_the_full_path():
    """No padding: sdpa gets no mask at all."""
    net, lora = _bert()
    ids, _ = _batch()
    mask = torch.ones_like(ids)
    draws = _draws(lora)
    with _positions_seen(_spied(net)) as seen:
        got = _stacked(lora, draws, input_ids=ids, attention_mask=mask)
    assert seen["mlp"] == [1]
    torch.testing.assert_close(got, _loop(lora, draws, input_ids=ids, attention_mask=mask), **TOL)


def test_gradients_equal_the_full_path():
    """Under grad mode (an SVI step's particles) the backward pass agrees too."""
    net, lora = _bert()
    ids, mask = _batch()
    draws = _draws(lora, 3)
    stacked = {k: v.requires_grad_() for k, v in stack_draws(draws).items()}
    with poutine.condition(data=stacked), _positions_seen(_spied(net)) as seen:
        lora(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)[..., 0].sum().backward()
    assert seen["mlp"] == [1]
    for i, d in enumerate(draws):
        d = {k: v.clone().requires_grad_() for k, v in d.items()}
        with poutine.condition(data=d):
            lora(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)[..., 0].sum().backward()
        for k, v in d.items():
            torch.testing.assert_close(stacked[k].grad[i], v.grad, rtol=1e-4, atol=1e-6)


def test_llama_is_not_on_the_list_and_takes_the_full_path():
    net, fn = tiny_transformer("llama")
    fake_finetune(net)
    lora = pyro_llm.BayesianLoRA(net, prior=0.3, select=_top("llama"))
    ids, mask = _batch()
    draws = _draws(lora)
    assert read_positions.reads_first_position(net, lora.plan, 1, (), {}) is None
    want = []
    for d in draws:
        with torch.no_grad(), poutine.condition(data=d):
            want.append(fn(lora(input_ids=ids, attention_mask=mask), mask))
    with _positions_seen(_spied(net, "llama")) as seen:
        with torch.no_grad(), poutine.condition(data=stack_draws(draws)):
            got = fn(lora(input_ids=ids, attention_mask=mask), mask)
    assert seen["mlp"] == [7]
    torch.testing.assert_close(got, torch.stack(want), **TOL)


def test_requests_for_every_position_take_the_full_path():
    """Hidden states asked for, or a hook on a module of the last block: every position."""
    net, lora = _bert()
    ids, mask = _batch()
    draws = _draws(lora)
    with torch.no_grad(), poutine.condition(data=stack_draws(draws)):
        out = lora(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert out.hidden_states[-1].shape == (S, 5, 7, 32)
    torch.testing.assert_close(out.logits, _loop(lora, draws, input_ids=ids, attention_mask=mask), **TOL)
    mlp = net.get_base_model().bert.encoder.layer[-1].intermediate.dense
    seen = []
    handle = mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        _stacked(lora, draws, input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    assert seen == [7]


def test_the_gate():
    net, lora = _bert()
    plan, top = lora.plan, net.get_base_model().bert.encoder.layer[-1]
    gate = read_positions.reads_first_position
    assert gate(net, plan, 1, (), {}) is top
    assert gate(net, plan, 0, (), {}) is top  # every block random: the last still reads one
    assert gate(net, plan, 2, (), {}) is None  # the last block does not run per draw
    assert gate(net, plan, 1, (), {"output_attentions": True}) is None
    assert gate(net, plan, 1, (), {"output_hidden_states": 0}) is None  # an index is a request
    top.train()
    assert gate(net, plan, 1, (), {}) is None  # dropout: the full path
    top.eval()
    handle = top.output.dense.register_forward_hook(lambda m, a, out: None)
    assert gate(net, plan, 1, (), {}) is None  # a hook's owner expects every position
    handle.remove()
    ids, mask = _batch()
    with torch.no_grad():  # transformers installs its output-capturing hooks for good ...
        net(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert top._forward_hooks
    assert gate(net, plan, 1, (), {}) is top  # ... inactive unless outputs are asked for again

    class Custom(type(net.get_base_model())):  # a subclass may read other positions
        pass

    net.get_base_model().__class__ = Custom
    assert gate(net, plan, 1, (), {}) is None
