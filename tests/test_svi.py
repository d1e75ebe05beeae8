"""fit_svi / fit_map: resumable checkpoints, early stopping, MAP training, the result record."""

from __future__ import annotations

import dataclasses
import json
import math

import pyro
import pytest
import torch
from conftest import fake_finetune, mlp_peft, tiny_transformer, token_batch
from safetensors import safe_open
from safetensors.torch import load_file

from pyro_llm import BayesianLoRA, EarlyStopping, FitResult, fit_map, fit_svi, likelihoods

N, D_IN, CLASSES = 40, 4, 3


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def _svi_problem(seed=0):
    pm = mlp_peft(seed=seed, d_in=D_IN, classes=CLASSES)
    fake_finetune(pm)
    lora = BayesianLoRA(pm, prior=0.5, select="B")  # A: pyro.param point estimates

    def model(x, y, idx):
        logits = lora(x)
        likelihoods.categorical("y", logits, y, N, idx)

    x, y = _data(seed)
    ds = torch.utils.data.TensorDataset(x, y, torch.arange(N))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)  # 5 batches / epoch
    return pm, lora, model, loader


def _fit(model, loader, lora, **kw):
    return fit_svi(model, "normal", loader, epochs=3, lr=0.02, init_values=lora, progress=False,
                   seed=3, **kw)


@pytest.mark.parametrize("k1", [7, 10], ids=["mid_epoch", "epoch_boundary"])
def test_checkpoint_resume_is_exact(tmp_path, k1):
    K = 13  # 3 epochs of 5 batches, stopped at 13
    pm, lora, model, loader = _svi_problem()
    full = _fit(model, loader, lora, max_steps=K, checkpoint=str(tmp_path / "a"),
                checkpoint_every=5)
    assert full.steps == K and len(full.losses) == K

    # interrupted run: a fresh "process" (new param store, new guide) resumes from disk
    pyro.clear_param_store()
    pm, lora, model, loader = _svi_problem()
    part = _fit(model, loader, lora, max_steps=k1, checkpoint=str(tmp_path / "b"),
                checkpoint_every=5)
    assert part.steps == k1
    assert part.losses == full.losses[:k1]
    pyro.clear_param_store()
    pyro.set_rng_seed(12345)  # whatever the global RNG holds, the checkpoint restores it
    pm, lora, model, loader = _svi_problem()
    resumed = _fit(model, loader, lora, max_steps=K, checkpoint=str(tmp_path / "b"),
                   checkpoint_every=5)
    assert resumed.steps == K
    assert resumed.losses == full.losses
    assert resumed.params.keys() == full.params.keys()
    for n in full.params:
        assert torch.equal(resumed.params[n], full.params[n]), n
    # a fit whose checkpoint says it is done returns at once with the saved result
    again = _fit(model, loader, lora, max_steps=K, checkpoint=str(tmp_path / "b"))
    assert again.losses == full.losses


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    pm, lora, model, loader = _svi_problem()
    res = _fit(model, loader, lora, max_steps=6, checkpoint=str(tmp_path), checkpoint_every=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.safetensors"]  # one file: atomic
    raw = (tmp_path / "state.safetensors").read_bytes()
    assert raw[:1] != b"\x80"  # not a pickle stream
    tensors = load_file(str(tmp_path / "state.safetensors"))
    with safe_open(str(tmp_path / "state.safetensors"), "pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
    assert meta["step"] == 6 and meta["losses"] == list(res.losses)
    assert set(meta["param_names"]) == set(res.params)
    for n in res.params:
        assert f"param/{n}" in tensors
    assert any(k.startswith("optim/") and k.endswith("/exp_avg") for k in tensors)
    assert "rng/torch" in tensors


def test_checkpoint_of_another_model_is_refused(tmp_path):
    pm, lora, model, loader = _svi_problem()
    _fit(model, loader, lora, max_steps=2, checkpoint=str(tmp_path))
    pyro.clear_param_store()
    pm = mlp_peft(d_in=D_IN, classes=CLASSES)
    other = BayesianLoRA(pm, prior=0.5, select="AB", prefix="other")

    def model2(x, y, idx):
        likelihoods.categorical("y", other(x), y, N, idx)

    with pytest.raises(ValueError, match="does not match this fit"):
        _fit(model2, loader, other, max_steps=4, checkpoint=str(tmp_path))


def test_bad_loop_settings_fail_before_the_first_step(tmp_path):
    """checkpoint_every=0 (was a ZeroDivisionError at the first checkpoint), num_particles=0 (was
    "no parameters to fit") and a checkpoint path that is a regular file (was an error only after
    all the training) are clear errors before any step runs (issue 14, items 12 and 14)."""
    pm, lora, model, loader = _svi_problem()
    with pytest.raises(ValueError, match="checkpoint_every must be a positive number of steps, got 0"):
        _fit(model, loader, lora, checkpoint=str(tmp_path / "ck"), checkpoint_every=0)
    with pytest.raises(ValueError, match="num_particles must be a positive integer"):
        _fit(model, loader, lora, num_particles=0)
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    start = pyro.get_param_store().get_state()
    with pytest.raises(ValueError, match="is a file, not a directory"):
        _fit(model, loader, lora, checkpoint=str(path))
    assert path.read_text() == "not a directory"
    assert pyro.get_param_store().get_state()["params"].keys() == start["params"].keys()


def test_same_seed_same_fit_and_other_seed_differs():
    pm, lora, model, loader = _svi_problem()
    a = _fit(model, loader, lora, max_steps=6)
    pyro.clear_param_store()
    b = _fit(model, loader, lora, max_steps=6)
    assert a.losses == b.losses
    for n in a.params:
        assert torch.equal(a.params[n], b.params[n])
    pyro.clear_param_store()
    c = fit_svi(model, "normal", loader, epochs=3, lr=0.02, init_values=lora, progress=False,
                seed=4, max_steps=6)
    assert c.losses != a.losses


def test_early_stopping_stops_and_restores_best():
    pm, lora, model, loader = _svi_problem()
    values = iter([5.0, 4.0, 3.0, 3.5, 3.2, 3.1, 0.0, 0.0])
    snapshots = []

    def metric():
        store = pyro.get_param_store()
        snapshots.append({n: store[n].detach().clone() for n in store.keys()})
        return next(values)

    es = EarlyStopping(metric, every=2, patience=3)
    res = _fit(model, loader, lora, max_steps=100, early_stopping=es)
    # evaluations at steps 2, 4, ..., best 3.0 at step 6, then 3 without improvement
    assert res.stopped_early
    assert res.steps == 12
    assert res.best_step == 6
    assert res.val_history == ((2, 5.0), (4, 4.0), (6, 3.0), (8, 3.5), (10, 3.2), (12, 3.1))
    assert len(res.losses) == 12
    best = snapshots[2]
    assert res.params.keys() <= best.keys()
    for n, v in res.params.items():
        assert torch.equal(v, best[n]), n
        assert not torch.equal(v, snapshots[-1][n]), n  # the last params were replaced
        assert torch.equal(pyro.get_param_store()[n].detach(), best[n])


def test_early_stopping_with_min_delta_and_validation():
    with pytest.raises(ValueError, match="every and patience must be >= 1"):
        EarlyStopping(lambda: 0.0, every=0)
    with pytest.raises(ValueError, match="every and patience must be >= 1"):
        EarlyStopping(lambda: 0.0, patience=0)
    pm, lora, model, loader = _svi_problem()
    values = iter([1.0, 0.95, 0.92, 0.91])  # improvements on the best smaller than min_delta
    res = _fit(model, loader, lora, max_steps=100,
               early_stopping=EarlyStopping(lambda: next(values), every=1, patience=3,
                                            min_delta=0.1))
    assert res.stopped_early and res.steps == 4 and res.best_step == 1


def test_fit_result_is_frozen():
    pm, lora, model, loader = _svi_problem()
    res = _fit(model, loader, lora, max_steps=2)
    assert isinstance(res, FitResult) and res.method == "svi"
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.losses = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.steps = 0
    assert res.steps == 2 and res.fit_seconds > 0
    assert res.seconds_per_step == pytest.approx(res.fit_seconds / 2)


def test_fit_svi_rejects_empty_data_and_bad_arguments():
    pm, lora, model, loader = _svi_problem()
    with pytest.raises(ValueError, match="empty"):
        fit_svi(model, "normal", [], progress=False)
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, D_IN)),
                                        batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        fit_svi(model, "normal", empty, progress=False)
    with pytest.raises(ValueError, match="unknown guide 'laplace'"):
        fit_svi(model, "laplace", loader, progress=False)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        fit_svi(model, "normal", loader, epochs=0, progress=False)


def test_nan_loss_raises_floating_point_error():
    pm, lora, model, loader = _svi_problem()
    x, y = _data()

    def bad_model(x, y, idx):
        logits = lora(x) * float("nan")
        with pyro.plate("d", N, subsample=idx):
            pyro.sample("y", pyro.distributions.Normal(logits.sum(-1), 1.0), obs=y.float())

    pyro.enable_validation(False)  # else the Normal's validation would catch the NaN first
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"), \
            pytest.warns(UserWarning, match="Encountered NaN"):
        fit_svi(bad_model, "normal", [(x, y, torch.arange(N))], progress=False)


# ---------------------------------------------------------------- fit_map
def test_fit_map_trains_tiny_model_in_place():
    pm, fn = tiny_transformer("bert")
    ids, mask = token_batch(n=16, t=6, seed=2)
    labels = (ids[:, 0] % 2).long()  # learnable from the first token
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8],
                "labels": labels[i:i + 8], "index": torch.arange(i, i + 8)} for i in (0, 8)]
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    pm.eval()

    @torch.no_grad()
    def full_loss():
        return float(pm(input_ids=ids, attention_mask=mask, labels=labels).loss)

    loss0 = full_loss()
    res = fit_map(pm, batches, epochs=15, lr=1e-2, progress=False)
    assert res.method == "map" and res.guide is None and res.steps == 30
    assert all(math.isfinite(v) for v in res.losses)
    loss1 = full_loss()
    assert loss0 > 0.6 and loss1 < 0.8 * loss0, (loss0, loss1)  # from chance (log 2) down
    assert not pm.training  # the mode is restored
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]) or ".lora_A." in n, n
            assert torch.equal(res.params[n], p.detach())
        else:
            assert torch.equal(p, before[n]), n  # base weights untouched


def test_fit_map_errors():
    pm = mlp_peft()
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="'labels' entry"):
        fit_map(pm, [(x,)], progress=False)
    with pytest.raises(ValueError, match="empty"):
        fit_map(pm, [], progress=False)
    for p in pm.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit_map(pm, [(x,)], progress=False)


def test_fit_map_custom_loss_and_checkpoint_resume(tmp_path):
    x, y = _data()
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731

    def run(max_steps, ckpt):
        pm = mlp_peft(seed=0, d_in=D_IN, classes=CLASSES)
        fake_finetune(pm)  # else B = 0 and A gets no gradient at the first step
        ds = torch.utils.data.TensorDataset(x, y)
        loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
        res = fit_map(pm, loader, loss=loss, epochs=4, max_steps=max_steps, lr=2e-2,
                      checkpoint=ckpt, checkpoint_every=3, progress=False, seed=5)
        return pm, res

    pm, full = run(None, str(tmp_path / "a"))
    assert full.steps == 20
    with torch.no_grad():
        fresh = mlp_peft(seed=0, d_in=D_IN, classes=CLASSES)
        fake_finetune(fresh)
        assert float(loss(pm, (x, y))) < 0.8 * float(loss(fresh, (x, y)))
    run(7, str(tmp_path / "b"))
    _, resumed = run(None, str(tmp_path / "b"))
    assert resumed.losses == full.losses
    for n in full.params:
        assert torch.equal(resumed.params[n], full.params[n]), n


def test_diagonal_guide_fits_the_mean_field_posterior_and_reads_as_a_gaussian():
    """``"diagonal"`` (one flat site) and ``"normal"`` (a site per matrix) fit the same family: on a
    model whose exact posterior is independent Gaussians, both recover it, and the diagonal
    guide's Gaussian snapshot has its flat loc and scale, split by site."""
    import pyro.distributions as dist

    from pyro_llm.gaussian import GaussianPosterior

    g = torch.Generator().manual_seed(0)
    n = 8
    ya, yb = torch.randn(n, 2, 3, generator=g) + 1.0, torch.randn(n, 4, generator=g) - 0.5

    def model(ya, yb):
        a = pyro.sample("a", dist.Normal(torch.zeros(2, 3), 1.0).to_event(2))
        b = pyro.sample("b", dist.Normal(torch.zeros(4), 1.0).to_event(1))
        with pyro.plate("n", n):
            pyro.sample("ya", dist.Normal(a, 1.0).to_event(2), obs=ya)
            pyro.sample("yb", dist.Normal(b, 1.0).to_event(1), obs=yb)

    exact = {"a": ya.sum(0) / (n + 1), "b": yb.sum(0) / (n + 1)}
    exact_sd = (1.0 / (n + 1)) ** 0.5
    for kind in ("diagonal", "normal"):
        pyro.clear_param_store()
        guide = kind
        for k, (lr, steps) in enumerate([(0.1, 300), (0.01, 300), (0.002, 400)]):
            res = fit_svi(model, guide, [(ya, yb)], epochs=10**6, max_steps=steps, lr=lr,
                          init_scale=0.1, num_particles=4, progress=False, seed=k)
            guide = res.guide
        post = res.posterior
        assert isinstance(post, GaussianPosterior), kind
        mean = post.mean()
        draws = post.sample(4000, generator=torch.Generator().manual_seed(1))
        for site in ("a", "b"):
            assert torch.allclose(mean[site], exact[site], atol=0.05), (kind, site, mean[site], exact[site])
            sd = torch.stack([d[site] for d in draws]).std(0)
            assert torch.allclose(sd, torch.full_like(sd, exact_sd), rtol=0.12), (kind, site, sd)
        if kind == "diagonal":
            q = res.guide.get_posterior()
            assert torch.equal(torch.cat([mean["a"].reshape(-1), mean["b"].reshape(-1)]),
                               q.base_dist.loc.detach())
