"""Fitting: SVI over Pyro models and the plain MAP baseline, with one result record."""

from .svi import EarlyStopping, FitResult, fit_map, fit_svi, make_guide, scale_lr

__all__ = ["EarlyStopping", "FitResult", "fit_map", "fit_svi", "make_guide", "scale_lr"]
