"""Does fine-tuning "for the downstream task" narrow the doubly robust interval? (B3's corpus.)

The seed's joint fine-tuning adds the regression's likelihood to the coder's training loss. Made
valid by a cut, it runs inside the folds: fold k's coder is trained on the other folds' rows only -
cross-entropy on their labelled rows plus, on their unlabelled rows, the regression likelihood
with z summed out (:mod:`pyro_llm.regression.downstream`) - and codes fold k. The scenario
compares two MAP coders fitted the same way but for that term, each followed by ``dr``.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from benchmarks.common import Replicate, expit, labelled_mask
from benchmarks.scenarios import B3_RANK, _b3_base

MAP_STEPS = 200


def map_coder(x, z, lab_rows, unl_rows, predict_rows, seed, term=None, steps: int = MAP_STEPS):
    """A LoRA MLP coder fine-tuned by full-batch AdamW on ``lab_rows`` (cross-entropy), plus the
    downstream term on ``unl_rows`` when ``term`` is given (its β, σ held at the labelled fit, as
    the library does); (len(predict_rows), 2) probabilities."""
    import peft
    import torch

    torch.manual_seed(seed)
    model = peft.get_peft_model(_b3_base(), peft.LoraConfig(r=B3_RANK, lora_alpha=2 * B3_RANK,
                                                            target_modules=["0", "2"]))
    xt = torch.as_tensor(x, dtype=torch.float32)
    zl = torch.as_tensor(z[lab_rows], dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    lab_t, unl_t = torch.as_tensor(lab_rows), torch.as_tensor(unl_rows)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt[lab_t]), zl)
        if term is not None:
            # the term is a mean over unlabelled rows; weight it by their share of the training rows
            loss = loss + len(unl_rows) / len(lab_rows) * term.loss(model(xt[unl_t]), unl_t)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return model(xt[torch.as_tensor(predict_rows)]).softmax(-1).double().numpy()


def b3_downstream(seed: int, n: int = 300, N: int = 10_000, folds: int = 5, weight: float = 1.0) -> Replicate:
    """B3's corpus; ``dr`` after a MAP coder with and without the downstream term."""
    from pyro_llm.regression import build_design
    from pyro_llm.regression.crossfit import fold_ids
    from pyro_llm.regression.downstream import downstream_term

    rng = np.random.default_rng(seed)
    q, eps = rng.normal(size=N), rng.normal(size=N)
    z = (rng.random(N) < expit(-0.5 + 0.8 * q)).astype(int)
    y = 1 + 1.0 * z + 0.5 * q + eps
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(100, 2)))[0].T
    x = (np.outer(1.5 * (2 * z - 1) + 0.5 * q + 0.3 * eps, basis[0]) + np.outer(q, basis[1])
         + rng.normal(size=(N, 100)))
    lab = labelled_mask(rng, N, n)
    df = pd.DataFrame({"y": y, "q": q, "z": np.where(lab, z, np.nan)})
    ids = fold_ids(lab, folds, seed)
    design = build_design(df, "y ~ z + q", label="z")
    start = time.perf_counter()
    plain, tuned = np.zeros((N, 2)), np.zeros((N, 2))
    for k in range(folds):
        tr_lab, tr_unl = np.flatnonzero(lab & (ids != k)), np.flatnonzero(~lab & (ids != k))
        rows = np.flatnonzero(ids == k)
        plain[rows] = map_coder(x, z, tr_lab, tr_unl, rows, seed + k)
        term = downstream_term(_subset(design, tr_lab), weight=weight)     # β, σ from fold k's training rows
        term.X_by_class, term.y = _full_arrays(design)
        tuned[rows] = map_coder(x, z, tr_lab, tr_unl, rows, seed + k, term=term)
    runs = {
        "dr (MAP coder)": {"method": "dr", "predictions": plain, "fold_ids": ids},
        "dr (MAP coder + downstream term)": {"method": "dr", "predictions": tuned, "fold_ids": ids},
        "ppi++ (MAP coder)": {"method": "ptd", "predictions": plain, "tune_for": "z"},
        "ppi++ (MAP coder + downstream term)": {"method": "ptd", "predictions": tuned, "tune_for": "z"},
    }
    info = {"accuracy_plain": float((plain.argmax(-1) == z).mean()),
            "accuracy_tuned": float((tuned.argmax(-1) == z).mean())}
    return Replicate(df, "y ~ z + q", "z", "covariate", "z", 1.0, runs, time.perf_counter() - start, info,
                     default="dr (MAP coder + downstream term)", reference="dr (MAP coder)")


def _subset(design, rows):
    """The design restricted to the labelled rows ``rows`` (for the term's starting fit)."""
    import dataclasses

    keep = np.zeros(len(design.labelled), bool)
    keep[rows] = True
    return dataclasses.replace(design, labelled=design.labelled & keep)


def _full_arrays(design):
    import torch

    return (torch.tensor(np.array(design.X_by_class), dtype=torch.float32),
            torch.tensor(np.array(design.y), dtype=torch.float32))
