"""Fitting: SVI, the plain MAP baseline, and the other posteriors over the same named sites:
post-hoc Laplace, LoRA ensembles, BLoB, PoLAR-VBLL, and the temperature-scaling and MC-dropout
baselines."""

from . import distributed
from .baselines import (
    MCDropoutPosterior,
    TemperatureScaling,
    collect_logits,
    fit_temperature,
    mc_dropout_predict,
)
from .blob import BLoBGuide, BLoBResult, fit_blob, kl_weights
from .config import TrainConfig
from .distributed import independent, launch, shard
from .ensemble import EnsemblePosterior, load_ensemble
from .ensemble_fit import fit_ensemble
from .laplace import LaplacePosterior, fit_laplace, load_laplace
from .polar_fit import fit_polar
from .polar_vbll import PolarVBLL, fit_polar_vbll, load_polar_vbll
from .svi import EarlyStopping, FitResult, fit_map, fit_svi, make_guide, scale_lr
from .train import LossPlateau

__all__ = [
    "BLoBGuide", "BLoBResult", "collect_logits", "distributed", "EarlyStopping",
    "EnsemblePosterior", "fit_blob", "fit_ensemble", "fit_laplace", "fit_map", "fit_polar",
    "fit_polar_vbll", "fit_svi", "fit_temperature", "FitResult", "independent", "kl_weights",
    "LaplacePosterior", "launch", "LossPlateau", "load_ensemble", "load_laplace", "load_polar_vbll",
    "make_guide",
    "mc_dropout_predict", "MCDropoutPosterior", "PolarVBLL", "scale_lr", "shard",
    "TemperatureScaling", "TrainConfig",
]
