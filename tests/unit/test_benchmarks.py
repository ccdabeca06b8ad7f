"""The benchmark report is generated from the saved results, and its verdicts are computed, not written in.

The benchmarks themselves (minutes of training) run with `make bench`, never in the test suite.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("peftlab_benchmarks_run", REPO / "benchmarks" / "run.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def saved_results(bench: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in bench.SCENARIOS:
        path = REPO / "benchmarks" / "results" / f"{name}.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    results["machine"] = next(r["machine"] for r in results.values())
    return results


def test_docs_benchmarks_md_is_rendered_from_the_saved_results(bench: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "DOCS", tmp_path)  # the plot goes to tmp, not over docs/
    rendered = bench.render(saved_results(bench))
    assert rendered == (REPO / "docs" / "benchmarks.md").read_text(), (
        "docs/benchmarks.md differs from benchmarks/results/*.json: run `python benchmarks/run.py --render-only`")
    assert (tmp_path / "benchmarks_methods.png").stat().st_size > 10_000


def test_target_verdicts_follow_the_numbers(bench: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "DOCS", tmp_path)
    results = saved_results(bench)
    slow = copy.deepcopy(results)
    ladder = slow["recipe"]["ladder"]
    first = next(iter(ladder.values()))
    slow["recipe"]["ratios"]["samples_per_s"] = 3.0
    slow["recipe"]["quality"]["peftlab defaults"]["test_metrics"]["f1_macro"] = (
        slow["recipe"]["quality"]["recipe (dynamic padding)"]["test_metrics"]["f1_macro"] - 0.05)
    e5 = next(k for k in slow["lora"] if k.startswith("multilingual"))
    slow["lora"][e5]["ratios"]["step_time"] = 0.9
    text = bench.render(slow)
    assert "(target 20x: **not met**)" in text
    assert "0.050 macro F1 below the recipe" in text
    assert "step time <= 0.5x: **not met**" in text
    assert first["train_samples_per_s"] > 0


def test_unknown_scenario_is_refused(bench: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["run.py", "--only", "recipe,serving"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "unknown scenario(s) serving" in capsys.readouterr().err


def test_pareto_front_keeps_only_undominated_methods(bench: Any) -> None:
    cost = {"full": 3.0, "lora": 1.0, "ia3": 0.5, "dora": 1.5, "same": 1.0}
    quality = {"full": 0.9, "lora": 0.8, "ia3": 0.4, "dora": 0.7, "same": 0.8}
    # dora: lora is cheaper and better; "same" ties lora exactly, so neither dominates the other
    assert bench.pareto_front(cost, quality) == ["ia3", "lora", "same", "full"]
