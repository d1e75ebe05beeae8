"""Short, readable, unique names for Pyro sites named after peft parameters (for ArviZ).

A peft LoRA parameter name such as
``base_model.model.encoder.layer.0.attention.self.query.lora_B.default.weight`` (85
characters) reads as ``layer0.query.B``: peft's wrapper, the adapter name and ``weight``
dropped, numbered blocks joined to their index, and of the module path only the numbered
blocks and the adapted module's own name kept.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

__all__ = ["short_site_names"]

_PEFT = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.[^.]+\.weight$")
_SAVED = re.compile(r"\.(modules_to_save|original_module)\.[^.]+(?=\.)")


def _tokens(path: str) -> tuple[list[str], list[bool]]:
    """Dotted path to tokens, a numeric part joined to the one before (``layer.0`` -> ``layer0``)."""
    out, indexed = [], []
    for part in path.split("."):
        if part.isdigit() and out:
            out[-1], indexed[-1] = out[-1] + part, True
        else:
            out.append(part)
            indexed.append(part.isdigit())
    return out, indexed


def _compact(site: str, short: bool) -> str:
    i = site.find(_PEFT)
    if i < 0:
        return site
    head, tail = site[:i], site[i + len(_PEFT):]
    m = _LORA.match(tail)
    if m is None:
        return head + ".".join(_tokens(_SAVED.sub("", tail))[0])
    tokens, indexed = _tokens(m["module"])
    if short:  # the indexed blocks (layer0, h3) and the adapted module's own name
        tokens = [t for t, ix in zip(tokens[:-1], indexed[:-1], strict=True) if ix] + tokens[-1:]
    return head + ".".join([*tokens, m["ab"]])


def short_site_names(sites: Iterable[str]) -> dict[str, str]:
    """Short, unique ArviZ variable names for Pyro site names: ``{site: name}``.

    A peft parameter loses peft's wrapper (``base_model.model.``, the adapter name,
    ``modules_to_save``); a LoRA matrix keeps its numbered blocks, its module's name and
    ``A`` / ``B``. Names that would collide keep the whole module path instead; a site that
    is no peft parameter keeps its name. The same sites always give the same names.

    Example
    -------
    >>> short_site_names(["base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight",
    ...                   "head.sigma"])
    {'base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight': 'layers3.q_proj.A', \
'head.sigma': 'head.sigma'}
    """
    sites = list(dict.fromkeys(sites))
    out = {s: _compact(s, short=True) for s in sites}
    counts = Counter(out.values())
    out = {s: n if counts[n] == 1 else _compact(s, short=False) for s, n in out.items()}
    counts = Counter(out.values())
    out = {s: n if counts[n] == 1 else s for s, n in out.items()}
    return out if len(set(out.values())) == len(out) else {s: s for s in sites}
