"""Laplace-LoRA against a second implementation: laplace-torch 0.3 (curvlinops backends).

Same model, same data, one batch holding the whole data set: the KFAC, diagonal and full
curvatures, the training log-likelihood, the log marginal likelihood, the linearised
predictive variance and the probit / bridge predictives must agree to float32 round-off.
laplace-torch is a test-only dependency installed by scripts/setup.sh.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import fake_finetune, tiny_transformer, token_batch
from test_laplace import _mlp

from pyro_llm.infer.laplace import fit_laplace

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from laplace import Laplace
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

RTOL = 1e-5  # float32 curvature in laplace-torch against float64 accumulation here


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _ref(model, X, y, structure, backend=CurvlinopsGGN, **kw):
    ref = Laplace(model, "classification", subset_of_weights="all", hessian_structure=structure,
                  backend=backend, **kw)
    ref.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=len(y)))
    return ref


def test_kfac_glm_and_marglik_match_laplace_torch():
    pm, X, y = _mlp()
    la = fit_laplace(pm, [(X, y)], structure="kfac", curvature="ggn", optimize_prior=None, progress=False)
    ref = _ref(pm, X, y, "kron")
    assert len(ref.H_facs.kfacs) == len(la.blocks) == 4
    for block, (G, A) in zip(la.blocks, ref.H_facs.kfacs, strict=True):
        assert _rel(block.dense(), torch.kron(G, A)) < RTOL
    assert la.log_likelihood == pytest.approx(float(ref.log_likelihood), rel=1e-6)
    for delta in (0.3, 4.0):
        ref.prior_precision = delta
        la.prior_precision = delta
        assert float(la.log_marginal_likelihood()) == pytest.approx(float(ref.log_marginal_likelihood()),
                                                                    rel=1e-6)
        _, f_var = ref._glm_predictive_distribution(X[:7])
        # laplace-torch's links are the per-logit probit and the conditioned bridge; ours by
        # default are their shift-invariant forms (tests/test_laplace.py checks those)
        probs = {link: la.predict([(X[:7], y[:7])], link=ours, progress=False)[0]
                 for link, ours in (("probit", "probit_per_logit"), ("bridge", "bridge_conditioned"))}
        for link, p in probs.items():
            assert _rel(p, ref(X[:7], pred_type="glm", link_approx=link)) < RTOL, link
        from pyro_llm.infer.laplace.capture import tapped
        from pyro_llm.infer.laplace.predictive import _at_map, glm_logit_moments

        with _at_map(la) as (peft, names), tapped(peft, names) as tap:
            var = glm_logit_moments(la, tap, peft(X[:7]), names)
        assert _rel(var, f_var) < RTOL


@pytest.mark.parametrize("curvature,backend", [("ggn", CurvlinopsGGN), ("empirical", CurvlinopsEF)])
def test_diag_matches_laplace_torch(curvature, backend):
    pm, X, y = _mlp(seed=2)
    la = fit_laplace(pm, [(X, y)], structure="diag", curvature=curvature, optimize_prior=None,
                     progress=False)
    ref = _ref(pm, X, y, "diag", backend=backend)
    ours = torch.cat([b.diag.reshape(-1) for b in la.blocks])
    assert _rel(ours, ref.H) < RTOL
    ref.prior_precision = 2.0
    assert float(la.log_marginal_likelihood(2.0)) == pytest.approx(float(ref.log_marginal_likelihood()),
                                                                   rel=1e-6)


def test_full_matches_laplace_torch():
    pm, X, y = _mlp(seed=3)
    la = fit_laplace(pm, [(X, y)], structure="full", curvature="ggn", optimize_prior=None, progress=False)
    ref = _ref(pm, X, y, "full")
    assert _rel(la.blocks[0].dense(), ref.H) < RTOL
    ref.prior_precision = 0.7
    assert float(la.log_marginal_likelihood(0.7)) == pytest.approx(float(ref.log_marginal_likelihood()),
                                                                   rel=1e-6)


class _DictLogits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_on_a_transformer_matches_laplace_torch(approx):
    """Token positions share the LoRA weights: KFAC-expand and KFAC-reduce as in curvlinops."""
    pm, _ = tiny_transformer("bert")
    fake_finetune(pm, scale=1.0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "classifier" in name:
                if name.endswith("weight"):
                    p.normal_(0, 1.0)  # logits that move with the adapter
                p.requires_grad_(False)
    ids, mask = token_batch(8, 6)
    y = torch.randint(0, 2, (8,))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": y}
    la = fit_laplace(pm, [batch], curvature="ggn", kfac_approx=approx, optimize_prior=None, progress=False)
    ref = Laplace(_DictLogits(pm), "classification", subset_of_weights="all", hessian_structure="kron",
                  backend=CurvlinopsGGN, asdl_fisher_kwargs={"kfac_approx": approx})
    rows = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    ref.fit(torch.utils.data.DataLoader(rows, batch_size=8))
    assert len(la.blocks) == len(ref.H_facs.kfacs) == 8
    for block, (G, A) in zip(la.blocks, ref.H_facs.kfacs, strict=True):
        assert _rel(block.dense(), torch.kron(G, A)) < 1e-4
    assert la.log_likelihood == pytest.approx(float(ref.log_likelihood), rel=1e-6)
