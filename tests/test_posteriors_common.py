"""Every posterior of the library feeds the same downstream code: (S, N, C) predictive draws into
the metric suite and into the regression with the LLM output as a covariate.

A tiny BERT classifier (built from a config) learns a token rule; each method is fitted briefly
and its draws go through ``metrics.summarize`` and ``regress(..., method="mi")``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import VOCAB, fake_finetune, tiny_transformer

from pyro_llm import metrics, regress

N, BATCH = 48, 8


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (N, 6), generator=g)
    labels = (ids[:, 0] > VOCAB // 2).long()  # the first token decides the class
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": labels[i], "index": torch.tensor(i)} for i in range(N)]
    collate = lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]}  # noqa: E731
    return torch.utils.data.DataLoader(rows, batch_size=BATCH, collate_fn=collate), labels


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _ensemble(net, dl):
    from pyro_llm import fit_ensemble

    return fit_ensemble(net, dl, num_members=2, epochs=2, lr=1e-2, progress=False).predict(dl, progress=False)


def _blob(net, dl):
    from pyro_llm import fit_blob

    return fit_blob(net, dl, epochs=2, lr=1e-2, progress=False).predict(dl, num_samples=3, progress=False)


def _laplace(net, dl):
    from pyro_llm import fit_laplace

    fake_finetune(net)
    return fit_laplace(net, dl, progress=False).predict(dl, num_samples=5, progress=False)


def _polar_vbll(net, dl):
    from pyro_llm import PolarAdapter, fit_polar_vbll
    from pyro_llm.features import pool

    def feats(adapter, batch):
        out = adapter(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True)
        return pool(out, batch["attention_mask"], "mean")

    pv = fit_polar_vbll(PolarAdapter(net), dl, feats, 2, epochs=2, progress=False)
    return pv.predict_samples(dl, 3, progress=False)


def _mc_dropout(net, dl):
    from pyro_llm import mc_dropout_predict

    return mc_dropout_predict(net, dl, 3, logits_fn=_logits, progress=False)


METHODS = {"ensemble": _ensemble, "blob": _blob, "laplace": _laplace, "polar_vbll": _polar_vbll,
           "mc_dropout": _mc_dropout}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_posterior_feeds_the_metrics_and_the_regression(method):
    net, _ = tiny_transformer("bert", seed=1)
    dl, y = _data()
    sp = METHODS[method](net, dl)
    assert sp.dim() == 3 and sp.shape[1:] == (N, 2) and sp.shape[0] >= 2
    assert torch.allclose(sp.sum(-1), torch.ones(sp.shape[:2]), atol=1e-5)
    m = metrics.summarize(sp.mean(0), y, sp, ood_probs=sp.mean(0)[:8], ood_sample_probs=sp[:, :8])
    assert all(np.isfinite(v) for v in m.values()), m
    assert m["mutual_information"] > 0  # the draws differ: every method carries epistemic spread
    # the regression of section 000: y ~ z + q with z coded by the LLM on the unlabelled half
    rng = np.random.default_rng(0)
    q = rng.normal(size=N)
    z = y.numpy().astype(float)
    df = pd.DataFrame({"y": z + 0.5 * q + rng.normal(scale=0.5, size=N), "q": q,
                       "z": np.where(np.arange(N) < N // 2, z, np.nan)})
    res = regress(df, "y ~ z + q", label="z", predictions=sp.double().numpy(), method="mi", num_draws=50)
    assert np.isfinite(res["z"]["mean"]) and res["z"]["sd"] > 0
