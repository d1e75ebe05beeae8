"""What one forward/backward pass tells the Laplace fit about each Linear layer.

:class:`LayerTap` hooks the ``torch.nn.Linear`` modules that own the Laplace sites (peft's
``lora_A`` / ``lora_B`` layers, a classifier head) and keeps their inputs ``a`` and outputs.
Backpropagating a vector ``v`` (B, C) from the logits with :func:`torch.autograd.grad` then
gives every layer's output gradient ``g``: the KFAC factors are sums of ``a a^T`` and
``g g^T``, a per-example gradient is ``sum_t g_t a_t^T``. No parameter ``.grad`` is touched.

Which vectors are backpropagated decides the curvature (:func:`curvature_vectors`):

* ``"fisher"`` -- the Fisher with labels sampled from the model (Laplace-LoRA's default):
  ``v = p - onehot(y~)``, ``y~ ~ Cat(p)``, ``mc_samples`` times, each scaled by ``1/sqrt(m)``;
* ``"empirical"`` -- the empirical Fisher, with the true labels: ``v = p - onehot(y)``;
* ``"ggn"`` -- the exact generalised Gauss-Newton: ``C - 1`` vectors whose outer products sum to
  the softmax Hessian ``diag(p) - p p^T`` (its rank is ``C - 1``; one vector, one backward pass,
  for a binary task), from a batched eigendecomposition of that C x C matrix. For a categorical
  likelihood the GGN equals the (expected) Fisher, so ``"fisher"`` is its one-sample estimate.
"""

from __future__ import annotations

import torch

__all__ = ["LayerTap", "curvature_vectors", "per_example_grads", "CURVATURES"]

CURVATURES = ("fisher", "empirical", "ggn")


def _module_of(modules: dict[str, torch.nn.Module], name: str) -> tuple[str, str]:
    mod_name, _, kind = name.rpartition(".")
    module = modules.get(mod_name)
    if not isinstance(module, torch.nn.Linear) or kind not in ("weight", "bias"):
        raise ValueError(
            f"Laplace sites must be the weight or bias of a torch.nn.Linear (peft's lora_A / lora_B "
            f"layers, a classifier head); {name!r} belongs to {type(module).__name__}")
    return mod_name, kind


class LayerTap:
    """Forward hooks that record the inputs and outputs of the modules owning ``param_names``."""

    def __init__(self, model: torch.nn.Module, param_names: list[str]):
        self.model = model
        # one walk of the module tree (get_submodule walks the path once per name)
        self._by_name = dict(model.named_modules(remove_duplicate=False))
        self.owner = {n: _module_of(self._by_name, n) for n in param_names}
        self.modules = list(dict.fromkeys(m for m, _ in self.owner.values()))
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []

    def _hook(self, name):
        def hook(module, args, output):
            if name in self.inputs:
                raise RuntimeError(f"module {name!r} ran twice in one forward pass (a shared layer); "
                                   "Laplace sites must belong to layers used once per pass")
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output
        return hook

    def __enter__(self) -> LayerTap:
        for name in self.modules:
            self._handles.append(self._by_name[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def check_ran(self) -> None:
        missing = [m for m in self.modules if m not in self.inputs]
        if missing:
            raise RuntimeError(f"layers {missing[:3]} did not run in the forward pass; is the adapter "
                               "active and does logits_fn call the same model?")

    def output_grads(self, logits: torch.Tensor, v: torch.Tensor, retain_graph: bool = True
                     ) -> dict[str, torch.Tensor]:
        """``d (v . logits) / d output`` of every tapped layer; the graph is kept for more calls
        unless ``retain_graph=False`` (the last call: its saved activations are freed at once)."""
        outs = [self.outputs[m] for m in self.modules]
        grads = torch.autograd.grad(logits, outs, grad_outputs=v.to(logits.dtype), retain_graph=retain_graph,
                                    allow_unused=True)
        return {m: (torch.zeros_like(o) if g is None else g.detach())
                for m, o, g in zip(self.modules, outs, grads, strict=True)}

    def per_example(self, name: str, g: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example gradient ``(B, *param shape)`` of parameter ``name`` given output grads ``g``."""
        mod, kind = self.owner[name]
        return per_example_grads(self.inputs[mod], g[mod], kind)


def per_example_grads(a: torch.Tensor, g: torch.Tensor, kind: str) -> torch.Tensor:
    """``sum_t g_t a_t^T`` (weight) or ``sum_t g_t`` (bias) per example; positions are summed."""
    B = a.shape[0]
    g3 = g.reshape(B, -1, g.shape[-1])
    if kind == "bias":
        return g3.sum(1)
    return torch.einsum("bto,bti->boi", g3, a.reshape(B, -1, a.shape[-1]).to(g3.dtype))


def curvature_vectors(logits: torch.Tensor, y: torch.Tensor | None, curvature: str, mc_samples: int = 1,
                      generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The (B, C) vectors whose backpropagated outer products sum to the curvature."""
    p = logits.detach().double().softmax(-1)
    C = p.shape[-1]
    eye = torch.eye(C, dtype=p.dtype, device=p.device)
    if curvature == "ggn":
        if C == 2:  # diag(p) - p p^T = u u^T with u = sqrt(p0 p1) (1, -1): one backward pass
            return [(p[:, :1] * p[:, 1:]).sqrt() * torch.tensor([1.0, -1.0], dtype=p.dtype, device=p.device)]
        # rank C - 1 (the ones vector is its null space): sqrt(lambda_k) q_k for the top C - 1 eigenpairs
        lam, Q = torch.linalg.eigh(torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
        return [Q[:, :, k] * lam[:, k:k + 1].clamp_min(0.0).sqrt() for k in range(1, C)]
    if curvature == "empirical":
        if y is None:
            raise ValueError("curvature='empirical' needs the true labels; the batches carry none")
        return [p - eye[y.long()]]
    if curvature == "fisher":
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        out = []
        for _ in range(mc_samples):
            y_s = torch.multinomial(p.cpu(), 1, generator=generator).squeeze(-1).to(p.device)
            out.append((p - eye[y_s]) / mc_samples ** 0.5)
        return out
    raise ValueError(f"unknown curvature {curvature!r}; choose one of {CURVATURES}")


# ---------------------------------------------------------------------------- running the model
class tapped:
    """Context: ``model`` in eval mode, the named parameters differentiable, a :class:`LayerTap` on."""

    def __init__(self, model: torch.nn.Module, param_names: list[str]):
        self.model, self.names = model, param_names

    def __enter__(self) -> LayerTap:
        from ...runtime import train_mode

        tap = LayerTap(self.model, self.names)  # checks the names before anything is changed
        params = dict(self.model.named_parameters(remove_duplicate=False))  # one walk, not one per name
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"the model has no parameters {missing[:3]}; pass names from "
                             "model.named_parameters()")
        self._mode = train_mode(self.model, False)
        self._mode.__enter__()
        self._grad = {n: params[n] for n in self.names}
        self._flags = {n: p.requires_grad for n, p in self._grad.items()}
        for p in self._grad.values():
            p.requires_grad_(True)
        self._tap = tap.__enter__()
        return self._tap

    def __exit__(self, *exc) -> None:
        self._tap.__exit__(*exc)
        for n, p in self._grad.items():
            p.requires_grad_(self._flags[n])
        self._mode.__exit__(*exc)


def check_logits(logits: torch.Tensor, y: torch.Tensor | None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[-1] < 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits_fn must return (batch, classes) logits with >= 2 classes, got {shape}")
    if y is not None and (y.shape != logits.shape[:1] or int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels must be (batch,) class indices in [0, {logits.shape[1]}); got shape "
                         f"{tuple(y.shape)}, range [{int(y.min())}, {int(y.max())}]")
