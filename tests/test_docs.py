"""The documentation site builds with warnings as errors, and shows what it promises.

``sphinx-build -W --keep-going -b html docs <tmp>``: MyST pages, the API reference (autodoc over
numpy-style docstrings: a malformed docstring is a warning, so a failure here names it) and the
notebooks rendered from their stored outputs (never executed). About 20 s on 2 cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

pytest.importorskip("sphinx", reason="the docs need the dev extra (scripts/setup.sh installs it)")
pytest.importorskip("myst_nb", reason="the docs need the dev extra (scripts/setup.sh installs it)")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html")
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d",
         str(out / ".doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                if re.search(r"WARNING|ERROR|CRITICAL", ln)]
    assert proc.returncode == 0 and not warnings, (
        f"sphinx-build failed (exit {proc.returncode}) with {len(warnings)} warnings:\n"
        + "\n".join(warnings or (proc.stdout + proc.stderr).splitlines()[-30:]))
    return out


def test_docs_build_without_warnings(site):
    assert (site / "index.html").exists()


def test_every_page_is_built(site):
    for page in DOCS.glob("*.md"):
        assert (site / f"{page.stem}.html").exists(), f"docs/{page.name} was not built"
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        assert (DOCS / "notebooks" / nb.name).exists(), (
            f"notebooks/{nb.name} is not linked into the docs: add docs/notebooks/{nb.name} "
            f"(a symlink to ../../notebooks/{nb.name}) and list it in docs/index.md")


def test_notebooks_render_their_stored_outputs(site):
    html = (site / "notebooks" / "quickstart.html").read_text()
    assert "cell_output" in html and "<img" in html      # stored text and figure outputs


def test_api_reference_documents_every_top_level_name(site):
    """Each class and function of ``pyro_llm.__all__`` has an entry where it is defined."""
    import inspect

    import pyro_llm

    html = "".join(p.read_text() for p in (site / "api").glob("*.html"))
    missing = []
    for name in pyro_llm.__all__:
        obj = getattr(pyro_llm, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            target = f'id="{obj.__module__}.{obj.__qualname__}"'
            if target not in html:
                missing.append(f"pyro_llm.{name} ({target})")
    assert not missing, f"not in the API reference: {missing}"
