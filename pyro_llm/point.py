"""Degenerate posteriors: a point (the MAP fine-tune) and temperature scaling of any posterior.

Both follow the :class:`~pyro_llm.posterior.Posterior` protocol so that a comparison of methods
runs one code path: :class:`PointPosterior` puts all its mass on one value of the trainable
tensors (``degenerate = True``: ``predict`` returns S = 1); :class:`TemperaturePosterior` divides
another posterior's log-probabilities by a fitted temperature (its draws are the base's).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ._io import FileFormatError, atomic_folder, read_json, read_safetensors, save_safetensors, write_json
from .posterior import Draw, Posterior, batch_probs, predict_probs
from .readout import Readout

__all__ = ["PointPosterior", "TemperaturePosterior", "WithValues"]

POSTERIOR_FILE, _TENSORS = "posterior.json", "posterior.safetensors"


class WithValues(torch.nn.Module):
    """``model`` run with some of its parameters replaced by ``values`` (by parameter name), through
    :func:`torch.func.functional_call`; the model itself is not changed (it is a submodule, so
    ``modules()`` and ``train()`` reach its layers)."""

    def __init__(self, model: torch.nn.Module, values: Mapping[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self.values = dict(values)

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.values, args, kwargs)


class PointPosterior(Posterior):
    """All mass at ``values`` (trainable tensors by parameter name of ``model``): the MAP fine-tune.

    ``predict`` runs ``model`` with the values injected (S = 1); ``sample(S)`` repeats them.

    Example
    -------
    >>> import torch
    >>> net = torch.nn.Linear(4, 3)
    >>> post = PointPosterior({"weight": torch.zeros(3, 4)}, model=net)
    >>> post.predict([(torch.randn(2, 4), torch.tensor([0, 1]))], progress=False).shape
    torch.Size([1, 2, 3])
    """

    degenerate = True

    def __init__(self, values: Mapping[str, torch.Tensor], *, model: torch.nn.Module | None = None,
                 readout: Readout | None = None, method: str = "map"):
        if not values:
            raise ValueError("a point posterior needs at least one tensor; got none")
        self.values = {k: torch.as_tensor(v).detach().clone() for k, v in values.items()}
        self.model, self.readout, self.method = model, readout, method

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> list[Draw]:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        return [dict(self.values) for _ in range(num_samples)]

    def mean(self) -> Draw:
        return dict(self.values)

    def attach(self, lora=None, readout: Readout | None = None) -> PointPosterior:
        """Set the model (a peft model, or a BayesianLoRA's) that :meth:`predict` runs."""
        if lora is not None:
            self.model = getattr(lora, "peft_model", lora)
        if readout is not None:
            self.readout = readout
        return self

    @torch.no_grad()
    def predict(self, data: Iterable, num_samples: int = 1, *, readout: Readout | None = None,
                progress: bool = True, seed: int | None = 0, vectorize="auto") -> torch.Tensor:
        """Class probabilities ``(1, N, C)`` of the model at the point (``num_samples`` ignored)."""
        if self.model is None:
            raise ValueError("this PointPosterior has no model attached; call .attach(peft_model)")
        was = self.model.training
        self.model.eval()
        try:
            fn = batch_probs(WithValues(self.model, self.values), readout or self.readout or Readout())
            return predict_probs(fn, data, None, progress=progress, seed=seed)
        finally:
            self.model.train(was)

    def as_guide(self):
        import pyro
        import pyro.distributions as dist

        def guide(*args, **kwargs):
            return {n: pyro.sample(n, dist.Delta(v, event_dim=v.dim())) for n, v in self.values.items()}

        return guide

    def save(self, path) -> Path:
        info = {"format": "pyro_llm.posterior", "version": 1, "kind": "point", "method": self.method,
                "names": list(self.values)}
        with atomic_folder(path, owned=lambda n: n in (POSTERIOR_FILE, _TENSORS)) as tmp:
            save_safetensors(tmp / _TENSORS, {f"value/{k}": v for k, v in self.values.items()})
            write_json(tmp / POSTERIOR_FILE, info)
        return Path(path)

    @classmethod
    def load(cls, path, model: torch.nn.Module | None = None,
             readout: Readout | None = None) -> PointPosterior:
        path = Path(path)
        info = read_json(path / POSTERIOR_FILE, what="point posterior",
                         fields={"kind": "str", "method": "str", "names": "list[str]"})
        t, _ = read_safetensors(path / _TENSORS, what="point posterior")
        missing = [n for n in info["names"] if f"value/{n}" not in t]
        if missing:
            raise FileFormatError(f"{path / _TENSORS} lacks {missing[:3]}; the file is damaged")
        values = {n: t[f"value/{n}"] for n in info["names"]}
        post = cls(values, readout=readout, method=info["method"])
        if model is not None:
            post.attach(model)
            params = dict(post.model.named_parameters())
            for n, v in values.items():
                if n not in params or params[n].shape != v.shape:
                    raise ValueError(f"{path}: the model has no parameter {n!r} of shape {tuple(v.shape)}; "
                                     "load it with the model it was fitted on")
        return post


class TemperaturePosterior(Posterior):
    """Temperature scaling of ``base``: its predictive log-probabilities divided by ``temperature``
    (fitted with :func:`~pyro_llm.fit_temperature` on held-out logits) and renormalised. Draws,
    mean and density are the base's."""

    def __init__(self, base: Posterior, temperature: float):
        t = float(temperature)
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.base, self.temperature = base, t

    @property
    def degenerate(self) -> bool:  # noqa: D401 -- mirrors the base
        return self.base.degenerate

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> list[Draw]:
        return self.base.sample(num_samples, generator)

    def mean(self) -> Draw:
        return self.base.mean()

    def log_prob(self, draw):
        return self.base.log_prob(draw)

    def attach(self, lora=None, readout: Readout | None = None) -> TemperaturePosterior:
        self.base.attach(lora, readout)
        return self

    def predict(self, data: Iterable, num_samples: int = 16, **kwargs) -> torch.Tensor:
        probs = self.base.predict(data, num_samples, **kwargs)
        return (probs.clamp_min(1e-30).log() / self.temperature).softmax(-1)

    def as_guide(self):
        return self.base.as_guide()

    def save(self, path) -> Path:
        """The base in ``path/base`` and the temperature in ``posterior.json``."""
        with atomic_folder(path, owned=lambda n: n in (POSTERIOR_FILE, "base")) as tmp:
            self.base.save(tmp / "base")
            write_json(tmp / POSTERIOR_FILE, {"format": "pyro_llm.posterior", "version": 1,
                                              "kind": "temperature", "temperature": self.temperature})
        return Path(path)
