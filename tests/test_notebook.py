"""The quickstart notebook runs end to end (smoke sizes) in a fresh Jupyter kernel."""

import os
from pathlib import Path

import pytest
from conftest import run_notebook_smoke

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(monkeypatch):
    try:
        from pyro_llm.data import minilm_path, rotten_tomatoes  # noqa: F401

        minilm_path()
    except FileNotFoundError as err:  # pragma: no cover - demo packages not installed
        pytest.skip(str(err))
    text, images = run_notebook_smoke(NOTEBOOK, monkeypatch)
    for expected in ("SMOKE=True", "held-out metrics", "MAP (LoRA fine-tune)", "Bayesian (SVI",
                     "length.sigma", "length.coef[0]", "accuracy"):
        assert expected in text, f"{expected!r} missing from the notebook's outputs"
    assert images >= 4  # two loss traces, the reliability diagram, the forest plot
    assert os.environ["PYRO_LLM_SMOKE"] == "1"
