"""Every ```python block of README.md runs as written: in order, in one namespace, in a fresh
process, with the real MiniLM and Rotten Tomatoes reviews (about a minute on 2 idle cores)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_readme_blocks_are_found_and_short():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    assert README.stat().st_size <= 12 * 1024, "the README is meant to stay under 12 KB"
    code_lines = lambda b: [ln for ln in b.splitlines() if ln.strip()]  # noqa: E731
    assert len(code_lines(blocks[0])) <= 15, "the Pyro-model quickstart is meant to stay within 15 lines"
    regress = next(b for b in blocks if "regress(" in b)
    assert len(code_lines(regress)) <= 10, "the regress quickstart is meant to stay within 10 lines"


# Run after the blocks, in their namespace: what the README promises about their results.
CHECKS = """
import json as _json
_s = pyro_llm.metrics.summarize(probs.mean(0), test.labels, probs)
_back = pyro_llm.load("svi_posterior", model=lora)
_again = _back.predict(test_loader, num_samples=8, progress=False)
print("README-CHECK " + _json.dumps({
    "reloaded_equal": bool(torch.equal(_again, probs)),
    "probs_shape": list(probs.shape), "accuracy": float(_s["accuracy"]),
    "mutual_information": float(_s["mutual_information"]),
    "coef_names": list(res.coef_names), "sd": [float(v) for v in res.sd]}))
"""


@pytest.mark.slow
def test_readme_code_runs_as_written(tmp_path):
    script = "\n\n".join(python_blocks(README.read_text())) + "\n" + CHECKS
    (tmp_path / "readme.py").write_text(script)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("README-CHECK "))
    got = json.loads(line.split(" ", 1)[1])
    assert got["probs_shape"] == [8, 100, 2]
    assert got["reloaded_equal"], "pyro_llm.load of the saved posterior predicts differently"
    assert got["accuracy"] > 0.6
    assert got["mutual_information"] > 1e-3, "the SVI posterior of the README is a point mass"
    assert got["coef_names"] == ["Intercept", "fresh", "age"] and all(s > 0 for s in got["sd"])
