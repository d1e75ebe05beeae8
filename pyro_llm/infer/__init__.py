"""Fitting: SVI over Pyro models and the plain MAP baseline, with one result record."""

from .laplace import LaplacePosterior, fit_laplace, load_laplace
from .svi import EarlyStopping, FitResult, fit_map, fit_svi, make_guide, scale_lr

__all__ = ["EarlyStopping", "FitResult", "LaplacePosterior", "fit_laplace", "fit_map", "fit_svi",
           "load_laplace", "make_guide", "scale_lr"]
