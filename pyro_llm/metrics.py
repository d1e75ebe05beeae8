"""Predictive metrics as plain tensor functions.

Every function takes class probabilities ``probs`` of shape ``(N, C)`` (or, for the
decomposition into aleatoric and epistemic parts, per-sample probabilities of shape
``(S, N, C)``) and integer labels ``y`` of shape ``(N,)``. They return 0-dim tensors
(or ``(N,)`` tensors for the per-example uncertainty measures), so they compose with
torch code and with each other.

Example
-------
>>> import torch
>>> probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
>>> y = torch.tensor([0, 1])
>>> float(accuracy(probs, y))
1.0
"""

from __future__ import annotations

import torch

__all__ = [
    "as_labels",
    "accuracy",
    "nll",
    "brier",
    "ece",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "reliability_bins",
    "summarize",
    "monte_carlo_error",
    "decompose",
    "auroc",
    "selective_accuracy",
    "aurc",
    "stable_rank",
]

_EPS = 1e-12


def as_labels(y, name: str = "labels") -> torch.Tensor:
    """Integer class labels as a ``long`` tensor: a tensor, array or list of ints, of bools, or of
    integral floats (a bfloat16 tensor too). NaN (an unlabelled row) and fractions are refused
    with the rows at fault: a metric, or a dataset, needs a label for every row."""
    if not isinstance(y, torch.Tensor):
        import numpy as np

        a = np.asarray(y)
        if a.dtype == object:  # e.g. a pandas column of True/False, or of numbers and None
            try:
                a = a.astype(float)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be integer class indices, got values such as "
                                 f"{a.reshape(-1)[:3].tolist()}; map class names to 0..C-1 first") from None
        y = torch.as_tensor(a)
    if y.is_floating_point():
        y = y.detach().double().cpu()
        missing = torch.nonzero(torch.isnan(y).reshape(-1)).reshape(-1)
        if missing.numel():
            raise ValueError(f"{name} must be integer class indices, but rows {missing[:5].tolist()} "
                             f"({missing.numel()} in all) hold NaN (unlabelled rows?); every row needs a "
                             "label here: keep only the labelled rows, e.g. keep = ~torch.isnan(y), "
                             "then accuracy(probs[keep], y[keep])")
        bad = torch.nonzero((~torch.isfinite(y) | (y != y.round())).reshape(-1)).reshape(-1)
        if bad.numel():
            raise ValueError(f"{name} must be integer class indices; row {int(bad[0])} holds "
                             f"{float(y.reshape(-1)[bad[0]])}")
    return y.long()


def _check(probs: torch.Tensor, y: torch.Tensor | None = None) -> None:
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape (N, C), got {tuple(probs.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("probs is empty: there is nothing to score")
    if not torch.isfinite(probs).all():
        raise ValueError("probs contains NaN or inf; check the model's outputs")
    if y is not None:
        if y.dim() != 1 or y.shape[0] != probs.shape[0]:
            raise ValueError(
                f"labels must have shape ({probs.shape[0]},) to match probs, got {tuple(y.shape)}"
            )
        y = as_labels(y)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= probs.shape[1]):
            raise ValueError(
                f"labels must lie in [0, {probs.shape[1] - 1}], got range "
                f"[{int(y.min())}, {int(y.max())}]"
            )


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose most probable class is the label."""
    _check(probs, y)
    return (probs.argmax(-1) == y).float().mean()


def nll(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean negative log predictive probability of the labels (nats)."""
    _check(probs, y)
    p = probs.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)
    return -(p.clamp_min(_EPS).log()).mean()


def brier(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the squared distance between ``probs`` and the one-hot label."""
    _check(probs, y)
    onehot = torch.nn.functional.one_hot(y.long(), probs.shape[-1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1).mean()


def reliability_bins(
    probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Equal-width confidence bins: ``(mean confidence, accuracy, count)`` per bin.

    Empty bins have count 0 and confidence/accuracy 0.
    """
    _check(probs, y)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = probs.max(-1)
    correct = (pred == y).to(probs.dtype)
    # bin k holds confidences in (k/n, (k+1)/n]; a confidence of exactly 0 goes to bin 0
    idx = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    count = torch.zeros(n_bins, dtype=probs.dtype).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=probs.dtype).index_add_(0, idx, conf)
    acc_sum = torch.zeros(n_bins, dtype=probs.dtype).index_add_(0, idx, correct)
    denom = count.clamp_min(1)
    return conf_sum / denom, acc_sum / denom, count


def ece(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Expected calibration error with ``n_bins`` equal-width bins on the top-class confidence."""
    conf, acc, count = reliability_bins(probs, y, n_bins)
    return (count / count.sum() * (conf - acc).abs()).sum()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each predictive distribution, shape ``(N,)`` (nats)."""
    return -(probs * probs.clamp_min(_EPS).log()).sum(-1)


def expected_entropy(sample_probs: torch.Tensor) -> torch.Tensor:
    """Aleatoric part: the mean over samples of each sample's entropy, shape ``(N,)``.

    ``sample_probs`` has shape ``(S, N, C)``: S posterior samples (or ensemble members).
    """
    if sample_probs.dim() != 3:
        raise ValueError(f"sample_probs must have shape (S, N, C), got {tuple(sample_probs.shape)}")
    return entropy(sample_probs).mean(0)


def mutual_information(sample_probs: torch.Tensor) -> torch.Tensor:
    """Epistemic part: entropy of the mean minus the mean entropy, shape ``(N,)``.

    Total predictive entropy = expected entropy + mutual information, exactly.
    """
    if sample_probs.dim() != 3:
        raise ValueError(f"sample_probs must have shape (S, N, C), got {tuple(sample_probs.shape)}")
    return (entropy(sample_probs.mean(0)) - expected_entropy(sample_probs)).clamp_min(0.0)


def summarize(
    probs: torch.Tensor,
    y: torch.Tensor,
    sample_probs: torch.Tensor | None = None,
    n_bins: int = 15,
    *,
    ood_probs: torch.Tensor | None = None,
    ood_sample_probs: torch.Tensor | None = None,
) -> dict[str, float]:
    """All metrics at once, as plain floats.

    ``mutual_information`` is added when ``sample_probs`` is given. With out-of-distribution
    predictions, ``auroc_entropy`` (``ood_probs``, or the mean of ``ood_sample_probs``) and,
    when both sample tensors are given, ``auroc_mi`` are added: how well the score tells
    the out-of-distribution examples from the in-distribution ones (see :func:`auroc`).
    """
    out = {
        "accuracy": float(accuracy(probs, y)),
        "ece": float(ece(probs, y, n_bins)),
        "nll": float(nll(probs, y)),
        "brier": float(brier(probs, y)),
        "entropy": float(entropy(probs).mean()),
    }
    if sample_probs is not None:
        out["mutual_information"] = float(mutual_information(sample_probs).mean())
    if ood_probs is None and ood_sample_probs is not None:
        ood_probs = ood_sample_probs.mean(0)
    if ood_probs is not None:
        out["auroc_entropy"] = float(auroc(entropy(probs), entropy(ood_probs)))
    if sample_probs is not None and ood_sample_probs is not None:
        out["auroc_mi"] = float(auroc(mutual_information(sample_probs),
                                      mutual_information(ood_sample_probs)))
    return out


def monte_carlo_error(sample_probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15,
                      num_resamples: int = 200, seed: int = 0) -> dict[str, float]:
    """The Monte Carlo standard error of ``accuracy``, ``ece`` and ``nll`` of the predictive mean
    of ``S`` draws ``(S, N, C)``: the standard deviation of each metric over ``num_resamples``
    bootstrap resamples of the draws (the same ``S``, with replacement). It is the noise of the
    metric due to drawing ``S`` samples, not the test set's sampling error: a difference between
    two methods smaller than a few of these is not an effect of the method. Antithetic or
    otherwise dependent draws make it conservative (resampling breaks their pairing).
    """
    if sample_probs.dim() != 3 or sample_probs.shape[0] < 2:
        raise ValueError(f"sample_probs must be (S, N, C) with S >= 2, got {tuple(sample_probs.shape)}")
    if num_resamples < 2:
        raise ValueError(f"num_resamples must be >= 2, got {num_resamples}")
    g = torch.Generator().manual_seed(seed)
    S = sample_probs.shape[0]
    vals = {"accuracy": [], "ece": [], "nll": []}
    for _ in range(num_resamples):
        p = sample_probs[torch.randint(0, S, (S,), generator=g)].mean(0)
        vals["accuracy"].append(float(accuracy(p, y)))
        vals["ece"].append(float(ece(p, y, n_bins)))
        vals["nll"].append(float(nll(p, y)))
    return {k: float(torch.tensor(v, dtype=torch.float64).std()) for k, v in vals.items()}


def decompose(sample_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example uncertainty split into ``total``, ``aleatoric`` and ``epistemic`` parts.

    ``aleatoric`` is the expected entropy, ``epistemic`` the mutual information (clamped at
    0 against rounding) and ``total = aleatoric + epistemic`` exactly; it equals the entropy
    of the mean prediction up to rounding. Each has shape ``(N,)`` (nats).

    Example
    -------
    >>> import torch
    >>> d = decompose(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))  # two confident, opposed
    >>> [round(float(d[k][0]), 4) for k in ("total", "aleatoric", "epistemic")]
    [0.6931, 0.0, 0.6931]
    """
    aleatoric = expected_entropy(sample_probs)
    epistemic = mutual_information(sample_probs)
    return {"total": aleatoric + epistemic, "aleatoric": aleatoric, "epistemic": epistemic}


def _scores(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of scores, got shape "
                         f"{tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; check the uncertainty scores")
    return x.double()


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x`` with tied values given the mean of their ranks."""
    values, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True,
                                                  return_counts=True)
    start = torch.cumsum(counts, 0) - counts  # 0-based first position of each tie group
    group_rank = start.double() + (counts.double() + 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = group_rank[inverse]
    return ranks


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve for telling ``scores_out`` (positives) from ``scores_in``.

    The Mann-Whitney statistic: the probability that an out-of-distribution example scores
    higher than an in-distribution one, ties counted 1/2. 1 is perfect separation, 0.5 is
    chance. Scores are any per-example uncertainty (entropy, mutual information), higher
    meaning more uncertain.

    Example
    -------
    >>> import torch
    >>> float(auroc(torch.tensor([0.1, 0.2, 0.5]), torch.tensor([0.5, 0.9])))
    0.9166666666666666
    """
    s_in, s_out = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    ranks = _average_ranks(torch.cat([s_in, s_out]))
    n_in, n_out = s_in.numel(), s_out.numel()
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return u / (n_in * n_out)


def _correct_in_order(probs, y, scores) -> torch.Tensor:
    _check(probs, y)
    scores = _scores(scores, "scores")
    if scores.numel() != probs.shape[0]:
        raise ValueError(f"scores must have shape ({probs.shape[0]},) to match probs, got "
                         f"{tuple(scores.shape)}")
    order = torch.sort(scores, stable=True).indices  # least uncertain first; ties by index
    return (probs.argmax(-1) == y).double()[order]


def selective_accuracy(
    probs: torch.Tensor, y: torch.Tensor, scores: torch.Tensor, fractions=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy on the examples kept after setting aside the most uncertain ones.

    For each rejected fraction ``f`` the ``max(1, round((1 - f) N))`` examples with the
    lowest ``scores`` are kept (ties broken by position, so results are deterministic).
    Default fractions: every achievable one, ``0, 1/N, ..., (N-1)/N``.

    Returns
    -------
    (coverage, accuracy):
        Float64 tensors, one entry per fraction; coverage is the kept share ``k / N``.

    Example
    -------
    >>> import torch
    >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    >>> cov, acc = selective_accuracy(probs, torch.tensor([0, 1, 1]),
    ...                               torch.tensor([0.1, 0.9, 0.3]), fractions=[0.0, 1 / 3])
    >>> acc.tolist()
    [0.6666666666666666, 1.0]
    """
    correct = _correct_in_order(probs, y, scores)
    n = correct.numel()
    if fractions is None:
        kept = torch.arange(n, 0, -1)
    else:
        f = torch.as_tensor(fractions, dtype=torch.float64).reshape(-1)
        if f.numel() == 0 or ((f < 0) | (f >= 1) | ~torch.isfinite(f)).any():
            raise ValueError(f"fractions must be non-empty and lie in [0, 1), got {f.tolist()}")
        kept = torch.round((1 - f) * n).long().clamp_min(1)
    cum = torch.cumsum(correct, 0)
    return kept.double() / n, cum[kept - 1] / kept.double()


def aurc(probs: torch.Tensor, y: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Area under the risk-coverage curve (lower is better; Geifman et al., 2019).

    The mean, over coverages ``k / N`` for ``k = 1..N``, of the error rate on the ``k``
    least uncertain examples. An oracle score gets ``err + (1 - err) log(1 - err)`` in the
    large-``N`` limit, a score unrelated to the errors about ``err``.

    Example
    -------
    >>> import torch
    >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    >>> float(aurc(probs, torch.tensor([0, 1]), torch.tensor([0.1, 0.9])))
    0.25
    """
    correct = _correct_in_order(probs, y, scores)
    k = torch.arange(1, correct.numel() + 1, dtype=torch.float64)
    return (1 - torch.cumsum(correct, 0) / k).mean()


def stable_rank(matrix: torch.Tensor) -> torch.Tensor:
    """``||M||_F^2 / ||M||_2^2``, batched over leading dimensions.

    A smooth count of the directions a matrix uses: between 1 and ``rank(M)``, equal to the
    rank when all non-zero singular values are equal. A zero matrix has stable rank 0 (by
    convention here, rather than 0/0).

    Example
    -------
    >>> import torch
    >>> float(stable_rank(torch.diag(torch.tensor([3.0, 1.0]))))
    1.1111111640930176
    """
    matrix = torch.as_tensor(matrix)
    if matrix.dim() < 2:
        raise ValueError(f"stable_rank needs a matrix (..., m, n), got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        matrix = matrix.double()
    fro2 = matrix.pow(2).sum((-2, -1))
    spec2 = torch.linalg.matrix_norm(matrix, ord=2).pow(2)
    return torch.where(spec2 > 0, fro2 / spec2.clamp_min(torch.finfo(spec2.dtype).tiny),
                       torch.zeros_like(fro2))
