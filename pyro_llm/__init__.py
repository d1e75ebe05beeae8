"""pyro_llm: a fine-tuned language model as one layer of a Pyro probabilistic program.

LoRA adapter matrices of a peft model become Pyro random sites (:class:`BayesianLoRA`);
one Pyro model function holds the adapter prior, the LLM forward pass and the likelihoods;
:func:`fit_svi` fits it, :func:`predict_probs` predicts under posterior draws, and
:func:`to_arviz` hands the result to ArviZ; :func:`regress` uses the LLM's output as a
covariate or outcome of a regression with honest intervals (:mod:`pyro_llm.regression`).
"""

from . import data, features, likelihoods, metrics, models, plots, priors, regression
from .arviz_io import to_arviz
from .infer import (
    EarlyStopping,
    FitResult,
    LaplacePosterior,
    fit_laplace,
    fit_map,
    fit_svi,
    load_laplace,
    make_guide,
    scale_lr,
)
from .lora import BayesianLoRA, find_lora_parameters
from .posterior import GuidePosterior, Posterior, predict_probs, stack_draws
from .regression import RegressionResult, regress

__version__ = "0.1.0"

__all__ = [
    "BayesianLoRA",
    "EarlyStopping",
    "FitResult",
    "LaplacePosterior",
    "GuidePosterior",
    "Posterior",
    "data",
    "features",
    "find_lora_parameters",
    "fit_laplace",
    "fit_map",
    "fit_svi",
    "likelihoods",
    "load_laplace",
    "make_guide",
    "metrics",
    "models",
    "plots",
    "predict_probs",
    "priors",
    "regress",
    "regression",
    "RegressionResult",
    "scale_lr",
    "stack_draws",
    "to_arviz",
]
