"""torch.distributed (gloo, 2 CPU processes) against one process: SVI, MAP, Laplace, ensembles.

One :func:`launch` of two forked workers runs every distributed check (spawned workers re-import
pyro_llm and peft, ~20 s a launch here: one slow test does that); the tests compare the
workers' results with single-process fits computed in the test process. The models
are float64, so the two computations differ only by the round-off of summing the shards'
weighted gradients (or curvature sums) in another order, ~1e-16 relative: the tolerance 1e-10
leaves room for Adam's few steps to amplify it, and is far below what a wrong weight, a missing
shard or a lost broadcast moves (a learning-rate-sized step, 0.05; a curvature entry, ~1/n).
"""

from __future__ import annotations

import peft  # noqa: F401  (imported before forking: the workers inherit it, ~7 s each saved)
import pyro
import pytest
import torch
import torch.multiprocessing as mp
from conftest import fake_finetune, mlp_peft

from pyro_llm import BayesianLoRA, EarlyStopping, fit_map, fit_svi, likelihoods
from pyro_llm.infer.blob import fit_blob
from pyro_llm.infer.distributed import (
    batch_rows,
    independent,
    is_distributed,
    launch,
    rank,
    shard,
)
from pyro_llm.infer.ensemble import load_ensemble
from pyro_llm.infer.ensemble_fit import fit_ensemble
from pyro_llm.infer.laplace import Factor, fit_laplace

N, D_IN, HIDDEN, CLASSES, WORLD = 20, 4, 8, 3, 2
TOL = 1e-10
LAPLACE = {  # name: (fit_laplace settings, classes, n, batch size)
    "kfac": (dict(structure="kfac", curvature="ggn", optimize_prior="marglik"), CLASSES, N, 7),
    "diag": (dict(structure="diag", curvature="empirical"), CLASSES, N, 7),
    "full": (dict(structure="full", curvature="ggn"), CLASSES, N, 7),
    # 6 examples, 1 GGN vector each (2 classes): rank 6 holds every row, the sketch is exact
    "lowrank_exact": (dict(structure="lowrank_kfac", n_kfac=6, curvature="ggn"), 2, 6, 2),
    "lowrank_cut": (dict(structure="lowrank_kfac", n_kfac=3, curvature="ggn"), CLASSES, N, 7),
}


# ---------------------------------------------------------------------------- problems
def _problem(classes=CLASSES, n=N, seed=0):
    pm = mlp_peft(seed, d_in=D_IN, hidden=HIDDEN, classes=classes).double()
    fake_finetune(pm)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return pm, x, y


def _loader(*tensors, batch_size=7, shuffle=True):
    ds = torch.utils.data.TensorDataset(*tensors)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)  # 7, 7, 6


def _ce(model, b):
    return torch.nn.functional.cross_entropy(model(b[0]), b[1])


def _trainable(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def _svi(shards=None, perturb=False):
    pyro.clear_param_store()
    pm, x, y = _problem()
    if perturb:  # another start on this rank: the fit must take rank 0's (broadcast)
        fake_finetune(pm, seed=99)
    lora = BayesianLoRA(pm, prior=0.5, select="B")  # B random, A a pyro.param

    def model(x, y, idx):
        likelihoods.categorical("y", lora(x), y, N, idx)

    data = _loader(x, y, torch.arange(N))
    return fit_svi(model, "normal", shards(data) if shards else data, epochs=2, max_steps=5, lr=0.05,
                   init_values=lora, progress=False, seed=3)


def _map(shards=None, perturb=False, max_steps=5, **kw):
    pm, x, y = _problem()
    if perturb:
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(1.0)
    data = _loader(x, y)
    res = fit_map(pm, shards(data) if shards else data, loss=_ce, epochs=2, max_steps=max_steps, lr=0.05,
                  progress=False, seed=4, **kw)
    return res, _trainable(pm)


def _blob(shards=None):
    pyro.clear_param_store()
    pm, x, y = _problem()
    data = _loader(x, y)  # shard(data).dataset is the loader's: N = 20 on every rank
    res = fit_blob(pm, shards(data) if shards else data, flipout=False, max_steps=4, lr=0.02,
                   progress=False, seed=5)  # no flipout: one global draw of A per step
    return res.fit


def _laplace(name, data_fn=None):
    kw, classes, n, bs = LAPLACE[name]
    pm, x, y = _problem(classes, n)
    data = _loader(x, y, batch_size=bs, shuffle=False)
    kw = {"optimize_prior": None, **kw}
    return fit_laplace(pm, data_fn(data) if data_fn else data, progress=False, **kw)


def _ensemble_batches():
    _, x, y = _problem()
    return [(x[i:i + 5], y[i:i + 5]) for i in range(0, N, 5)]


class _NoLen:
    """Re-iterable batches without ``len``: the loop can only find a mismatch step by step."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


# ---------------------------------------------------------------------------- the workers
def _worker(workdir: str) -> dict:
    """Every distributed check, run on each of the 2 ranks."""
    assert is_distributed()
    r, out = rank(), {}
    res = _svi(shard, perturb=r == 1)
    out.update({f"svi/{k}": v for k, v in res.params.items()})
    out["svi/losses"] = torch.tensor(res.losses, dtype=torch.float64)
    res, params = _map(shard, perturb=r == 1)
    out.update({f"map/{k}": v for k, v in params.items()})
    out["map/losses"] = torch.tensor(res.losses, dtype=torch.float64)
    _map(shard, perturb=r == 1, max_steps=3, checkpoint=f"{workdir}/ckpt", checkpoint_every=2)
    res, params = _map(shard, max_steps=5, checkpoint=f"{workdir}/ckpt")  # resumes at step 3
    out.update({f"resumed/{k}": v for k, v in params.items()})
    out["resumed/losses"] = torch.tensor(res.losses, dtype=torch.float64)
    res = _blob(shard)
    out.update({f"blob/{k}": v for k, v in res.params.items()})
    out["blob/losses"] = torch.tensor(res.losses, dtype=torch.float64)
    # the held-out metric is averaged over the ranks: one stopping decision (rank 0: 1, rank 1: 2)
    stop = EarlyStopping(lambda: 1.0 + r, every=1, patience=1)
    res, _ = _map(shard, early_stopping=stop)
    out["stop/val"] = torch.tensor([v for _, v in res.val_history])
    out["stop/steps"] = torch.tensor(res.steps)
    # mismatched data: every rank raises (no hang), and the ranks stay in step afterwards
    pm, x, y = _problem()
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, N, 4)]
    mine = batches if r == 0 else batches[:-1]
    for key, data in (("len", mine), ("nolen", _NoLen(mine))):
        try:
            fit_map(pm, data, loss=_ce, max_steps=10, progress=False)
            out[f"error/{key}"] = "none"
        except (ValueError, RuntimeError) as e:
            out[f"error/{key}"] = f"{type(e).__name__}: {e}"
    for name in LAPLACE:
        la = _laplace(name, shard)
        out.update({f"{name}/{i}": b.dense() for i, b in enumerate(la.blocks)})
        out[f"{name}/n"] = torch.tensor(la.n_data)
        out[f"{name}/loglik"] = torch.tensor(la.log_likelihood, dtype=torch.float64)
        out[f"{name}/delta"] = la.prior_precision
    with independent():  # ensemble members in parallel: rank r trains member r, no gradient sharing
        pm, _, _ = _problem()
        fit_ensemble(pm, _ensemble_batches(), WORLD, members=[r], out_dir=f"{workdir}/ensemble", loss=_ce,
                     lr=0.05, progress=False)
    return out


# Forked workers start in ~0.1 s; spawned ones re-import pyro_llm, peft and transformers, ~20 s a
# launch on this 2-core machine (measured for a no-op worker). test_spawned_workers_* checks spawn.
START = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("distributed")
    results = launch(_worker, WORLD, args=(str(workdir),), timeout=240, start_method=START)
    return results, workdir / "ensemble"


def _close(a, b, tol=TOL):
    assert a.shape == b.shape
    err = float((a - b).abs().max())
    assert err <= tol * max(1.0, float(b.abs().max())), err


# ---------------------------------------------------------------------------- distributed == one process
def test_svi_steps_equal_single_process(ranks):
    results, _ = ranks
    one = _svi()
    assert len(one.losses) == 5
    for res in results:  # both ranks hold the same, single-process, guide
        _close(res["svi/losses"], torch.tensor(one.losses, dtype=torch.float64))
        for k, v in one.params.items():
            _close(res[f"svi/{k}"], v)
    init = BayesianLoRA(_problem()[0], select="B").init_values()
    locs = {k.removeprefix("AutoNormal.locs."): v for k, v in one.params.items() if ".locs." in k}
    assert locs.keys() == init.keys()
    assert max(float((locs[k] - init[k]).abs().max()) for k in init) > 0.05  # the fit moved


@pytest.mark.parametrize("key", ["map", "resumed"])
def test_map_steps_equal_single_process(ranks, key):
    """fit_map over the shards; "resumed": 3 steps checkpointed by rank 0, then resumed to 5."""
    results, _ = ranks
    one, params = _map()
    start = _trainable(_problem()[0])
    assert max(float((params[k] - start[k]).abs().max()) for k in params) > 0.05  # the fit moved
    for res in results:
        _close(res[f"{key}/losses"], torch.tensor(one.losses, dtype=torch.float64))
        for k, v in params.items():
            _close(res[f"{key}/{k}"], v)


def test_blob_steps_equal_single_process(ranks):
    results, _ = ranks
    one = _blob()
    for res in results:
        _close(res["blob/losses"], torch.tensor(one.losses, dtype=torch.float64))
        for k, v in one.params.items():
            _close(res[f"blob/{k}"], v)


def test_early_stopping_takes_one_decision_from_the_mean_metric(ranks):
    results, _ = ranks
    for res in results:  # 1.5 on both ranks: best at step 1, no gain at step 2, stop
        assert res["stop/val"].tolist() == [1.5, 1.5] and int(res["stop/steps"]) == 2


@pytest.mark.parametrize("name", ["kfac", "diag", "full", "lowrank_exact"])
def test_laplace_curvature_equals_single_process(ranks, name):
    results, _ = ranks
    one = _laplace(name)
    for res in results:
        assert int(res[f"{name}/n"]) == one.n_data
        _close(res[f"{name}/loglik"], torch.tensor(one.log_likelihood, dtype=torch.float64))
        _close(res[f"{name}/delta"], one.prior_precision, 1e-8)  # marglik optimum: 1e-8 of delta
        for i, b in enumerate(one.blocks):
            _close(res[f"{name}/{i}"], b.dense())
    if name == "lowrank_exact":  # and the exact sketch is exact KFAC
        kfac = fit_laplace(_problem(2, 6)[0], _loader(*_problem(2, 6)[1:], batch_size=2, shuffle=False),
                           structure="kfac", curvature="ggn", optimize_prior=None, progress=False)
        for a, b in zip(one.blocks, kfac.blocks, strict=True):
            _close(a.dense(), b.dense())


def test_truncated_lowrank_is_the_merge_of_the_ranks_sketches(ranks):
    """With n_kfac below the rows' span, rank r's streaming sketch of its shard is merged: the result
    is the best rank-k part of the sum of the two sketches, recomputed here in one process."""
    results, _ = ranks
    parts = [_laplace("lowrank_cut", lambda d, r=r: shard(d, r, WORLD)) for r in range(WORLD)]
    k = LAPLACE["lowrank_cut"][0]["n_kfac"]
    n = sum(p.n_data for p in parts)
    for i in range(len(parts[0].blocks)):
        rootsG = [p.blocks[i].QG * p.blocks[i].lG.sqrt() for p in parts]
        rootsA = [p.blocks[i].QA * (p.blocks[i].lA * p.n_data).sqrt() for p in parts]  # A was / n_r
        G, A = Factor(rootsG[0].shape[0], k), Factor(rootsA[0].shape[0], k)
        for f, roots in ((G, rootsG), (A, rootsA)):
            if f.rank is None:
                f.S = sum(R @ R.T for R in roots)
            else:
                f.combine(roots)
        (QG, lG), (QA, lA) = G.eig(), A.eig(1.0 / n)
        dense = torch.kron(QG @ torch.diag(lG) @ QG.T, QA @ torch.diag(lA) @ QA.T)
        for res in results:
            _close(res[f"lowrank_cut/{i}"], dense, 1e-9)  # SVDs of the same roots, in another order


def _worker_svi() -> dict:
    res = _svi(shard, perturb=rank() == 1)
    return {"losses": torch.tensor(res.losses, dtype=torch.float64), **res.params}


@pytest.mark.slow
def test_spawned_workers_import_cleanly_and_fit_as_one_process():
    """What torchrun does: fresh interpreters (spawn), no state inherited from this process."""
    results = launch(_worker_svi, WORLD, timeout=300, start_method="spawn")
    one = _svi()
    for res in results:
        _close(res["losses"], torch.tensor(one.losses, dtype=torch.float64))
        for k, v in one.params.items():
            _close(res[k], v)


def test_mismatched_data_raises_on_every_rank(ranks):
    results, _ = ranks
    for res in results:
        assert res["error/len"].startswith("ValueError: the number of batches"), res["error/len"]
        assert res["error/nolen"].startswith("RuntimeError: 1 of 2 ranks had a batch"), res["error/nolen"]


def test_ensemble_members_in_parallel_processes_equal_one_process(ranks):
    _, ens_dir = ranks
    pm = _problem()[0]
    one = fit_ensemble(pm, _ensemble_batches(), WORLD, loss=_ce, lr=0.05, progress=False)
    both = load_ensemble(ens_dir, pm)
    assert both.indices == [0, 1]
    for a, b in zip(one.members, both.members, strict=True):
        for k in a:
            _close(b[k], a[k])
    assert not torch.equal(one.members[0][next(iter(one.members[0]))],
                           one.members[1][next(iter(one.members[1]))])


# ---------------------------------------------------------------------------- no processes
def test_bf16_backbone_keeps_a_float32_adapter_posterior():
    """The documented GPU set-up, on CPU: peft keeps LoRA in float32 over a bf16 backbone, and the
    guide's tensors follow the adapter (float32) while the frozen backbone stays bf16."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    base = tf.BertForSequenceClassification(cfg).to(torch.bfloat16).eval()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    fake_finetune(pm)
    lora = BayesianLoRA(pm, prior=0.5, select="B")
    ids = torch.randint(1, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 1, 0])

    def model(ids, y, idx):
        logits = lora(input_ids=ids).logits.float()  # bf16 out of the backbone: upcast for the loss
        likelihoods.categorical("y", logits, y, 4, idx)

    res = fit_svi(model, "normal", [(ids, y, torch.arange(4))], epochs=2, lr=0.01, init_values=lora,
                  progress=False)
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert {v.dtype for v in res.params.values()} == {torch.float32}
    assert {p.dtype for n, p in pm.named_parameters() if ".lora_" not in n} == {torch.bfloat16}


def _elbo_grads(model, guide, batch, seed):
    pyro.set_rng_seed(seed)  # the same draw of the global sites on every "rank"
    loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, *batch)
    params = [pyro.param(n).unconstrained() for n in sorted(pyro.get_param_store().keys())]
    return loss.detach(), torch.autograd.grad(loss, params)


def test_gradient_rule_weighted_by_shard_rows_is_the_global_batch_gradient():
    """sum_r (b_r/B) grad ELBO_r == grad ELBO(global batch) for a subsample-scaled plate, even for
    uneven shards; the plain average (1/world) is not, there."""
    import pyro.distributions as dist

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, dtype=torch.float64, generator=g)

    def model(xb, idx):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 10.0))
        with pyro.plate("data", 30, subsample=idx):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=xb)

    guide = pyro.infer.autoguide.AutoNormal(model)
    idx = torch.arange(7)
    pyro.set_rng_seed(1)
    guide(x[idx], idx)  # create the parameters
    loss, grads = _elbo_grads(model, guide, (x[idx], idx), 5)
    shards = [next(iter(shard([(x[idx], idx)], r, 3))) for r in range(3)]
    assert [len(s[1]) for s in shards] == [3, 2, 2]
    per = [_elbo_grads(model, guide, s, 5) for s in shards]
    w = [batch_rows(s) / 7 for s in shards]
    _close(sum(wi * li for wi, (li, _) in zip(w, per, strict=True)), loss, 1e-12)
    for j, gj in enumerate(grads):
        _close(sum(wi * gr[j] for wi, (_, gr) in zip(w, per, strict=True)), gj, 1e-12)
    plain = sum(gr[0] for _, gr in per) / 3
    assert float((plain - grads[0]).abs().max()) > 1e-3 * float(grads[0].abs().max())


def test_shard_splits_every_tensor_of_each_batch():
    batches = [{"ids": torch.arange(10).reshape(5, 2), "labels": torch.arange(5), "text": list("abcde"),
                "flag": True}]
    parts = [next(iter(shard(batches, r, 2))) for r in range(2)]
    assert parts[0]["labels"].tolist() == [0, 1, 2] and parts[1]["labels"].tolist() == [3, 4]
    assert parts[1]["ids"].tolist() == [[6, 7], [8, 9]] and parts[1]["text"] == ["d", "e"]
    assert parts[0]["flag"] is True and len(shard(batches, 0, 2)) == 1
    assert batch_rows(parts[0]) == 3 and batch_rows((torch.zeros(4), torch.zeros(2))) is None
    with pytest.raises(ValueError, match="different leading sizes"):
        next(iter(shard([(torch.zeros(6), torch.arange(2))], 0, 2)))
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        next(iter(shard([torch.zeros(2)], 0, 3)))
    with pytest.raises(ValueError, match="rank must lie in"):
        shard(batches, 2, 2)
    assert not is_distributed()


def test_combine_is_the_best_rank_k_of_the_sum_of_the_roots():
    g = torch.Generator().manual_seed(0)
    roots = [torch.randn(12, 4, generator=g, dtype=torch.float64) * 0.6 ** torch.arange(4.0)
             for _ in range(3)]
    f = Factor(12, rank=4)
    f.combine(roots + [torch.zeros(12, 4, dtype=torch.float64)])  # padding adds nothing
    total = sum(R @ R.T for R in roots)
    lam, Q = torch.linalg.eigh(total)
    best = Q[:, -4:] @ torch.diag(lam[-4:]) @ Q[:, -4:].T
    _close(f.U @ f.U.T, best, 1e-12)
    small = Factor(12, rank=4)
    small.combine([roots[0][:, :2], roots[1][:, :1]])  # 3 columns <= k: kept as they are, exact
    _close(small.U @ small.U.T, roots[0][:, :2] @ roots[0][:, :2].T + roots[1][:, :1] @ roots[1][:, :1].T)
