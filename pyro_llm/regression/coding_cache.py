"""The cache of :func:`pyro_llm.regression.coding.code_crossfit`: its key and its adapter files.

The key (``key.json``) fingerprints everything a cross-fitted coding depends on; a rerun whose
key differs is refused with the names of the differing entries. Fingerprints are truncated
SHA-256 digests: of the base model's tensors (every parameter and buffer that is not part of the
adapter), of the tokenizer (its class, vocabulary, padding and a probe text's ids), of the texts
(length-prefixed UTF-8) and of integer arrays (labels, fold ids). Adapters are saved with peft's
``save_pretrained`` into a temporary folder that then replaces the target.

Every cache file is read back through :mod:`pyro_llm._io`'s validated readers
(:func:`read_record` for the JSON records, :func:`load_adapter` for the adapters), so a damaged
or tampered file is a :class:`~pyro_llm._io.FileFormatError` naming the file, the field and
what to delete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .._io import FileFormatError, check_field, read_json, read_safetensors, write_json

__all__ = ["model_fingerprint", "tokenizer_fingerprint", "texts_fingerprint", "array_fingerprint",
           "open_cache", "save_adapter", "load_adapter", "read_record", "FIT_FIELDS", "FOLD_FIELDS"]

# fields of the cache's records that a rerun reads, checked by read_record
FIT_FIELDS = {"epochs_run": "float>=0", "best_epoch": "int>=0|none", "seconds": "float>=0"}
FOLD_FIELDS = {"fold": "int>=0", "accuracy": "float>=0", "one_class": "bool", "seconds": "float>=0",
               **{f"fit.{k}": v for k, v in FIT_FIELDS.items()}}


def _hash_bytes(h, b: bytes) -> None:
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)


def _hash_tensors(named) -> str:
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().cpu().contiguous()
        _hash_bytes(h, f"{name}{tuple(t.shape)}{t.dtype}".encode())
        _hash_bytes(h, t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _is_adapter(name: str) -> bool:
    return "lora_" in name or ".modules_to_save." in name


def model_fingerprint(model) -> tuple[str, dict]:
    """``(digest of the base model's tensors, the active adapter's peft config as JSON)``; the
    adapter's own tensors (LoRA, ``modules_to_save`` copies) are left out: each fold resets them."""
    base = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if not _is_adapter(n)]
    cfg = model.peft_config[model.active_adapter]
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    adapter = json.loads(json.dumps(raw, sort_keys=True, default=lambda v: sorted(v) if isinstance(
        v, (set, frozenset)) else repr(v)))
    return _hash_tensors(base), adapter


def tokenizer_fingerprint(tok) -> str:
    """Digest of a tokenizer: class, vocabulary, padding and truncation sides, a probe's ids."""
    h = hashlib.sha256(type(tok).__name__.encode())
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    _hash_bytes(h, json.dumps(sorted(vocab.items())).encode())
    _hash_bytes(h, json.dumps([getattr(tok, "pad_token_id", None), getattr(tok, "padding_side", None),
                               getattr(tok, "truncation_side", None)]).encode())
    probe = tok(["The quick brown fox, 1999."])["input_ids"]  # normalisation and special tokens
    _hash_bytes(h, json.dumps(probe).encode())
    return h.hexdigest()[:32]


def texts_fingerprint(texts: list[str]) -> str:
    """Digest of the texts, in order."""
    h = hashlib.sha256()
    for t in texts:
        _hash_bytes(h, t.encode("utf-8"))
    return h.hexdigest()[:32]


def array_fingerprint(a: np.ndarray) -> str:
    """Digest of an integer array (as int64)."""
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:32]


def open_cache(root: Path, key: dict) -> None:
    """Write ``key`` to ``root/key.json`` (atomically), or check it against the one there and raise
    a ``ValueError`` naming every entry that differs."""
    f = root / "key.json"
    if f.exists():
        old = read_record(f, "cross-fitting cache key", {"format": "str", "version": "int"},
                          f"pass a new cache_dir, or delete {root} to start over")
        diff = [k for k in sorted(set(old) | set(key)) if old.get(k) != key.get(k)]
        if diff:
            said = "; ".join(f"{k}: cached {old.get(k)!r:.80} vs now {key.get(k)!r:.80}" for k in diff)
            raise ValueError(f"cache_dir {root} holds a cross-fitting run with other inputs or settings "
                             f"(differing: {', '.join(diff)}; {said}); pass a new cache_dir, or delete "
                             f"{root} to start over")
        return
    if root.exists() and any(root.glob("fold_*")):
        raise ValueError(f"cache_dir {root} holds fold folders but no key.json; pass a new cache_dir "
                         "or delete it")
    write_json(f, key)




def save_adapter(model, path: Path) -> None:
    """peft ``save_pretrained`` into ``path``, replacing it only once the new one is complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_adapter(model, path: Path) -> None:
    """Load a :func:`save_adapter` folder's weights into ``model`` (same adapter config), each
    tensor checked against the model's adapter (names, shapes, finite values)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    f = Path(path) / "adapter_model.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"{path} holds no adapter_model.safetensors; delete its fold folder "
                                f"{Path(path).parent} and run again")
    expect = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    try:
        tensors, _ = read_safetensors(f, what="fold adapter", expect=expect)
    except FileFormatError as e:
        raise FileFormatError(f"{e}; delete its fold folder {Path(path).parent} and run again") from None
    extra = sorted(set(tensors) - set(expect))
    if extra:
        raise FileFormatError(f"{f} holds tensors {extra[:3]} that the model's adapter lacks: it was "
                              f"saved for another model; delete its fold folder {Path(path).parent} "
                              "and run again")
    set_peft_model_state_dict(model, tensors)


def read_record(path: Path, what: str, fields: dict[str, str], fix: str) -> dict:
    """A JSON record of the cache through :func:`pyro_llm._io.read_json`; ``fields`` may name
    fields of a nested object (``"fit.seconds"``). A damaged file raises a ``FileFormatError``
    naming the file and field, ending with ``fix`` (what to delete)."""
    try:
        rec = read_json(path, what=what, fields={k: v for k, v in fields.items() if "." not in k})
        for key, spec in fields.items():
            if "." in key:
                outer, inner = key.split(".", 1)
                obj = rec.get(outer)
                if not isinstance(obj, dict) or inner not in obj or not check_field(obj[inner], spec):
                    got = obj.get(inner, "missing") if isinstance(obj, dict) else "missing"
                    raise FileFormatError(f"{path}: field {key!r} is {got!r:.60}, expected {spec}; the "
                                          f"{what} is damaged")
    except FileFormatError as e:
        raise FileFormatError(f"{e}; {fix}") from None
    return rec
