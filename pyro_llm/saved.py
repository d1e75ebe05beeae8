""":func:`load`: read any saved posterior back, whatever method wrote it.

The folder's files say what it holds: ``posterior.json`` (a Gaussian from SVI or BLoB, a point
from MAP, PoLAR or MC dropout, temperature scaling over another posterior), ``laplace.json``
(:func:`~pyro_llm.fit_laplace`), ``ensemble.json`` (:func:`~pyro_llm.fit_ensemble`),
``polar_vbll.json`` (:func:`~pyro_llm.fit_polar_vbll`) or ``answer_rows.json``
(:func:`~pyro_llm.infer.laplace.fit_answer_laplace`; pass ``model=`` and ``features_fn=``).
Every file goes through the validated reader of :mod:`pyro_llm._io`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ._io import FileFormatError, read_json
from .gaussian import POSTERIOR_FILE, GaussianPosterior
from .point import PointPosterior, TemperaturePosterior
from .posterior import Posterior
from .readout import Readout

__all__ = ["load"]


def load(path, model: torch.nn.Module | None = None, *, readout: Readout | None = None,
         features_fn: Callable | None = None) -> Posterior:
    """The posterior saved in the folder ``path`` (by any method's ``save``).

    Parameters
    ----------
    model:
        What ``predict`` runs: the :class:`~pyro_llm.BayesianLoRA` the posterior was fitted with
        (site-based posteriors: SVI, BLoB, Laplace), or the peft model (MAP, ensembles, MC
        dropout; a BayesianLoRA works there too), or the :class:`~pyro_llm.PolarAdapter`
        (PoLAR-VBLL, with ``features_fn``). Shapes are checked against it. Without it the
        posterior still samples; ``.attach(model)`` later enables ``predict``.
    readout:
        How ``predict`` reads logits from a batch (default :class:`~pyro_llm.Readout`).

    Example
    -------
    >>> post = fit.posterior; post.save("runs/svi_posterior")              # doctest: +SKIP
    >>> pyro_llm.load("runs/svi_posterior", model=lora).predict(test_loader)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder holding a saved posterior")
    if (path / POSTERIOR_FILE).exists():
        info = read_json(path / POSTERIOR_FILE, what="saved posterior", fields={"kind": "str"})
        kind = info["kind"]
        if kind == "gaussian":
            return GaussianPosterior.load(path, lora=_lora(model, path), readout=readout)
        if kind == "point":
            point = PointPosterior.load(path, model=getattr(model, "peft_model", model), readout=readout)
            if point.method == "mc_dropout" and point.model is not None:
                from .infer.baselines import MCDropoutPosterior

                return MCDropoutPosterior(point.model, readout=readout, values=point.values)
            return point
        if kind == "temperature":
            t = read_json(path / POSTERIOR_FILE, what="saved posterior", fields={"temperature": "float>=0"})
            base = load(path / "base", model, readout=readout, features_fn=features_fn)
            return TemperaturePosterior(base, t["temperature"])
        raise FileFormatError(f"{path / POSTERIOR_FILE}: unknown kind {kind!r}; saved by a newer version?")
    if (path / "laplace.json").exists():
        from .infer.laplace import load_laplace

        return load_laplace(path, lora=_lora(model, path)).attach(readout=readout)
    if (path / "answer_rows.json").exists():
        from .infer.laplace import load_answer_laplace

        return load_answer_laplace(path, model, features_fn)
    if (path / "ensemble.json").exists():
        from .infer.ensemble import load_ensemble

        lora = model if hasattr(model, "site_names") else None
        post = load_ensemble(path, None if lora is not None else model, lora=lora)
        return post.attach(readout=readout)
    if (path / "polar_vbll.json").exists():
        from .infer.polar_vbll import load_polar_vbll

        if model is None or features_fn is None:
            raise ValueError(f"{path} holds a PoLAR-VBLL posterior: pass model= (the PolarAdapter) and "
                             "features_fn= (the function it was fitted with)")
        return load_polar_vbll(path, model, features_fn)
    raise FileNotFoundError(f"{path} holds no saved posterior (posterior.json, laplace.json, ensemble.json, "
                            "polar_vbll.json or answer_rows.json)")


def _lora(model, path):
    """``model`` as a BayesianLoRA: itself, or ``None`` (a peft model cannot name the sites)."""
    if model is None or hasattr(model, "site_names"):
        return model
    raise TypeError(f"{path} holds a posterior over BayesianLoRA sites: pass model= the BayesianLoRA it "
                    f"was fitted with (same select= and prefix=), not a {type(model).__name__}")
