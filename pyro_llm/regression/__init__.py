"""Downstream inference with an LLM-coded variable, as a covariate or as the outcome.

:func:`regress` goes from a DataFrame and a formula to a :class:`RegressionResult` with any of
the estimators (``joint``, ``naive``, ``labelled_only``, ``ptd``, ``mi``). The joint estimator's
Pyro model is in :mod:`.completion` and its draws in :mod:`.joint`; the classical baselines are
in :mod:`.estimators`; :func:`crossfit` codes every row with a model that did not see its label;
:func:`fit_joint_lora` is the fully joint model of seed 000 (the adapter informed by the
regression as well).
"""

from .api import METHODS, llm_outputs, regress
from .completion import completion_model, continuous_model, fit_completion
from .crossfit import crossfit, fold_ids
from .design import Design, build_design
from .result import RegressionResult, compare, forest_plot
from .structural import fit_joint_lora, joint_lora_model

__all__ = ["METHODS", "Design", "RegressionResult", "build_design", "compare", "completion_model",
           "continuous_model", "crossfit", "fit_completion", "fit_joint_lora", "fold_ids", "forest_plot",
           "joint_lora_model", "llm_outputs", "regress"]
