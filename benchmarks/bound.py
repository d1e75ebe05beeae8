"""The semiparametric efficiency bound of a target coefficient, for the coverage benchmark.

With the labels observed independently with known probabilities π_i, the efficient influence
function of the regression's coefficients is ``H⁻¹ {m(s, W) + (R/π)(ψ − m(s, W))}`` with ψ the
target regression's score at the truth, ``m = E[ψ | s, W]`` under the true conditional law of z
and ``H = E[∂ψ/∂θ]``. Its variance for a corpus of N rows is

    V = H⁻¹ (E[ψψᵀ] + E[(1/π − 1) Var(ψ | s, W)]) H⁻¹ / N

(rows in clusters: the first term over cluster sums of ψ; the second stays per row, as the labels
are drawn row by row). :func:`efficiency_bound` is the benchmark's own version of
``pyro_llm.regression.dr.efficiency_bound`` (same arguments); :func:`bound_sd` uses the library's
when it exists.
"""

from __future__ import annotations

import numpy as np

Z975 = 1.959963984540054
GH_NODES = 24   # Gauss-Hermite nodes for a continuous z (exact for polynomials up to degree 47)


def _labelling_probs(df, prob, labelled: np.ndarray) -> np.ndarray:
    if prob is None:
        return np.full(len(df), labelled.mean())
    p = np.asarray(df[prob] if isinstance(prob, str) else prob, float)
    if p.shape != (len(df),) or not ((p > 0) & (p <= 1)).all():
        raise ValueError("prob must give a labelling probability in (0, 1] for every row")
    return p


def efficiency_bound(df, formula, *, label, truth, probs, role="covariate", family="gaussian",
                     prob=None, cluster=None, kind="auto") -> dict:
    """{coefficient: sd} of the efficiency bound for this corpus (see the module docstring).

    ``truth`` (N,): every row's true label; ``probs`` (N, K): the true ``p(z = k | s, W)`` in the
    order of the design's classes (continuous z: (N, 2), the conditional mean and sd)."""
    from pyro_llm.regression.design import build_design, plain_value

    d = build_design(df, formula, label=label, role=role, kind=kind)
    truth, probs = np.asarray(truth), np.asarray(probs, float)
    N = len(df)
    if d.kind == "continuous":
        nodes, w = np.polynomial.hermite_e.hermegauss(GH_NODES)
        vals = probs[:, :1] + probs[:, 1:2] * nodes              # (N, J)
        X0, X1 = d.X_by_class
        Xk = X0[None] + vals.T[..., None] * (X1 - X0)[None]      # (J, N, p)
        Pk = np.broadcast_to(w / w.sum(), vals.shape)
        Xt = d.X(truth.astype(float))
        resp_k = d.y[None] if role == "covariate" else vals.T
        resp_t = d.y if role == "covariate" else truth.astype(float)
    else:
        idx = np.array([d.classes.index(plain_value(v)) for v in truth])
        if probs.shape != (N, d.num_classes):
            raise ValueError(f"probs must be (N, K) = ({N}, {d.num_classes}); got {probs.shape}")
        Xk, Pk = d.X_by_class, probs
        Xt = d.X(idx)
        resp_k = np.broadcast_to(d.y, (d.num_classes, N)) if role == "covariate" else d.class_values[:, None]
        resp_t = d.response(idx)
    from pyro_llm.regression.estimators import fit_glm

    theta = fit_glm(Xt, resp_t, family)[0]                           # the full-data fit at the truth

    def link(X):
        eta = X @ theta
        return eta if family == "gaussian" else 1 / (1 + np.exp(-eta))

    psi_t = Xt * (resp_t - link(Xt))[:, None]                     # (N, p)
    psi_k = Xk * (resp_k - link(Xk))[..., None]                   # (K, N, p)
    wt = np.ones(N) if family == "gaussian" else link(Xt) * (1 - link(Xt))
    H = Xt.T @ (wt[:, None] * Xt)
    m = np.einsum("nk,knp->np", Pk, psi_k)
    second = np.einsum("nk,knp,knq->npq", Pk, psi_k, psi_k) - m[:, :, None] * m[:, None, :]
    pi = _labelling_probs(df, prob, d.labelled)
    if cluster is None:
        first = psi_t.T @ psi_t
    else:
        ids = np.asarray(df[cluster] if isinstance(cluster, str) else cluster)
        _, g = np.unique(ids, return_inverse=True)
        sums = np.zeros((g.max() + 1, psi_t.shape[1]))
        np.add.at(sums, g, psi_t)
        first = sums.T @ sums
    meat = first + np.einsum("n,npq->pq", 1 / pi - 1, second)
    Hinv = np.linalg.inv(H)
    V = Hinv @ meat @ Hinv
    return dict(zip(d.coef_names, np.sqrt(np.diag(V)).tolist(), strict=True))


def library_bound():
    """The library's ``efficiency_bound`` when ``pyro_llm.regression.dr`` has it, else None."""
    try:
        from pyro_llm.regression.dr import efficiency_bound as lib
    except ImportError:
        return None
    return lib


def bound_sd(rep) -> tuple[float, str]:
    """The bound's sd of ``rep.coef`` and which implementation gave it ("library"/"benchmark")."""
    o = rep.oracle
    lib = library_bound()
    fn, impl = (lib, "library") if lib is not None else (efficiency_bound, "benchmark")
    sd = fn(rep.df, rep.formula, label=rep.label, truth=o.truth, probs=o.probs, role=rep.role,
            family=rep.family, prob=o.prob, cluster=o.cluster)
    return float(sd[rep.coef]), impl
