"""The package's layering: no module takes another module's private names, and Pyro's own
private runtime is not read where a public function exists."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pyro_llm"
MODULES = {p.stem for p in PKG.rglob("*.py")} | {p.name for p in PKG.rglob("*") if p.is_dir()}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in MODULES


def _offences(path: Path, package_relative: bool) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    hits, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            ours = (node.level > 0 and package_relative) or (node.module or "").startswith("pyro_llm")
            for a in node.names:
                if ours and _private(a.name):
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {a.name}")
                if ours and a.name in MODULES:  # `from . import svi as s`: s._x below is an offence
                    aliases.add(a.asname or a.name)
            pyro_runtime = node.module and node.module.startswith("pyro.")
            if pyro_runtime and any(a.name == "_PYRO_STACK" for a in node.names):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: reads pyro's _PYRO_STACK "
                            "(use pyro.poutine.runtime.get_plates)")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pyro_llm.") and a.asname:
                    aliases.add(a.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and _private(node.attr)):
            hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: uses {node.value.id}.{node.attr}")
    return hits


def test_no_module_takes_another_modules_private_names():
    hits = [h for f in sorted(PKG.rglob("*.py")) for h in _offences(f, True)]
    assert not hits, "\n".join(hits)


def test_benchmarks_and_tests_use_the_public_api():
    files = sorted((ROOT / "benchmarks").rglob("*.py"))
    hits = [h for f in files for h in _offences(f, False)]
    assert not hits, "\n".join(hits)


def test_the_check_catches_an_offence(tmp_path):
    bad = PKG / "_layering_probe_tmp.py"
    bad.write_text("from .infer import svi as s\nfrom .posterior import _stacked\nx = s._constrained\n")
    try:
        hits = _offences(bad, True)
    finally:
        bad.unlink()
    assert len(hits) == 2 and "_stacked" in hits[0] and "s._constrained" in hits[1]
