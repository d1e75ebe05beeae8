"""A bounded cache of frozen-prefix activations, kept between passes over the same corpus.

When only the top blocks carry random adapters, the blocks below them compute the same
hidden states for an input at every SVI epoch and every prediction. :class:`PrefixCache`
keeps them, one entry per input row, keyed by a hash of the row's tensors (token ids,
attention mask, ...; the same text padded differently is a different row), in memory or in
a memory-mapped file on disk, up to ``max_bytes``. It is filled until full and then kept
(no eviction: for repeated passes in the same or a shuffled order, keeping a fixed part of the
corpus hits more often than replacing entries, which under cyclic access hits never).

Invalidation is automatic: every entry belongs to one *fingerprint* -- the model object, the
prefix depth (which follows the adapter selection) and, for every tensor the prefix reads
(embeddings, the frozen blocks, adapter values injected there), its storage and in-place
version counter. A changed selection, a loaded or edited weight, an optimiser step on a prefix
tensor all change the fingerprint, and the cache empties itself before the next lookup.

Size: one entry is ``seq_len * hidden * bytes`` (all-MiniLM-L6-v2, 64 tokens, float32: 96 KiB;
100,000 documents: 9.2 GiB). :meth:`PrefixCache.estimate` gives the figure before a run; the
first fill logs it (``verbose``).
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["PrefixCache", "parse_bytes"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(size: int | float | str) -> int:
    """``2**30``, ``"1GiB"``, ``"500 MB"`` -> bytes."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
        unit = m.group(2).upper() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(f"cannot read {size!r} as a size; use bytes or e.g. '2GiB', '500MB'")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"the cache size must be > 0 bytes, got {size!r}")
    return value


def _fmt(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return f"{b} B"


class PrefixCache:
    """Frozen-prefix activations by input row; pass it to ``BayesianLoRA(prefix_cache=...)``.

    Parameters
    ----------
    max_bytes:
        The bound, e.g. ``"2GiB"``. Rows beyond it are computed each time, not stored.
    directory:
        Keep entries in a memory-mapped file there (``prefix_cache.bin``, a sparse file that
        grows to at most ``max_bytes``) instead of in memory; it is scratch space, rewritten
        by every run.
    verbose:
        Print the size estimate when the cache first fills.
    """

    def __init__(self, max_bytes: int | str = "1GiB", directory: str | Path | None = None,
                 verbose: bool = True):
        self.max_bytes = parse_bytes(max_bytes)
        self.directory = Path(directory) if directory is not None else None
        self.verbose = verbose
        self.hits = self.misses = self.not_stored = self.invalidations = 0
        self._entries: dict[bytes, object] = {}
        self._bytes = 0
        self._fingerprint = None
        self._mmap = None
        self._described = False

    # ------------------------------------------------------------------ bookkeeping
    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {"entries": len(self), "bytes": self._bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "not_stored": self.not_stored,
                "invalidations": self.invalidations}

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self._bytes = 0
        self._mmap = None

    def __repr__(self) -> str:
        where = f"on disk at {self.directory}" if self.directory else "in memory"
        return (f"PrefixCache({len(self)} rows, {_fmt(self._bytes)} of {_fmt(self.max_bytes)} "
                f"{where}, hits={self.hits}, misses={self.misses})")

    @staticmethod
    def estimate(num_examples: int, seq_len: int, hidden_size: int,
                 dtype: torch.dtype = torch.float32) -> int:
        """Bytes to keep the prefix output of ``num_examples`` rows of ``seq_len`` tokens."""
        item = torch.empty((), dtype=dtype).element_size()
        return int(num_examples) * int(seq_len) * int(hidden_size) * item

    # ------------------------------------------------------------------ keys
    @staticmethod
    def row_keys(args, kwargs, n: int) -> list[bytes]:
        """One hash per input row, over every batch-first tensor argument."""
        parts = [t for t in list(args) + [kwargs[k] for k in sorted(kwargs)]
                 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n]
        arrays = [np.ascontiguousarray(t.detach().cpu().reshape(n, -1).numpy()) for t in parts]
        keys = []
        for i in range(n):
            h = hashlib.blake2b(digest_size=16)
            for a in arrays:
                h.update(a[i].tobytes())
                h.update(str(a.dtype).encode())
            keys.append(h.digest())
        return keys

    @staticmethod
    def fingerprint(model, plan, k: int, weights: dict) -> tuple:
        """What the prefix depends on: model, depth, and each prefix tensor's storage/version."""
        relevant = plan.extra.get(("prefix_names", k))
        if relevant is None:
            relevant = _prefix_names(model, plan, k)
            plan.extra[("prefix_names", k)] = relevant
        named = dict(model.named_parameters())
        named.update(model.named_buffers())
        marks = []
        for name in relevant:
            t = weights.get(name, named.get(name))
            if t is not None:
                marks.append((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype))
        return (id(model), plan.blocks_name, k, tuple(marks))

    # ------------------------------------------------------------------ storage
    def _store(self, key: bytes, h: torch.Tensor) -> None:
        size = h.numel() * h.element_size()
        if self._bytes + size > self.max_bytes:
            self.not_stored += 1
            return
        if self.directory is None:
            self._entries[key] = h.clone()
        else:
            if self._mmap is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._mmap = np.memmap(self.directory / "prefix_cache.bin", dtype=np.uint8,
                                       mode="w+", shape=(self.max_bytes,))
            raw = h.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._mmap[self._bytes:self._bytes + size] = raw
            self._entries[key] = (self._bytes, size, tuple(h.shape), h.dtype, h.device)
        self._bytes += size

    def _load(self, key: bytes) -> torch.Tensor:
        e = self._entries[key]
        if isinstance(e, torch.Tensor):
            return e
        off, size, shape, dtype, device = e
        raw = torch.from_numpy(np.array(self._mmap[off:off + size]))
        return raw.view(dtype).reshape(shape).to(device)

    def _describe(self, plan, k: int, h: torch.Tensor) -> None:
        self._described = True
        if not self.verbose:
            return
        per = h[0].numel() * h.element_size()
        rows = self.max_bytes // max(per, 1)
        where = f"a memory-mapped file in {self.directory}" if self.directory else "memory"
        print(f"pyro_llm prefix cache: blocks 0-{k - 1} of {plan.blocks_name} are frozen below the "
              f"adapters; {_fmt(per)} per input row ({' x '.join(map(str, h.shape[1:]))} "
              f"{str(h.dtype).replace('torch.', '')}); the bound of {_fmt(self.max_bytes)} in {where} "
              f"holds {rows:,} rows (100,000 rows would take {_fmt(100_000 * per)})", file=sys.stderr)

    # ------------------------------------------------------------------ lookup
    def lookup(self, model, plan, k: int, weights: dict, args, kwargs, n: int) -> torch.Tensor:
        """The prefix output (block k's input) for this batch: cached rows, the rest computed."""
        from .batched import prefix_hidden, select_rows

        fp = self.fingerprint(model, plan, k, weights)
        if fp != self._fingerprint:
            if self._fingerprint is not None and self._entries:
                self.invalidations += 1
            self.clear()
            self._fingerprint = fp
        keys = self.row_keys(args, kwargs, n)
        miss = [i for i, key in enumerate(keys) if key not in self._entries]
        self.hits += n - len(miss)
        self.misses += len(miss)
        fresh = None
        if miss:
            idx = torch.as_tensor(miss)
            sub_args = tuple(select_rows(a, n, idx) for a in args)
            sub_kwargs = {key: select_rows(v, n, idx) for key, v in kwargs.items()}
            fresh = prefix_hidden(model, plan, k, weights, sub_args, sub_kwargs)
            if not self._described:
                self._describe(plan, k, fresh)
            for j, i in enumerate(miss):
                self._store(keys[i], fresh[j])
            if len(miss) == n:
                return fresh
        pos = {i: j for j, i in enumerate(miss)}
        rows = [fresh[pos[i]] if i in pos else self._load(key) for i, key in enumerate(keys)]
        return torch.stack(rows)


def _prefix_names(model, plan, k: int) -> list[str]:
    """Parameter and buffer names the prefix reads: those of modules registered before the
    blocks, and of blocks ``0 .. k-1``."""
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    return [n for n in names if plan.position(n) < k]
