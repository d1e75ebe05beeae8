"""Post-hoc Laplace over LoRA weights (Laplace-LoRA): KFAC, low-rank KFAC, diagonal, last layer.

:func:`fit_laplace` turns a MAP-fine-tuned peft model into a :class:`LaplacePosterior` over the
same named sites as :class:`~pyro_llm.BayesianLoRA`; its ``predict`` gives the linearised
(GLM) predictive with MC, probit or Laplace-bridge links, or samples the weights.
:func:`fit_answer_laplace` is the last-layer Laplace over a causal LM's answer-token rows.
"""

from .answer_rows import AnswerRowsLaplace, fit_answer_laplace, load_answer_laplace
from .blocks import DiagBlock, Factor, FullBlock, KronBlock
from .capture import CURVATURES
from .fit import STRUCTURES, estimate_memory, fit_laplace, last_layer_names
from .posterior import LaplacePosterior, load_laplace
from .predictive import (
    LINKS,
    glm_logit_moments,
    gridsearch_prior_precision,
    laplace_bridge,
    laplace_predict,
    logit_contrasts,
    mc_softmax,
    mc_softmax_differences,
    probit,
)

__all__ = [
    "AnswerRowsLaplace", "CURVATURES", "DiagBlock", "Factor", "FullBlock", "KronBlock", "LINKS",
    "LaplacePosterior", "STRUCTURES", "estimate_memory", "fit_answer_laplace", "fit_laplace",
    "glm_logit_moments", "gridsearch_prior_precision", "laplace_bridge", "laplace_predict",
    "last_layer_names", "load_answer_laplace", "load_laplace", "logit_contrasts", "mc_softmax",
    "mc_softmax_differences", "probit",
]
