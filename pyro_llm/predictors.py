"""Predictors for :func:`pyro_llm.stream.code_corpus`: ``predict_fn(texts) -> probabilities``.

:func:`map_predictor` (a peft / Hugging Face model), :func:`posterior_predictor` (a
:class:`~pyro_llm.posterior.Posterior` through a :class:`~pyro_llm.BayesianLoRA`, with S draws
fixed once for the whole corpus, evaluated together by the sample-batched engine) and
:func:`method_predictor` (a posterior's own ``predict``, e.g. an ensemble or a Laplace
posterior). Each carries a ``fingerprint`` (a hash of the tensors it predicts with), which
``code_corpus`` records so that a resume with another model is refused.

:func:`predictor_fingerprint` gives any other callable one: its qualified name and the tensors of
the ``torch.nn.Module`` objects it is bound to (a bound method's object, a callable object's
attributes, a closure's variables, ``functools.partial`` arguments, module-level names the
function uses). Anything else it depends on (a tokenizer, a temperature in a global) is not
seen, so such a fingerprint is a weaker check: pass ``fingerprint=`` to ``code_corpus`` instead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch

from .posterior import Posterior, predict_probs
from .runtime import train_mode

__all__ = ["map_predictor", "posterior_predictor", "method_predictor", "predictor_fingerprint",
           "module_tensors", "posterior_tensors"]


def _fingerprint(tensors: dict[str, torch.Tensor], *extra) -> str:
    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def module_tensors(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors that identify a model: its adapter or trainable ones (LoRA, ``modules_to_save``,
    ``requires_grad``) where it has any, else every parameter and buffer (a frozen model)."""
    own = {prefix + n: p for n, p in model.named_parameters()
           if p.requires_grad or "lora_" in n or "modules_to_save" in n}
    if own:
        return own
    return {prefix + n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}


def predictor_fingerprint(predict_fn: Callable, fingerprint: str | None = None) -> tuple[str, bool]:
    """``(fingerprint, verified)`` of a corpus predictor: ``fingerprint`` when given, else the
    predictor's own ``fingerprint`` attribute (``verified``), else a hash of its qualified name
    and of the modules it is bound to (``verified`` is ``False``: state outside those modules is
    not seen)."""
    if fingerprint is not None:
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TypeError(f"fingerprint must be a non-empty str naming the model, got {fingerprint!r}")
        return fingerprint, True
    own = getattr(predict_fn, "fingerprint", None)
    if own is not None:
        return str(own), True
    tensors: dict[str, torch.Tensor] = {}
    for i, m in enumerate(_bound_modules(predict_fn)):
        tensors.update(module_tensors(m, f"{i}/{type(m).__name__}/"))
    return "callable:" + _fingerprint(tensors, _qualname(predict_fn)), False


def _qualname(fn) -> str:
    if isinstance(fn, functools.partial):
        return "partial:" + _qualname(fn.func)
    f = fn.__func__ if hasattr(fn, "__func__") else fn
    if not hasattr(f, "__qualname__"):
        f = type(f)  # a callable object: its class
    return f"{getattr(f, '__module__', '?')}.{f.__qualname__}"


def _bound_modules(fn, depth: int = 3) -> list[torch.nn.Module]:
    """The ``nn.Module`` objects reachable from a callable (see the module docs), in a fixed order."""
    found: list[torch.nn.Module] = []
    seen: set[int] = set()

    def visit(x, d):
        if id(x) in seen or d < 0 or x is None or isinstance(x, (str, bytes, int, float, bool)):
            return
        seen.add(id(x))
        try:
            look(x, d)
        except Exception:  # an object whose attributes cannot be read safely: not followed
            pass

    def look(x, d):
        if isinstance(x, torch.nn.Module):
            found.append(x)
            peft = getattr(type(x), "peft_model", None)  # a BayesianLoRA keeps its peft model aside
            if isinstance(peft, property):
                visit(x.peft_model, d)
            return
        if isinstance(x, torch.Tensor):
            return
        if isinstance(x, functools.partial):
            for y in (x.func, *x.args, *sorted(x.keywords.items())):
                visit(y, d - 1)
        elif hasattr(x, "__func__") and hasattr(x, "__self__"):  # a bound method
            visit(x.__self__, d - 1)
            visit(x.__func__, d - 1)
        elif hasattr(x, "__code__"):  # a function: closure, defaults, the globals it names
            for c in x.__closure__ or ():
                try:
                    visit(c.cell_contents, d - 1)
                except ValueError:  # an empty cell
                    pass
            for y in (*(x.__defaults__ or ()), *(x.__kwdefaults__ or {}).values()):
                visit(y, d - 1)
            g = getattr(x, "__globals__", {})
            for name in x.__code__.co_names:
                if name in g and not isinstance(g[name], type(functools)):  # skip modules
                    visit(g[name], d - 1)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y, d - 1)
        elif isinstance(x, Mapping):
            for y in x.values():
                visit(y, d - 1)
        elif hasattr(x, "__dict__") and not isinstance(x, type):  # a callable object's attributes
            if callable(x) and d == depth:
                visit(type(x).__call__, d - 1)
            for y in vars(x).values():
                visit(y, d - 1)

    visit(fn, depth)
    return found


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

    predict.fingerprint = _fingerprint(module_tensors(model), "map", max_length)
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
    posterior's peft model. The fingerprint hashes what identifies the posterior
    (:func:`posterior_tensors`: its mean, ensemble members, a Laplace posterior's prior precision
    and curvature blocks), the adapter of the model it predicts through, the method and ``kwargs``.
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

    tensors, extra = posterior_tensors(posterior)
    model = getattr(posterior, "peft_model", None)
    if model is None and getattr(posterior, "lora", None) is not None:
        model = posterior.lora.peft_model
    if isinstance(model, torch.nn.Module):  # the adapter the posterior predicts through
        tensors.update(module_tensors(model, "model/"))
    predict.fingerprint = _fingerprint(tensors, type(posterior).__name__, method,
                                       sorted(kwargs.items()), max_length, *extra)
    return predict


def posterior_tensors(posterior) -> tuple[dict[str, torch.Tensor], list]:
    """What identifies a posterior: ``(tensors, other facts)``. Its mean where its class defines
    one, ensemble ``members``, and for a Laplace posterior the prior precision, the MAP and every
    curvature block's tensors, with the blocks' kinds and sites and the site names and shapes."""
    own_mean = isinstance(posterior, Posterior) and type(posterior).mean is not Posterior.mean
    tensors = {f"mean/{k}": v for k, v in (posterior.mean() if own_mean else {}).items()}
    extra: list = []
    members = getattr(posterior, "members", None)
    if isinstance(members, list) and all(isinstance(m, Mapping) for m in members):
        tensors.update({f"member{i}/{k}": v for i, m in enumerate(members) for k, v in m.items()})
    delta = getattr(posterior, "prior_precision", None)
    if isinstance(delta, torch.Tensor):
        tensors["prior_precision"] = delta
    for j, b in enumerate(getattr(posterior, "blocks", None) or ()):
        extra.append(["block", j, getattr(b, "kind", type(b).__name__), list(getattr(b, "sites", []))])
        if callable(getattr(b, "tensors", None)):
            tensors.update({f"block{j}/{k}": v for k, v in b.tensors().items()})
    for name in ("site_names", "shapes"):
        if getattr(posterior, name, None) is not None:
            extra.append([name, [list(x) if isinstance(x, tuple) else x for x in getattr(posterior, name)]])
    return tensors, extra
