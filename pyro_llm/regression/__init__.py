"""Downstream inference with an LLM-coded variable, as a covariate or as the outcome.

:func:`regress` goes from a DataFrame and a formula (and a text column with a LoRA model, or the
LLM's cross-fitted predictions) to a :class:`RegressionResult`. The default estimator is the
cut, cross-fitted, doubly robust one (:mod:`.dr`, with its completion model in
:mod:`.calibration`): valid by design - a random labelled subset, every row coded by a model
that saw neither its label nor its outcome, and a correction on the labelled rows. The others
(:mod:`.methods`): PPI++ (``ptd``), ``labelled_only``, ``naive``, imputation from the completion
model (``mi``) and the generative joint model (``joint``: :mod:`.completion`, :mod:`.joint`).
:func:`code_crossfit` fine-tunes a fresh LoRA adapter per fold and codes every row with the
model of its fold (what ``regress(model=..., text=...)`` calls); :func:`crossfit` does the same
for any ``fit_predict`` callable;
:func:`fit_joint_lora` is the fully joint model of seed 000 (no cut: see its docstring).
"""

from .api import METHODS, llm_outputs, regress
from .coding import CrossFitCoding, code_crossfit
from .completion import completion_model, continuous_model, fit_completion
from .crossfit import crossfit, fold_ids
from .design import Design, build_design
from .dr import efficiency_bound, fit_dr
from .finetune import FineTune
from .result import RegressionResult, compare, forest_plot
from .structural import fit_joint_lora, joint_lora_model

__all__ = ["METHODS", "CrossFitCoding", "Design", "FineTune", "RegressionResult", "build_design",
           "code_crossfit", "compare", "completion_model", "continuous_model", "crossfit", "efficiency_bound",
           "fit_completion", "fit_dr", "fit_joint_lora",
           "fold_ids", "forest_plot", "joint_lora_model", "llm_outputs", "regress"]
