"""Local process groups for tests and single-machine runs: :func:`launch` (see
:mod:`pyro_llm.infer.distributed` for the fits under ``torch.distributed``)."""

from __future__ import annotations

import datetime
import math
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from .._io import read_json, read_safetensors, save_safetensors, write_json

__all__ = ["launch", "free_port"]


def free_port() -> int:
    """A TCP port free on this machine now (for a local process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(r: int, fn, world: int, backend: str, port: int, args, out: str, timeout: float,
            threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(*args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    result = {} if result is None else result
    if not isinstance(result, Mapping):
        raise TypeError(f"launch(): fn must return a dict (tensors and JSON values) or None, "
                        f"got {type(result).__name__}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in result.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in result.items() if not isinstance(v, torch.Tensor)}
    save_safetensors(Path(out, f"rank{r}.safetensors"), tensors)
    write_json(Path(out, f"rank{r}.json"), rest)


def launch(fn: Callable, world_size: int = 2, *, backend: str = "gloo", args: Sequence = (),
           timeout: float = 300.0, threads: int = 1, start_method: str = "spawn") -> list[dict]:
    """Run ``fn(*args)`` in ``world_size`` new local processes joined in a process group.

    Each process initialises ``torch.distributed`` (``backend``, a free local port, collectives
    that fail after ``timeout`` seconds), sets ``threads`` intra-op threads, calls ``fn`` and returns
    its dict, whose tensors travel back through safetensors and other values through JSON (no
    pickle of results). ``fn`` must be importable (a module-level function). An exception in any
    process is raised here; a run longer than ``timeout`` seconds is stopped and raises
    ``TimeoutError``. For tests and single-machine runs; on a cluster use ``torchrun``.

    Returns one dict per rank, in rank order.

    Example
    -------
    >>> results = launch(my_worker, 2, args=(settings,))   # doctest: +SKIP
    """
    import torch.multiprocessing as mp

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    with tempfile.TemporaryDirectory(prefix="pyro_llm_launch_") as out:
        ctx = mp.start_processes(_worker, nprocs=world_size, join=False, start_method=start_method,
                                 args=(fn, world_size, backend, free_port(), tuple(args), out,
                                       float(timeout), threads))
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join()
                raise TimeoutError(f"launch(): {world_size} processes of {getattr(fn, '__name__', fn)} "
                                   f"ran past timeout={timeout} s (a hang in a collective?); stopped them")
        results = []
        for r in range(world_size):
            res = read_json(Path(out, f"rank{r}.json"), what=f"result of rank {r}")
            res.update(read_safetensors(Path(out, f"rank{r}.safetensors"), what=f"result of rank {r}",
                                        finite=False)[0])
            results.append(res)
    return results
