"""The last transformer block computed only at the position the head reads.

A BERT sequence classifier reads one position of its last block's output: the pooler takes
position 0 (CLS), the classifier reads the pooler. When :func:`pyro_llm.batched.run` runs that
block once per draw, its other positions are wasted work. For the models listed in
:data:`READS_FIRST`, the last block then runs its query, attention output, LayerNorm and MLP at
position 0 only, with keys and values at every position (the attention mask respected), and
returns a ``(rows, 1, hidden)`` tensor whose one position is exact: the pooler reads it as
before. The LoRA layers and the batched-draw hooks run as module calls, as on the full path.

Anything else takes the full path: a model class not on the list (or a subclass of one), an
attention implementation other than ``eager`` / ``sdpa``, dropout in train mode, hidden
states or attentions requested, a decoder or cross-attention, a transformers release before 5,
and a block carrying forward / backward hooks or a patched ``forward`` (whoever put them there
expects every position; transformers' own, inactive, output-capturing hooks excepted).

>>> import torch, transformers as tf
>>> from pyro_llm import batched
>>> cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
...                     intermediate_size=64)
>>> net = tf.BertForSequenceClassification(cfg).eval()
>>> plan = batched.Plan(net.bert.encoder.layer, "bert.encoder.layer", {}, {}, "default")
>>> reads_first_position(net, plan, 1, (), {}) is net.bert.encoder.layer[1]
True
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["READS_FIRST", "ATTENTION", "reads_first_position", "first_position_only",
           "read_positions_only"]

# transformers model class -> attribute holding its backbone (whose pooler reads position 0)
READS_FIRST = {"BertForSequenceClassification": "bert"}
# attention implementations whose one-query-row result is the full result's row
ATTENTION = ("eager", "sdpa")
_OUTPUT_FLAGS = ("output_hidden_states", "output_attentions")
# keyword arguments a BERT block receives from its encoder (the flags must be off, the rest None)
_LAYER_KWARGS = {"encoder_attention_mask", "cache", "position_ids", *_OUTPUT_FLAGS}


def _requested(value) -> bool:
    """An output flag that asks for something (``output_hidden_states`` may be an index, 0 too)."""
    return value is not None and value is not False


def _bert():
    """transformers' BERT module, or ``None`` before release 5 (other block outputs and masks)."""
    import transformers
    from transformers.models.bert import modeling_bert

    return modeling_bert if int(transformers.__version__.split(".")[0]) >= 5 else None


def _capture_hook(hook) -> bool:
    """transformers' output-capturing hook: installed for good once outputs were requested,
    inactive unless they are requested again (which takes the full path)."""
    return (getattr(hook, "__module__", "") == "transformers.utils.output_capturing"
            and getattr(hook, "__name__", "") == "output_capturing_hook")


def _hooked(block: torch.nn.Module) -> bool:
    """Whether a module of ``block`` has a patched ``forward`` or a hook not from transformers."""
    for m in block.modules():
        if "forward" in m.__dict__:
            return True
        for hooks in (m._forward_pre_hooks, m._forward_hooks, m._backward_pre_hooks,
                      m._backward_hooks):
            if any(not _capture_hook(h) for h in hooks.values()):
                return True
    return False


def _stochastic(block: torch.nn.Module) -> bool:
    """Whether ``block`` drops anything at random (a dropout module, or the attention's dropout,
    in train mode with ``p > 0``): one row of it would not reproduce the full path's draws."""
    sa = block.attention.self
    return (sa.training and sa.dropout.p > 0) or any(
        m.training and "Dropout" in type(m).__name__ and getattr(m, "p", 0) > 0
        for m in block.modules())


def _bert_block(block: torch.nn.Module, bert) -> bool:
    """A plain BERT encoder block (self-attention, no cross-attention), exactly these classes."""
    att = getattr(block, "attention", None)
    return (type(block) is bert.BertLayer and not block.is_decoder and not block.add_cross_attention
            and type(att) is bert.BertAttention and not att.is_cross_attention
            and type(att.self) is bert.BertSelfAttention and type(att.output) is bert.BertSelfOutput
            and type(block.intermediate) is bert.BertIntermediate
            and type(block.output) is bert.BertOutput)


def reads_first_position(model: torch.nn.Module, plan, k: int, args: tuple, kwargs: dict):
    """The last block of ``plan`` when the call ``model(*args, **kwargs)``, with blocks ``k``
    and above running, may compute it at position 0 only; ``None`` where it may not."""
    blocks = plan.blocks
    if blocks is None or k >= len(blocks) or len(args) > 4:  # peft's 5th/6th: output flags
        return None
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    backbone = READS_FIRST.get(type(base).__name__)
    bert = _bert() if backbone else None
    if bert is None or type(base) is not getattr(bert, type(base).__name__):
        return None
    cfg, body = base.config, getattr(base, backbone)
    block = blocks[len(blocks) - 1]
    if (blocks is not body.encoder.layer or type(body.pooler) is not bert.BertPooler
            or cfg._attn_implementation not in ATTENTION or cfg.is_decoder
            or any(_requested(kwargs.get(f)) or _requested(getattr(cfg, f, None)) for f in _OUTPUT_FLAGS)
            or not _bert_block(block, bert) or _stochastic(block) or _hooked(block)):
        return None
    return block


def _plain_call(mask, encoder_hidden_states, rest: tuple, kwargs: dict) -> bool:
    """Whether a block call is the encoder's usual one (nothing asks for every position)."""
    if rest or encoder_hidden_states is not None or (mask is not None and mask.dim() != 4):
        return False
    for key, value in kwargs.items():
        if key not in _LAYER_KWARGS or (key in _OUTPUT_FLAGS and _requested(value)):
            return False
        if key in ("encoder_attention_mask", "cache") and value is not None:
            return False
    return True


@contextlib.contextmanager
def first_position_only(block: torch.nn.Module):
    """Within the block, ``block`` (a BERT encoder layer, see :func:`reads_first_position`)
    returns its output at position 0 only, shape ``(rows, 1, hidden)``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    full, sa = type(block).forward, block.attention.self

    def forward(hidden_states, attention_mask=None, encoder_hidden_states=None, *rest, **kwargs):
        impl = sa.config._attn_implementation
        if impl not in ATTENTION or not _plain_call(attention_mask, encoder_hidden_states, rest, kwargs):
            return full(block, hidden_states, attention_mask, encoder_hidden_states, *rest, **kwargs)
        kwargs = {key: v for key, v in kwargs.items() if key not in ("encoder_attention_mask", "cache")}
        head = hidden_states[:, :1]

        def split(x):  # (rows, positions, hidden) -> (rows, heads, positions, head size)
            return x.view(*x.shape[:-1], -1, sa.attention_head_size).transpose(1, 2)

        mask = attention_mask
        if mask is not None and mask.shape[-2] != 1:
            mask = mask[:, :, :1]  # the query row of position 0, every key
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        ctx, _ = attend(sa, split(sa.query(head)), split(sa.key(hidden_states)),
                        split(sa.value(hidden_states)), mask, dropout=0.0, scaling=sa.scaling,
                        encoder_hidden_states=None, **kwargs)
        ctx = ctx.reshape(*head.shape[:-1], -1).contiguous()
        return block.feed_forward_chunk(block.attention.output(ctx, head))

    before = block.__dict__.get("forward")
    block.forward = forward
    try:
        yield
    finally:
        if before is None:
            del block.forward
        else:
            block.forward = before


def read_positions_only(model: torch.nn.Module, plan, k: int, args: tuple, kwargs: dict):
    """:func:`first_position_only` on the last block where :func:`reads_first_position` allows
    it, else a context that changes nothing."""
    block = reads_first_position(model, plan, k, args, kwargs)
    return first_position_only(block) if block is not None else contextlib.nullcontext()
