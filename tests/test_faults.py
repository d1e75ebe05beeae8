"""Fault injection: every resumable job killed with SIGKILL at random points and run again gives
the uninterrupted result bit for bit; every saved file, damaged in turn, is named by the error
of the load that reads it.

The jobs live in tests/fault_jobs.py and run in subprocesses (a kill must not take the test
runner down); each is killed twice, at seeded random moments after its first file appears.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent
JOBS = ["fit", "svi", "laplace", "ensemble", "coding"]
FIRST_FILE = {"fit": "ck", "svi": "ck", "laplace": "ck", "ensemble": "ens", "coding": "coded"}


def _env():
    return {**os.environ, "FAULT_SLEEP": "0.02", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _run(kind: str, out: Path) -> None:
    done = subprocess.run([sys.executable, str(HERE / "fault_jobs.py"), kind, str(out)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _kill_at_random(kind: str, out: Path, rng: random.Random) -> bool:
    """Start the job, SIGKILL it a random moment after its first file appears; True if it died
    before finishing."""
    proc = subprocess.Popen([sys.executable, str(HERE / "fault_jobs.py"), kind, str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / FIRST_FILE[kind]).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return not (out / "result.safetensors").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Each job run once uninterrupted: its folder (the saved files) and its result."""
    root = tmp_path_factory.mktemp("uninterrupted")
    for kind in JOBS:
        _run(kind, root / kind)
    return root


@pytest.mark.parametrize("kind", JOBS)
def test_killed_twice_and_resumed_equals_uninterrupted(kind, finished, tmp_path):
    rng = random.Random(f"faults-{kind}")
    out = tmp_path / kind
    killed = [_kill_at_random(kind, out, rng) for _ in range(2)]
    assert any(killed), "the job finished before either kill; the test exercised nothing"
    _run(kind, out)
    want = load_file(str(finished / kind / "result.safetensors"))
    got = load_file(str(out / "result.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{kind}: {k} differs after kill and resume"


# ---------------------------------------------------------------- damaged files
def _loaders():
    from pyro_llm import load_ensemble, load_laplace
    from pyro_llm.infer.checkpoint import checkpoint_step
    from pyro_llm.stream import load_coded

    return {"ck": checkpoint_step, "laplace": load_laplace, "ens": load_ensemble, "coded": load_coded}


def _saved_files(finished: Path):
    for kind in JOBS:
        for f in sorted((finished / kind).rglob("*")):
            if f.is_file() and f.name != "result.safetensors":
                yield f.relative_to(finished)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # flip bytes in the middle: a header or values no longer what was written
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 8]) + data[mid + 8:])


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_each_damaged_file_is_named_by_its_load_error(finished, tmp_path, how):
    loaders, checked = _loaders(), 0
    for rel in _saved_files(finished):
        copy = tmp_path / f"{how}-{checked}"
        shutil.copytree(finished / rel.parts[0], copy)
        target = copy / Path(*rel.parts[1:])
        _damage(target, how)
        folder = copy / rel.parts[1]
        with pytest.raises((ValueError, OSError)) as err:
            loaders[rel.parts[1]](folder)
            # a flip inside tensor values can leave a valid file: then it must not read back equal
            if how == "flip" and target.suffix == ".safetensors":
                pytest.fail(f"{rel}: flipped bytes loaded without an error")
        assert target.name in str(err.value), f"{rel}: {err.value}"
        checked += 1
    assert checked >= 20
