"""The posterior of one cross-fitting fold's coder, fitted or reloaded, as a corpus predictor.

:func:`predictor_for` takes a fold's fine-tuned (MAP) model and the fold's training rows and
returns ``(predict_fn, keep, record)`` for :func:`pyro_llm.code_corpus`. Every posterior is
saved under the fold's folder before coding starts, and reloaded on a rerun, so that coding
interrupted half-way resumes with the same predictor (``code_corpus`` checks its fingerprint).
Only the fold's training rows reach any fit here.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pyro
import torch

from .._io import FileFormatError, read_safetensors, save_safetensors, write_json
from ..infer import fit_laplace, fit_svi, load_laplace, scale_lr
from ..infer.ensemble import EnsemblePosterior
from ..infer.laplace import last_layer_names
from ..likelihoods import categorical
from ..lora import BayesianLoRA
from ..posterior import GuidePosterior
from ..predictors import map_predictor, method_predictor, posterior_predictor
from . import coding_cache as cache
from . import finetune as ft

__all__ = ["predictor_for", "laplace_draws", "ENSEMBLE_MEMBERS", "LAPLACE_MIN_DRAWS",
           "LAPLACE_FULL_MAX", "SVI"]

ENSEMBLE_MEMBERS = 3
LAPLACE_MIN_DRAWS = 100  # GLM draws of the logits; at 16 their Monte Carlo noise cost 1.5 points of
#                          accuracy on MiniLM (last-layer Laplace, 120 reviews per fold)
LAPLACE_FULL_MAX = 10_000  # a head up to this many parameters gets a dense curvature
# Bayesian LoRA as in pyro_llm.demo: B random with a N(0, 0.1^2) prior, A and the head point
# estimates, guide locations at lr 1e-4 and scales at 3e-2, 2 epochs from the MAP adapter
SVI = dict(prior=0.1, select="B", epochs=2, lr=1e-4, scale_lr=3e-2, init_scale=1e-2)


def _record(path: Path, what: str, fields: dict):
    """The saved record at ``path`` (checked field by field), or ``None`` when there is none."""
    if not path.exists():
        return None
    return cache.read_record(path, what, fields, f"delete {path.parent} and run again")


def _tensors(path: Path, what: str, expect=None) -> dict[str, torch.Tensor]:
    try:
        return read_safetensors(path, what=what, expect=expect)[0]
    except FileFormatError as e:
        raise FileFormatError(f"{e}; delete {path.parent.parent} and run again") from None


def _replace_dir(tmp: Path, path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _tmp_dir(path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def predictor_for(kind: str, model, tokenizer, texts, labels, train: ft.FineTune, d: Path, *, K: int,
                  max_length: int, num_samples: int, seed: int, progress: bool):
    """``(predict_fn, keep, record)`` of posterior ``kind`` around the fine-tuned ``model``."""
    if kind == "map":
        return map_predictor(model, tokenizer, max_length=max_length), "mean", {}
    if kind == "laplace":
        return _laplace(model, tokenizer, texts, labels, train, d, max_length, num_samples, seed,
                        progress)
    if kind == "ensemble":
        return _ensemble(model, tokenizer, texts, labels, train, d, K, max_length, seed, progress)
    if kind == "svi":
        return _svi(model, tokenizer, texts, labels, train, d, max_length, num_samples, seed, progress)
    raise ValueError(f"unknown posterior {kind!r}")


def _train_loader(model, texts, labels, tokenizer, max_length, batch_size, shuffle=False):
    return ft.DeviceLoader(texts, labels, tokenizer, max_length, batch_size, shuffle,
                           ft.model_device(model))


# ---------------------------------------------------------------------------- Laplace
def laplace_draws(num_samples: int) -> int:
    """GLM draws the Laplace coder takes: ``num_samples``, but at least :data:`LAPLACE_MIN_DRAWS`
    (drawing the logits costs almost nothing next to the backward pass of each batch)."""
    return max(int(num_samples), LAPLACE_MIN_DRAWS)


def _laplace(model, tok, texts, labels, train, d, max_length, num_samples, seed, progress):
    """Last-layer Laplace (the classification head; dense curvature up to
    :data:`LAPLACE_FULL_MAX` parameters, diagonal above) on the MAP adapter, prior precision by
    marginal likelihood, GLM predictive with Monte Carlo draws of the logits."""
    path, marker = d / "laplace", d / "laplace.json"
    names = last_layer_names(model)
    size = sum(model.get_parameter(n).numel() for n in names)
    structure = "full" if size <= LAPLACE_FULL_MAX else "diag"
    rec = _record(marker, "Laplace record", {"structure": "str", "sites": "list[str]",
                                             "seconds": "float>=0"})
    if rec is None or not path.exists():
        t0 = time.perf_counter()
        data = _train_loader(model, texts, labels, tok, max_length, train.batch_size)
        la = fit_laplace(model, data, structure=structure, select=names, progress=progress, seed=seed)
        tmp = _tmp_dir(path)
        la.save(tmp)
        _replace_dir(tmp, path)
        rec = {"structure": structure, "sites": names, "parameters": int(size),
               "prior_precision": la.prior_precision.tolist(), "draws": laplace_draws(num_samples),
               "seconds": time.perf_counter() - t0}
        write_json(marker, rec)
    la = load_laplace(path, lora=BayesianLoRA(model, select=names))
    predict = method_predictor(la, tok, max_length=max_length, num_samples=laplace_draws(num_samples),
                               seed=seed)
    return predict, "draws", rec


# ---------------------------------------------------------------------------- ensemble
def _ensemble(model, tok, texts, labels, train, d, K, max_length, seed, progress):
    """Member 0 is ``model`` (the MAP fit); members 1.. are fresh adapters fine-tuned from other
    seeds on the same rows, each saved as it finishes."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    members, recs = [{n: model.get_parameter(n).detach().clone() for n in names}], []
    for m in range(1, ENSEMBLE_MEMBERS):
        f, meta = d / "ensemble" / f"member_{m}.safetensors", d / "ensemble" / f"member_{m}.json"
        rec = _record(meta, f"ensemble member {m}'s fine-tuning record", cache.FIT_FIELDS)
        if rec is None or not f.exists():
            member = ft.fresh_adapter(model, seed + 7919 * m)
            rec = ft.finetune(member, tok, texts, labels, train, num_classes=K, max_length=max_length,
                              seed=seed + 7919 * m, progress=progress)
            save_safetensors(f, {n: member.get_parameter(n).detach().contiguous() for n in names})
            write_json(meta, rec)
            del member
        values = _tensors(f, f"ensemble member {m}",
                          {n: tuple(model.get_parameter(n).shape) for n in names})
        members.append({n: values[n] for n in names})
        recs.append(rec)
    ens = EnsemblePosterior(members, peft_model=model)
    return method_predictor(ens, tok, max_length=max_length), "draws", {"members": recs}


# ---------------------------------------------------------------------------- SVI
def _svi(model, tok, texts, labels, train, d, max_length, num_samples, seed, progress):
    """Bayesian LoRA by SVI from the MAP adapter; the draws and the fitted point estimates (the
    head) are saved, so prediction (first run or rerun) reads them from the same files."""
    f, marker = d / "svi" / "draws.safetensors", d / "svi.json"
    rec = _record(marker, "SVI record", {"seconds": "float>=0", "steps": "int>=0"})
    store = pyro.get_param_store()
    if rec is None or not f.exists():
        t0 = time.perf_counter()
        with store.scope():
            lora = BayesianLoRA(model, prior=SVI["prior"], select=SVI["select"])
            n = len(texts)
            data = _train_loader(model, texts, labels, tok, max_length, train.batch_size, shuffle=True)

            def svi_model(input_ids, attention_mask, index, labels=None):
                logits = ft.class_logits(lora, {"input_ids": input_ids, "attention_mask": attention_mask})
                categorical("label", logits, labels, n, index)

            fit = fit_svi(svi_model, "normal", data, epochs=SVI["epochs"],
                          lr=scale_lr(SVI["lr"], SVI["scale_lr"]), init_values=lora,
                          init_scale=SVI["init_scale"], progress=progress, seed=seed)
            pyro.set_rng_seed(seed)
            draws = GuidePosterior(fit.guide).sample(num_samples)
            fixed = {n: store[lora.site_name(n)].detach() for n in lora.fixed_names
                     if lora.site_name(n) in store}
        tensors = {f"draw{i}/{k}": v.contiguous() for i, dr in enumerate(draws) for k, v in dr.items()}
        tensors.update({f"fixed/{k}": v.contiguous() for k, v in fixed.items()})
        save_safetensors(f, tensors)
        rec = {"seconds": time.perf_counter() - t0, "steps": fit.steps, **SVI}
        write_json(marker, rec)
    t = _tensors(f, "SVI posterior draws")
    draws = _svi_draws(f, t, model, num_samples)
    with torch.no_grad():
        for k, v in t.items():
            if k.startswith("fixed/"):
                model.get_parameter(k[len("fixed/"):]).copy_(v)
    lora = BayesianLoRA(model, prior=SVI["prior"], select=SVI["select"])
    fn = posterior_predictor(lora, draws, tok, max_length=max_length,
                             logits_fn=lambda m, b: ft.class_logits(m, b))
    return _scoped(fn), "draws", rec


def _svi_draws(f: Path, t: dict, model, num_samples: int) -> list[dict[str, torch.Tensor]]:
    """The ``num_samples`` draws saved in ``t``, checked: draws ``0..S-1`` with the same sites and
    shapes, and point estimates (``fixed/``) that are parameters of ``model`` of their shape."""
    draws: list[dict] = [{} for _ in range(num_samples)]
    bad = None
    for k, v in t.items():
        if k.startswith("fixed/"):
            try:
                p = model.get_parameter(k[len("fixed/"):])
            except AttributeError:
                p = None
            if p is None or p.shape != v.shape:
                bad = f"the point estimate {k!r} does not fit the model"
        elif k.startswith("draw") and "/" in k and k[4:].split("/", 1)[0].isdigit():
            i, name = k[len("draw"):].split("/", 1)
            if int(i) >= num_samples:
                bad = f"draw {i} lies beyond num_samples={num_samples}"
            else:
                draws[int(i)][name] = v
        else:
            bad = f"the tensor {k!r} is neither a draw nor a point estimate"
    first = {n: v.shape for n, v in draws[0].items()}
    if bad is None and (not first or any({n: v.shape for n, v in dr.items()} != first for dr in draws)):
        bad = f"its {num_samples} draws do not all hold the same sites and shapes"
    if bad:
        raise FileFormatError(f"{f}: {bad}; the SVI posterior is damaged: delete {f.parent.parent} and "
                              "run again")
    return draws


def _scoped(fn):
    """Run ``fn`` in an empty Pyro param store of its own (point estimates then come from the
    peft model, where they were written), leaving the caller's store alone."""
    store = pyro.get_param_store()
    state: dict = {"params": {}, "constraints": {}}

    def predict(texts):
        with store.scope(state):
            return fn(texts)

    predict.fingerprint = fn.fingerprint
    return predict
