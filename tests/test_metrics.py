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


# ---------------------------------------------------------------- out-of-distribution AUROC
def _pairwise_auroc(s_in: torch.Tensor, s_out: torch.Tensor) -> float:
    """Brute force: P(out > in) + P(out == in) / 2 over all pairs."""
    diff = s_out[:, None] - s_in[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def test_auroc_equals_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(5)
    for n_in, n_out in [(1, 1), (7, 3), (40, 65)]:
        # integer scores in 0..5: many ties within and across the two groups
        s_in = torch.randint(0, 6, (n_in,), generator=g).double()
        s_out = torch.randint(1, 7, (n_out,), generator=g).double()
        assert float(metrics.auroc(s_in, s_out)) == pytest.approx(
            _pairwise_auroc(s_in, s_out), abs=1e-12)
    s = torch.tensor([0.3, 0.3, 0.3])
    assert float(metrics.auroc(s, s)) == 0.5  # all tied
    assert float(metrics.auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.5, 0.9]))) == 1.0
    assert float(metrics.auroc(torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2]))) == 0.0


def test_auroc_identical_distributions_and_normal_shift():
    n = 2000
    g = torch.Generator().manual_seed(8)
    a = float(metrics.auroc(torch.randn(n, generator=g), torch.randn(n, generator=g)))
    # under H0 the Mann-Whitney AUC has sd sqrt((n1 + n2 + 1) / (12 n1 n2)) ~= 0.0091
    sd = math.sqrt((2 * n + 1) / (12 * n * n))
    assert abs(a - 0.5) < 4 * sd
    # N(0, 1) vs N(d, 1): AUC = Phi(d / sqrt 2); Var(AUC) <= A (1 - A) / min(n1, n2)
    d = 1.0
    a = float(metrics.auroc(torch.randn(n, generator=g), d + torch.randn(n, generator=g)))
    exact = 0.5 * (1 + math.erf(d / 2))  # Phi(d / sqrt 2) = (1 + erf(d / 2)) / 2
    assert a == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / n))


def test_auroc_bad_input():
    with pytest.raises(ValueError, match="scores_in must be a non-empty 1-D"):
        metrics.auroc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="scores_out must be a non-empty 1-D"):
        metrics.auroc(torch.tensor([1.0]), torch.ones(2, 2))
    with pytest.raises(ValueError, match="scores_out contains NaN"):
        metrics.auroc(torch.tensor([1.0]), torch.tensor([float("nan")]))


# ---------------------------------------------------------------- selective prediction
def test_selective_accuracy_by_hand():
    # PROBS: correct, wrong, correct, wrong; scores rank them 2, 0, 3, 1 (least uncertain first)
    scores = torch.tensor([0.5, 0.1, 0.9, 0.2])
    cov, acc = metrics.selective_accuracy(PROBS, Y, scores)
    # kept order: row1 (wrong), row3 (wrong), row0 (right), row2 (right)
    assert cov.tolist() == [1.0, 0.75, 0.5, 0.25]
    assert acc.tolist() == pytest.approx([2 / 4, 1 / 3, 0 / 2, 0 / 1])
    cov, acc = metrics.selective_accuracy(PROBS, Y, -scores, fractions=[0.0, 0.5, 0.74, 0.99])
    assert cov.tolist() == [1.0, 0.5, 0.25, 0.25]  # round((1 - f) 4), at least one
    assert acc.tolist() == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert float(acc[0]) == float(metrics.accuracy(PROBS, Y))
    # ties are broken by position: equal scores keep the first rows
    _, acc = metrics.selective_accuracy(PROBS, Y, torch.zeros(4), fractions=[0.5, 0.75])
    assert acc.tolist() == [0.5, 1.0]


def test_aurc_oracle_limit_and_ordering():
    n, err = 10_000, 0.2
    g = torch.Generator().manual_seed(2)
    correct = torch.rand(n, generator=g) > err
    y = torch.zeros(n, dtype=torch.long)
    probs = torch.where(correct[:, None], torch.tensor([0.8, 0.2]), torch.tensor([0.3, 0.7]))
    e = 1 - float(correct.double().mean())
    oracle = float(metrics.aurc(probs, y, (~correct).double()))
    # the sum over k = 1..N is a Riemann sum of a monotone risk in [0, 1]: error <= 1 / N
    assert oracle == pytest.approx(e + (1 - e) * math.log(1 - e), abs=1 / n)
    worst = float(metrics.aurc(probs, y, correct.double()))  # errors kept first
    # random order: E[risk at any coverage k / N] = e exactly (hypergeometric mean); the sd of
    # one AURC is at most the mean of the per-k sds, (1/N) sum_k sqrt(e(1-e)/k) ~ 0.8/sqrt(N)
    # = 0.008, so the mean of 20 draws has sd <= 0.0018 and 0.01 is over 5 sd
    rand = sum(float(metrics.aurc(probs, y, torch.rand(n, generator=g))) for _ in range(20)) / 20
    assert rand == pytest.approx(e, abs=0.01)
    assert oracle < rand < worst
    cov, acc = metrics.selective_accuracy(probs, y, (~correct).double())
    torch.testing.assert_close(metrics.aurc(probs, y, (~correct).double()), (1 - acc).mean())


def test_selective_bad_input():
    with pytest.raises(ValueError, match=r"scores must have shape \(4,\)"):
        metrics.selective_accuracy(PROBS, Y, torch.zeros(3))
    with pytest.raises(ValueError, match=r"fractions must be non-empty and lie in \[0, 1\)"):
        metrics.selective_accuracy(PROBS, Y, torch.zeros(4), fractions=[0.5, 1.0])
    with pytest.raises(ValueError, match="labels must have shape"):
        metrics.aurc(PROBS, Y[:2], torch.zeros(4))


# ---------------------------------------------------------------- decomposition, stable rank
def test_decompose():
    g = torch.Generator().manual_seed(4)
    sample_probs = torch.softmax(2 * torch.randn(6, 9, 4, generator=g, dtype=torch.float64), -1)
    d = metrics.decompose(sample_probs)
    assert set(d) == {"total", "aleatoric", "epistemic"}
    assert torch.equal(d["total"], d["aleatoric"] + d["epistemic"])
    torch.testing.assert_close(d["total"], metrics.entropy(sample_probs.mean(0)), rtol=0,
                               atol=1e-12)
    torch.testing.assert_close(d["aleatoric"], metrics.expected_entropy(sample_probs))
    torch.testing.assert_close(d["epistemic"], metrics.mutual_information(sample_probs))
    # two members, each certain, disagreeing: all epistemic, log 2
    d = metrics.decompose(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64))
    assert d["epistemic"].item() == pytest.approx(math.log(2), abs=1e-10)
    assert d["aleatoric"].item() == pytest.approx(0.0, abs=1e-10)


def test_stable_rank_closed_forms():
    assert float(metrics.stable_rank(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)))
                 ) == pytest.approx(10 / 9, rel=1e-12)
    g = torch.Generator().manual_seed(1)
    u, v = torch.randn(7, 1, generator=g), torch.randn(1, 5, generator=g)
    assert float(metrics.stable_rank(u @ v)) == pytest.approx(1.0, rel=1e-5)  # rank one
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert float(metrics.stable_rank(2.5 * q[:, :4])) == pytest.approx(4.0, rel=1e-12)
    assert float(metrics.stable_rank(torch.zeros(3, 4))) == 0.0  # convention, not NaN
    assert float(metrics.stable_rank(torch.eye(3, dtype=torch.long))) == pytest.approx(3.0)
    batch = torch.randn(4, 2, 5, 3, generator=g, dtype=torch.float64)
    batch[1, 0] = 0.0
    out = metrics.stable_rank(batch)
    assert out.shape == (4, 2) and out[1, 0] == 0.0
    for i in range(4):
        for j in range(2):
            m = batch[i, j]
            s = torch.linalg.svdvals(m)
            ref = 0.0 if s[0] == 0 else float((s**2).sum() / s[0] ** 2)
            assert float(out[i, j]) == pytest.approx(ref, rel=1e-10)
            assert float(metrics.stable_rank(m.T)) == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match=r"needs a matrix \(\.\.\., m, n\), got shape \(3,\)"):
        metrics.stable_rank(torch.ones(3))


def test_summarize_with_ood_predictions():
    g = torch.Generator().manual_seed(6)
    sample_probs = torch.softmax(3 * torch.randn(4, 30, 3, generator=g, dtype=torch.float64), -1)
    ood_samples = torch.softmax(torch.randn(4, 20, 3, generator=g, dtype=torch.float64), -1)
    probs, y = sample_probs.mean(0), torch.randint(0, 3, (30,), generator=g)
    base = metrics.summarize(probs, y, sample_probs)
    out = metrics.summarize(probs, y, sample_probs, ood_sample_probs=ood_samples)
    assert {k: out[k] for k in base} == base
    assert out["auroc_entropy"] == float(metrics.auroc(metrics.entropy(probs),
                                                       metrics.entropy(ood_samples.mean(0))))
    assert out["auroc_mi"] == float(metrics.auroc(metrics.mutual_information(sample_probs),
                                                  metrics.mutual_information(ood_samples)))
    # flat OOD predictions have higher entropy than the sharp in-distribution ones
    assert out["auroc_entropy"] > 0.75
    only = metrics.summarize(probs, y, ood_probs=ood_samples.mean(0))
    assert only["auroc_entropy"] == out["auroc_entropy"] and "auroc_mi" not in only


# ---------------------------------------------------------------- adapter stable ranks
def test_adapter_stable_ranks_match_peft_delta_weight():
    from conftest import fake_finetune, mlp_peft, tiny_transformer

    from pyro_llm import BayesianLoRA
    from pyro_llm.diagnostics import adapter_stable_ranks, lora_deltas

    net = mlp_peft(r=2, hidden=8)
    assert adapter_stable_ranks(net) == {"base_model.model.0": 0.0, "base_model.model.2": 0.0}
    fake_finetune(net)
    deltas = lora_deltas(net)
    ranks = adapter_stable_ranks(net)
    assert list(ranks) == ["base_model.model.0", "base_model.model.2"]
    for name, module in net.named_modules():
        if name in deltas:  # peft's own Delta W (scaling * B @ A) as the oracle
            torch.testing.assert_close(deltas[name], module.get_delta_weight("default"))
            s = torch.linalg.svdvals(deltas[name].double())
            assert ranks[name] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-6)
            assert 1.0 <= ranks[name] <= 2.0 + 1e-9  # between 1 and r
    # a posterior draw keyed by site names with a prefix: a rank-one B gives stable rank 1,
    # entries it lacks come from the model, other entries (a head) are ignored
    lora = BayesianLoRA(net, prior=0.1, prefix="m")
    b_name = "base_model.model.0.lora_B.default.weight"
    draw = {lora.site_name(b_name): torch.ones(8, 2), "m.head.weight": torch.ones(3)}
    ranks2 = adapter_stable_ranks(net, draw)
    assert ranks2["base_model.model.0"] == pytest.approx(1.0, rel=1e-6)
    assert ranks2["base_model.model.2"] == ranks["base_model.model.2"]
    with pytest.raises(ValueError, match=r"has shape \(2, 2\).*pass one draw at a time"):
        adapter_stable_ranks(net, {b_name: torch.ones(2, 2)})
    # GPT-2 Conv1D (fan_in_fan_out): same stable ranks as peft's (transposed) delta
    gpt, _ = tiny_transformer("gpt2")
    fake_finetune(gpt)
    deltas = lora_deltas(gpt)
    assert len(deltas) == 2
    for name, module in gpt.named_modules():
        if name in deltas:
            ref = metrics.stable_rank(module.get_delta_weight("default").detach().double())
            assert adapter_stable_ranks(gpt)[name] == pytest.approx(float(ref), rel=1e-6)


def test_monte_carlo_error_matches_the_spread_over_independent_draw_sets():
    from pyro_llm.metrics import accuracy, ece, monte_carlo_error, nll

    g = torch.Generator().manual_seed(0)
    N, S = 400, 20
    margin = 0.6 * torch.randn(N, generator=g)
    y = (margin + 0.8 * torch.randn(N, generator=g) > 0).long()

    def draws():  # logit draws around each example's margin, sd 1.5
        d = margin + 1.5 * torch.randn(S, N, generator=g)
        return torch.stack([1 - d.sigmoid(), d.sigmoid()], -1)

    truth = {"accuracy": [], "ece": [], "nll": []}
    for _ in range(300):
        p = draws().mean(0)
        truth["accuracy"].append(float(accuracy(p, y)))
        truth["ece"].append(float(ece(p, y)))
        truth["nll"].append(float(nll(p, y)))
    est = monte_carlo_error(draws(), y)
    for k, v in truth.items():
        sd = float(torch.tensor(v).std())
        assert 0.6 * sd < est[k] < 1.6 * sd, (k, est[k], sd)
    same = torch.stack([draws()[0]] * 5)  # identical draws: no Monte Carlo error at all
    assert monte_carlo_error(same, y) == {"accuracy": 0.0, "ece": 0.0, "nll": 0.0}
    with pytest.raises(ValueError, match="S >= 2"):
        monte_carlo_error(same[:1], y)
