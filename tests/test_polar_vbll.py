"""PoLAR-VBLL: alternating fit of a PoLAR adapter and a VBLL head on a tiny peft MLP."""

from __future__ import annotations

import pytest
import torch
from conftest import mlp_peft, tiny_transformer, token_batch

from pyro_llm import features
from pyro_llm.infer.polar_vbll import fit_polar_vbll, load_polar_vbll
from pyro_llm.polar import PolarAdapter

C, D_FEAT = 3, 6


def _data(n=64, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    teacher = torch.randn(4, C, generator=g)
    y = (3 * x @ teacher).argmax(-1)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _features(adapter, batch):
    return adapter(batch[0])  # the MLP's 6 outputs are the features of the VBLL head


def _adapter(seed=0):
    return PolarAdapter(mlp_peft(seed=0, classes=D_FEAT), seed=seed)


@pytest.mark.parametrize("alternate", ["epoch", "step"])
def test_fit_lowers_the_loss_and_keeps_frames_orthonormal(alternate):
    data = _data()
    ad = _adapter()
    before = {k: t.detach().clone() for k, t in ad.named_polar_tensors().items()}
    m = fit_polar_vbll(ad, data, _features, C, epochs=30, lr=0.02, vbll_lr=0.05, alternate=alternate,
                       inner_steps=2, progress=False)
    per_epoch = torch.tensor(m.losses).view(30, len(data)).mean(-1)
    assert per_epoch[-3:].mean() < 0.7 * per_epoch[:3].mean(), per_epoch
    assert len(m.head_losses) == 30 * len(data) * 2
    # the backbone moved, and landing keeps U, V near the Stiefel manifold (lr 0.02: the
    # landing bound lr max|F|^2 / (2 lam) is far below 1e-2 here)
    after = ad.named_polar_tensors()
    assert any((after[k] - before[k]).abs().max() > 1e-3 for k in before)
    assert max(ad.orthogonality_errors().values()) < 1e-2
    assert m.head.num_classes == C and m.head.in_features == D_FEAT and m.config["num_data"] == 64


def test_retraction_keeps_frames_exactly_orthonormal():
    ad = _adapter()
    fit_polar_vbll(ad, _data(), _features, C, epochs=3, lr=0.05, method="retraction", progress=False)
    assert max(ad.orthogonality_errors().values()) < 1e-5


def test_predict_shapes_probabilities_and_one_forward_per_batch():
    data = _data()
    ad = _adapter()
    m = fit_polar_vbll(ad, data, _features, C, epochs=2, lr=0.02, progress=False)
    calls = []
    hook = ad.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        p = m.predictive(data, progress=False)
        assert len(calls) == len(data)
        calls.clear()
        s = m.predict_samples(data, 5, progress=False)
        assert len(calls) == len(data)
        calls.clear()
        mc = m.predictive(data, num_samples=4000, progress=False)
        assert len(calls) == len(data)
    finally:
        hook.remove()
    assert p.shape == (64, C) and s.shape == (5, 64, C)
    torch.testing.assert_close(p.sum(-1), torch.ones(64))
    torch.testing.assert_close(s.sum(-1), torch.ones(5, 64))
    # sampling-free vs many logit draws: the mean-field approximation is a few 1e-2 at most
    assert (p - mc).abs().max() < 0.05
    # same seed, same draws; the draws are the same for every batch
    torch.testing.assert_close(m.predict_samples(data, 5, progress=False), s)
    f = m.features(data, progress=False)
    w = m.head.sample_weights(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.head.sample_probs(f, w), s)


def test_seeded_runs_are_identical_and_seeds_matter():
    kw = dict(epochs=3, lr=0.02, alternate="step", progress=False)
    runs = [fit_polar_vbll(_adapter(), _data(), _features, C, seed=s, **kw) for s in (1, 1, 2)]
    assert runs[0].losses == runs[1].losses
    for k, v in runs[0].head.state_dict().items():
        assert torch.equal(v, runs[1].head.state_dict()[k]), k
    for a, b in zip(runs[0].adapter.stiefel_parameters(), runs[1].adapter.stiefel_parameters(),
                    strict=True):
        assert torch.equal(a, b)
    assert runs[0].losses != runs[2].losses


def test_save_load_round_trip(tmp_path):
    data = _data()
    m = fit_polar_vbll(_adapter(), data, _features, C, epochs=2, lr=0.02, progress=False)
    m.save(tmp_path / "pv")
    assert (tmp_path / "pv" / "peft_adapter" / "adapter_config.json").exists()
    fresh = _adapter(seed=5)  # other random frames: all must be overwritten
    back = load_polar_vbll(tmp_path / "pv", fresh, _features)
    torch.testing.assert_close(back.predictive(data, progress=False), m.predictive(data, progress=False),
                               rtol=0, atol=0)
    torch.testing.assert_close(back.predict_samples(data, 3, progress=False),
                               m.predict_samples(data, 3, progress=False), rtol=0, atol=0)
    assert back.losses == m.losses and back.config == m.config
    with pytest.raises(ValueError, match="do not match"):
        load_polar_vbll(tmp_path / "pv", PolarAdapter(mlp_peft(classes=D_FEAT, r=1)), _features)
    with pytest.raises(FileNotFoundError, match="not a saved PolarVBLL"):
        load_polar_vbll(tmp_path, fresh, _features)


def test_bad_inputs():
    data = _data()
    with pytest.raises(ValueError, match="alternate"):
        fit_polar_vbll(_adapter(), data, _features, C, alternate="joint", progress=False)
    with pytest.raises(ValueError, match=r"features_fn must return \(batch, D\)"):
        fit_polar_vbll(_adapter(), data, lambda a, b: a(b[0]).sum(-1), C, progress=False)
    with pytest.raises(ValueError, match="empty"):
        fit_polar_vbll(_adapter(), [], _features, C, progress=False)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit_polar_vbll(_adapter(), data, _features, 2, progress=False)


def test_tiny_bert_sequence_classifier():
    """Dict batches with labels, CLS features of a BERT sequence classifier (its own head unused)."""
    peft_model, _ = tiny_transformer("bert")
    ids, mask = token_batch(8, 6)
    y = torch.tensor([0, 1] * 4)
    data = [dict(input_ids=ids[:4], attention_mask=mask[:4], labels=y[:4]),
            dict(input_ids=ids[4:], attention_mask=mask[4:], labels=y[4:])]

    def fn(adapter, batch):
        out = adapter(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True)
        return features.pool(out, batch["attention_mask"], "cls")

    m = fit_polar_vbll(PolarAdapter(peft_model), data, fn, 2, epochs=3, lr=0.01, progress=False)
    p = m.predictive(data, progress=False)
    assert p.shape == (8, 2) and m.head.in_features == 32
    torch.testing.assert_close(p.sum(-1), torch.ones(8))


def test_a_posterior_over_the_last_layer_for_arviz():
    from pyro_llm import Posterior, to_arviz

    m = fit_polar_vbll(_adapter(), _data(), _features, C, epochs=2, lr=0.02, progress=False)
    assert isinstance(m, Posterior)
    draws = m.sample(2000, torch.Generator().manual_seed(0))
    w = torch.stack([d[m.SITE] for d in draws])
    assert w.shape == (2000, C, D_FEAT)
    # the draws have q(W)'s mean: per entry within 5 Monte Carlo standard errors
    se = w.std(0) / 2000 ** 0.5
    assert ((w.mean(0) - m.mean()[m.SITE]).abs() < 5 * se).all()
    idata = to_arviz(m, num_samples=8)
    assert idata.posterior[m.SITE].shape == (2, 4, C, D_FEAT)


def test_features_are_normalised_so_their_scale_does_not_matter(tmp_path):
    """A decoder's hidden states have norms of tens: the fit divides them by the first batch's
    mean norm, so features x 100 give the same model (up to float round-off), saved and loaded."""
    data = _data()
    big = lambda adapter, batch: 100.0 * _features(adapter, batch)  # noqa: E731
    m1 = fit_polar_vbll(_adapter(), data, _features, C, epochs=2, lr=0.02, progress=False)
    m100 = fit_polar_vbll(_adapter(), data, big, C, epochs=2, lr=0.02, progress=False)
    assert m100.config["feature_scale"] == pytest.approx(m1.config["feature_scale"] / 100, rel=1e-5)
    p1, p100 = m1.predictive(data, progress=False), m100.predictive(data, progress=False)
    torch.testing.assert_close(p100, p1, atol=1e-4, rtol=0)
    m100.save(tmp_path / "pv")
    back = load_polar_vbll(tmp_path / "pv", _adapter(seed=5), big)
    torch.testing.assert_close(back.predictive(data, progress=False), p100)
    # without the normalisation the x100 features give another (much more confident) model
    raw = fit_polar_vbll(_adapter(), data, big, C, epochs=2, lr=0.02, normalize_features=False,
                         progress=False)
    assert (raw.predictive(data, progress=False) - p1).abs().max() > 0.05
