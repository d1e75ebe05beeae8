"""Sphinx configuration for the pyro_llm documentation.

Build: ``.venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html``
(``tests/test_docs.py`` runs the same with warnings as errors). The pages are MyST Markdown; the
notebooks in ``notebooks/`` are rendered with their stored outputs (never executed here) through
the links in ``docs/notebooks/``; the API reference is autodoc over the installed package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyro_llm  # noqa: E402

project = "pyro_llm"
author = "the pyro_llm authors"
copyright = "2026, the pyro_llm authors"
release = pyro_llm.__version__
version = release

extensions = [
    "myst_nb",                    # MyST Markdown pages and .ipynb notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",        # NumPy-style docstrings
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_design",              # the landing page's cards
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "_static/screenshots"]

# MyST: heading anchors so that links like [text](page.md#a-heading) resolve; $math$.
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 4
# Notebooks are shown as committed, with their stored outputs: executing them needs the real
# models and minutes of CPU (tests/test_notebook*.py run them in a smoke mode).
nb_execution_mode = "off"
nb_merge_streams = True

# autodoc / napoleon
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_mock_imports: list[str] = []
autosummary_generate = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_preprocess_types = False


html_theme = "pydata_sphinx_theme"
html_title = "pyro_llm"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "header_links_before_dropdown": 6,
    "navbar_align": "left",
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
# Pages with no sub-pages get no (empty) section sidebar.
html_sidebars = {page: [] for page in ("index", "getting_started", "benchmarks", "layout")}
html_show_sourcelink = False


# ---------------------------------------------------------------------------- API catch-all
# The API pages (docs/api/*.md) list the modules by topic. A module that none of them names (a new
# one) is still documented: `api/other.md` holds a `pyro-llm-other-modules` directive that
# renders every module of the package that no page names, so the reference is never incomplete.
from docutils import nodes  # noqa: E402
from docutils.statemachine import StringList  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402

API_DIR = Path(__file__).parent / "api"


def all_modules() -> list[str]:
    """Every public module of pyro_llm (no path part starting with an underscore)."""
    out = []
    for f in sorted((ROOT / "pyro_llm").rglob("*.py")):
        parts = f.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(p.startswith("_") for p in parts):
            out.append(".".join(parts))
    return out


def listed_modules() -> set[str]:
    """The modules the topic pages of docs/api/ name in an automodule directive."""
    import re

    found = set()
    for page in API_DIR.glob("*.md"):
        found |= set(re.findall(r"automodule:: (\S+)", page.read_text()))
    return found


class OtherModules(SphinxDirective):
    """Document the modules no topic page names (one rubric and automodule each)."""

    def run(self):
        rest = [m for m in all_modules() if m not in listed_modules()]
        if not rest:
            para = nodes.paragraph(text="None: every module is on one of the topic pages.")
            return [para]
        lines = []
        for m in rest:
            lines += [f".. rubric:: {m}", "", f".. automodule:: {m}", "   :members:", ""]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="api/other"), self.content_offset, container)
        return container.children


def setup(app):
    app.add_directive("pyro-llm-other-modules", OtherModules)
    return {"parallel_read_safe": True}
