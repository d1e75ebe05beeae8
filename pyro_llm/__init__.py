"""pyro_llm: a fine-tuned language model as one layer of a Pyro probabilistic program.

LoRA adapter matrices of a peft model become Pyro random sites (:class:`BayesianLoRA`);
one Pyro model function holds the adapter prior, the LLM forward pass and the likelihoods;
:func:`fit_svi` fits it, :func:`predict_probs` predicts under posterior draws, and
:func:`to_arviz` hands the result to ArviZ. Stacked draws run in one sample-batched forward
(:mod:`pyro_llm.batched`, :class:`PrefixCache`); :func:`code_corpus` codes a large corpus in
bounded memory, resumably (:mod:`pyro_llm.stream`). The other posteriors over the same sites:
:func:`fit_laplace`, :func:`fit_ensemble`, :func:`fit_blob`, :func:`fit_polar_vbll` (on a
:class:`PolarAdapter`), with :func:`fit_temperature` and :func:`mc_dropout_predict` as
baselines; :func:`regress` uses the LLM's output as a covariate or outcome of a regression
with honest intervals (:mod:`pyro_llm.regression`).
"""

from . import (
    batched,
    data,
    diagnostics,
    features,
    likelihoods,
    metrics,
    models,
    plots,
    priors,
    regression,
    stream,
    vbll,
)
from .arviz_io import short_site_names, to_arviz
from .data import PromptDataset
from .features import label_token_ids
from .gaussian import GaussianPosterior
from .infer import (
    BLoBResult,
    EarlyStopping,
    EnsemblePosterior,
    FitResult,
    LaplacePosterior,
    LossPlateau,
    MCDropoutPosterior,
    PolarVBLL,
    TemperatureScaling,
    TrainConfig,
    fit_blob,
    fit_ensemble,
    fit_laplace,
    fit_map,
    fit_polar,
    fit_polar_vbll,
    fit_svi,
    fit_temperature,
    load_ensemble,
    load_laplace,
    load_polar_vbll,
    make_guide,
    mc_dropout_predict,
    scale_lr,
)
from .lora import BayesianLoRA, find_lora_parameters
from .point import PointPosterior, TemperaturePosterior
from .polar import PolarAdapter, polar_optimizer
from .posterior import GuidePosterior, Posterior, predict_probs, stack_draws
from .prefix_cache import PrefixCache
from .readout import Readout
from .regression import RegressionResult, regress
from .saved import load
from .stream import code_corpus, load_coded
from .vbll import VBLLClassification, VBLLRegression

__version__ = "0.1.0"

__all__ = [
    "PromptDataset",
    "label_token_ids",
    "short_site_names",
    "TrainConfig",
    "load",
    "TemperaturePosterior",
    "Readout",
    "PointPosterior",
    "MCDropoutPosterior",
    "GaussianPosterior",
    "BayesianLoRA",
    "BLoBResult",
    "EarlyStopping",
    "LossPlateau",
    "EnsemblePosterior",
    "FitResult",
    "GuidePosterior",
    "LaplacePosterior",
    "PolarAdapter",
    "PolarVBLL",
    "Posterior",
    "PrefixCache",
    "RegressionResult",
    "TemperatureScaling",
    "VBLLClassification",
    "VBLLRegression",
    "batched",
    "code_corpus",
    "data",
    "diagnostics",
    "features",
    "find_lora_parameters",
    "fit_blob",
    "fit_ensemble",
    "fit_laplace",
    "fit_map",
    "fit_polar",
    "fit_polar_vbll",
    "fit_svi",
    "fit_temperature",
    "likelihoods",
    "load_ensemble",
    "load_coded",
    "load_laplace",
    "load_polar_vbll",
    "make_guide",
    "mc_dropout_predict",
    "metrics",
    "models",
    "plots",
    "polar_optimizer",
    "predict_probs",
    "priors",
    "regress",
    "regression",
    "scale_lr",
    "stack_draws",
    "stream",
    "to_arviz",
    "vbll",
]
