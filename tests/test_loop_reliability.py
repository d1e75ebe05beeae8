"""The training loop under misuse and interruption (issue 14 items 3-6, 12, 16): one-shot data,
non-finite gradients, resuming another fit, early stopping across a resume, half precision."""

from __future__ import annotations

import json

import pyro
import pytest
import torch
from conftest import fake_finetune, mlp_peft

from pyro_llm import BayesianLoRA, EarlyStopping, fit_blob, fit_map, fit_svi, likelihoods
from pyro_llm._io import FileFormatError, read_safetensors, save_safetensors
from pyro_llm.infer.checkpoint import TENSORS

N, D_IN, CLASSES, B = 32, 4, 3, 8


def _xy(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D_IN, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _batches(seed=0):
    x, y = _xy(seed)
    return [{"x": x[i:i + B], "labels": y[i:i + B]} for i in range(0, N, B)]


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["labels"])


def _map(data, **kw):
    pm = mlp_peft(d_in=D_IN, classes=CLASSES)
    kw = {"epochs": 2, "lr": 0.05, "progress": False, **kw}
    return pm, fit_map(pm, data, loss=_loss, **kw)


# ---------------------------------------------------------------- item 3: one-shot data
def test_generator_data_keeps_its_first_batch_and_refuses_a_second_epoch():
    _, ref = _map(_batches(), epochs=1)
    _, res = _map((b for b in _batches()), epochs=1)
    assert res.steps == ref.steps == N // B
    assert res.losses == ref.losses
    with pytest.raises(ValueError, match="one-shot iterator.*epochs=2"):
        _map((b for b in _batches()), epochs=2)


def test_generator_data_in_fit_svi_and_fit_blob_loses_no_batch():
    pm = mlp_peft(d_in=D_IN, classes=CLASSES)
    fake_finetune(pm)
    lora = BayesianLoRA(pm, prior=0.5, select="B")
    x, y = _xy()

    def model(x, y, idx):
        likelihoods.categorical("y", lora(x), y, N, idx)

    gen = ((x[i:i + B], y[i:i + B], torch.arange(i, i + B)) for i in range(0, N, B))
    res = fit_svi(model, "normal", gen, epochs=1, lr=0.01, init_values=lora, progress=False)
    assert res.steps == N // B
    pyro.clear_param_store()
    gen = ((x[i:i + B], y[i:i + B]) for i in range(0, N, B))
    blob = fit_blob(mlp_peft(d_in=D_IN, classes=CLASSES), gen, epochs=1, num_data=N,
                    kl_schedule="uniform", progress=False)
    assert blob.fit.steps == N // B


# ---------------------------------------------------------------- item 4: NaN gradients
def _nan_grad_loss(at_step):
    calls = [0]

    def loss(model, batch):
        calls[0] += 1
        out = _loss(model, batch)
        if calls[0] == at_step:  # finite value, NaN gradient: sqrt'(0) * 0 is inf * 0
            out = out + 0.0 * torch.sqrt(model(batch["x"]).sum() * 0.0)
        return out
    return loss


def test_finite_loss_with_nan_gradient_never_overwrites_a_good_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    pm = mlp_peft(d_in=D_IN, classes=CLASSES)
    with pytest.raises(FloatingPointError, match="gradient.*NaN or inf at step 5.*intact"):
        fit_map(pm, _batches(), loss=_nan_grad_loss(6), epochs=3, lr=0.05, checkpoint=str(ck),
                checkpoint_every=2, progress=False)
    tensors, meta = read_safetensors(ck / TENSORS, what="checkpoint")  # finite, or it would raise
    assert json.loads(meta["meta"])["step"] == 4
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(p).all() for p in params.values())  # the step was not taken


def test_non_finite_parameters_are_not_checkpointed(tmp_path):
    pm = mlp_peft(d_in=D_IN, classes=CLASSES)
    params = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    from pyro_llm.infer.checkpoint import save_checkpoint

    opt = torch.optim.AdamW(params.values())
    meta = {"step": 0}
    save_checkpoint(tmp_path, params, opt, meta)
    before = (tmp_path / TENSORS).read_bytes()
    with torch.no_grad():
        next(iter(params.values()))[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf.*not overwritten"):
        save_checkpoint(tmp_path, params, opt, meta)
    assert (tmp_path / TENSORS).read_bytes() == before


# ---------------------------------------------------------------- item 5: resume fingerprint
@pytest.mark.parametrize("change", ["base_weights", "data", "batch_size", "lr", "weight_decay"])
def test_resume_with_another_model_data_or_settings_is_refused(tmp_path, change):
    ck = str(tmp_path / "ck")
    _map(_batches(), epochs=1, checkpoint=ck)
    data, kw, pm = _batches(), {}, mlp_peft(d_in=D_IN, classes=CLASSES)
    if change == "base_weights":
        pm = mlp_peft(seed=1, d_in=D_IN, classes=CLASSES)
    elif change == "data":
        data = _batches(seed=1)
    elif change == "batch_size":
        x, y = _xy()
        data = [{"x": x[i:i + 4], "labels": y[i:i + 4]} for i in range(0, N, 4)]
    else:
        kw = {"lr": 0.01} if change == "lr" else {"weight_decay": 0.1}
    with pytest.raises(ValueError, match="different fit: .*(model|data|optimizer|weight_decay)"):
        fit_map(pm, data, loss=_loss, epochs=2, progress=False, checkpoint=ck,
                **{"lr": 0.05, **kw})


def test_resume_may_extend_epochs_and_equals_the_longer_run(tmp_path):
    _, full = _map(_batches(), epochs=3)
    _map(_batches(), epochs=1, checkpoint=str(tmp_path))
    _, resumed = _map(_batches(), epochs=3, checkpoint=str(tmp_path))
    assert resumed.losses == full.losses
    for n in full.params:
        assert torch.equal(resumed.params[n], full.params[n]), n


@pytest.mark.parametrize("field,value", [("step", 10**12), ("step", -1), ("losses", "x"),
                                         ("bad", 1.5), ("fingerprint", None)])
def test_tampered_checkpoint_record_is_refused_naming_the_field(tmp_path, field, value):
    _map(_batches(), epochs=1, checkpoint=str(tmp_path))
    tensors, meta = read_safetensors(tmp_path / TENSORS, what="checkpoint")
    record = json.loads(meta["meta"])
    record[field] = value
    save_safetensors(tmp_path / TENSORS, tensors, metadata={"meta": json.dumps(record)})
    with pytest.raises(FileFormatError, match=f"'{field}'|{field}"):
        _map(_batches(), epochs=2, checkpoint=str(tmp_path))


def test_nan_tensor_in_checkpoint_is_refused(tmp_path):
    _map(_batches(), epochs=1, checkpoint=str(tmp_path))
    tensors, meta = read_safetensors(tmp_path / TENSORS, what="checkpoint")
    key = next(k for k in tensors if k.startswith("param/"))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_safetensors(tmp_path / TENSORS, tensors, metadata=meta)
    with pytest.raises(FileFormatError, match=f"{key}.*NaN"):
        _map(_batches(), epochs=2, checkpoint=str(tmp_path))


# ---------------------------------------------------------------- item 6: early stopping
def _es_fit(tmp_path=None, max_steps=None):
    pm = mlp_peft(d_in=D_IN, classes=CLASSES)
    x, y = _xy(seed=5)
    metric = EarlyStopping(lambda: float(_loss(pm, {"x": x, "labels": y})), every=2, patience=2)
    return fit_map(pm, _batches(), loss=_loss, epochs=20, lr=0.3, early_stopping=metric,
                   max_steps=max_steps, checkpoint=str(tmp_path) if tmp_path else None,
                   checkpoint_every=3, progress=False)


def test_resumed_early_stopping_equals_the_uninterrupted_run(tmp_path):
    full = _es_fit()
    assert full.stopped_early and full.best_step < full.steps
    stop = full.best_step + 1  # interrupted after the best, before the stop
    _es_fit(tmp_path, max_steps=stop)
    resumed = _es_fit(tmp_path)
    assert resumed.stopped_early and resumed.best_step == full.best_step
    assert resumed.losses == full.losses and resumed.val_history == full.val_history
    for n in full.params:
        assert torch.equal(resumed.params[n], full.params[n]), n
    again = _es_fit(tmp_path)  # a finished, early-stopped fit does not train on
    assert again.steps == full.steps and again.losses == full.losses


# ---------------------------------------------------------------- item 16 / 12: precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_trainable_tensors_are_refused(dtype):
    pm = mlp_peft(d_in=D_IN, classes=CLASSES).to(dtype)
    x, y = _xy()
    data = [{"x": x.to(dtype), "labels": y}]
    with pytest.raises(ValueError, match=f"{dtype}.*float32"):
        fit_map(pm, data, loss=_loss, progress=False)


def test_half_precision_svi_guide_is_refused():
    pm = mlp_peft(d_in=D_IN, classes=CLASSES).to(torch.float16)
    lora = BayesianLoRA(pm, prior=0.5, select="B")
    x, y = _xy()

    def model(x, y, idx):
        likelihoods.categorical("y", lora(x).float(), y, N, idx)

    with pytest.raises(ValueError, match="float16.*float32"):
        fit_svi(model, "normal", [(x.half(), y, torch.arange(N))], init_values=lora, progress=False)
