"""S1 of the coverage benchmark: real reviews, MiniLM with Bayesian LoRA, simulated Q and Y.

Fine-tuning MiniLM six times per replication (one full fit, five cross-fitting folds) is too
slow on two CPU cores, so LoRA sits on the *last* transformer layer (query, value) and the
classification head only: the first five layers are frozen and unchanged by the adapter, so
their output is computed once for the review pool (:func:`prefix_states`) and every fit and
prediction runs the last layer alone - the same model and the same gradients as LoRA on that
layer of the full network. Reviews are right-padded to 48 tokens (mean length 27): every batch is
trimmed to its longest review, and prediction batches hold reviews of similar length (the
padding is masked, so the outputs are the same up to rounding).
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch

POOL, MAX_LENGTH, RANK = 4000, 48, 8


class TopOfEncoder(torch.nn.Module):
    """The last BERT layer of MiniLM, mean pooling and a new linear head."""

    def __init__(self, layer: torch.nn.Module, hidden: int, classes: int = 2, seed: int = 0):
        super().__init__()
        self.layer = layer
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, hidden, mask):
        ext = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        out = self.layer(hidden, attention_mask=ext)
        out = out[0] if isinstance(out, tuple) else out
        m = mask.unsqueeze(-1).to(out.dtype)
        return self.head((out * m).sum(1) / m.sum(1))


@lru_cache(maxsize=1)
def prefix_states():
    """(texts' hidden states after layer 5, attention masks, gold labels) for the review pool."""
    from transformers import AutoModel, AutoTokenizer

    from pyro_llm import data

    texts, labels = data.rotten_tomatoes(seed=0)
    texts, labels = list(texts[:POOL]), np.asarray(labels[:POOL])
    path = data.minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    bert = AutoModel.from_pretrained(path).eval()
    enc = tok(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    states = []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            out = bert(input_ids=enc["input_ids"][i:i + 64], attention_mask=enc["attention_mask"][i:i + 64],
                       output_hidden_states=True)
            states.append(out.hidden_states[-2])   # the input of the last layer
    return torch.cat(states), enc["attention_mask"], labels


def _top():
    from transformers import AutoModel
    from transformers.utils import logging

    from pyro_llm import data

    logging.disable_progress_bar()

    bert = AutoModel.from_pretrained(data.minilm_path())
    return TopOfEncoder(bert.encoder.layer[-1], bert.config.hidden_size)


def minilm_codes(rows_train, labels_train, rows_predict, seed: int, samples: int = 8,
                 map_epochs: int = 4, svi_epochs: int = 2, batch: int = 16):
    """Fine-tune LoRA on the last MiniLM layer (MAP, then B random by SVI around it) on the pool
    rows ``rows_train``; return (S, len(rows_predict), 2) posterior predictive probabilities."""
    import peft
    import pyro

    import pyro_llm

    states, masks, _ = prefix_states()
    pyro.clear_param_store()
    model = peft.get_peft_model(_top(), peft.LoraConfig(r=RANK, lora_alpha=2 * RANK,
                                                        target_modules=["query", "value"],
                                                        modules_to_save=["head"]))
    g = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(labels_train, dtype=torch.long)
    n = len(rows_train)

    def batches():
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            r = torch.as_tensor(rows_train)[idx]
            length = int(masks[r].sum(1).max())      # right padding: trim the all-padding tail
            yield states[r, :length], masks[r, :length], y[idx], idx

    class Epoch:
        def __iter__(self):
            return batches()

        def __len__(self):
            return -(-n // batch)

    pyro_llm.fit_map(model, Epoch(), epochs=map_epochs, lr=1e-3, progress=False, seed=seed,
                     loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0], b[1]), b[2]))
    lora = pyro_llm.BayesianLoRA(model, prior=0.1, select="B")

    def svi_model(h, mask, yb, idx):
        pyro_llm.likelihoods.categorical("z", lora(h, mask), yb, n, idx)

    fit = pyro_llm.fit_svi(svi_model, "normal", Epoch(), epochs=svi_epochs,
                           lr=pyro_llm.scale_lr(1e-4, 3e-2), init_values=lora, init_scale=1e-2,
                           progress=False, seed=seed)
    rp = torch.as_tensor(rows_predict)
    order = torch.argsort(masks[rp].sum(1), stable=True)    # batches of similar length, trimmed
    data_ = []
    for i in range(0, len(rp), 128):
        r = rp[order[i:i + 128]]
        length = int(masks[r].sum(1).max())
        data_.append((states[r, :length], masks[r, :length]))
    probs = pyro_llm.predict_probs(lambda h, mk: lora(h, mk).softmax(-1), data_,
                                   pyro_llm.GuidePosterior(fit.guide), samples, progress=False,
                                   seed=seed).numpy()
    out = np.empty_like(probs)
    out[:, order.numpy()] = probs
    return out


def s1(seed: int, N: int = 2000, n: int = 500, folds: int = 5):
    """Real reviews as the corpus; z = fresh; Q and Y simulated around z as in B1."""
    import pandas as pd

    from benchmarks.scenarios import Replicate, lora_oracle, lora_runs
    from pyro_llm.regression.crossfit import crossfit, fold_ids

    _, _, gold = prefix_states()
    rng = np.random.default_rng(seed)
    pool_rows = rng.choice(len(gold), N, replace=False)
    z = gold[pool_rows]
    q = 0.8 * (z - z.mean()) + rng.normal(size=N)
    y = 1 + 1.0 * z + 0.5 * q + rng.normal(size=N)
    lab = np.zeros(N, bool)
    lab[rng.choice(N, n, replace=False)] = True
    start = time.perf_counter()
    full = minilm_codes(pool_rows[lab], z[lab], pool_rows, seed)

    def fold(tr, rows):
        return minilm_codes(pool_rows[tr], z[tr], pool_rows[rows], seed + 1, samples=4).mean(0)

    oof = crossfit(fold, lab, folds, seed)
    llm_s = time.perf_counter() - start
    df = pd.DataFrame({"y": y, "q": q, "z": np.where(lab, z, np.nan)})
    runs, info = lora_runs(full, oof, z, lab, fold_ids(lab, folds, seed))
    return Replicate(df, "y ~ z + q", "z", "covariate", "z", 1.0, runs, llm_s, info,
                     oracle=lora_oracle(z, oof, q, y))
