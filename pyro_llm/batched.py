"""Many adapter draws in one forward, and the frozen prefix run once.

The cost of a posterior predictive is LLM forward passes. Two things bring S adapter draws
close to one pass:

* **Sample-batched adapters.** The S draws of a LoRA pair arrive stacked, ``A: (S, r, in)``,
  ``B: (S, out, r)``. The inputs are tiled S times along the batch (row ``s * N + n`` is input
  ``n`` under draw ``s``); each adapted layer computes its frozen base output on all S * N
  rows in one matrix product and adds the per-draw delta
  ``scaling * (x_s A_s^T) B_s^T`` with two batched products (``torch.bmm``). One forward
  instead of S, with the same numbers as the loop.
* **The shared frozen prefix.** If the lowest random (or trainable) adapter sits in transformer
  block k, the embeddings and blocks ``0 .. k-1`` do not depend on the draw: they run once on
  the N inputs (under ``no_grad``), and their output is tiled into block k. Blocks below k are
  skipped in the second pass (they pass their input through); everything the model computes
  from the inputs alone (attention masks, rotary tables, the classifier's pooling) is computed
  as usual from the tiled inputs. A :class:`~pyro_llm.prefix_cache.PrefixCache` keeps those
  prefix activations across calls (SVI epochs, repeated predictions).
* **Only the positions the head reads.** A BERT classifier reads position 0 of its last block:
  that block runs there only (:mod:`pyro_llm.read_positions`).

Both work on any peft LoRA model whose transformer blocks sit in one ``nn.ModuleList``
(``encoder.layer``, ``model.layers``, ``transformer.h``, ...) and whose block takes the hidden
states as its first argument; models without one get the sample batching only. Every
tensor argument whose first dimension is the batch size is tiled; outputs come back with the
sample dimensions in front: ``logits (*sample_shape, N, ...)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from . import read_positions
from .adapter_state import own_path

__all__ = ["Plan", "plan_for", "find_blocks", "run", "fold_outputs"]

_BEFORE, _AFTER = -1, math.inf


class _Stop(Exception):
    """Raised by the hook at block k to end the prefix pass early."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("prefix captured")
        self.hidden = hidden


def find_blocks(model: torch.nn.Module, layer_modules: list[str]) -> tuple[str, torch.nn.ModuleList] | None:
    """The ``nn.ModuleList`` of transformer blocks holding the LoRA layers (the longest list
    of same-typed modules that contains one), or ``None`` (e.g. an MLP)."""
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or len(m) < 2:
            continue
        if len({type(c) for c in m}) != 1:
            continue
        if not any(lm.startswith(name + ".") for lm in layer_modules):
            continue
        if best is None or len(m) > len(best[1]):
            best = (name, m)
    return best


@dataclass
class Plan:
    """Where each adapted layer sits: its module, and the index of its block.

    ``block_of[peft_name]`` is the block index of a trainable tensor, ``-1`` for a tensor before
    the blocks (e.g. an adapted embedding) and ``inf`` after them (a classifier head).
    """

    blocks: torch.nn.ModuleList | None
    blocks_name: str | None
    layer_of: dict[str, tuple[str, str]]  # peft name -> (LoRA module name, "A" | "B")
    block_of: dict[str, float]
    adapter: str
    module_order: dict[str, int] = field(default_factory=dict)  # registration order of modules
    returns_tuple: bool | None = None  # what a block returns; learnt on the first prefix pass
    extra: dict = field(default_factory=dict)

    def position(self, name: str) -> float:
        """Block index of a parameter or buffer ``name``; ``-1`` before the blocks, ``inf`` after
        them (by where its module was registered)."""
        if self.blocks_name and name.startswith(self.blocks_name + "."):
            return int(name[len(self.blocks_name) + 1:].split(".", 1)[0])
        owner = name.rsplit(".", 1)[0]
        while owner and owner not in self.module_order:
            owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        start = self.module_order.get(self.blocks_name, 0)
        return _BEFORE if self.module_order.get(owner, 0) < start else _AFTER


def plan_for(model: torch.nn.Module, names: list[str], adapter: str) -> Plan:
    """Map the trainable tensors ``names`` (peft parameter names) to layers and blocks."""
    layer_of = {}
    for n in names:
        for kind in ("A", "B"):
            tag = f".lora_{kind}.{adapter}.weight"
            if n.endswith(tag):
                layer_of[n] = (n[: -len(tag)], kind)
    found = find_blocks(model, [m for m, _ in layer_of.values()])
    blocks_name, blocks = found if found else (None, None)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    plan = Plan(blocks, blocks_name, layer_of, {}, adapter, module_order=order)
    plan.block_of = {n: plan.position(n) for n in names}
    return plan


def prefix_depth(plan: Plan, varying: list[str]) -> int:
    """Number of blocks below every tensor in ``varying``: the frozen prefix (0: none)."""
    if plan.blocks is None or not varying:
        return 0
    k = min(plan.block_of[n] for n in varying)
    # above every block (a head only): share all but the last block, which then runs per draw
    return 0 if k == _BEFORE else int(min(k, len(plan.blocks) - 1))


# ---------------------------------------------------------------------------- batch helpers
def _batch_size(args, kwargs) -> int:
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    raise ValueError("no tensor argument with a batch dimension was passed to the model")


def _tile(x, n: int, s: int):
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n and s > 1:
        return x.repeat(s, *([1] * (x.dim() - 1)))
    return x


def select_rows(x, n: int, idx: torch.Tensor):
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n:
        return x[idx.to(x.device)]
    return x


def fold_outputs(out, total: int, sample_shape: torch.Size):
    """Reshape every tensor with leading size ``total = S * N`` to ``(*sample_shape, N, ...)``."""
    if isinstance(out, torch.Tensor):
        if out.dim() > 0 and out.shape[0] == total:
            out = out.reshape(*sample_shape, total // math.prod(sample_shape), *out.shape[1:])
            out.sample_shape = sample_shape  # read by pyro_llm.features
        return out
    if isinstance(out, Mapping):  # transformers' ModelOutput is an OrderedDict
        vals = {k: fold_outputs(v, total, sample_shape) for k, v in out.items()}
        try:
            folded = type(out)(**vals)
            # read by pyro_llm.features: the leading dimensions are draws, not data
            object.__setattr__(folded, "sample_shape", sample_shape)
            return folded
        except (TypeError, AttributeError):
            return vals
    if isinstance(out, tuple):
        return type(out)(fold_outputs(v, total, sample_shape) for v in out)
    if isinstance(out, list):
        return [fold_outputs(v, total, sample_shape) for v in out]
    return out


# ---------------------------------------------------------------------------- the passes
def prefix_hidden(model, plan: Plan, k: int, weights: dict, args, kwargs) -> torch.Tensor:
    """The input of block ``k`` for these inputs: the model run until block k, under no_grad."""
    block = plan.blocks[k]

    def stop(module, a, kw):
        raise _Stop(a[0] if a else kw["hidden_states"])

    def learn(module, a, out):
        plan.returns_tuple = isinstance(out, tuple)

    handles = [block.register_forward_pre_hook(stop, with_kwargs=True)]
    if plan.returns_tuple is None and k > 0:
        handles.append(plan.blocks[0].register_forward_hook(learn))
    try:
        with torch.no_grad():
            torch.func.functional_call(model, weights, args, kwargs)
    except _Stop as s:
        return s.hidden.detach()
    finally:
        for h in handles:
            h.remove()
    raise RuntimeError(f"block {k} of {plan.blocks_name} was not called in the forward pass; "
                       "this model cannot share its frozen prefix (pass share_prefix=False)")


@contextlib.contextmanager
def _skip_prefix(plan: Plan, k: int, hidden: torch.Tensor):
    """Blocks below k return their input; block k receives ``hidden`` instead of its input."""

    def passthrough(*a, **kw):
        h = a[0] if a else kw["hidden_states"]
        return (h,) if plan.returns_tuple else h

    def inject(module, a, kw):
        if a:
            return (hidden, *a[1:]), kw
        return a, {**kw, "hidden_states": hidden}

    skipped = [(b, b.__dict__.get("forward")) for b in list(plan.blocks)[:k]]
    for b, _ in skipped:
        b.forward = passthrough
    handle = plan.blocks[k].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        _restore_forward(skipped)


def _rowwise(module: torch.nn.Module) -> bool:
    """A leaf module that maps each batch row on its own (its output rows depend on the same
    input rows only): linear maps and normalisations."""
    if next(module.children(), None) is not None:
        return False
    if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
        return True
    name = type(module).__name__
    return name == "Conv1D" or name.endswith(("RMSNorm", "LayerNorm"))


@contextlib.contextmanager
def _dedup_first_block(plan: Plan, k: int, tiled: torch.Tensor, n: int, s: int):
    """In block k, whose input is S identical copies of the prefix output, row-wise layers
    (its first norm, the base query/key/value projections) compute on one copy and tile the
    result; what mixes in the draws (the LoRA deltas, attention with drawn queries) does not
    see a tiled tensor and runs on every row."""
    known = [tiled]  # tensors known to hold s copies of their first n rows (kept alive here)
    patched = []

    def wrap(forward):
        def fwd(x, *a, **kw):
            if a or kw or not isinstance(x, torch.Tensor) or not any(x is t for t in known):
                return forward(x, *a, **kw)
            y = forward(x[:n])
            y = y.repeat(s, *([1] * (y.dim() - 1)))
            known.append(y)
            return y

        return fwd

    for m in plan.blocks[k].modules():
        if _rowwise(m):
            patched.append((m, m.__dict__.get("forward")))
            m.forward = wrap(m.forward)
    try:
        yield
    finally:
        _restore_forward(patched)


def _restore_forward(patched) -> None:
    """Undo instance-level ``forward`` patches (an earlier instance attribute comes back)."""
    for m, before in reversed(patched):
        if before is None:
            del m.forward
        else:
            m.forward = before


@contextlib.contextmanager
def _batched_layers(model, plan: Plan, weights: dict, batched: list[str], s: int, also=()):
    """Adapted layers whose A or B carries S draws (and the LoRA modules ``also``): peft's own
    LoRA path off, the per-draw delta added by a forward hook with two batched matrix products."""
    layers: dict[str, dict] = {m: {} for m in also}
    linears: dict[str, dict] = {}
    for n in batched:
        if n in plan.layer_of:
            mod, kind = plan.layer_of[n]
            layers.setdefault(mod, {})[kind] = weights[n]
            continue
        mod, _, kind = n.rpartition(".")
        if kind not in ("weight", "bias") or not isinstance(model.get_submodule(mod), torch.nn.Linear):
            raise NotImplementedError(
                f"{n}: sample-batched draws support LoRA matrices and nn.Linear weights and biases "
                "(e.g. a classifier head); run the draws one at a time for this tensor")
        linears.setdefault(mod, {})[kind] = weights[n]
    state = []
    try:
        for mod_name, wb in linears.items():
            lin = model.get_submodule(mod_name)
            w = wb.get("weight", weights.get(f"{mod_name}.weight", lin.weight))
            w = w.expand(s, *w.shape) if w.dim() == 2 else w.reshape(s, *w.shape[-2:])
            b = wb.get("bias", weights.get(f"{mod_name}.bias", lin.bias))
            if b is not None:
                b = b.expand(s, *b.shape) if b.dim() == 1 else b.reshape(s, b.shape[-1])
            state.append((None, None, lin.register_forward_hook(_linear_hook(w, b, s))))
        for mod_name, ab in layers.items():
            layer = model.get_submodule(mod_name)
            # the partner of a drawn matrix: its injected value (a fitted param), else the model's
            a = ab.get("A", weights.get(f"{mod_name}.lora_A.{plan.adapter}.weight",
                                        layer.lora_A[plan.adapter].weight))
            b = ab.get("B", weights.get(f"{mod_name}.lora_B.{plan.adapter}.weight",
                                        layer.lora_B[plan.adapter].weight))
            a = a.expand(s, *a.shape[-2:]) if a.dim() == 2 else a.reshape(s, *a.shape[-2:])
            b = b.expand(s, *b.shape[-2:]) if b.dim() == 2 else b.reshape(s, *b.shape[-2:])
            if plan.adapter in getattr(layer, "lora_variant", {}):
                raise NotImplementedError(
                    f"{mod_name}: sample-batched draws support plain LoRA layers only (not DoRA or "
                    "other variants)")
            hook = layer.register_forward_hook(
                _delta_hook(a, b, layer.scaling[plan.adapter], layer.lora_dropout[plan.adapter], s))
            state.append((layer, layer._disable_adapters, hook))
            layer._disable_adapters = True
        yield
    finally:
        for layer, flag, hook in state:
            hook.remove()
            if layer is not None:
                layer._disable_adapters = flag


def _linear_hook(w: torch.Tensor, b: torch.Tensor | None, s: int):
    """Replace a Linear's output by ``x_s W_s^T + b_s`` for each draw s."""

    def hook(module, args, output):
        x = args[0]
        xs = x.reshape(s, -1, x.shape[-1]).to(w.dtype)
        y = torch.bmm(xs, w.transpose(-1, -2))
        if b is not None:
            y = y + b[:, None, :]
        return y.reshape(output.shape).to(output.dtype)

    return hook


def _delta_hook(a: torch.Tensor, b: torch.Tensor, scaling: float, dropout, s: int):
    """Add ``scaling * (x_s A_s^T) B_s^T`` to the base output: one ``bmm`` to rank r, then one
    ``baddbmm`` that scales and adds in the same pass (no separate elementwise passes)."""

    def hook(module, args, output):
        x = dropout(args[0])
        xa = torch.bmm(x.reshape(s, -1, x.shape[-1]).to(a.dtype), a.transpose(-1, -2))
        if output.dtype == a.dtype and output.is_contiguous():
            out = output.reshape(s, -1, output.shape[-1])
            return torch.baddbmm(out, xa, b.transpose(-1, -2), alpha=scaling).reshape(output.shape)
        d = torch.bmm(xa, b.transpose(-1, -2))
        return output + (d * scaling).reshape(output.shape).to(output.dtype)

    return hook


def run(model: torch.nn.Module, plan: Plan, weights: dict[str, torch.Tensor], sample_shape: torch.Size,
        args: tuple, kwargs: dict, *, random: list[str] = (), share_prefix: bool = True, cache=None):
    """Run ``model`` under ``weights`` (peft name -> tensor); tensors with the leading
    ``sample_shape`` are sample-batched. Returns the outputs with ``sample_shape`` in front.

    ``random`` names the tensors that change from call to call (drawn ones). With
    ``share_prefix``, the blocks below the lowest random, sample-batched or (under grad mode)
    trainable tensor run once per input rather than once per draw; ``cache`` (a
    :class:`~pyro_llm.prefix_cache.PrefixCache`) keeps their output between calls.
    """
    sample_shape = torch.Size(sample_shape)
    s = math.prod(sample_shape)
    nd = len(sample_shape)
    dims = plan.extra.get("dims")
    if dims is None:
        dims = plan.extra["dims"] = {n: p.dim() for n, p in model.named_parameters()}
    batched = [w for w, t in weights.items()
               if nd and t.dim() == nd + dims.get(w, t.dim()) and t.shape[:nd] == sample_shape]
    plain = {w: t for w, t in weights.items() if w not in batched}
    grad = torch.is_grad_enabled()
    random = set(random)
    varying = [w for w, t in weights.items()
               if w in random or w in batched or (grad and t.requires_grad)]
    k = prefix_depth(plan, varying) if share_prefix else 0
    if s == 1 and cache is None:
        k = 0  # one draw and nothing kept: the prefix would run once either way
    n = _batch_size(args, kwargs)
    # peft's own path computes the active adapters; when that is not exactly plan.adapter
    # (another adapter active, or adapters disabled) every layer takes the hook path instead
    foreign = [] if own_path(model, plan) else list(plan.extra["lora_modules"])
    if k == 0 and not batched and not foreign:
        return torch.func.functional_call(model, plain, args, kwargs)
    stack = contextlib.ExitStack()
    with stack:
        stack.enter_context(read_positions.read_positions_only(model, plan, k, args, kwargs))
        if k > 0:
            if cache is not None:
                hidden = cache.lookup(model, plan, k, plain, args, kwargs, n)
            else:
                hidden = prefix_hidden(model, plan, k, plain, args, kwargs)
            tiled = _tile(hidden, n, s)
            stack.enter_context(_skip_prefix(plan, k, tiled))
            if s > 1:
                stack.enter_context(_dedup_first_block(plan, k, tiled, n, s))
        if batched or foreign:
            stack.enter_context(_batched_layers(model, plan, weights, batched, s, also=foreign))
        t_args = tuple(_tile(a, n, s) for a in args)
        t_kwargs = {key: _tile(v, n, s) for key, v in kwargs.items()}
        out = torch.func.functional_call(model, plain, t_args, t_kwargs)
    return fold_outputs(out, s * n, sample_shape) if nd else out
