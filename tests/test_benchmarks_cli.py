"""benchmarks/cost.py without a real model: registry, CLI, interleaving, JSON rows (fast)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

COST = Path(__file__).resolve().parents[1] / "benchmarks" / "cost.py"
REQUIRED = {"name": str, "ratio": float, "numerator_s": float, "denominator_s": float,
            "settings": dict}


@pytest.fixture(scope="module")
def cost():
    spec = importlib.util.spec_from_file_location("pyro_llm_bench_cost", COST)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


@pytest.fixture
def fake_registry(cost, monkeypatch):
    """Replace the registry with one fake row whose steps sleep 2 ms and 1 ms."""
    sizes = cost.Sizes(warmup=1, min_rounds=4, max_rounds=4, budget_s=60, memory_steps=2)

    def setup(sides):
        work = {"numerator": lambda: time.sleep(0.002), "denominator": lambda: time.sleep(0.001)}
        return cost.Pair(work["numerator"] if "numerator" in sides else None,
                         work["denominator"] if "denominator" in sides else None,
                         {"fake": True})

    bench = cost.Benchmark("fake_row", setup, 1.15, "sleep 2 ms", "sleep 1 ms", sizes, sizes)
    monkeypatch.setattr(cost, "REGISTRY", {"fake_row": bench})
    return bench


def test_registry_has_the_svi_over_map_row(cost):
    bench = cost.REGISTRY["svi_step_over_map_step"]
    assert bench.goal == 1.15
    assert bench.quick.min_rounds <= bench.quick.max_rounds
    assert bench.full.max_rounds >= bench.quick.max_rounds
    with pytest.raises(ValueError, match="registered twice"):
        cost.register("svi_step_over_map_step", goal=1.0, numerator="", denominator="",
                      quick=bench.quick, full=bench.full)(lambda sides: None)


def test_parser_and_sizes(cost, tmp_path):
    args = cost.build_parser().parse_args(["--quick", "--out", str(tmp_path / "x.json"),
                                           "--rounds", "7", "--warmup", "0"])
    assert args.quick and args.out == tmp_path / "x.json" and args.threads == 2
    s = cost._sizes(cost.REGISTRY["svi_step_over_map_step"], args)
    assert (s.warmup, s.min_rounds, s.max_rounds) == (0, 7, 7)
    with pytest.raises(SystemExit):
        cost.build_parser().parse_args(["--rows", "no_such_row"])


def test_interleaving_alternates_and_respects_the_budget(cost):
    calls, now = [], [0.0]

    def clock():
        return now[0]

    def work(name, dt):
        def f():
            calls.append(name)
            now[0] += dt
        return f

    sizes = cost.Sizes(warmup=2, min_rounds=3, max_rounds=100, budget_s=10.0, memory_steps=0)
    out = cost.time_interleaved(work("n", 2.0), work("d", 1.0), sizes, clock=clock,
                                cpu_clock=clock)
    assert calls[:4] == ["n", "d", "n", "d"]  # warm-up
    assert calls[4:10] == ["d", "n", "n", "d", "d", "n"]  # alternating order per round
    assert len(out["num"]) == len(out["den"]) == 4  # 3 rounds take 9 s, the 4th ends past 10 s
    assert set(out["num"]) == {2.0} and set(out["den"]) == {1.0}
    with pytest.raises(ValueError, match="min_rounds"):
        cost.time_interleaved(work("n", 1), work("d", 1), cost.Sizes(0, 0, 1, 1.0, 0))


def test_summarise_row_schema_and_verdict(cost, fake_registry):
    times = {"num": [1.0, 1.1, 5.0], "den": [1.0, 1.0, 0.9], "num_cpu": [2.0], "den_cpu": [1.0]}
    mem = {"numerator": {"peak_mb": 900.0}, "denominator": {"peak_mb": 800.0}, "method": "x"}
    row = cost.summarise(fake_registry, times, {"batch": 8}, mem)
    for key, typ in REQUIRED.items():
        assert isinstance(row[key], typ), key
    assert row["ratio"] == pytest.approx(1.1)  # medians 1.1 / 1.0: the outlier 5.0 is ignored
    assert row["verdict"] == "PASS" and row["cpu_ratio"] == pytest.approx(2.0)
    assert (row["peak_mb"], row["peak_mb_denominator"]) == (900.0, 800.0)
    times["num"] = [1.2, 1.2]
    assert cost.summarise(fake_registry, times, {}, None)["verdict"] == "MISS"
    json.dumps(row)  # serialisable
    with pytest.raises(ValueError, match="no timings"):
        cost.summarise(fake_registry, {"num": [], "den": [1.0]}, {})


def test_main_writes_json_rows(cost, fake_registry, tmp_path, capsys):
    out = tmp_path / "cost.json"
    cost.main(["--quick", "--no-memory", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["fake_row"]
    row = rows[0]
    for key, typ in REQUIRED.items():
        assert isinstance(row[key], typ), key
    assert row["peak_mb"] is None  # --no-memory
    assert row["ratio"] == pytest.approx(row["numerator_s"] / row["denominator_s"])
    assert row["verdict"] == ("PASS" if row["ratio"] <= 1.15 else "MISS")
    assert row["settings"]["fake"] is True and row["settings"]["timed_rounds"] == 4
    printed = capsys.readouterr().out
    assert "fake_row" in printed and row["verdict"] in printed


def test_memory_probe_reports_peak_rss(cost, fake_registry):
    res = cost.run_probe(fake_registry, "denominator", fake_registry.quick)
    assert res["peak_mb"] > 1.0 and res["calls"] == 3
