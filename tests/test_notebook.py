"""The quickstart notebook runs end to end (smoke sizes) in a fresh Jupyter kernel."""

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    try:
        from pyro_llm.data import minilm_path, rotten_tomatoes  # noqa: F401

        minilm_path()
    except FileNotFoundError as err:  # pragma: no cover - demo packages not installed
        pytest.skip(str(err))
    # nbclient starts the kernel with os.environ: the kernel sees these
    monkeypatch.setenv("PYRO_LLM_SMOKE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"{out.get('ename')}: {out.get('evalue')}"
            if out["output_type"] == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            text.append(data.get("text/plain", ""))
            images += "image/png" in data
    text = "\n".join(text)
    for expected in ("SMOKE=True", "held-out metrics", "MAP (LoRA fine-tune)", "Bayesian (SVI",
                     "length.sigma", "length.coef[0]", "accuracy"):
        assert expected in text, f"{expected!r} missing from the notebook's outputs"
    assert images >= 4  # two loss traces, the reliability diagram, the forest plot
    assert os.environ["PYRO_LLM_SMOKE"] == "1"
