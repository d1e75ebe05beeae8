"""Past one process: the fits under ``torch.distributed`` (gloo on CPU, nccl on GPUs).

Start one process per device (``torchrun --nproc_per_node=N script.py``, ``accelerate launch``,
or :func:`launch`), call ``torch.distributed.init_process_group`` in each, give each rank its
part of every global batch (:func:`shard`) and call the fit as in one process. Once a process
group of more than one rank is initialised, :func:`~pyro_llm.fit_svi`, :func:`~pyro_llm.fit_map`
and the fits on the same loop (``fit_blob``, ``fit_polar``) combine the ranks' gradients after
every ``backward()``, start from rank 0's parameters, record the loss of the global batch, and
leave the progress bar and the checkpoint files to rank 0; :func:`~pyro_llm.fit_laplace` sums
its curvature over the ranks. No option is needed; :func:`independent` turns it off.

The gradient rule
-----------------
Rank ``r`` holds ``b_r`` of the ``B = sum_r b_r`` rows of a global batch and computes its loss
``L_r`` on them. The update uses

    g = sum_r (b_r / B) grad L_r        (each rank scales, then all-reduce SUM).

If ``L_r = c + (1/b_r) sum_{i in r} l_i`` (global terms plus a mean over the rows), then
``sum_r (b_r/B) L_r = c + (1/B) sum_i l_i``: the single-process loss of the global batch, so
``g`` is its gradient, exactly up to round-off, uneven last batches included. Pyro's ELBO with
``pyro.plate(name, size=N, subsample=idx)`` has that form: its likelihood term is
``(N/b_r) sum_{i in r} log p(y_i | z)`` and the global terms ``log p(z) - log q(z)`` are the same
on every rank when every rank draws the same ``z`` -- which it does, because every rank runs the
fit with the same ``seed``. So is a Hugging Face loss averaged over examples. With equal shards
the weights are ``1/world``: DDP's gradient average. A loss *summed* over the rows gets its
gradient divided by the world size, as under DDP. ``b_r`` is the leading size shared by the
batch's tensors (:func:`batch_rows`); a batch without one weighs 1 (the plain average).

Why not ``DistributedDataParallel``: DDP wraps an ``nn.Module`` and averages its parameters'
gradients during ``backward()``. An SVI guide's parameters live in Pyro's param store, not in a
module, and the fits already hold the exact tensors they optimise, by name; one all-reduce of
those gradients after ``backward()`` (a flat buffer per dtype) is the same computation, without
DDP's overlap of communication and backward -- for LoRA's few tensors the buffer is small.

Randomness. Every rank uses the same seed, so the guide's draws of the global sites and the
epoch's shuffle order (a ``DataLoader`` read whole on every rank, then :func:`shard`-ed) are the
same as in one process. What is drawn per row (dropout, local latent variables) is drawn on each
rank's shard: equal in distribution to one process, not bitwise; once the ranks' random streams
part, their global draws differ too (still an unbiased gradient: the ranks then act as extra
particles). ``fit_laplace(curvature="fisher")`` draws its labels with seed ``seed + 1_000_003 *
rank``; ``"ggn"`` and ``"empirical"`` are deterministic and equal the single-process curvature.

Mismatched data. Every rank must take the same number of steps. Unequal ``len(data)`` raises a
``ValueError`` on every rank before the first step; data without ``len`` is checked step by step
(one small all-reduce that also carries the loss), and a rank that runs out early makes every
rank raise a ``RuntimeError`` instead of waiting forever. An exception raised on one rank alone
(a bad batch) leaves the others waiting in the next collective until the process group's
``timeout`` (``init_process_group(timeout=...)``; :func:`launch` sets it).

GPUs
----
Device and dtype follow the backbone. The adapter priors are built like the LoRA tensors
(same device and dtype) and the guides start at the fine-tuned adapter, so the variational
parameters sit on the adapter's device. peft's ``get_peft_model`` keeps the LoRA tensors in
float32 over a bf16 or fp16 backbone (``autocast_adapter_dtype=True``, its default) and casts
the activations to the adapter's dtype inside each LoRA layer: a bf16 backbone with a float32
posterior is the default, with no flag here. Laplace factors are float64 on the CPU. Per GPU::

    # torchrun --nproc_per_node=4 train.py
    import os, torch, torch.distributed as dist
    from pyro_llm import fit_laplace, fit_map
    from pyro_llm.infer.distributed import shard

    dist.init_process_group("nccl")                  # "gloo" for CPU processes
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    base = AutoModelForSequenceClassification.from_pretrained(path, torch_dtype=torch.bfloat16)
    peft_model = peft.get_peft_model(base, lora_config).to(f"cuda:{local}")  # LoRA in float32
    loader = DataLoader(train, batch_size=32, shuffle=True, collate_fn=collate)  # GLOBAL batches
    fit_map(peft_model, shard(loader, device=f"cuda:{local}"), epochs=3, seed=0)
    la = fit_laplace(peft_model, shard(loader, device=f"cuda:{local}"), curvature="ggn")
    if dist.get_rank() == 0:
        peft_model.save_pretrained("out"); la.save("out/laplace")
    dist.destroy_process_group()

Every rank must hold the same backbone (loaded from the same files); only the trained tensors
are broadcast from rank 0. :func:`shard` reads every global batch on every rank and keeps a
slice, which preserves the single-process order; for large data a ``DistributedSampler`` (each
rank loads its own examples, ``drop_last=True`` or its padding) is cheaper and the same
algorithm in distribution. ``accelerate launch`` sets the same environment as ``torchrun``.

Ensembles need no process group: members are independent fits. In each process call
``fit_ensemble(..., members=range(rank(), M, world_size()), out_dir=shared_dir)`` (``rank`` and
``world_size`` read torchrun's ``RANK`` / ``WORLD_SIZE`` when no group is initialised), then
``load_ensemble(shared_dir)``. If a group is initialised for other work, call it inside
``with independent():`` so the members' fits do not average their gradients.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "independent", "shard", "Shard", "batch_rows",
           "broadcast_params", "all_reduce_grads", "all_reduce_sum", "barrier", "launch"]

from .launch import free_port, launch  # noqa: E402,F401  (re-exported: the local launcher)

_F64 = torch.float64
_independent = 0


# ---------------------------------------------------------------------------- who am I
def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank (and not :func:`independent`)."""
    return (_independent == 0 and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1)


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """The number of processes: the process group's, else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


_rank, _world_size = rank, world_size  # for functions whose arguments bear these names


@contextlib.contextmanager
def independent():
    """Within this block the fits ignore the process group: each rank fits on its own.

    For ensemble members trained in parallel processes that also share a process group.
    """
    global _independent
    _independent += 1
    try:
        yield
    finally:
        _independent -= 1


# ---------------------------------------------------------------------------- data
def _leaves(batch) -> list:
    if isinstance(batch, Mapping):
        return list(batch.values())
    if isinstance(batch, (tuple, list)):  # a DataLoader collates tuples into lists
        return list(batch)
    return [batch]


def batch_rows(batch) -> int | None:
    """The leading size shared by every tensor of ``batch`` (dict values, tuple items or a tensor);
    ``None`` if it has none or they differ. The weight of a rank's batch in the gradient rule."""
    sizes = {int(t.shape[0]) for t in _leaves(batch) if isinstance(t, torch.Tensor) and t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def _bounds(n: int, r: int, w: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``r``: contiguous chunks whose sizes differ by at most one."""
    q, extra = divmod(n, w)
    lo = r * q + min(r, extra)
    return lo, lo + q + (r < extra)


def _slice_batch(batch, r: int, w: int, device):
    leaves = _leaves(batch)
    sizes = {len(v) for v in leaves if isinstance(v, (torch.Tensor, list)) and not
             (isinstance(v, torch.Tensor) and v.dim() == 0)}
    if not sizes:
        raise ValueError(f"shard() found no tensor or list to split in a batch of type "
                         f"{type(batch).__name__}; give each rank its own batches instead")
    if len(sizes) != 1:
        raise ValueError(
            f"shard() splits every tensor (and list) of a batch along its first dimension, but this "
            f"batch's have different leading sizes {sorted(sizes)}; keep whole-data tensors out of "
            "the batch (e.g. in the model's closure) or give each rank its own batches")
    n = sizes.pop()
    if n < w:
        raise ValueError(f"a global batch of {n} rows cannot be split over {w} ranks; use a batch "
                         f"size of at least {w} (and drop_last=True for a short last batch)")
    lo, hi = _bounds(n, r, w)

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            v = v[lo:hi]
            return v.to(device) if device is not None else v
        if isinstance(v, list):
            return v[lo:hi]
        if isinstance(v, torch.Tensor) or v is None or isinstance(v, (str, int, float, bool)):
            return v
        raise TypeError(f"shard() cannot split a batch entry of type {type(v).__name__}; batches "
                        "must hold tensors or lists (or give each rank its own batches)")

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch) if isinstance(batch, tuple) else [cut(v) for v in batch]
    return cut(batch)


class Shard:
    """Re-iterable: rank ``r``'s contiguous slice of every batch of ``data`` (see :func:`shard`)."""

    def __init__(self, data: Iterable, rank: int, world_size: int, device=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.data, self.rank, self.world_size, self.device = data, rank, world_size, device

    def __len__(self) -> int:
        return len(self.data)

    @property
    def dataset(self):
        """The wrapped loader's dataset (every rank's rows), so ``len(shard.dataset)`` is the global
        N that a fit scales its likelihood to (``fit_blob``'s default ``num_data``)."""
        return getattr(self.data, "dataset", None)

    def __iter__(self):
        for batch in self.data:
            yield _slice_batch(batch, self.rank, self.world_size, self.device)


def shard(data: Iterable, rank: int | None = None, world_size: int | None = None,
          device=None) -> Shard:
    """Each rank's part of every global batch of ``data``: rows ``[lo, hi)`` of a contiguous split.

    Every tensor (and list) of a batch -- a dict's values, a tuple's items, or the batch itself --
    is cut along its first dimension into ``world_size`` chunks whose sizes differ by at most one;
    ``rank`` keeps its chunk (moved to ``device`` if given). ``rank`` and ``world_size`` default to
    the process group's. With every rank iterating the same ``data`` in the same order (the same
    seed), the ranks together see exactly the single-process batches, so the distributed fit equals
    the single-process one (see the module docstring).

    Example
    -------
    >>> import torch
    >>> batches = [(torch.arange(5), torch.zeros(5))]
    >>> [[b[0].tolist() for b in shard(batches, r, 2)] for r in (0, 1)]
    [[[0, 1, 2]], [[3, 4]]]
    """
    r = _rank() if rank is None else int(rank)
    w = _world_size() if world_size is None else int(world_size)
    return Shard(data, r, w, device)


# ---------------------------------------------------------------------------- collectives
def _comm_device(t: torch.Tensor) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce of ``t``, through the backend's device if ``t`` is elsewhere."""
    op = dist.ReduceOp.SUM if op is None else op
    dev = _comm_device(t)
    if dev == t.device:
        dist.all_reduce(t, op=op)
        return t
    buf = t.to(dev)
    dist.all_reduce(buf, op=op)
    t.copy_(buf.to(t.device))
    return t


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (a no-op outside a process group)."""
    if is_distributed():
        for t in tensors:
            _all_reduce_(t)


def broadcast_params(params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite every rank's tensors with rank ``src``'s values (DDP's start), in place."""
    if not is_distributed():
        return
    tensors = list(params.values()) if isinstance(params, Mapping) else list(params)
    with torch.no_grad():
        for p in tensors:
            buf = p.detach().to(_comm_device(p)).clone()
            dist.broadcast(buf, src)
            p.copy_(buf.to(p.device))


def all_reduce_grads(params: Mapping[str, torch.Tensor] | Iterable[torch.Tensor],
                     scale: float | None = None) -> None:
    """``p.grad <- sum_r scale_r p.grad_r`` over the ranks, for every tensor, in place.

    ``scale`` is this rank's weight: its share ``b_r / B`` of the global batch, or ``1/world``
    (the default, DDP's average). A tensor without a gradient counts as zero on that rank and
    keeps ``grad=None`` only if no rank has one (as a single process would have).
    """
    if not is_distributed():
        return
    scale = 1.0 / world_size() if scale is None else float(scale)
    tensors = list(params.values()) if isinstance(params, Mapping) else list(params)
    has = torch.tensor([p.grad is not None for p in tensors], dtype=_F64)
    _all_reduce_(has)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(tensors):
        if has[i] > 0:
            groups.setdefault((p.device, p.dtype), []).append(i)
    for idx in groups.values():
        grads = [tensors[i].grad if tensors[i].grad is not None else torch.zeros_like(tensors[i])
                 for i in idx]
        flat = torch.cat([g.reshape(-1) for g in grads]) * scale
        _all_reduce_(flat)
        for i, chunk in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
            tensors[i].grad = chunk.view_as(tensors[i]).clone()


def check_same(value: int, what: str) -> None:
    """Raise a ``ValueError`` on every rank if ``value`` differs between the ranks."""
    t = torch.tensor([value, -value], dtype=_F64)
    _all_reduce_(t, dist.ReduceOp.MAX)
    hi, lo = int(t[0]), -int(t[1])
    if hi != lo:
        raise ValueError(f"{what} differs between the ranks: from {lo} to {hi} (this is rank {rank()}, "
                         f"with {value}); give every rank the same number, e.g. with shard(data)")


def barrier() -> None:
    """Wait until every rank gets here (a no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def mean_over_ranks(value: float) -> float:
    """The average of a float over the ranks (the value itself outside a process group)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=_F64)
    _all_reduce_(t)
    return float(t[0]) / world_size()


def _mismatch(count: float) -> RuntimeError:
    return RuntimeError(
        f"{int(count)} of {world_size()} ranks had a batch at this step (this is rank {rank()}): the "
        "ranks' data have different numbers of batches; give every rank as many, e.g. with shard(data)")


def sync_step(loss: float, rows: int | None) -> tuple[float, float]:
    """One step's bookkeeping: ``(loss of the global batch, this rank's share b_r / B)``.

    Raises on every rank if some rank had no batch at this step (see :func:`sync_end`).
    """
    w = float(rows) if rows else 1.0
    t = torch.tensor([1.0, w, w * loss], dtype=_F64)
    _all_reduce_(t)
    if int(t[0]) != world_size():
        raise _mismatch(t[0])
    return float(t[2] / t[1]), w / float(t[1])


def sync_end() -> None:
    """Called by every rank when its data ends: the counterpart of :func:`sync_step`."""
    t = torch.zeros(3, dtype=_F64)
    _all_reduce_(t)
    if int(t[0]) != 0:
        raise _mismatch(t[0])


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape on all ranks), on ``t``'s device."""
    buf = t.to(_comm_device(t)).contiguous()
    out = [torch.empty_like(buf) for _ in range(world_size())]
    dist.all_gather(out, buf)
    return [o.to(t.device) for o in out]
