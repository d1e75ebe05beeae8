"""Jobs that tests/test_faults.py runs in a subprocess, kills with SIGKILL and runs again.

``python tests/fault_jobs.py KIND OUT`` runs job KIND with its files in ``OUT`` (resuming whatever
is there) and writes what it produced to ``OUT/result.safetensors``. Every step sleeps
``FAULT_SLEEP`` seconds so that a kill lands inside the work, not after it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from conftest import fake_finetune, mlp_peft  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

N, D_IN, CLASSES, B = 48, 4, 3, 8
SLEEP = float(os.environ.get("FAULT_SLEEP", "0.02"))


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def _loader():
    x, y = _data()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=B, shuffle=True)


def _loss(model, batch):
    time.sleep(SLEEP)
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def fit(out: Path) -> dict:
    from pyro_llm import fit_map

    pm = mlp_peft(d_in=D_IN, classes=CLASSES, lora_dropout=0.1)  # dropout: the RNG state matters
    res = fit_map(pm, _loader(), loss=_loss, epochs=8, lr=0.05, checkpoint=str(out / "ck"),
                  checkpoint_every=3, progress=False, seed=4)
    return {**{f"p/{n}": t for n, t in res.params.items()}, "losses": torch.tensor(res.losses)}


def svi(out: Path) -> dict:
    from pyro_llm import BayesianLoRA, fit_svi, likelihoods

    pm = mlp_peft(d_in=D_IN, classes=CLASSES)
    fake_finetune(pm)
    lora = BayesianLoRA(pm, prior=0.5, select="B")
    x, y = _data()

    def model(x, y, idx):
        time.sleep(SLEEP)
        likelihoods.categorical("y", lora(x), y, N, idx)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, torch.arange(N)),
                                         batch_size=B, shuffle=True)
    res = fit_svi(model, "normal", loader, epochs=8, lr=0.02, init_values=lora, progress=False,
                  checkpoint=str(out / "ck"), checkpoint_every=4, seed=2)
    return {**{f"p/{n}": t for n, t in res.params.items()}, "losses": torch.tensor(res.losses)}


def laplace(out: Path) -> dict:
    from pyro_llm import fit_laplace, fit_map, load_laplace

    pm = mlp_peft(d_in=D_IN, classes=CLASSES)
    fit_map(pm, _loader(), loss=_loss, epochs=6, lr=0.05, checkpoint=str(out / "ck"),
            checkpoint_every=2, progress=False, seed=1)
    x, y = _data()
    la = fit_laplace(pm, [(x[i:i + B], y[i:i + B]) for i in range(0, N, B)], structure="kfac",
                     progress=False)
    la.save(out / "laplace")
    t, _ = _read(out / "laplace" / "laplace.safetensors")
    load_laplace(out / "laplace")  # the saved folder reads back
    return t


def ensemble(out: Path) -> dict:
    from pyro_llm import fit_ensemble, load_ensemble

    pm = mlp_peft(d_in=D_IN, classes=CLASSES)
    fit_ensemble(pm, _loader(), 3, out_dir=out / "ens", loss=_loss, epochs=4, lr=0.05,
                 progress=False, checkpoint_every=2)
    ens = load_ensemble(out / "ens", pm)
    return {f"m{k}/{n}": t for k, m in zip(ens.indices, ens.members, strict=True) for n, t in m.items()}


def coding(out: Path) -> dict:
    from pyro_llm.stream import code_corpus, load_coded

    torch.manual_seed(0)
    net = torch.nn.Linear(16, CLASSES)

    def predict(texts):
        time.sleep(SLEEP)
        feats = torch.stack([torch.tensor([float(ord(c) % 7) for c in (t * 16)[:16]]) for t in texts])
        return net(feats).softmax(-1).detach()

    texts = [f"text {i} " + "ab" * (i % 5) for i in range(200)]
    code_corpus(texts, predict, out / "coded", batch_size=4, shard_size=16, progress=False,
                fingerprint="fault-job-linear-v1")
    coded = load_coded(out / "coded")
    return {"probs": torch.as_tensor(coded.probs)}


def _read(path):
    from pyro_llm._io import read_safetensors

    return read_safetensors(path, what="result")


JOBS = {"fit": fit, "svi": svi, "laplace": laplace, "ensemble": ensemble, "coding": coding}

if __name__ == "__main__":
    kind, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    result = JOBS[kind](out)
    save_file({k: v.detach().contiguous() for k, v in result.items()}, str(out / "result.safetensors"))
