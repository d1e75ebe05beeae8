"""Predictors for :func:`pyro_llm.stream.code_corpus`: ``predict_fn(texts) -> probabilities``.

:func:`map_predictor` (a peft / Hugging Face model), :func:`posterior_predictor` (a
:class:`~pyro_llm.posterior.Posterior` through a :class:`~pyro_llm.BayesianLoRA`, with S draws
fixed once for the whole corpus, evaluated together by the sample-batched engine) and
:func:`method_predictor` (a posterior's own ``predict``, e.g. an ensemble or a Laplace
posterior). Each carries a ``fingerprint`` (a hash of the tensors it predicts with), which
``code_corpus`` records so that a resume with another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence

import torch

from .lora import train_mode
from .posterior import Posterior, predict_probs

__all__ = ["map_predictor", "posterior_predictor", "method_predictor"]


def _fingerprint(tensors: dict[str, torch.Tensor], *extra) -> str:
    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _tokenize(tokenizer, texts: Sequence[str], max_length: int, device) -> dict:
    if getattr(tokenizer, "pad_token_id", 0) is None:
        raise ValueError("the tokenizer has no pad token, needed to batch texts; set one, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token")
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def _class_logits(model, batch: dict) -> torch.Tensor:
    from .features import class_logits

    return class_logits(model(**batch))


def _device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def map_predictor(model: torch.nn.Module, tokenizer, *, max_length: int = 128,
                  logits_fn: Callable | None = None) -> Callable[[list[str]], torch.Tensor]:
    """``texts -> (B, C)`` softmax probabilities of a (peft) model in eval mode.

    ``logits_fn(model, batch) -> (B, C)`` logits defaults to ``model(**batch).logits`` (a
    sequence classifier); ``batch`` is the tokenizer's padded output on the model's device.
    The fingerprint hashes the adapter's tensors (LoRA, ``modules_to_save``, anything trainable).
    """
    logits_fn = logits_fn or _class_logits
    device = _device(model)

    @torch.no_grad()
    def predict(texts):
        with train_mode(model, False):
            return logits_fn(model, _tokenize(tokenizer, texts, max_length, device)).float().softmax(-1)

    own = {n: p for n, p in model.named_parameters()
           if p.requires_grad or "lora_" in n or "modules_to_save" in n}
    predict.fingerprint = _fingerprint(own, "map", max_length)
    return predict


def posterior_predictor(lora, posterior, tokenizer, *, num_samples: int = 16, seed: int = 0,
                        max_length: int = 128, logits_fn: Callable | None = None,
                        vectorize: bool | str = "auto", sample_batch: int | None = None
                        ) -> Callable[[list[str]], torch.Tensor]:
    """``texts -> (S, B, C)`` probabilities under S posterior draws, the same for every batch.

    ``posterior`` is a :class:`~pyro_llm.posterior.Posterior` (``num_samples`` draws are taken
    once, after ``pyro.set_rng_seed(seed)``) or a list of draws (``{site: tensor}``; e.g. an
    ensemble's ``.members``, to use each member once). Each batch runs
    :func:`pyro_llm.posterior.predict_probs` through ``lora`` (a :class:`~pyro_llm.BayesianLoRA`)
    with ``logits_fn(lora, batch)`` (default ``lora(**batch).logits``). The fingerprint hashes
    the draws and the ``lora``'s point-estimate tensors (its ``pyro.param`` sites, e.g. a head).

    ``vectorize``: evaluate ``sample_batch`` draws (default all S) in one forward (working
    memory grows with ``sample_batch * batch_size`` rows); ``"auto"`` checks once, on the first
    batch, that the stacked draws give what the first draw gives alone, and otherwise warns and
    runs them one at a time for the whole corpus. A ``prefix_cache`` on the ``lora`` gains
    nothing in one pass over a corpus: every text is new.
    """
    import pyro

    if isinstance(posterior, Posterior):
        pyro.set_rng_seed(seed)
        draws = posterior.sample(num_samples)
    else:
        draws = list(posterior)
    if not draws:
        raise ValueError("no posterior draws given: pass a Posterior or a non-empty list of draws")
    logits_fn = logits_fn or _class_logits
    device = _device(lora.peft_model)
    mode = {"vectorize": vectorize if len(draws) > 1 else False}

    def fn(**batch):
        return logits_fn(lora, batch).float().softmax(-1)

    def run(batch, vec, these=draws):
        return predict_probs(fn, [batch], these, progress=False, seed=None, vectorize=vec,
                             sample_batch=sample_batch)

    def predict(texts):
        batch = _tokenize(tokenizer, texts, max_length, device)
        if mode["vectorize"] == "auto":
            mode["vectorize"], probs = _vectorises(run, batch, draws)
            if probs is not None:
                return probs
        return run(batch, mode["vectorize"])

    flat = {f"{s}/{k}": v for s, d in enumerate(draws) for k, v in d.items()}
    store = pyro.get_param_store()
    for n in lora.fixed_names:  # point-estimate tensors (a head) come from the param store
        site = lora.site_name(n)
        flat[f"fixed/{n}"] = store[site] if site in store else lora.peft_model.get_parameter(n)
    predict.fingerprint = _fingerprint(flat, "posterior", max_length)
    return predict


def _vectorises(run, batch, draws) -> tuple[bool, torch.Tensor | None]:
    """Whether the draws, stacked, give on ``batch`` what the first gives alone (and the
    stacked result when they do)."""
    try:
        stacked = run(batch, True)
    except ValueError as e:
        why = f"they fail stacked ({e})"
    else:
        alone = run(batch, False, draws[:1])
        if torch.allclose(stacked[0], alone[0], rtol=1e-4, atol=1e-6):
            return True, stacked
        why = "the stacked result differs from the first draw run alone"
    warnings.warn(f"posterior_predictor: {why}; running the {len(draws)} draws one at a time",
                  stacklevel=3)
    return False, None


def method_predictor(posterior, tokenizer, *, method: str = "predict", max_length: int = 128,
                     device=None, **kwargs) -> Callable[[list[str]], torch.Tensor]:
    """``texts -> posterior.<method>([batch], progress=False, **kwargs)``: a posterior's own
    predictive, e.g. :meth:`EnsemblePosterior.predict` (every member, ``(M, B, C)``) or
    :meth:`LaplacePosterior.predict` (``pred_type``, ``link``, ``num_samples``, ``seed`` in
    ``kwargs``; its seed is reset for every batch). ``device`` defaults to that of the
    posterior's peft model. The fingerprint hashes ``posterior.mean()`` where the class defines
    one, the method and ``kwargs``.
    """
    fn = getattr(posterior, method, None)
    if not callable(fn):
        raise TypeError(f"{type(posterior).__name__} has no method {method!r}")
    if device is None:
        model = getattr(posterior, "peft_model", None)
        if model is None and getattr(posterior, "lora", None) is not None:
            model = posterior.lora.peft_model
        device = _device(model) if model is not None else torch.device("cpu")

    def predict(texts):
        return fn([_tokenize(tokenizer, texts, max_length, device)], progress=False, **kwargs)

    own_mean = isinstance(posterior, Posterior) and type(posterior).mean is not Posterior.mean
    predict.fingerprint = _fingerprint(posterior.mean() if own_mean else {}, type(posterior).__name__,
                                       method, sorted(kwargs.items()), max_length)
    return predict
