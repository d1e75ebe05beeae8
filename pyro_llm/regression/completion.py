"""The completion model: what the gold variable z is, given the LLM's output and the other data.

A Pyro model over all N rows (seed 000, eqs. 3 and 8, with the measurement model conditioned
on the other variables of the regression so that it stays valid when the LLM's errors depend
on them):

    z_i | F_i        ~ Categorical(softmax(F_i · α))                 (α: ``z_coef``)
    m_i | z_i, F_i   ~ p(m | z, F; c_z)                  (``m_coef``, ``m_cut``, ``m_log_scale``)

``F`` holds the regression's other variables (covariate role: the covariates Q *and* the
outcome Y; outcome role: Q) and ``m`` the LLM's output for the row, in one of three forms
(:func:`measurement_log_prob`): its coded label (``"label"``, multinomial logistic per gold
class), the bin of its score (``"ordinal"``, the binormal model of classifier scores, binned:
any shape of score distribution) or its log-odds scores (``"score"``, Gaussian per gold class, mean linear
in F). The measurement term enters as ``pyro.factor`` indexed by z. z is observed on the
labelled rows and marginalised by parallel enumeration on the rest, so the unlabelled rows
inform both parts through the mixture ``p(m | F) = Σ_z p(z | F) p(m | z, F)``.

:func:`fit_completion` finds the posterior mode with L-BFGS on the enumerated log joint
(``TraceEnum_ELBO`` with an empty guide over the conditioned globals) and returns a Laplace
approximation around it (:class:`CompletionPosterior`), whose draws give imputation
probabilities ``p(z_i | m_i, F_i)`` for the unlabelled rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.ops.indexing import Vindex

__all__ = ["CompletionPosterior", "MEASUREMENTS", "as_measurement", "completion_model", "continuous_model",
           "fit_completion", "measurement_log_prob"]

MEASUREMENTS = ("label", "ordinal", "score", "continuous")


def _pad0(x: torch.Tensor) -> torch.Tensor:
    """Prepend a zero column: logits of K classes from K-1 free columns."""
    return torch.cat([torch.zeros(x.shape[:-1] + (1,), dtype=x.dtype), x], -1)


def site_shapes(num_features: int, num_classes: int, measurement: str, dim: int) -> dict[str, tuple]:
    """Shapes of the global sites. ``dim``: score dimension ("score") or number of bins ("ordinal")."""
    f, k = num_features, num_classes
    if measurement == "continuous":
        return {"z_coef": (f,), "z_log_scale": (), "m_coef": (f,), "m_slope": (), "m_log_scale": ()}
    shapes = {"z_coef": (f, k - 1)}
    if measurement == "label":
        shapes["m_coef"] = (k, f, k - 1)
    elif measurement == "ordinal":              # binormal: class 0 fixes location and scale
        shapes["m_cut"] = (dim - 1,)
        shapes["m_shift"] = (k - 1,)
        shapes["m_coef"] = (k, f - 1)
        shapes["m_log_scale"] = (k - 1,)
    else:
        shapes["m_coef"] = (k, f, dim)
        shapes["m_log_scale"] = (k, dim)
    return shapes


def site_prior_scale(name: str, prior_scale: float) -> float:
    """The N(0, scale) prior's scale of a site: 3 for log-scales, cutpoints and shifts."""
    return 3.0 if name in ("m_log_scale", "m_cut", "m_shift", "z_log_scale") else prior_scale


def z_logits(F: torch.Tensor, z_coef: torch.Tensor) -> torch.Tensor:
    """``log p(z = k | F)`` up to a constant, shape ``batch + (N, K)``."""
    return _pad0(F @ z_coef)


def cutpoints(raw: torch.Tensor) -> torch.Tensor:
    """Increasing cutpoints from unconstrained values: the first, then positive increments."""
    return torch.cat([raw[..., :1], raw[..., :1] + torch.nn.functional.softplus(raw[..., 1:]).cumsum(-1)], -1)


def _log_normal_interval(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``log(Φ(hi) - Φ(lo))``, computed in the tail where it is not a difference of near-ones."""
    upper = lo > 0
    a, b = torch.where(upper, -hi, lo), torch.where(upper, -lo, hi)             # now a < b, a <= 0
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log1p(-torch.exp((torch.special.log_ndtr(a) - log_b).clamp(max=-1e-15)))


def measurement_log_prob(F: torch.Tensor, m: torch.Tensor, params: dict, measurement: str) -> torch.Tensor:
    """``log p(m_i | z_i = k, F_i)`` for every row and class: shape ``batch + (N, K)``.

    ``label``: multinomial logistic over the coded label, per gold class. ``ordinal``: the
    binormal model of the bin of the LLM's score - after *some* increasing transform g (the
    cutpoints, shared by the classes), the score of a class-k row is Gaussian with mean
    ``shift_k + F·c_k`` and sd ``σ_k`` (class 0: shift 0, sd 1), so the score's distribution may
    take any shape. ``score``: Gaussian log-odds with mean linear in F.
    """
    coef = params["m_coef"]
    if measurement == "label":
        logits = _pad0(torch.einsum("nf,...kfd->...nkd", F, coef))
        return dist.Categorical(logits=logits).log_prob(m.unsqueeze(-1))
    if measurement == "ordinal":
        zero = torch.zeros(params["m_shift"].shape[:-1] + (1,), dtype=F.dtype)
        shift = torch.cat([zero, params["m_shift"]], -1)                       # (..., K)
        scale = torch.cat([zero, params["m_log_scale"]], -1).exp()
        loc = shift.unsqueeze(-2) + torch.einsum("nf,...kf->...nk", F[:, 1:], coef)   # (..., N, K)
        cuts = cutpoints(params["m_cut"])                                      # (..., B-1)
        big = torch.full(cuts.shape[:-1] + (1,), 1e4, dtype=cuts.dtype)        # finite: no NaN gradients
        edges = torch.cat([-big, cuts, big], -1)                               # (..., B+1)
        lo, hi = edges[..., m].unsqueeze(-1), edges[..., m + 1].unsqueeze(-1)   # (..., N, 1)
        scale = scale.unsqueeze(-2)
        return _log_normal_interval((lo - loc) / scale, (hi - loc) / scale)
    mean = torch.einsum("nf,...kfd->...nkd", F, coef)
    scale = params["m_log_scale"].exp().unsqueeze(-3)
    return dist.Normal(mean, scale).to_event(1).log_prob(m.unsqueeze(-2))


def completion_model(F, m, z, labelled, *, num_classes: int, measurement: str = "ordinal",
                     dim: int | None = None, prior_scale: float = 5.0):
    """The Pyro model. ``F`` (N, f) float with an intercept first; ``m`` (N,) int labels or bins,
    or (N, d) scores; ``z`` (N,) int (any value where unlabelled); ``labelled`` (N,) bool;
    ``dim`` the number of bins for ``measurement="ordinal"``."""
    if measurement not in MEASUREMENTS:
        raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {measurement!r}")
    dim = _dim(m, measurement, dim)
    params = {}
    for name, shape in site_shapes(F.shape[1], num_classes, measurement, dim).items():
        scale = site_prior_scale(name, prior_scale)
        params[name] = pyro.sample(
            name, dist.Normal(torch.zeros((), dtype=F.dtype), scale).expand(shape).to_event(len(shape)))
    lab, unl = labelled.nonzero().squeeze(-1), (~labelled).nonzero().squeeze(-1)
    for rows, suffix in ((lab, "lab"), (unl, "unl")):
        if rows.numel() == 0:
            continue
        Fr = F[rows]
        meas = measurement_log_prob(Fr, m[rows], params, measurement)            # (n, K)
        with pyro.plate(f"rows_{suffix}", rows.numel()):
            prior = dist.Categorical(logits=z_logits(Fr, params["z_coef"]))
            if suffix == "lab":
                zr = pyro.sample("z_lab", prior, obs=z[rows])
            else:
                zr = pyro.sample("z_unl", prior, infer={"enumerate": "parallel"})
            pyro.factor(f"m_{suffix}", Vindex(meas)[..., zr])


def continuous_model(F, m, z, labelled, *, prior_scale: float = 5.0, **_):
    """A continuous z (standardised) and an LLM regression output m (standardised)::

        z_i | F_i      ~ N(F_i · a, σ_z²)
        m_i | z_i, F_i ~ N(F_i · c + b z_i, τ²)

    z is integrated out analytically where unlabelled: ``m_i | F_i ~ N(F_i·c + b F_i·a, τ² + b²σ_z²)``.
    """
    p = {}
    for name, shape in site_shapes(F.shape[1], 0, "continuous", 1).items():
        scale = site_prior_scale(name, prior_scale)
        p[name] = pyro.sample(name, dist.Normal(torch.zeros((), dtype=F.dtype), scale).expand(shape)
                              .to_event(len(shape)))
    sz, tau, b = p["z_log_scale"].exp(), p["m_log_scale"].exp(), p["m_slope"]
    lab, unl = labelled.nonzero().squeeze(-1), (~labelled).nonzero().squeeze(-1)
    if lab.numel():
        with pyro.plate("rows_lab", lab.numel()):
            pyro.sample("z_lab", dist.Normal(F[lab] @ p["z_coef"], sz), obs=z[lab])
            pyro.sample("m_lab", dist.Normal(F[lab] @ p["m_coef"] + b * z[lab], tau), obs=m[lab])
    if unl.numel():
        with pyro.plate("rows_unl", unl.numel()):
            loc = F[unl] @ p["m_coef"] + b * (F[unl] @ p["z_coef"])
            pyro.sample("m_unl", dist.Normal(loc, (tau ** 2 + b ** 2 * sz ** 2).sqrt()), obs=m[unl])


def _dim(m: torch.Tensor, measurement: str, dim: int | None) -> int:
    if measurement == "score":
        return m.shape[-1]
    if measurement == "ordinal":
        return dim if dim is not None else int(m.max()) + 1
    return 1


def as_measurement(m: torch.Tensor, measurement: str) -> torch.Tensor:
    """The measurement tensor in the form the model reads: (N, d) float64 scores, (N,) float64
    continuous values, or (N,) int64 labels / bins."""
    if measurement not in MEASUREMENTS:
        raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {measurement!r}")
    if measurement == "score":
        return m.double().reshape(len(m), -1)
    return m.double() if measurement == "continuous" else m.long()


@dataclass(frozen=True)
class CompletionPosterior:
    """Laplace approximation ``N(mode, cov)`` over the flattened completion parameters."""

    mode: torch.Tensor
    cov: torch.Tensor
    shapes: dict
    measurement: str
    num_classes: int
    neg_log_joint: float
    prior_scale: float = 5.0

    def unpack(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out, i = {}, 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            out[name] = flat[..., i:i + size].reshape(flat.shape[:-1] + shape)
            i += size
        return out

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.unpack(self.sample_flat(num_samples, generator)[0])

    def sample_flat(self, num_samples: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, P) flat draws from the Laplace approximation and their log density up to a constant."""
        chol = torch.linalg.cholesky(self.cov)
        eps = torch.randn(num_samples, self.mode.numel(), dtype=self.mode.dtype, generator=generator)
        return self.mode + eps @ chol.T, -0.5 * (eps ** 2).sum(-1)

    def log_joint(self, F, m, z, labelled, params: dict) -> torch.Tensor:
        """``log p(params, data)`` with z summed out where unlabelled, batched over leading draw
        axes: the density :func:`completion_model` (or :func:`continuous_model`) defines."""
        lp = sum(dist.Normal(torch.zeros((), dtype=v.dtype), site_prior_scale(n, self.prior_scale))
                 .log_prob(v)
                 .reshape(v.shape[:len(v.shape) - len(self.shapes[n])] + (-1,)).sum(-1)
                 for n, v in params.items())
        if self.measurement == "continuous":
            sz, tau, b = params["z_log_scale"].exp()[..., None], params["m_log_scale"].exp()[..., None], \
                params["m_slope"][..., None]
            mz, mm = params["z_coef"] @ F.T, params["m_coef"] @ F.T                  # (..., N)
            lab = labelled
            on_lab = (dist.Normal(mz[..., lab], sz).log_prob(z[lab])
                      + dist.Normal(mm[..., lab] + b * z[lab], tau).log_prob(m[lab])).sum(-1)
            spread = (tau ** 2 + b ** 2 * sz ** 2).sqrt()
            on_unl = dist.Normal(mm[..., ~lab] + b * mz[..., ~lab], spread).log_prob(m[~lab]).sum(-1)
            return lp + on_lab + on_unl
        joint = (z_logits(F, params["z_coef"]).log_softmax(-1)
                 + measurement_log_prob(F, m, params, self.measurement))            # (..., N, K)
        on_lab = joint[..., labelled, :].gather(
            -1, z[labelled].expand(joint.shape[:-2] + (-1,)).unsqueeze(-1)).sum((-1, -2))
        return lp + on_lab + joint[..., ~labelled, :].logsumexp(-1).sum(-1)

    def class_log_probs(self, F: torch.Tensor, m: torch.Tensor, params: dict) -> torch.Tensor:
        """``log p(z = k | m, F)`` under ``params`` (batched over leading draw axes): (..., N, K)."""
        joint = z_logits(F, params["z_coef"]).log_softmax(-1)
        return (joint + measurement_log_prob(F, m, params, self.measurement)).log_softmax(-1)

    def impute(self, F: torch.Tensor, m: torch.Tensor, params: dict, generator=None) -> torch.Tensor:
        """One draw of z from ``p(z | m, F)`` per row under each parameter draw: (S, N) class
        indices, or values for a continuous z."""
        if self.measurement == "continuous":   # conjugate: p(z | m, F) is Gaussian
            prior_mean = params["z_coef"] @ F.T                                  # (S, N)
            resid = m - params["m_coef"] @ F.T
            b = params["m_slope"][:, None]
            pz = torch.exp(-2 * params["z_log_scale"])[:, None]
            pm = torch.exp(-2 * params["m_log_scale"])[:, None]
            prec = pz + b ** 2 * pm
            mean = (prior_mean * pz + b * resid * pm) / prec
            return mean + torch.randn(mean.shape, dtype=mean.dtype, generator=generator) / prec.sqrt()
        probs = self.class_log_probs(F, m, params).exp().cumsum(-1)
        u = torch.rand(probs.shape[:-1], dtype=probs.dtype, generator=generator)
        return (probs[..., :-1] < u[..., None]).sum(-1)


def _initial(shapes, F, m, z, labelled, measurement, num_classes) -> torch.Tensor:
    """Start the score means at the labelled class means (F's first column is the intercept) and
    the ordinal cutpoints at the labelled class's empirical quantiles."""
    init = {name: torch.zeros(shape, dtype=F.dtype) for name, shape in shapes.items()}
    if measurement == "continuous":  # least squares on the labelled rows
        Fl, zl, ml = F[labelled], z[labelled].double(), m[labelled]
        a = torch.linalg.lstsq(Fl, zl[:, None]).solution[:, 0]
        cb = torch.linalg.lstsq(torch.cat([Fl, zl[:, None]], 1), ml[:, None]).solution[:, 0]
        init.update(z_coef=a, m_coef=cb[:-1], m_slope=cb[-1],
                    z_log_scale=(zl - Fl @ a).std().clamp_min(1e-3).log(),
                    m_log_scale=(ml - Fl @ cb[:-1] - cb[-1] * zl).std().clamp_min(1e-3).log())
    if measurement == "ordinal":  # cutpoints at the labelled class-0 rows' quantiles
        bins = shapes["m_cut"][0] + 1
        counts = torch.bincount(m[labelled & (z == 0)], minlength=bins).double() + 0.5
        cuts = torch.special.ndtri((counts.cumsum(0) / counts.sum())[:-1])
        init["m_cut"] = torch.cat([cuts[:1], torch.log(torch.expm1(cuts.diff().clamp_min(1e-3)))])
    if measurement == "score":
        for k in range(num_classes):
            rows = labelled & (z == k)
            if rows.sum() > 1:
                init["m_coef"][k, 0] = m[rows].mean(0)
                init["m_log_scale"][k] = m[rows].std(0).clamp_min(1e-3).log()
    return torch.cat([v.reshape(-1) for v in init.values()])


def fit_completion(F, m, z, labelled, *, num_classes: int, measurement: str = "ordinal",
                   dim: int | None = None, prior_scale: float = 5.0,
                   max_iter: int = 200) -> CompletionPosterior:
    """Posterior mode by L-BFGS and a Laplace approximation around it (float64 throughout)."""
    continuous = measurement == "continuous"
    F, m = F.double(), as_measurement(m, measurement)
    if continuous:
        z = z.double()
    dim = 1 if continuous else _dim(m, measurement, dim)
    shapes = site_shapes(F.shape[1], num_classes, measurement, dim)
    post = CompletionPosterior(torch.empty(0), torch.empty(0), shapes, measurement, num_classes, 0.0)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)

    def neg_log_joint(flat):
        model = continuous_model if continuous else completion_model
        conditioned = poutine.condition(model, data=post.unpack(flat))
        kwargs = {} if continuous else {"num_classes": num_classes, "measurement": measurement, "dim": dim}
        return elbo.differentiable_loss(conditioned, lambda *a, **k: None, F, m, z, labelled,
                                        prior_scale=prior_scale, **kwargs)

    flat = _initial(shapes, F, m, z, labelled, measurement, num_classes).requires_grad_()
    opt = torch.optim.LBFGS([flat], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = neg_log_joint(flat)
        loss.backward()
        return loss

    with pyro.validation_enabled(False):
        opt.step(closure)
        mode = flat.detach()
        hess = torch.autograd.functional.hessian(neg_log_joint, mode)
        value = float(neg_log_joint(mode.clone().requires_grad_()).detach())
    hess = 0.5 * (hess + hess.T)
    eig = torch.linalg.eigvalsh(hess)
    if not torch.isfinite(eig).all() or eig.min() <= 0:
        raise RuntimeError(
            "the completion model's Hessian at the mode is not positive definite "
            f"(smallest eigenvalue {eig.min().item():.3g}); the optimiser did not converge or the "
            "model is not identified from these data - check that both classes occur among the "
            "labelled rows, or use fewer covariates")
    return CompletionPosterior(mode, torch.linalg.inv(hess), shapes, measurement, num_classes, value,
                               prior_scale)
