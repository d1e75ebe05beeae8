"""Curvature blocks of a Laplace posterior: Kronecker-factored, diagonal, dense.

A block holds the curvature ``H`` (Fisher / GGN / empirical Fisher) of one or more sites;
with a prior precision ``delta`` per site the posterior precision is ``H + delta I``. Every
block answers the same five questions, so the posterior code never asks which kind it has:

* ``logdet(delta)`` -- log det of the posterior precision;
* ``sample(delta, n, generator)`` -- ``n`` draws of the deviation from the MAP, per site;
* ``variance(J, delta)`` -- ``J Sigma J^T`` for Jacobians ``J`` (the linearised predictive);
* ``mahalanobis(x, delta)`` -- ``x^T (H + delta) x`` (the log density);
* ``tensors()`` / ``from_tensors`` -- save and load with safetensors.

A weight matrix ``W`` (out x in) is vectorised row-major, so its KFAC block is ``G (x) A``
with ``G`` (out x out) the output-gradient factor and ``A`` (in x in) the input factor. A
:class:`Factor` is either the exact running sum of outer products or, for a large
dimension, a rank-``k`` square root updated batch by batch (no d x d matrix is formed):
the low-rank KFAC of Laplace-LoRA. Eigenvalues outside a low-rank factor's span are zero,
so there the posterior precision is the prior's.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Factor", "KronBlock", "DiagBlock", "FullBlock", "BLOCKS"]

DTYPE = torch.float64


def gram(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """``R^T R`` of one batch's rows ``R`` (``(..., dim)``). On the CPU in float64, like the
    running sum; on an accelerator in float32 where the rows live (half precision upcast), so
    that only the ``dim x dim`` result crosses to the CPU, not the rows in float64."""
    rows = rows.detach().reshape(-1, dim)
    rows = rows.to(DTYPE) if rows.device.type == "cpu" else rows.float()
    return rows.T @ rows


class Factor:
    """Running ``sum_rows r r^T`` of ``(m, dim)`` rows: exact, or a rank-``rank`` square root.

    The low-rank update keeps ``U`` (dim x rank) with ``U U^T`` the top-``rank`` part of
    ``U U^T + R^T R`` for each new batch ``R``, found by a randomised range finder on that
    sum as an operator (Halko et al. 2011), started from the current basis plus
    ``oversample`` random directions, with ``power_iters`` power iterations: its cost is
    ``O(m dim (rank + oversample))`` per batch and no dim x dim matrix is formed. It is exact
    when the accumulated rows span at most ``rank + oversample`` directions.
    """

    def __init__(self, dim: int, rank: int | None = None, oversample: int = 10, power_iters: int = 2,
                 seed: int = 0):
        self.dim = int(dim)
        self.rank = int(rank) if rank is not None and rank < dim else None
        if self.rank is None:
            self.S = torch.zeros(dim, dim, dtype=DTYPE)
        else:
            self.U = torch.zeros(dim, 0, dtype=DTYPE)
            self.q = min(self.dim, self.rank + oversample)
            self.power_iters = power_iters
            self._gen = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        if self.rank is None:
            self.add_gram(gram(rows, self.dim))
            return
        rows = rows.detach().reshape(-1, self.dim).to(DTYPE).cpu()
        U = self.U
        if U.shape[1] + rows.shape[0] <= self.rank:  # still exact: keep the rows themselves
            self.U = torch.cat([U, rows.T], 1)
            return

        def apply(X):  # (U U^T + R^T R) X without forming the sum
            return U @ (U.T @ X) + rows.T @ (rows @ X)

        start = torch.randn(self.dim, self.q, dtype=DTYPE, generator=self._gen)
        if U.shape[1]:
            start[:, : U.shape[1]] = U
        Q = torch.linalg.qr(apply(start)).Q
        for _ in range(self.power_iters):
            Q = torch.linalg.qr(apply(Q)).Q
        lam, V = torch.linalg.eigh(Q.T @ apply(Q))
        top = lam.flip(0)[: self.rank].clamp_min(0.0)
        self.U = (Q @ V.flip(1)[:, : self.rank]) * top.sqrt()

    def add_gram(self, g: torch.Tensor) -> None:
        """Add a batch's ``R^T R`` (from :func:`gram`) to an exact factor."""
        if self.rank is not None:
            raise ValueError("add_gram() is for exact factors; a low-rank factor needs the rows (add)")
        self.S += g.to(DTYPE).cpu()

    def combine(self, roots: list[torch.Tensor]) -> None:
        """Replace a low-rank factor by the best rank-``k`` part of ``sum_i R_i R_i^T``.

        ``roots`` are square roots ``R_i`` (``dim x k_i``), e.g. the ``U`` of the factors that
        several processes accumulated on their shards. With ``W = [R_1 ... R_m] = Q S V^T`` (thin
        SVD), ``sum_i R_i R_i^T = W W^T = Q S^2 Q^T``, so ``U = Q_k S_k`` is its best rank-``k``
        approximation (Eckart-Young), exact when ``rank(W) <= k``. All-zero columns are dropped.
        """
        if self.rank is None:
            raise ValueError("combine() is for low-rank factors; sum the exact factors' S instead")
        W = torch.cat([r.detach().to(DTYPE).cpu().reshape(self.dim, -1) for r in roots], 1)
        W = W[:, W.abs().amax(0) > 0]
        if W.shape[1] <= self.rank:
            self.U = W
            return
        Q, s, _ = torch.linalg.svd(W, full_matrices=False)
        self.U = Q[:, : self.rank] * s[: self.rank]

    def eig(self, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvectors ``(dim, k)`` and eigenvalues ``(k,)`` of ``scale * sum r r^T``."""
        if self.rank is None:
            lam, Q = torch.linalg.eigh(self.S * scale)
            return Q, lam.clamp_min(0.0)
        Q, s, _ = torch.linalg.svd(self.U, full_matrices=False)
        return Q, s.square() * scale


def _as_delta(delta, n: int) -> torch.Tensor:
    d = torch.as_tensor(delta, dtype=DTYPE).reshape(-1)
    return d.expand(n) if d.numel() == 1 else d


class KronBlock:
    """One weight matrix (out x in) with curvature ``G (x) A`` in eigenbases ``QG``, ``QA``."""

    kind = "kron"

    def __init__(self, site: int, shape, QG, lG, QA, lA):
        self.sites, self.shape = [site], tuple(shape)
        self.QG, self.lG, self.QA, self.lA = (t.to(DTYPE) for t in (QG, lG, QA, lA))
        self.E = torch.outer(self.lG, self.lA)
        self.lowrank = self.E.numel() < math.prod(self.shape)

    def dense(self) -> torch.Tensor:
        """The curvature as a dense (D x D) matrix, for checks on small sites."""
        G = self.QG @ torch.diag(self.lG) @ self.QG.T
        A = self.QA @ torch.diag(self.lA) @ self.QA.T
        return torch.kron(G, A)

    def _t(self, x: torch.Tensor) -> torch.Tensor:
        return self.QG.T @ x.to(DTYPE) @ self.QA

    def logdet(self, delta) -> torch.Tensor:
        d = _as_delta(delta, 1)[0]
        rest = math.prod(self.shape) - self.E.numel()
        return torch.log(self.E + d).sum() + rest * torch.log(d)

    def sample(self, delta, n: int, generator=None) -> list[torch.Tensor]:
        d = _as_delta(delta, 1)[0]
        e1 = torch.randn((n, *self.E.shape), dtype=DTYPE, generator=generator)
        x = self.QG @ (e1 / (self.E + d).sqrt()) @ self.QA.T
        if self.lowrank:  # the complement of the factors' span has the prior's precision
            e2 = torch.randn((n, *self.shape), dtype=DTYPE, generator=generator)
            x = x + (e2 - self.QG @ self._t(e2) @ self.QA.T) / d.sqrt()
        return [x]

    def variance(self, J: list[torch.Tensor], delta, split: bool = False):
        d = _as_delta(delta, 1)[0]
        J0 = J[0].to(DTYPE)
        t = self._t(J0)
        w = 1 / (self.E + d)
        out = torch.einsum("bcij,bdij->bcd", t * w, t)
        rest = 0.0
        if self.lowrank:
            rest = (torch.einsum("bcij,bdij->bcd", J0, J0) - torch.einsum("bcij,bdij->bcd", t, t)) / d
            out = out + rest
        if not split:
            return out
        return out, torch.einsum("bcij,bdij->bcd", t * w * (self.E < d), t) + rest

    def mahalanobis(self, x: list[torch.Tensor], delta) -> torch.Tensor:
        d = _as_delta(delta, 1)[0]
        x0 = x[0].to(DTYPE)
        t = self._t(x0)
        out = (t.square() * (self.E + d)).sum((-2, -1))
        if self.lowrank:
            out = out + d * (x0.square().sum((-2, -1)) - t.square().sum((-2, -1)))
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"QG": self.QG, "lG": self.lG, "QA": self.QA, "lA": self.lA}

    @classmethod
    def from_tensors(cls, sites, shapes, t):
        return cls(sites[0], shapes[0], t["QG"], t["lG"], t["QA"], t["lA"])


class DiagBlock:
    """One site with a diagonal curvature of the site's shape."""

    kind = "diag"

    def __init__(self, site: int, shape, diag: torch.Tensor):
        self.sites, self.shape = [site], tuple(shape)
        self.diag = diag.to(DTYPE).reshape(self.shape)

    def dense(self) -> torch.Tensor:
        return torch.diag(self.diag.reshape(-1))

    def logdet(self, delta) -> torch.Tensor:
        return torch.log(self.diag + _as_delta(delta, 1)[0]).sum()

    def sample(self, delta, n: int, generator=None) -> list[torch.Tensor]:
        e = torch.randn((n, *self.shape), dtype=DTYPE, generator=generator)
        return [e / (self.diag + _as_delta(delta, 1)[0]).sqrt()]

    def variance(self, J: list[torch.Tensor], delta, split: bool = False):
        J0 = J[0].to(DTYPE).flatten(2)
        d, h = _as_delta(delta, 1)[0], self.diag.reshape(-1)
        Jw = J0 / (h + d)
        out = torch.einsum("bcp,bdp->bcd", Jw, J0)
        return (out, torch.einsum("bcp,bdp->bcd", Jw * (h < d), J0)) if split else out

    def mahalanobis(self, x: list[torch.Tensor], delta) -> torch.Tensor:
        x0 = x[0].to(DTYPE).flatten(x[0].dim() - len(self.shape))
        return (x0.square() * (self.diag.reshape(-1) + _as_delta(delta, 1)[0])).sum(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"diag": self.diag}

    @classmethod
    def from_tensors(cls, sites, shapes, t):
        return cls(sites[0], shapes[0], t["diag"])


class FullBlock:
    """Several sites with one dense curvature over their concatenation (e.g. the last layer).

    With one prior precision for the whole block, ``H`` is eigendecomposed once and every
    operation (log det, draws, variances, the marginal likelihood's gradient) is a cheap
    diagonal one in that basis; per-site precisions that differ fall back to a Cholesky.
    """

    kind = "full"

    def __init__(self, sites: list[int], shapes: list[tuple], H: torch.Tensor):
        self.sites, self.shapes = list(sites), [tuple(s) for s in shapes]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.H = H.to(DTYPE)
        self._chol_key, self._chol, self._eigh = None, None, None

    def dense(self) -> torch.Tensor:
        return self.H

    def _uniform(self, delta) -> torch.Tensor | None:
        """The block's single prior precision, or None if its sites have different ones."""
        d = _as_delta(delta, len(self.sites))
        if bool((d.detach() == d.detach()[0]).all()):
            if self._eigh is None:
                lam, Q = torch.linalg.eigh(self.H)
                self._eigh = (lam.clamp_min(0.0), Q)
            return d[0]
        return None

    def _L(self, delta) -> torch.Tensor:
        d = _as_delta(delta, len(self.sites))
        key = tuple(d.tolist())
        if self._chol_key != key or d.requires_grad:
            dv = torch.cat([di.expand(n) for di, n in zip(d, self.sizes, strict=True)])
            L = torch.linalg.cholesky(self.H + torch.diag(dv))
            if d.requires_grad:
                return L
            self._chol_key, self._chol = key, L
        return self._chol

    def logdet(self, delta) -> torch.Tensor:
        d0 = self._uniform(delta)
        if d0 is not None:
            return torch.log(self._eigh[0] + d0).sum()
        return 2 * torch.log(torch.diagonal(self._L(delta))).sum()

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        parts = flat.split(self.sizes, dim=-1)
        return [p.reshape(*flat.shape[:-1], *s) for p, s in zip(parts, self.shapes, strict=True)]

    def sample(self, delta, n: int, generator=None) -> list[torch.Tensor]:
        e = torch.randn((sum(self.sizes), n), dtype=DTYPE, generator=generator)
        d0 = self._uniform(delta)
        if d0 is not None:
            lam, Q = self._eigh
            return self._split((Q @ (e / (lam + d0).sqrt()[:, None])).T)
        x = torch.linalg.solve_triangular(self._L(delta).T, e, upper=True)  # L^-T e
        return self._split(x.T)

    def variance(self, J: list[torch.Tensor], delta, split: bool = False):
        Jf = torch.cat([j.to(DTYPE).flatten(2) for j in J], -1)  # (B, C, P)
        d0 = self._uniform(delta)
        if d0 is not None:
            lam, Q = self._eigh
            JQ = Jf @ Q
            out = torch.einsum("bcp,bdp->bcd", JQ / (lam + d0), JQ)
            return (out, torch.einsum("bcp,bdp->bcd", JQ * ((lam < d0) / (lam + d0)), JQ)) if split else out
        B, C, P = Jf.shape
        sol = torch.cholesky_solve(Jf.reshape(-1, P).T, self._L(delta)).T.reshape(B, C, P)
        out = torch.einsum("bcp,bdp->bcd", sol, Jf)
        if not split:
            return out
        # per-site precisions D: H + D = D^1/2 (M + I) D^1/2 with M = D^-1/2 H D^-1/2 = U mu U^T;
        # the prior rules the directions with mu < 1 (curvature below the prior's precision)
        dv = torch.cat([di.expand(n) for di, n in zip(_as_delta(delta, len(self.sites)), self.sizes,
                                                        strict=True)]).detach()
        r = dv.rsqrt()
        mu, U = torch.linalg.eigh(r[:, None] * self.H * r[None, :])
        JU = (Jf * r) @ U
        return out, torch.einsum("bcp,bdp->bcd", JU * ((mu < 1) / (mu + 1)), JU)

    def mahalanobis(self, x: list[torch.Tensor], delta) -> torch.Tensor:
        flat = [xi.to(DTYPE).flatten(xi.dim() - len(s)) for xi, s in zip(x, self.shapes, strict=True)]
        xf = torch.cat(flat, -1)
        d0 = self._uniform(delta)
        if d0 is not None:
            lam, Q = self._eigh
            return ((xf @ Q).square() * (lam + d0)).sum(-1)
        return (xf @ self._L(delta)).square().sum(-1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"H": self.H}

    @classmethod
    def from_tensors(cls, sites, shapes, t):
        return cls(sites, shapes, t["H"])


BLOCKS = {b.kind: b for b in (KronBlock, DiagBlock, FullBlock)}
