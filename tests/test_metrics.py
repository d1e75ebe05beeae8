"""Predictive metrics on hand-computed cases, the entropy decomposition, and calibration."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_llm import metrics

PROBS = torch.tensor([[0.95, 0.05],   # predicts 0, correct, confidence 0.95
                      [0.25, 0.75],   # predicts 1, wrong,   confidence 0.75
                      [0.65, 0.35],   # predicts 0, correct, confidence 0.65
                      [0.72, 0.28]],  # predicts 0, wrong,   confidence 0.72
                     dtype=torch.float64)
Y = torch.tensor([0, 0, 0, 1])


def test_accuracy_nll_brier_by_hand():
    assert float(metrics.accuracy(PROBS, Y)) == pytest.approx(2 / 4)
    nll = -(math.log(0.95) + math.log(0.25) + math.log(0.65) + math.log(0.28)) / 4
    assert float(metrics.nll(PROBS, Y)) == pytest.approx(nll, rel=1e-12)
    brier = (2 * 0.05**2 + 2 * 0.75**2 + 2 * 0.35**2 + 2 * 0.72**2) / 4
    assert float(metrics.brier(PROBS, Y)) == pytest.approx(brier, rel=1e-12)


def test_nll_of_zero_probability_is_finite_and_large():
    probs = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    value = float(metrics.nll(probs, torch.tensor([1])))
    assert value == pytest.approx(-math.log(1e-12))


def test_ece_and_reliability_bins_by_hand():
    # 10 bins (k/10, (k+1)/10]: 0.95 -> bin 9; 0.75 and 0.72 -> bin 7; 0.65 -> bin 6
    conf, acc, count = metrics.reliability_bins(PROBS, Y, n_bins=10)
    expected_count = torch.zeros(10, dtype=torch.float64)
    expected_count[[6, 7, 9]] = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.equal(count, expected_count)
    assert conf[7] == pytest.approx((0.75 + 0.72) / 2)
    assert acc[7] == 0.0 and acc[6] == 1.0 and acc[9] == 1.0
    assert float(conf[0]) == 0.0 and float(acc[0]) == 0.0  # empty bin
    ece = 0.25 * abs(0.95 - 1) + 0.25 * abs(0.65 - 1) + 0.5 * abs(0.735 - 0)
    assert float(metrics.ece(PROBS, Y, n_bins=10)) == pytest.approx(ece, rel=1e-12)
    # one bin: |mean confidence - accuracy|
    assert float(metrics.ece(PROBS, Y, n_bins=1)) == pytest.approx(
        abs((0.95 + 0.75 + 0.65 + 0.72) / 4 - 0.5), rel=1e-12)


def test_entropy_known_values():
    probs = torch.tensor([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]], dtype=torch.float64)
    h = metrics.entropy(probs)
    assert h.shape == (3,)
    assert h.tolist() == pytest.approx([math.log(4), 0.0, math.log(2)], abs=1e-12)


def test_entropy_decomposition_is_exact():
    g = torch.Generator().manual_seed(3)
    sample_probs = torch.softmax(3 * torch.randn(7, 11, 5, generator=g, dtype=torch.float64), -1)
    total = metrics.entropy(sample_probs.mean(0))
    aleatoric = metrics.expected_entropy(sample_probs)
    epistemic = metrics.mutual_information(sample_probs)
    assert total.shape == aleatoric.shape == epistemic.shape == (11,)
    torch.testing.assert_close(total, aleatoric + epistemic, rtol=0, atol=1e-12)
    assert (epistemic > 1e-3).all()  # the samples disagree, so MI is clearly positive
    # expected entropy is the plain mean of per-sample entropies
    manual = torch.stack([metrics.entropy(p) for p in sample_probs]).mean(0)
    torch.testing.assert_close(aleatoric, manual, rtol=0, atol=1e-12)


def test_identical_samples_have_zero_mutual_information():
    probs = torch.softmax(torch.randn(9, 3, dtype=torch.float64), -1)
    sample_probs = probs.expand(6, 9, 3)
    mi = metrics.mutual_information(sample_probs)
    # zero up to the rounding of the mean over samples (the entropies are ~1)
    torch.testing.assert_close(mi, torch.zeros(9, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(metrics.expected_entropy(sample_probs), metrics.entropy(probs))


def _binary_with_confidence(conf: torch.Tensor, p_correct: torch.Tensor, g: torch.Generator):
    probs = torch.stack([conf, 1 - conf], -1)  # always predicts class 0
    correct = torch.rand(conf.shape, generator=g, dtype=conf.dtype) < p_correct
    return probs, (~correct).long()


def test_ece_of_calibrated_data_is_small_and_of_miscalibrated_data_large():
    n, n_bins = 20_000, 15
    g = torch.Generator().manual_seed(11)
    conf = 0.5 + 0.5 * torch.rand(n, generator=g, dtype=torch.float64)
    probs, y = _binary_with_confidence(conf, conf, g)
    value = float(metrics.ece(probs, y, n_bins))
    # Tolerance from the sampling error of a calibrated model: in bin k (n_k points) the
    # gap d_k = accuracy - mean confidence has mean 0 and variance v_k = mean(c(1-c)) / n_k,
    # so E|d_k| = sqrt(2 v_k / pi), Var|d_k| = v_k (1 - 2/pi); bins are independent, so
    # ECE = sum_k w_k |d_k| (w_k = n_k / n) has that mean plus 4 sd as a bound.
    _, _, count = metrics.reliability_bins(probs, y, n_bins)
    idx = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    var_c = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf * (1 - conf))
    v = var_c / count.clamp_min(1) ** 2
    w = count / n
    mean = float((w * (2 * v / math.pi).sqrt()).sum())
    sd = float((w**2 * v * (1 - 2 / math.pi)).sum().sqrt())
    assert value < mean + 4 * sd, (value, mean, sd)
    assert mean + 4 * sd < 0.02
    # the same confidences, 15 points over-confident: every gap is ~ -0.15 (no sign flips),
    # so ECE ~ 0.15 + sum_k w_k noise_k, whose sd is sqrt(sum_k w_k^2 v_k) (about, with
    # c(1 - c) for the lower accuracy no larger than v_k's bound above at these levels)
    probs, y = _binary_with_confidence(conf, conf - 0.15, g)
    noise_sd = sd / math.sqrt(1 - 2 / math.pi)
    assert float(metrics.ece(probs, y, n_bins)) == pytest.approx(0.15, abs=4 * noise_sd)
    assert 4 * noise_sd < 0.15 - (mean + 4 * sd)  # the two cases cannot be confused


def test_summarize_matches_individual_metrics():
    sample_probs = torch.softmax(torch.randn(4, 6, 3, dtype=torch.float64), -1)
    probs = sample_probs.mean(0)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = metrics.summarize(probs, y, sample_probs, n_bins=5)
    assert out == {
        "accuracy": float(metrics.accuracy(probs, y)),
        "ece": float(metrics.ece(probs, y, 5)),
        "nll": float(metrics.nll(probs, y)),
        "brier": float(metrics.brier(probs, y)),
        "entropy": float(metrics.entropy(probs).mean()),
        "mutual_information": float(metrics.mutual_information(sample_probs).mean()),
    }
    assert "mutual_information" not in metrics.summarize(probs, y)


@pytest.mark.parametrize("fn", [metrics.accuracy, metrics.nll, metrics.brier, metrics.ece])
def test_bad_shapes_and_values_raise(fn):
    probs = torch.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=r"probs must have shape \(N, C\)"):
        fn(probs[0], torch.tensor([0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        fn(probs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        fn(probs, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        fn(probs, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        fn(probs, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="NaN or inf"):
        fn(torch.tensor([[0.5, float("nan")]] * 3), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="empty"):
        fn(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_sample_metrics_need_three_dims_and_bins_positive():
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        metrics.mutual_information(torch.full((3, 2), 0.5))
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        metrics.expected_entropy(torch.full((3, 2), 0.5))
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        metrics.ece(PROBS, Y, n_bins=0)
