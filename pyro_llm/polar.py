"""PoLAR: polar-decomposed low-rank adapters on Stiefel manifolds (Lion et al. 2025).

For every LoRA layer of a peft model the update is ``Delta W = scaling * U @ Theta @ V.T``
with ``U`` (d_out, r) and ``V`` (d_in, r) of orthonormal columns and ``Theta`` (r, r) free.
:class:`PolarAdapter` holds ``U, V, Theta`` and runs the peft model with
``lora_A = Theta @ V.T`` and ``lora_B = U`` injected through
:func:`torch.func.functional_call`, so the peft model's own tensors are untouched until
:meth:`PolarAdapter.write_to_peft`. After that call the peft model is an ordinary LoRA model:
``peft_model.save_pretrained``, :func:`~pyro_llm.fit_laplace` (a Laplace posterior over
``A = Theta V^T`` and ``B = U``) and :class:`~pyro_llm.BayesianLoRA` all work on it.

Initialisation follows the reference code (github.com/kcc-lion/polar, ``PoLARLinear``):
``U`` and ``V`` random orthonormal, ``Theta = 0`` so ``Delta W = 0`` at the start, and
``scaling`` is peft's (``lora_alpha / r``). ``init="lora"`` instead starts from the current
LoRA update (its thin SVD), reproducing ``Delta W`` exactly.

:func:`polar_optimizer` steps ``U, V`` on the Stiefel manifold, either by *landing*
(Ablin & Peyre 2022, as PoLAR does; no retraction, cheap, stays near the manifold) or by
*retraction* (Riemannian gradient, projected Adam/SGD step, sign-fixed QR; exactly
orthonormal), and ``Theta`` plus other trainable tensors (a classifier head) with AdamW.
Landing preconditioning (``precondition=``): ``"adam"`` (default) takes the landing field of
the Adam-preconditioned gradient, so every step is ``X - lr F`` with ``F`` a landing field and
``||X^T X - I||`` provably stays below ``~ lr max||F||^2 / (2 lam)`` (:func:`landing_bound`;
the optimiser records ``max||F||`` as ``state["max_field_norm"]``); ``"adam_field"`` feeds the
whole field to Adam, as the reference code does (no such bound: Adam rescales the pull
towards the manifold too, and the distance no longer shrinks as ``lam`` grows); ``"none"`` is
the paper's plain landing iteration.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ._io import atomic_folder, read_json, read_safetensors, save_safetensors, write_json
from .lora import find_lora_parameters, lora_layers

__all__ = ["PolarAdapter", "PolarOptimizer", "landing_bound", "landing_field",
           "orthogonality_error", "orthonormal", "polar_optimizer", "qr_retraction",
           "riemannian_gradient"]

METHODS = ("landing", "retraction")
PRECONDITIONS = ("adam", "adam_field", "none")
INITS = ("random", "lora")
_TENSORS, _META = "polar.safetensors", "polar.json"
_FIELDS = {"adapter_name": "str", "layers": "list[str]", "extra_names": "list[str]"}


# ---------------------------------------------------------------- Stiefel primitives
def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.mT)


def orthogonality_error(x: torch.Tensor) -> float:
    """``||X^T X - I||_F``: how far the columns of ``x`` are from orthonormal."""
    x = x.detach().double()
    return float(torch.linalg.matrix_norm(x.mT @ x - torch.eye(x.shape[-1], dtype=x.dtype)))


def qr_retraction(x: torch.Tensor) -> torch.Tensor:
    """The Q factor of ``x``, signs fixed so that R has a positive diagonal (unique, smooth)."""
    q, r = torch.linalg.qr(x)
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(-2)


def orthonormal(rows: int, cols: int, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random (Haar) ``rows x cols`` matrix with orthonormal columns; ``cols <= rows``."""
    if not 0 < cols <= rows:
        raise ValueError(f"need 0 < cols <= rows for orthonormal columns, got {rows} x {cols}")
    g = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return qr_retraction(g).to(dtype)


def riemannian_gradient(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Project a Euclidean gradient onto the tangent space at ``x``: ``G - X sym(X^T G)``."""
    return g - x @ _sym(x.mT @ g)


def landing_field(x: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    """Ablin & Peyre's landing field ``skew(G X^T) X + lam X (X^T X - I)``, ``skew(A) = (A - A^T)/2``.

    Computed as ``(G (X^T X) - X (G^T X)) / 2``, never forming the ``d x d`` matrix ``G X^T``.
    """
    xtx = x.mT @ x
    relative = 0.5 * (g @ xtx - x @ (g.mT @ x))
    return relative + lam * (x @ xtx - x)


def landing_bound(lr: float, lam: float, field_norm: float) -> float:
    """Upper bound on ``||X^T X - I||_F`` along plain landing steps started on the manifold.

    With ``N = X^T X - I`` one step ``X - lr F`` gives ``N' = N - 2 lr lam (N + N^2) + lr^2 F^T F``
    (the skew part leaves ``X^T X`` unchanged to first order), so ``n' <= (1 - 2 a) n + 2 a n^2
    + lr^2 L^2`` with ``a = lr lam`` and ``L >= ||F||_F``. From ``n = 0`` the iterates stay below
    the smaller fixed point ``(1 - sqrt(1 - 2 lr L^2 / lam)) / 2 ~ lr L^2 / (2 lam)``, as long as
    ``a <= 1/2``; ``inf`` where no fixed point exists.
    """
    disc = 1.0 - 2.0 * lr * field_norm**2 / lam
    if lr * lam > 0.5 or disc < 0:
        return math.inf
    return 0.5 * (1.0 - math.sqrt(disc))


# ---------------------------------------------------------------- the adapter
def _is_lora(name: str) -> bool:
    return any(k in name for k in (".lora_A.", ".lora_B.", ".lora_embedding_"))


class PolarAdapter(torch.nn.Module):
    """PoLAR: ``Delta W = scaling * U @ Theta @ V.T`` for every LoRA layer of a peft model.

    Parameters
    ----------
    peft_model:
        A model adapted by peft with LoRA (``r <= min(d_in, d_out)`` in every layer).
    adapter_name:
        Which LoRA adapter; default the active one.
    init:
        ``"random"`` (orthonormal ``U, V`` drawn under ``seed``, ``Theta = 0``: ``Delta W = 0``,
        as PoLAR and LoRA start) or ``"lora"`` (the thin SVD of the current LoRA update).
    seed:
        Seed of the random orthonormal frames.

    Other trainable tensors of the peft model (a ``modules_to_save`` head) stay the peft
    model's own parameters: the adapter trains them in place (:meth:`euclidean_parameters`).

    Example
    -------
    >>> import torch, peft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> net = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    >>> polar = PolarAdapter(net)
    >>> polar(torch.randn(3, 4)).shape
    torch.Size([3, 2])
    >>> float(polar.delta_weights()["base_model.model.0"].abs().max())
    0.0
    """

    def __init__(self, peft_model: torch.nn.Module, adapter_name: str | None = None,
                 init: str = "random", seed: int = 0):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
        names = find_lora_parameters(peft_model, adapter_name)
        object.__setattr__(self, "_peft_model", peft_model)  # not a submodule
        adapter = names[0].split(".")[-2]
        layers = dict(lora_layers(peft_model))
        params = dict(peft_model.named_parameters())
        self.adapter_name = adapter
        self.layer_names = [n[: -len(f".lora_A.{adapter}.weight")] for n in names[::2]]
        self.scaling = {m: float(layers[m].scaling[adapter]) for m in self.layer_names}
        self.extra_names = [n for n, p in params.items() if p.requires_grad and not _is_lora(n)]
        self.U, self.V, self.Theta = (torch.nn.ParameterList() for _ in range(3))
        g = torch.Generator().manual_seed(int(seed))
        for m in self.layer_names:
            a, b = params[self._a(m)], params[self._b(m)]
            (r, d_in), d_out = a.shape, b.shape[0]
            if r > min(d_in, d_out):
                raise ValueError(f"layer {m!r} has LoRA rank {r} > min(d_in={d_in}, d_out={d_out}); "
                                 "PoLAR needs orthonormal columns: lower r")
            u, theta, v = self._init(init, a, b, self.scaling[m], g)
            for lst, t in ((self.U, u), (self.Theta, theta), (self.V, v)):
                lst.append(torch.nn.Parameter(t.to(device=a.device, dtype=a.dtype)))

    def _a(self, layer: str) -> str:
        return f"{layer}.lora_A.{self.adapter_name}.weight"

    def _b(self, layer: str) -> str:
        return f"{layer}.lora_B.{self.adapter_name}.weight"

    @staticmethod
    def _init(init, a, b, scaling, g):
        (r, d_in), d_out = a.shape, b.shape[0]
        if init == "random":
            return orthonormal(d_out, r, g), torch.zeros(r, r), orthonormal(d_in, r, g)
        u, s, vh = torch.linalg.svd(b.detach().double() @ a.detach().double(), full_matrices=False)
        return u[:, :r].float(), torch.diag(s[:r]).float(), vh[:r].mT.float()

    # ------------------------------------------------------------------ parameters
    @property
    def peft_model(self) -> torch.nn.Module:
        """The wrapped peft model (not a submodule)."""
        return self._peft_model

    def stiefel_parameters(self) -> list[torch.nn.Parameter]:
        """All ``U`` and ``V`` (orthonormal columns), layer by layer."""
        return [p for u, v in zip(self.U, self.V, strict=True) for p in (u, v)]

    def euclidean_parameters(self) -> list[torch.nn.Parameter]:
        """All ``Theta`` and the peft model's other trainable tensors (e.g. a classifier head)."""
        return list(self.Theta) + [self._peft_model.get_parameter(n) for n in self.extra_names]

    def named_polar_tensors(self) -> dict[str, torch.Tensor]:
        """``{"U/<layer>": U, "V/<layer>": V, "Theta/<layer>": Theta}`` (live parameters)."""
        out = {}
        for m, u, v, t in zip(self.layer_names, self.U, self.V, self.Theta, strict=True):
            out.update({f"U/{m}": u, f"V/{m}": v, f"Theta/{m}": t})
        return out

    def lora_weights(self) -> dict[str, torch.Tensor]:
        """peft-named LoRA tensors: ``lora_A = Theta @ V.T``, ``lora_B = U`` (differentiable)."""
        out = {}
        for m, u, v, t in zip(self.layer_names, self.U, self.V, self.Theta, strict=True):
            out[self._a(m)], out[self._b(m)] = t @ v.mT, u
        return out

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """Per LoRA layer name, ``scaling * U @ Theta @ V.T`` of shape (d_out, d_in).

        (peft's ``get_delta_weight`` returns the transpose for ``fan_in_fan_out`` layers.)
        """
        return {m: self.scaling[m] * (u @ t @ v.mT)
                for m, u, v, t in zip(self.layer_names, self.U, self.V, self.Theta, strict=True)}

    def orthogonality_errors(self) -> dict[str, float]:
        """``||X^T X - I||_F`` for every ``U`` and ``V``, keyed ``U/<layer>``, ``V/<layer>``."""
        return {k: orthogonality_error(t) for k, t in self.named_polar_tensors().items()
                if not k.startswith("Theta/")}

    # ------------------------------------------------------------------ forward / export
    def forward(self, *args, **kwargs):
        """Run the peft model with the PoLAR LoRA tensors injected (its own stay untouched)."""
        return torch.func.functional_call(self._peft_model, self.lora_weights(), args, kwargs)

    @torch.no_grad()
    def write_to_peft(self) -> None:
        """Copy :meth:`lora_weights` into the peft model: it becomes a plain LoRA model."""
        for name, value in self.lora_weights().items():
            p = self._peft_model.get_parameter(name)
            p.copy_(value.to(device=p.device, dtype=p.dtype))

    def save_pretrained(self, path) -> Path:
        """Save a plain peft adapter (loadable by ``PeftModel.from_pretrained`` alone) and
        ``polar.safetensors`` + ``polar.json`` with ``U, V, Theta`` (and the extra tensors).
        Atomic as a whole; other files in ``path`` (a tokenizer) are kept."""
        if not hasattr(self._peft_model, "save_pretrained"):
            raise TypeError(f"{type(self._peft_model).__name__} has no save_pretrained; wrap the "
                            "model with peft.get_peft_model to save it")
        self.write_to_peft()
        tensors = {k: t.detach().cpu().contiguous() for k, t in self.named_polar_tensors().items()}
        for n in self.extra_names:
            tensors[f"extra/{n}"] = self._peft_model.get_parameter(n).detach().cpu().contiguous()
        meta = {"format": "pyro_llm.polar", "version": 1, "adapter_name": self.adapter_name,
                "layers": self.layer_names, "scaling": self.scaling, "extra_names": self.extra_names}
        owned = {_TENSORS, _META, "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"}
        with atomic_folder(path, owned=owned.__contains__) as tmp:
            if (Path(path) / "README.md").is_file():  # peft updates a model card in place
                shutil.copy2(Path(path) / "README.md", tmp / "README.md")
            self._peft_model.save_pretrained(str(tmp))
            save_safetensors(tmp / _TENSORS, tensors)
            write_json(tmp / _META, meta)
        return Path(path)

    @classmethod
    def from_pretrained(cls, peft_model: torch.nn.Module, path) -> PolarAdapter:
        """Restore ``U, V, Theta`` (exactly) and the extra tensors saved by :meth:`save_pretrained`
        onto ``peft_model`` (same architecture and LoRA config); writes them into the peft model.
        Both files are checked (fields, tensor names and shapes, NaN / inf) before anything is written."""
        d = Path(path)
        if not (d / _META).exists() or not (d / _TENSORS).exists():
            raise FileNotFoundError(f"{d} has no {_META} / {_TENSORS}; save it with "
                                    "PolarAdapter.save_pretrained (a plain peft adapter lacks them)")
        meta = read_json(d / _META, what="PoLAR adapter", fields=_FIELDS)
        adapter = cls(peft_model, adapter_name=meta["adapter_name"])
        if adapter.layer_names != meta["layers"]:
            raise ValueError(f"saved LoRA layers {meta['layers'][:3]}... differ from the model's "
                             f"{adapter.layer_names[:3]}...; use the same base model and LoRA config")
        params = dict(peft_model.named_parameters())
        lacking = sorted(set(meta["extra_names"]) - set(params))
        if lacking:
            raise ValueError(f"{d / _META} names extra tensors {lacking[:3]} the model lacks; use the "
                             "same base model and modules_to_save")
        targets = dict(adapter.named_polar_tensors()) | {f"extra/{n}": params[n] for n in meta["extra_names"]}
        tensors, _ = read_safetensors(d / _TENSORS, what="PoLAR adapter",
                                      expect={k: tuple(p.shape) for k, p in targets.items()})
        with torch.no_grad():
            for k, p in targets.items():
                p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))
        adapter.write_to_peft()
        return adapter

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, layers={len(self.layer_names)}, extra={len(self.extra_names)}"


# ---------------------------------------------------------------- the optimiser
class PolarOptimizer(torch.optim.Optimizer):
    """One optimiser for PoLAR: Stiefel groups (landing or retraction) and Euclidean groups (AdamW).

    A group with ``stiefel=True`` holds matrices with orthonormal columns and is stepped by
    ``method``: ``"landing"`` moves along the landing field (:func:`landing_field`, strength
    ``lam``), ``"retraction"`` along the Riemannian gradient, then retracts by sign-fixed QR.
    ``precondition="adam"`` uses Adam moments: for landing, the field of the preconditioned
    gradient (the bound of :func:`landing_bound` holds); for retraction, the preconditioned
    Riemannian gradient projected back onto the tangent space. ``"adam_field"`` (landing)
    preconditions the whole field, as the PoLAR reference code; ``"none"`` is plain
    (Riemannian) gradient descent.
    Other groups are AdamW with decoupled ``weight_decay``.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, stiefel: bool = False, method: str = "landing",
                 lam: float = 1.0, precondition: str = "adam"):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        stiefel=stiefel, method=method, lam=lam, precondition=precondition)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["stiefel"]:
                    self._stiefel_step(p, group)
                else:
                    if group["weight_decay"]:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(self._adam_direction(p, p.grad, group), alpha=-group["lr"])
        return loss

    def _adam_direction(self, p, g, group) -> torch.Tensor:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros(())
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        b1, b2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
        return state["exp_avg"] / (1 - b1**t) / denom

    def _stiefel_step(self, x, group) -> None:
        g, pre = x.grad, group["precondition"]
        if group["method"] == "landing":
            if pre == "adam_field":  # the reference code: Adam moments of the whole field
                step = self._adam_direction(x, landing_field(x, g, group["lam"]), group)
            else:  # the landing field of the (Adam-preconditioned) gradient
                g = self._adam_direction(x, g, group) if pre == "adam" else g
                step = landing_field(x, g, group["lam"])
                state = self.state[x]
                norm = torch.linalg.matrix_norm(step).detach().to("cpu", torch.float32)
                state["max_field_norm"] = torch.maximum(state.get("max_field_norm", norm), norm)
            x.add_(step, alpha=-group["lr"])
            return
        direction = riemannian_gradient(x, g)
        if pre != "none":
            direction = riemannian_gradient(x, self._adam_direction(x, direction, group))
        x.copy_(qr_retraction(x - group["lr"] * direction))


def _check_group(group: dict) -> None:
    lr, lam = group["lr"], group["lam"]
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning rate must be > 0, got {lr!r}")
    if group["method"] not in METHODS:
        raise ValueError(f"unknown method {group['method']!r}; choose one of {METHODS}")
    if group["stiefel"] and group["method"] == "landing" and not lam > 0:
        raise ValueError(f"landing needs lam > 0 (pull towards the manifold), got {lam!r}")
    if group["precondition"] not in PRECONDITIONS:
        raise ValueError(f"unknown precondition {group['precondition']!r}; choose one of {PRECONDITIONS}")
    if group["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']!r}")


def polar_optimizer(adapter: PolarAdapter, lr: float = 1e-3, method: str = "landing", *,
                    lam: float = 1.0, stiefel_lr: float | None = None, precondition: str = "adam",
                    weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8) -> PolarOptimizer:
    """A :class:`PolarOptimizer` for ``adapter``: ``U, V`` by ``method``, the rest by AdamW.

    ``lam`` is the landing strength (reference default 1.0); ``stiefel_lr`` (default ``lr``)
    the step size on the manifold; ``weight_decay`` applies to the Euclidean group only.

    Example
    -------
    >>> opt = polar_optimizer(polar, lr=1e-3, method="retraction")   # doctest: +SKIP
    """
    if not isinstance(adapter, PolarAdapter):
        raise TypeError(f"expected a PolarAdapter, got {type(adapter).__name__}")
    stiefel = dict(params=adapter.stiefel_parameters(), stiefel=True, weight_decay=0.0,
                   lr=lr if stiefel_lr is None else stiefel_lr)
    euclid = dict(params=adapter.euclidean_parameters(), stiefel=False)
    return PolarOptimizer([stiefel, euclid], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                          method=method, lam=lam, precondition=precondition)
