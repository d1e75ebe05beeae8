"""Laplace-LoRA on SmolLM2 against laplace-torch: the same adapter, data and prior, two codes.

Run from the repository root (about 5 minutes on 2 cores; laplace-torch is the test-only
reference that ``scripts/setup.sh`` installs)::

    .venv/bin/python benchmarks/laplace_agreement.py --out benchmarks/results/laplace_agreement.json

SmolLM2-135M-Instruct with LoRA r = 8 on q_proj / v_proj (460,800 weights) is fine-tuned (MAP)
for one epoch on ``--n-train`` Rotten Tomatoes reviews and read through its label tokens, as in
``benchmarks/calibration.py``. Both codes then fit a KFAC Laplace with the exact GGN on the same
reviews (one batch per ``--batch-size``) and a prior centred where fine-tuning started
(``prior_mean="init"`` here, ``prior_mean=`` the flattened start there) with one prior precision
(``prior_groups="one"``: laplace-torch's scalar), and the script reports:
the relative Frobenius error of every Kronecker block, the training log-likelihood, the log
marginal likelihood at our evidence-optimal prior precision, and the GLM probit predictive
(laplace-torch's per-logit form, ``link="probit_per_logit"`` here) on ``--n-test`` held-out
reviews. laplace-torch computes in float32, we accumulate in float64: agreement to float32
round-off is the goal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)  # so that ``import coverage`` (numba does) is not benchmarks/coverage.py


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import torch

    from benchmarks.calibration import _loaders, _new_model, _texts
    from pyro_llm.adapter_state import initial_values
    from pyro_llm.infer import fit_map
    from pyro_llm.infer.laplace import fit_laplace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from laplace import Laplace
        from laplace.curvature import CurvlinopsGGN

    torch.set_num_threads(args.threads)
    ns = argparse.Namespace(rank=8, lr=5e-4, progress=False)
    pm, tok, logits_fn, prompt, loss = _new_model("smollm2", 0, ns)
    size = dict(max_length=args.max_length, batch_size=args.batch_size, eval_batch_size=args.batch_size)
    train, test, _ = _texts(args.n_test, args.n_train, 0)
    dls = _loaders(tok, train, test, size, prompt)
    t0 = time.perf_counter()
    fit_map(pm, dls["train_dl"], loss=loss, epochs=1, lr=ns.lr, progress=False, seed=0)
    pm.eval()
    map_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    la = fit_laplace(pm, dls["fit_dl"], structure="kfac", curvature="ggn", prior_mean="init",
                     prior_groups="one", logits_fn=logits_fn, progress=False)
    ours_s = time.perf_counter() - t0
    delta = float(la.prior_precision[0])

    class DictLogits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return logits_fn(self.model, batch)

    names = [n for n, q in pm.named_parameters() if q.requires_grad]
    start = initial_values(pm)
    prior_mean = torch.cat([start[n].reshape(-1) for n in names])
    t0 = time.perf_counter()
    ref = Laplace(DictLogits(pm), "classification", subset_of_weights="all", hessian_structure="kron",
                  backend=CurvlinopsGGN, prior_mean=prior_mean, prior_precision=delta)
    rows = lambda dl: [{k: v[i] for k, v in b.items()} for b in dl for i in range(len(b["labels"]))]  # noqa: E731
    ref.fit(torch.utils.data.DataLoader(rows(dls["fit_dl"]), batch_size=args.batch_size))
    ref_s = time.perf_counter() - t0
    errors = [_rel(block.dense(), torch.kron(G, A)) for block, (G, A) in zip(la.blocks, ref.H_facs.kfacs,
                                                                               strict=True)]
    ours_probs = la.predict(dls["test_dl"], link="probit_per_logit", logits_fn=logits_fn, progress=False)[0]
    ref_probs = torch.cat([ref(b, pred_type="glm", link_approx="probit") for b in
                           torch.utils.data.DataLoader(rows(dls["test_dl"]), batch_size=args.batch_size)])
    lml_ours = float(la.log_marginal_likelihood())
    lml_ref = float(ref.log_marginal_likelihood(prior_precision=torch.tensor(delta)))
    result = {
        "model": "SmolLM2-135M-Instruct", "lora": "r=8 on q_proj, v_proj", "n_train": args.n_train,
        "n_test": args.n_test, "num_parameters": la.num_parameters, "blocks": len(errors),
        "prior_mean": "init", "prior_precision": delta,
        "kron_block_rel_error_max": max(errors),
        "kron_block_rel_error_median": sorted(errors)[len(errors) // 2],
        "log_likelihood": [la.log_likelihood, float(ref.log_likelihood)],
        "log_marglik": [lml_ours, lml_ref], "log_marglik_rel_diff": abs(lml_ours - lml_ref) / abs(lml_ref),
        "probit_max_abs_diff": float((ours_probs.double() - ref_probs.double()).abs().max()),
        "accuracy_same": float((ours_probs.argmax(-1) == ref_probs.argmax(-1)).double().mean()),
        "seconds": {"map": map_s, "ours": ours_s, "laplace_torch": ref_s},
        "command": "benchmarks/laplace_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
