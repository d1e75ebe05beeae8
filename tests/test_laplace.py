"""Laplace-LoRA against brute force, closed forms and Monte Carlo (laplace-torch: test_laplace_reference)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fake_finetune, mlp_peft, tiny_transformer, token_batch

from pyro_llm.infer.laplace import Factor, FullBlock, fit_laplace, laplace_bridge, mc_softmax, probit
from pyro_llm.infer.laplace.capture import tapped
from pyro_llm.infer.laplace.predictive import _at_map, glm_logit_moments


def _mlp(seed=0, n=40, classes=3, head=False):
    import peft
    from conftest import mlp_base

    if head:  # LoRA on the first layer, the last layer a trainable head (modules_to_save)
        net = mlp_base(seed, 6, 16, classes)
        pm = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    else:
        pm = mlp_peft(seed, d_in=6, hidden=16, classes=classes, r=2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    X = torch.randn(n, 6, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return pm, X, y


def _bert(n=8, t=6, seed=0):
    pm, _ = tiny_transformer("bert")
    fake_finetune(pm, scale=1.0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "classifier" in name:
                if name.endswith("weight"):
                    p.normal_(0, 1.0)
                p.requires_grad_(False)
    ids, mask = token_batch(n, t, seed)
    y = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed))
    return pm, {"input_ids": ids, "attention_mask": mask, "labels": y}


def _split(batch, k):
    n = len(batch["labels"])
    return [{key: v[i:i + k] for key, v in batch.items()} for i in range(0, n, k)]


def _fit(pm, data, **kw):
    kw.setdefault("optimize_prior", None)
    return fit_laplace(pm, data, progress=False, **kw)


def _max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------- curvature
@pytest.mark.parametrize("structure", ["kfac", "diag", "full"])
def test_streaming_over_batches_equals_one_batch(structure):
    pm, X, y = _mlp()
    one = _fit(pm, [(X, y)], structure=structure, curvature="ggn")
    many = _fit(pm, [(X[i:i + 10], y[i:i + 10]) for i in range(0, 40, 10)], structure=structure,
                curvature="ggn")
    for a, b in zip(one.blocks, many.blocks, strict=True):
        assert _max_rel(b.dense(), a.dense()) < 1e-6  # float32 forwards, batched differently
    assert many.log_likelihood == pytest.approx(one.log_likelihood, rel=1e-6)
    assert many.n_data == one.n_data == 40


@pytest.mark.parametrize("model", ["mlp", "bert"])
def test_lowrank_kfac_at_full_rank_equals_kfac(model):
    if model == "mlp":
        pm, X, y = _mlp()
        data = [(X[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]
    else:
        pm, batch = _bert(n=12)
        data = _split(batch, 4)
    full = _fit(pm, data, structure="kfac", curvature="ggn")
    big = max(max(s) for s in full.shapes)
    low = _fit(pm, data, structure="lowrank_kfac", n_kfac=big, curvature="ggn")
    for a, b in zip(full.blocks, low.blocks, strict=True):
        assert _max_rel(b.dense(), a.dense()) < 1e-9
    for d in (0.1, 10.0):
        assert float(low.log_marginal_likelihood(d)) == pytest.approx(float(full.log_marginal_likelihood(d)),
                                                                       rel=1e-9)


def test_lowrank_factor_is_the_exact_top_k_and_never_forms_the_square():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 50, generator=g, dtype=torch.float64)
    f = Factor(50, rank=3)
    exact = Factor(50)
    for _ in range(6):  # rows in a 3-dim subspace: rank 3 is exact after any number of batches
        rows = torch.randn(20, 3, generator=g, dtype=torch.float64) @ basis
        f.add(rows)
        exact.add(rows)
        assert not hasattr(f, "S") and f.U.shape == (50, 3)
    Q, lam = f.eig()
    assert torch.allclose(Q @ torch.diag(lam) @ Q.T, exact.S, atol=1e-8 * exact.S.abs().max())
    # a decaying spectrum, as activations have: the randomised update finds the top 4 of one batch
    one = Factor(50, rank=4)
    rows = torch.randn(300, 50, generator=g, dtype=torch.float64) * 0.7 ** torch.arange(50.0)
    one.add(rows)
    ev = torch.linalg.eigvalsh(rows.T @ rows).flip(0)[:4]
    assert torch.allclose(one.eig()[1], ev, rtol=1e-8)


def test_ggn_of_a_linear_softmax_head_equals_the_closed_form():
    """Last-layer (LLLA) full GGN of the head: sum_n (diag p - p p^T) (x) [phi 1][phi 1]^T."""
    pm, X, y = _mlp(head=True)
    la = _fit(pm, [(X, y)], structure="full", curvature="ggn", select="last_layer")
    assert [s.split(".")[-1] for s in la.site_names] == ["weight", "bias"]
    base = pm.base_model.model
    with torch.no_grad():
        phi = base[1](base[0](X)).double()
        p = base[2](phi.float()).double().softmax(-1)
    Lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    phi1 = torch.cat([phi, torch.ones(len(X), 1, dtype=phi.dtype)], 1)
    H = torch.einsum("nab,ni,nj->aibj", Lam, phi1, phi1)  # (C, d+1, C, d+1)
    C, d = p.shape[1], phi.shape[1]
    w = H[:, :d, :, :d].reshape(C * d, C * d)
    wb = H[:, :d, :, d].reshape(C * d, C)
    b = H[:, d, :, d]
    closed = torch.cat([torch.cat([w, wb], 1), torch.cat([wb.T, b], 1)], 0)
    assert _max_rel(la.blocks[0].dense(), closed) < 1e-6


def test_kfac_of_one_example_is_the_exact_empirical_fisher():
    pm, X, y = _mlp(n=1)
    la = _fit(pm, [(X, y)], structure="kfac", curvature="empirical")
    params = [pm.get_parameter(pm_name) for pm_name in la.lora.random_names]
    loss = torch.nn.functional.cross_entropy(pm(X), y, reduction="sum")
    grads = torch.autograd.grad(loss, params)
    for block, gr in zip(la.blocks, grads, strict=True):
        v = gr.reshape(-1).double()
        assert _max_rel(block.dense(), torch.outer(v, v)) < 1e-5


def test_sampled_label_fisher_converges_to_the_ggn():
    """E over sampled labels of the Fisher is the GGN: z-scores of 1,000 one-sample replicates."""
    pm, X, y = _mlp(n=10)
    ggn_fit = _fit(pm, [(X, y)], structure="diag", curvature="ggn")
    ggn = torch.cat([b.diag.reshape(-1) for b in ggn_fit.blocks])
    reps = torch.stack([
        torch.cat([b.diag.reshape(-1) for b in _fit(pm, [(X, y)], structure="diag", curvature="fisher",
                                                     seed=s).blocks])
        for s in range(1000)])
    se = reps.std(0) / math.sqrt(len(reps))
    z = (reps.mean(0) - ggn) / se.clamp_min(1e-12)
    assert z.abs().max() < 4.5  # Bonferroni over ~80 entries at about 1e-3
    assert (reps.std(0) > 0.05 * ggn).sum() > len(ggn) // 2  # the labels were sampled


# --------------------------------------------------------------------------- the Gaussian
def _posterior(structure, n_kfac=10):
    pm, X, y = _mlp(n=30)
    return _fit(pm, [(X, y)], structure=structure, curvature="ggn", n_kfac=n_kfac, prior_precision=2.0)


@pytest.mark.parametrize("structure,n_kfac", [("kfac", 10), ("lowrank_kfac", 3), ("diag", 10), ("full", 10)])
def test_draws_have_the_posterior_covariance(structure, n_kfac):
    la = _posterior(structure, n_kfac)
    site = la.site_names[0]
    block = next(b for b in la.blocks if 0 in b.sites)
    D = math.prod(la.shapes[0])
    H = block.dense()  # for "full" the block spans all sites: the first site's marginal is its corner
    cov = torch.linalg.inv(H + 2.0 * torch.eye(H.shape[0], dtype=torch.float64))[:D, :D]
    n = 20000
    dev = la.deviations(n, torch.Generator().manual_seed(1))[site].reshape(n, D)
    emp = dev.T @ dev / n
    se = ((torch.diag(cov)[:, None] * torch.diag(cov)[None, :] + cov.square()) / n).sqrt()
    assert ((emp - cov).abs() <= 5 * se).all()
    assert (dev.mean(0).abs() <= 5 * (torch.diag(cov) / n).sqrt()).all()


@pytest.mark.parametrize("structure,n_kfac", [("kfac", 10), ("lowrank_kfac", 3), ("diag", 10), ("full", 10)])
def test_guide_log_prob_is_the_gaussian_density(structure, n_kfac):
    import pyro.poutine as poutine

    la = _posterior(structure, n_kfac)
    tr = poutine.trace(la.guide).get_trace()
    P = la.num_parameters
    prec = torch.zeros(P, P, dtype=torch.float64)
    offsets = [0]
    for s in la.shapes:
        offsets.append(offsets[-1] + math.prod(s))
    for b in la.blocks:
        lo, hi = offsets[b.sites[0]], offsets[b.sites[-1] + 1]
        prec[lo:hi, lo:hi] = b.dense()
    prec += 2.0 * torch.eye(P, dtype=torch.float64)
    mvn = torch.distributions.MultivariateNormal(
        torch.cat([la.map[n].double().reshape(-1) for n in la.site_names]), precision_matrix=prec)
    x = torch.cat([tr.nodes[n]["value"].double().reshape(-1) for n in la.site_names])
    # the full block's joint density sits on an auxiliary site, its sites are Deltas (log prob 0)
    total = sum(float(site["fn"].log_prob(site["value"]).sum()) for site in tr.nodes.values()
                if site["type"] == "sample")
    assert total == pytest.approx(float(mvn.log_prob(x)), rel=1e-4)


@pytest.mark.parametrize("structure", ["lowrank_kfac", "diag", "kfac"])
def test_linearised_variance_equals_brute_force_jacobians(structure):
    pm, batch = _bert(n=5)
    la = _fit(pm, [batch], structure=structure, curvature="ggn", n_kfac=6, prior_precision=0.5)
    names = la.lora.random_names
    params = [pm.get_parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
    logits = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    B, C = logits.shape
    J = torch.stack([torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        logits[b, c], params, retain_graph=True)]) for c in range(C)]) for b in range(B)]).double()
    cov = torch.block_diag(*[torch.linalg.inv(b.dense() + 0.5 * torch.eye(b.dense().shape[0],
                                                                         dtype=torch.float64))
                             for b in la.blocks])
    brute = J @ cov @ J.transpose(1, 2)
    with _at_map(la) as (peft, nm), tapped(peft, nm) as tap:
        ours = glm_logit_moments(la, tap, peft(input_ids=batch["input_ids"],
                                               attention_mask=batch["attention_mask"]).logits, nm)
    assert _max_rel(ours, brute) < 1e-5


def test_marginal_likelihood_optimisation_raises_the_evidence():
    pm, X, y = _mlp(n=40)
    la = _fit(pm, [(X, y)], structure="kfac", curvature="ggn", prior_precision=1e3)  # a poor start
    before = float(la.log_marginal_likelihood())
    scalar = la.optimize_prior_precision()
    after = float(la.log_marginal_likelihood())
    assert after > before + 1.0 and scalar.unique().numel() == 1
    grid = torch.logspace(-3, 4, 200, dtype=torch.float64)
    best_grid = max(float(la.log_marginal_likelihood(d)) for d in grid)
    assert after >= best_grid - 1e-3  # the optimum of a 1-D objective, not just an improvement
    per_site = la.optimize_prior_precision(per_site=True)
    assert per_site.unique().numel() > 1
    assert float(la.log_marginal_likelihood()) >= after - 1e-6
    assert la.marglik_trace[-1] == pytest.approx(float(la.log_marginal_likelihood()))


# --------------------------------------------------------------------------- predictive links
def test_probit_is_close_to_monte_carlo_for_a_binary_logit():
    """sigmoid(m / sqrt(1 + pi v / 8)) approximates E sigmoid(m + sqrt(v) e) within 0.02."""
    m = torch.linspace(-4, 4, 9, dtype=torch.float64)
    for v in (0.1, 1.0, 4.0, 16.0):
        f = torch.stack([torch.zeros_like(m), m], -1)
        var = torch.zeros(len(m), 2, 2, dtype=torch.float64)
        var[:, 1, 1] = v
        g = torch.Generator().manual_seed(0)
        mc = mc_softmax(f, var, 200000, g).mean(0)[:, 1]
        mc_se = 0.5 / math.sqrt(200000)
        assert (probit(f, var)[:, 1] - mc).abs().max() < 0.02 + 4 * mc_se


def test_probit_and_mc_agree_with_the_softmax_at_vanishing_variance():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 4, generator=g, dtype=torch.float64)
    A = torch.randn(6, 4, 4, generator=g, dtype=torch.float64)
    for scale, tol in ((1e-4, 1e-3), (1e-6, 1e-5)):
        var = scale * A @ A.transpose(1, 2)
        assert (probit(f, var) - f.softmax(-1)).abs().max() < tol
        mc_se = var.diagonal(dim1=-2, dim2=-1).max().sqrt() / math.sqrt(2000)  # |d softmax| <= 1
        assert (mc_softmax(f, var, 2000, g).mean(0) - f.softmax(-1)).abs().max() < tol + 5 * mc_se


def test_laplace_bridge_inverts_a_dirichlet_and_matches_monte_carlo_there():
    """For the Laplace approximation (softmax basis) of Dir(alpha), the bridge returns alpha exactly;
    at high concentration the MC predictive is close to the Dirichlet mean alpha / sum(alpha)."""
    alpha = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 1.0, 2.0]], dtype=torch.float64) * 200
    C = alpha.shape[1]
    mu = alpha.log() - alpha.log().mean(-1, keepdim=True)
    inv = 1 / alpha
    var = (torch.diag_embed(inv) - (inv[:, :, None] + inv[:, None, :]) / C
           + inv.sum(-1)[:, None, None] / C**2)
    mean = alpha / alpha.sum(-1, keepdim=True)
    assert torch.allclose(laplace_bridge(mu, var), mean, atol=1e-10)
    mc = mc_softmax(mu, var, 100000, torch.Generator().manual_seed(0)).mean(0)
    assert (mc - mean).abs().max() < 0.01
    # zero mean and exchangeable variance: 1/C under every link
    f0 = torch.zeros(3, 4, dtype=torch.float64)
    ex = (2.0 * torch.eye(4) + 0.5).double().expand(3, 4, 4)
    for fn in (probit, laplace_bridge):
        assert torch.allclose(fn(f0, ex), torch.full((3, 4), 0.25, dtype=torch.float64))


def test_probit_and_bridge_ignore_a_common_shift_of_the_logits():
    """Label-token logits share a large offset and common-mode variance (causal LMs): the softmax
    ignores both, and so must the closed-form links; the per-logit forms do not."""
    from pyro_llm.infer.laplace.predictive import laplace_bridge_conditioned, probit_per_logit

    g = torch.Generator().manual_seed(0)
    for C in (2, 3, 5):
        f = torch.randn(6, C, generator=g, dtype=torch.float64)
        A = torch.randn(6, C, C, generator=g, dtype=torch.float64)
        var = A @ A.transpose(1, 2)
        f2, var2 = f + 9.0, var + 14.9**2 * torch.ones(C, C, dtype=torch.float64)
        for fn in (probit, laplace_bridge):
            torch.testing.assert_close(fn(f2, var2), fn(f, var), rtol=0, atol=1e-9)
        assert (probit_per_logit(f2, var2) - probit_per_logit(f, var)).abs().max() > 0.01
        assert (laplace_bridge_conditioned(f2, var2) - laplace_bridge_conditioned(f, var)).abs().max() > 0.01


def test_two_class_probit_is_the_binary_probit_of_the_difference_and_keeps_the_decision():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(50, 2, generator=g, dtype=torch.float64) * 3
    A = torch.randn(50, 2, 2, generator=g, dtype=torch.float64) * 4
    var = A @ A.transpose(1, 2) + 200.0  # a large common mode, as with label tokens
    d = f[:, 1] - f[:, 0]
    var_d = var[:, 1, 1] + var[:, 0, 0] - 2 * var[:, 0, 1]
    want = torch.sigmoid(d / (1 + math.pi / 8 * var_d).sqrt())
    torch.testing.assert_close(probit(f, var)[:, 1], want, rtol=0, atol=1e-12)
    assert torch.equal(probit(f, var).argmax(-1), f.argmax(-1))


@pytest.mark.parametrize("deltas", [(0.7, 0.7), (0.3, 5.0)])
def test_full_block_eigen_and_cholesky_paths_are_the_dense_formulas(deltas):
    """One precision per block uses H's eigenbasis, different ones a Cholesky: both are exact."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(7, 7, generator=g, dtype=torch.float64)
    block = FullBlock([0, 1], [(2, 2), (3,)], A @ A.T)
    d = torch.tensor(deltas, dtype=torch.float64)
    P = A @ A.T + torch.diag(torch.cat([d[0].expand(4), d[1].expand(3)]))
    assert float(block.logdet(d)) == pytest.approx(float(torch.logdet(P)), rel=1e-12)
    J = [torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64),
         torch.randn(4, 3, 3, generator=g, dtype=torch.float64)]
    Jf = torch.cat([J[0].flatten(2), J[1]], -1)
    assert torch.allclose(block.variance(J, d), Jf @ torch.linalg.inv(P) @ Jf.transpose(1, 2), rtol=1e-10)
    x = [torch.randn(5, 2, 2, generator=g, dtype=torch.float64),
         torch.randn(5, 3, generator=g, dtype=torch.float64)]
    xf = torch.cat([x[0].flatten(1), x[1]], -1)
    assert torch.allclose(block.mahalanobis(x, d), torch.einsum("ni,ij,nj->n", xf, P, xf), rtol=1e-10)
    dev = block.sample(d, 40000, torch.Generator().manual_seed(1))
    flat = torch.cat([dev[0].flatten(1), dev[1]], -1)
    cov = torch.linalg.inv(P)
    se = ((torch.diag(cov)[:, None] * torch.diag(cov)[None, :] + cov.square()) / 40000).sqrt()
    assert ((flat.T @ flat / 40000 - cov).abs() <= 5 * se).all()


def test_adapters_reading_one_input_share_its_factor_exactly():
    """The q and v adapters of a block read the same hidden states: one product serves both
    A-input factors (computed once per batch), and each still equals that input's Gram matrix."""
    pm, batch = _bert()
    assert {"query", "value"} <= set(pm.peft_config["default"].target_modules)
    la = _fit(pm, _split(batch, 4), structure="kfac", curvature="empirical")
    names = la.lora.random_names
    A = {n: b.QA @ torch.diag(b.lA) @ b.QA.T for n, b in zip(names, la.blocks, strict=True)}
    pairs = [(n, n.replace(".query.", ".value.")) for n in names if ".query.lora_A." in n]
    assert pairs
    for q, v in pairs:
        assert _max_rel(A[q], A[v]) < 1e-12
    inputs = {}
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    hook = layer.register_forward_hook(lambda m, args, out: inputs.setdefault("x", args[0].detach()))
    with torch.no_grad():
        pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    x = inputs["x"].double()
    gram = torch.einsum("btd,bte->de", x, x) / x.shape[1] / x.shape[0]  # "expand": mean over examples
    assert _max_rel(A[pairs[0][0]], gram) < 1e-6  # the float32 model's rows, scaled in float32
