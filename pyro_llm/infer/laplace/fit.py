"""``fit_laplace``: a post-hoc Laplace posterior over the LoRA weights of a MAP-fine-tuned model.

One pass over the training data (streamed, with a progress bar) collects the curvature of
the log-likelihood at the fine-tuned weights, per site, in the requested structure; the
prior precision is then chosen by the Laplace marginal likelihood (no validation set).

Under torch.distributed (a process group of more than one rank) each rank streams its shard of
the data (:func:`~pyro_llm.infer.distributed.shard`); the sums -- exact factors, diagonals, the
dense curvature, the number of examples and the log-likelihood -- are all-reduced before the
blocks are formed, so every rank holds the single-process posterior (to round-off) for
``curvature="ggn"`` or ``"empirical"``. A low-rank factor is a rank-``k`` square root per rank;
they are all-gathered and cut to the best rank ``k`` of their sum (:meth:`Factor.combine`). That
equals the single-process factor when the sketch is exact (the rows span at most ``k``
directions) and is otherwise a different rank-``k`` approximation of the same sum: one process
truncates after every batch, the ranks truncate their shards and then the merged sum (measured
on a 16-32-4 MLP, 400 examples, ``n_kfac`` 4 and 8, 2 and 4 ranks: relative Frobenius errors
against exact KFAC 0.026-0.247 merged, 0.025-0.242 in one process).
``curvature="fisher"`` samples labels with seed ``seed + 1_000_003 * rank``: a valid sampled
Fisher, not the single-process draws.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ...adapter_state import initial_values
from ...lora import BayesianLoRA, find_lora_parameters
from ...readout import default_labels, default_logits
from .. import distributed as _dist
from ..config import takes_config
from .blocks import DiagBlock, Factor, FullBlock, KronBlock, gram
from .capture import CURVATURES, check_logits, curvature_vectors, tapped
from .posterior import LaplacePosterior

__all__ = ["fit_laplace", "last_layer_names", "estimate_memory", "STRUCTURES"]

STRUCTURES = ("kfac", "lowrank_kfac", "diag", "full")


def last_layer_names(peft_model: torch.nn.Module) -> list[str]:
    """The last layer's trainable tensors: a ``modules_to_save`` head's weight and bias if the model
    has one (a sequence classifier), else the last LoRA layer's A and B (e.g. a causal LM's last
    adapted projection). The sites of the last-layer Laplace (LLLA)."""
    params = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    head = [n for n, _ in params if ".modules_to_save." in n]
    if head:
        last_mod = head[-1].rpartition(".")[0]
        return [n for n in head if n.rpartition(".")[0] == last_mod]
    return find_lora_parameters(peft_model)[-2:]


def _fmt(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.1f} {unit}"
        b /= 1024
    return ""


def estimate_memory(shapes: list[tuple], structure: str, n_kfac: int = 10, batch_rows: int = 0) -> int:
    """Bytes the curvature of ``structure`` keeps for sites of these shapes (float64, with the
    eigendecompositions); ``batch_rows`` adds the low-rank update's working copy."""
    if structure == "full":
        p = sum(math.prod(s) for s in shapes)
        return 3 * 8 * p * p
    total = 0
    for s in shapes:
        if structure == "diag" or len(s) != 2:
            total += 2 * 8 * math.prod(s)
            continue
        for d in s:  # the output factor (out x out) and the input factor (in x in)
            if structure == "lowrank_kfac" and d > n_kfac:
                total += 8 * d * (2 * n_kfac + batch_rows)
            else:
                total += 2 * 8 * d * d
    return total


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _check_memory(shapes, structure, n_kfac, max_memory) -> int:
    need = estimate_memory(shapes, structure, n_kfac)
    limit = max_memory if max_memory is not None else _available_memory()
    if limit is not None and max_memory is None:
        limit = limit // 2
    if limit is not None and need > limit:
        alt = {s: _fmt(estimate_memory(shapes, s, n_kfac)) for s in ("lowrank_kfac", "diag")}
        raise MemoryError(
            f"structure={structure!r} needs about {_fmt(need)} for the curvature of {len(shapes)} sites "
            f"(largest {max(shapes, key=math.prod)}), more than the limit of {_fmt(limit)}; use "
            f"structure='lowrank_kfac' (n_kfac={n_kfac}: about {alt['lowrank_kfac']}) or 'diag' "
            f"(about {alt['diag']}), or raise max_memory=")
    return need


def _as_lora(model, select) -> BayesianLoRA:
    if isinstance(model, BayesianLoRA):
        return model
    if isinstance(select, str) and select == "last_layer":
        select = last_layer_names(model)
    return BayesianLoRA(model, select=select)


def _prior_centre(peft, names, prior_mean) -> tuple[str, dict]:
    """``(how, {peft name: tensor})``: the prior's centre per site (missing names: zero)."""
    if isinstance(prior_mean, str):
        if prior_mean not in ("auto", "init", "zero"):
            raise ValueError(f"prior_mean must be 'auto', 'init', 'zero' or a dict of tensors, "
                             f"got {prior_mean!r}")
        if prior_mean == "zero":
            return "zero", {}
        try:
            values = initial_values(peft)
        except ValueError:
            if prior_mean == "init":
                raise
            return "zero", {}
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"the recorded initial values lack {missing[:2]}: record_init ran on "
                             "another model or before the adapter was added; pass prior_mean='zero'")
        return "init", {n: values[n] for n in names}
    unknown = sorted(set(prior_mean) - set(names))
    if unknown:
        raise ValueError(f"prior_mean has {unknown[:2]}, which are not Laplace sites (peft parameter "
                         f"names such as {names[0]!r})")
    return "given", dict(prior_mean)


def _validate(structure, curvature, kfac_approx, n_kfac, names, shapes):
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; choose one of {STRUCTURES}")
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; choose one of {CURVATURES}")
    if kfac_approx not in ("expand", "reduce"):
        raise ValueError(f"kfac_approx must be 'expand' or 'reduce', got {kfac_approx!r}")
    if structure == "lowrank_kfac" and (not isinstance(n_kfac, int) or n_kfac < 1):
        raise ValueError(f"n_kfac must be a positive int, got {n_kfac!r}")
    if structure in ("kfac", "lowrank_kfac"):
        bad = [n for n, s in zip(names, shapes, strict=True) if len(s) != 2]
        if bad:
            raise ValueError(f"KFAC covers weight matrices; {bad[0]!r} has shape "
                             f"{shapes[names.index(bad[0])]}: use structure='diag' or 'full' for biases")


class _Accumulator:
    """Sums the per-batch statistics of one structure; ``blocks(n)`` turns them into blocks."""

    def __init__(self, names, shapes, structure, n_kfac, kfac_approx):
        self.names, self.shapes, self.structure = names, shapes, structure
        self.approx = kfac_approx
        rank = n_kfac if structure == "lowrank_kfac" else None
        if structure in ("kfac", "lowrank_kfac"):
            self.G = [Factor(s[0], rank) for s in shapes]
            self.A = [Factor(s[1], rank) for s in shapes]
        elif structure == "diag":
            self.D = [torch.zeros(s, dtype=torch.float64) for s in shapes]
        else:
            P = sum(math.prod(s) for s in shapes)
            self.H = torch.zeros(P, P, dtype=torch.float64)

    def add_inputs(self, tap) -> None:
        if not hasattr(self, "A"):
            return
        grams = {}  # one product per distinct input: the q and v adapters of a block read the same one
        for i, n in enumerate(self.names):
            a = tap.inputs[tap.owner[n][0]]
            key = id(a)
            a = a.reshape(a.shape[0], -1, a.shape[-1])
            rows = a / a.shape[1] ** 0.5 if self.approx == "expand" else a.mean(1)
            if self.A[i].rank is not None:
                self.A[i].add(rows)
                continue
            if key not in grams:
                grams[key] = gram(rows, self.A[i].dim)
            self.A[i].add_gram(grams[key])

    def add_grads(self, tap, g) -> None:
        for i, n in enumerate(self.names):
            if hasattr(self, "G"):
                go = g[tap.owner[n][0]]
                go = go.reshape(go.shape[0], -1, go.shape[-1])
                self.G[i].add(go if self.approx == "expand" else go.sum(1))
            elif hasattr(self, "D"):
                self.D[i] += tap.per_example(n, g).double().square().sum(0).cpu()
        if hasattr(self, "H"):
            J = torch.cat([tap.per_example(n, g).double().flatten(1) for n in self.names], 1).cpu()
            self.H.addmm_(J.T, J)

    def blocks(self, n: int) -> list:
        if self.structure == "full":
            return [FullBlock(list(range(len(self.names))), self.shapes, self.H)]
        if self.structure == "diag":
            return [DiagBlock(i, s, d) for i, (s, d) in enumerate(zip(self.shapes, self.D, strict=True))]
        out = []
        for i, s in enumerate(self.shapes):
            QG, lG = self.G[i].eig()
            QA, lA = self.A[i].eig(1.0 / n)  # A is the mean input outer product, G the sum
            out.append(KronBlock(i, s, QG, lG, QA, lA))
        return out

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks (each rank accumulated its own shard), in place."""
        _dist.all_reduce_sum(*getattr(self, "D", []), *([self.H] if hasattr(self, "H") else []))
        for f in getattr(self, "G", []) + getattr(self, "A", []):
            if f.rank is None:
                _dist.all_reduce_sum(f.S)
            else:  # pad to k columns (zeros add nothing) so every rank sends one shape
                U = torch.cat([f.U, f.U.new_zeros(f.dim, f.rank - f.U.shape[1])], 1)
                f.combine(_dist.all_gather(U))


@takes_config
def fit_laplace(
    model,
    data: Iterable,
    *,
    structure: str = "kfac",
    curvature: str = "fisher",
    select="AB",
    n_kfac: int = 10,
    kfac_approx: str = "expand",
    mc_samples: int = 1,
    prior_precision: float = 1.0,
    optimize_prior: str | None = "marglik",
    per_site: bool = False,
    prior_groups: str = "AB",
    prior_mean="auto",
    logits_fn: Callable | None = None,
    labels_fn: Callable | None = None,
    max_memory: int | None = None,
    progress: bool = True,
    seed: int | None = 0,
) -> LaplacePosterior:
    """Post-hoc Laplace over the LoRA weights of a fine-tuned peft model (Laplace-LoRA).

    Parameters
    ----------
    model:
        A :class:`~pyro_llm.BayesianLoRA` (its random sites are the Laplace sites) or a peft
        model (wrapped with ``select``; ``select="last_layer"`` gives the LLLA sites, see
        :func:`last_layer_names`). The peft model's current weights are the MAP.
    data:
        The training data, re-iterable batches (a ``DataLoader``); one pass, streamed.
    structure:
        ``"kfac"`` (Kronecker factors per matrix, A and B of each adapter as two layers),
        ``"lowrank_kfac"`` (factors larger than ``n_kfac`` kept at rank ``n_kfac``, updated batch by
        batch), ``"diag"``, or ``"full"`` (dense over all sites: for the last layer).
    curvature:
        ``"fisher"`` (sampled labels, ``mc_samples`` per example; the default, as Laplace-LoRA),
        ``"empirical"`` (true labels) or ``"ggn"`` (exact GGN, C - 1 backward passes per batch).
    kfac_approx:
        How KFAC treats token positions: ``"expand"`` (each position a data point; the input factor
        averages over positions) or ``"reduce"`` (positions averaged, gradients summed first).
    prior_precision, optimize_prior, prior_groups, per_site:
        The Gaussian prior's precision; ``optimize_prior="marglik"`` maximises the Laplace marginal
        likelihood over it: one value for the ``A`` sites and one for the ``B`` sites (and one for
        any other, such as a head: ``prior_groups="AB"``, the default; peft starts ``B`` at zero
        and ``A`` at random, so their scales differ), one value (``"one"``, Laplace-LoRA's
        recipe), or one per site (``"site"``, also ``per_site=True``); ``None`` keeps it.
    prior_mean:
        The prior's centre: ``"init"``, the tensors as they were before fine-tuning (recorded by
        :func:`~pyro_llm.adapter_state.record_init`, which the model builders of
        :mod:`pyro_llm.models` call); ``"zero"``; ``"auto"`` (the default: ``"init"`` where recorded,
        else ``"zero"``); or ``{peft parameter name: tensor}``. peft starts ``B`` at zero but ``A``
        at random: a zero-centred prior counts ``A``'s random start as fitted signal, its scatter
        term then drives the evidence-optimal precision down, and the posterior widens.
    logits_fn, labels_fn:
        ``logits_fn(model, batch) -> (B, C)`` logits and ``labels_fn(batch) -> (B,)`` labels; the
        defaults read Hugging Face dict batches (``model(**inputs).logits``, ``batch["labels"]``) or
        ``(x, y)`` tuples.
    max_memory:
        Bytes the curvature may take; default half the available memory. A larger estimate raises a
        ``MemoryError`` naming it, before any data is read.

    Example
    -------
    >>> la = fit_laplace(peft_model, train_loader)                      # doctest: +SKIP
    >>> probs = la.predict(test_loader, pred_type="glm", link="mc")    # (S, N, C)  # doctest: +SKIP
    """
    lora = _as_lora(model, select)
    peft = lora.peft_model
    names = list(lora.random_names)
    shapes = [tuple(peft.get_parameter(n).shape) for n in names]
    _validate(structure, curvature, kfac_approx, n_kfac, names, shapes)
    _check_memory(shapes, structure, n_kfac, max_memory)
    logits_fn = logits_fn or default_logits
    labels_fn = labels_fn or default_labels
    distributed = _dist.is_distributed()
    rank_seed = None if seed is None else seed + 1_000_003 * (_dist.rank() if distributed else 0)
    gen = torch.Generator().manual_seed(rank_seed) if seed is not None else None
    acc = _Accumulator(names, shapes, structure, n_kfac, kfac_approx)
    n, loglik = 0, 0.0
    total = len(data) if hasattr(data, "__len__") else None
    with tapped(peft, names) as tap:
        show = progress and (not distributed or _dist.rank() == 0)
        for batch in tqdm(data, total=total, disable=not show, desc=f"laplace {structure}", leave=False):
            tap.clear()
            logits = logits_fn(peft, batch)
            y = labels_fn(batch)
            if y is None:
                raise ValueError("the batches carry no labels; pass labels_fn=lambda batch: ...")
            y = torch.as_tensor(y, device=logits.device)
            check_logits(logits, y)
            tap.check_ran()
            loglik += float(logits.detach().double().log_softmax(-1).gather(1, y.long()[:, None]).sum())
            n += logits.shape[0]
            acc.add_inputs(tap)
            for v in curvature_vectors(logits, y, curvature, mc_samples, gen):
                acc.add_grads(tap, tap.output_grads(logits, v))
    if distributed:  # every rank saw its shard: sum over the ranks
        totals = torch.tensor([n, loglik], dtype=torch.float64)
        _dist.all_reduce_sum(totals)
        n, loglik = int(totals[0]), float(totals[1])
        acc.all_reduce()
    if n == 0:
        raise ValueError("the data yielded no batch: nothing to fit")
    map_values = {lora.site_name(nm): peft.get_parameter(nm).detach().clone() for nm in names}
    centre, means = _prior_centre(peft, names, prior_mean)
    meta = dict(structure=structure, curvature=curvature, n_kfac=n_kfac, kfac_approx=kfac_approx,
                mc_samples=mc_samples, prior_mean=centre, prior_groups="site" if per_site else prior_groups)
    la = LaplacePosterior([lora.site_name(nm) for nm in names], shapes, map_values, acc.blocks(n),
                          prior_precision, loglik, n, meta, lora=lora,
                          prior_mean={lora.site_name(nm): v for nm, v in means.items()})
    la.logits_fn = logits_fn
    if optimize_prior == "marglik":
        la.optimize_prior_precision(per_site=per_site, groups=prior_groups)
    elif optimize_prior is not None:
        raise ValueError(f"optimize_prior must be 'marglik' or None, got {optimize_prior!r}; for a "
                         "validation grid use pyro_llm.infer.laplace.gridsearch_prior_precision")
    # a diagnostic only: LoRA's curvature has low rank, so the share is small even where Laplace
    # calibrates well (MiniLM); it does not separate a prior-ruled posterior from a good one alone
    la.meta["curvature_above_prior"] = la.curvature_above_prior()
    return la
