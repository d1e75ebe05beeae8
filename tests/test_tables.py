"""The docs' results tables are what ``benchmarks/tables.py`` makes of the JSON in
``benchmarks/results/``: a number changed in one place and not the other fails here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import tables  # noqa: E402


def test_docs_tables_equal_the_generated_ones():
    stale = []
    for page in tables.pages():
        _, changed = tables.render(page.read_text())
        stale += [f"docs/{page.name}: {name}" for name in changed]
    assert not stale, f"regenerate with `.venv/bin/python benchmarks/tables.py`: {stale}"


def test_every_table_is_used_and_every_result_file_read():
    text = "".join(p.read_text() for p in tables.pages())
    unused = [name for name in tables.TABLES if f"<!-- table: {name} -->" not in text]
    assert not unused, f"tables no page shows: {unused}"
    on_disk = {p.stem for p in tables.RESULTS.glob("*.json")}
    assert on_disk == {"calibration", "cost", "coverage", "growth", "laplace_agreement", "one_call"}, (
        f"one JSON per benchmark in benchmarks/results/, got {sorted(on_disk)}")


def test_cost_runs_are_named_and_documented():
    rows = json.loads((tables.RESULTS / "cost.json").read_text())
    assert {r["run"] for r in rows} == set(tables.RUNS)
    calib = json.loads((tables.RESULTS / "calibration.json").read_text())
    assert {r["run"] for r in calib} == {"v3", "v2", "v1_laplace", "v2_superseded"}


def test_merge_replaces_only_that_run(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    (tmp_path / "cost.json").write_text(json.dumps([{"name": "a", "run": "x"}, {"name": "b", "run": "y"}]))
    new = tmp_path / "new.json"
    new.write_text(json.dumps([{"name": "c"}]))
    tables.main(["merge", "cost", "--run", "x", str(new)])
    rows = json.loads((tmp_path / "cost.json").read_text())
    assert rows == [{"name": "b", "run": "y"}, {"name": "c", "run": "x"}]


def test_a_changed_number_is_caught():
    page = next(p for p in tables.pages() if "<!-- table: cost-svi -->" in p.read_text())
    text = page.read_text().replace("**0.836**", "**0.800**")
    _, changed = tables.render(text)
    assert changed == ["cost-svi"]


def test_readme_methods_table_quotes_the_generated_headline():
    import re

    ece = {}
    for row in tables.headline().splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        ece[cells[1].strip("`")] = cells[3].split(" ± ")[0]
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Methods"):readme.index("## Documentation")]
    quoted = {"fit_map": re.search(r"\(MAP: (\d\.\d+)\)", section).group(1)}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        calls = re.findall(r"`(fit_\w+|mc_dropout_predict)`", cells[1]) if len(cells) > 2 else []
        if calls and calls[-1] in ece:
            quoted[calls[-1]] = re.match(r"(\d\.\d+)", cells[2]).group(1)
    assert len(quoted) >= 7, quoted
    wrong = {k: (v, ece[k]) for k, v in quoted.items() if v != ece[k]}
    assert not wrong, f"README quotes ECE values the results JSON does not give: {wrong}"


def test_the_paired_gap_averages_seeds_and_combines_their_standard_errors():
    import math

    from benchmarks import calibration

    d, se = calibration._paired([0.1, -0.1, 0.3], [0.03, 0.04, 0.12])
    assert math.isclose(d, 0.1) and math.isclose(se, 0.13 / 3)
    assert all(math.isnan(x) for x in calibration._paired([0.1, None], [0.03, None]))  # a row without it
