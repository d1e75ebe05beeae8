"""One frozen training configuration for every fit, and one callback convention.

Every fit takes ``config=TrainConfig(...)`` in place of its training keywords, and every fit or
predict that reads logits from batches takes ``readout=Readout(...)`` in place of the older
``logits_fn`` / ``labels_fn`` pair::

    cfg = TrainConfig(epochs=3, lr=1e-3, checkpoint="runs/x", progress=False)
    fit_map(peft_model, loader, config=cfg)
    fit_blob(peft_model, loader, config=cfg, readout=Readout.label_tokens(ids))

A field left unset keeps the method's own default; setting one both in ``config`` and as a
keyword is an error, as is a field the method does not have.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

from ..readout import Readout

__all__ = ["TrainConfig", "UNSET", "takes_config"]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET = _Unset()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how to train: the settings every fit shares (unset fields keep the method's
    defaults). ``early_stopping`` is an :class:`~pyro_llm.EarlyStopping`; ``checkpoint`` a folder.

    Example
    -------
    >>> cfg = TrainConfig(epochs=2, lr=0.01)
    >>> cfg.given()
    {'epochs': 2, 'lr': 0.01}
    """

    epochs: int = UNSET
    max_steps: int | None = UNSET
    lr: float | Callable = UNSET
    weight_decay: float = UNSET
    clip_norm: float | None = UNSET
    checkpoint: str | None = UNSET
    checkpoint_every: int = UNSET
    early_stopping: object = UNSET
    progress: bool = UNSET
    seed: int | None = UNSET

    def given(self) -> dict:
        """The fields that were set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not UNSET}

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def takes_config(fn: Callable | None = None, *, config: bool = True) -> Callable:
    """Give ``fn`` the keywords ``config=`` (a :class:`TrainConfig`; not with ``config=False``, for
    a predict) and ``readout=`` (a :class:`~pyro_llm.Readout`, mapped onto ``fn``'s ``logits_fn``
    / ``labels_fn``). A ``fn`` with ``**kwargs`` passes config fields it lacks on."""
    if fn is None:
        return functools.partial(takes_config, config=config)
    sig = inspect.signature(fn)
    params = sig.parameters
    reads = "logits_fn" in params or "labels_fn" in params
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    takes = config

    @functools.wraps(fn)
    def wrapper(*args, config: TrainConfig | None = None, readout: Readout | None = None, **kwargs):
        if config is not None and not takes:
            raise ValueError(f"{fn.__name__} trains nothing: it takes no config=")
        if config is not None:
            if not isinstance(config, TrainConfig):
                raise TypeError(f"config must be a pyro_llm.TrainConfig, got {type(config).__name__}")
            for name, value in config.given().items():
                if name not in params and not passes_on:
                    raise ValueError(f"{fn.__name__} has no setting {name!r}; leave it unset in config")
                if name in kwargs:
                    raise ValueError(f"{name} is set both in config= and as a keyword of {fn.__name__}; "
                                     "set it once")
                kwargs[name] = value
        if readout is not None:
            if not reads:
                raise ValueError(f"{fn.__name__} reads no logits from batches: it takes no readout=")
            if not isinstance(readout, Readout):
                raise TypeError(f"readout must be a pyro_llm.Readout, got {type(readout).__name__}")
            if kwargs.get("logits_fn") is not None or kwargs.get("labels_fn") is not None:
                raise ValueError("pass readout= or logits_fn= / labels_fn=, not both")
            if "logits_fn" in params:
                kwargs["logits_fn"] = readout.logits
            if "labels_fn" in params:
                kwargs["labels_fn"] = readout.labels
        return fn(*args, **kwargs)

    extra = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None)] if takes else []
    if reads:
        extra.append(inspect.Parameter("readout", inspect.Parameter.KEYWORD_ONLY, default=None))
    plist = list(params.values())
    at = next((i for i, p in enumerate(plist) if p.kind is inspect.Parameter.VAR_KEYWORD), len(plist))
    wrapper.__signature__ = sig.replace(parameters=plist[:at] + extra + plist[at:])
    return wrapper
