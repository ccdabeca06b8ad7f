"""Report rendering from results alone: tables, computed summary, self-contained HTML, re-render from JSON."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from peftlab.report import summary_sentences, write_report
from peftlab.results import EpochRecord, ExperimentResult, RunResult


def run(name: str, method: str, f1: float, trainable: int, size: int, seconds: float) -> RunResult:
    history = [EpochRecord(epoch=e, step=10 * e, train_loss=1.0 / e, eval_loss=1.1 / e,
                           metrics={"f1_macro": f1 - 0.1 / e, "accuracy": f1}) for e in (1, 2)]
    return RunResult(name=name, method=method, task="classification", trainable_params=trainable,
                     total_params=1_000_000, model_size_bytes=size, wall_time_s=seconds, train_samples_per_s=10.0,
                     peak_rss_bytes=2**30, optimizer_state_bytes=2 * size, best_epoch=2, best_metric_name="f1_macro",
                     best_metric=f1, history=history,
                     test_metrics={"loss": 0.5, "accuracy": f1, "precision_macro": f1, "recall_macro": f1, "f1_macro": f1},
                     per_class={"neg": {"precision": 1, "recall": 1, "f1": 1, "support": 3},
                                "pos": {"precision": 1, "recall": 1, "f1": 1, "support": 3}},
                     confusion_matrix=[[3, 0], [0, 3]])


@pytest.fixture
def experiment() -> ExperimentResult:
    return ExperimentResult(
        name="unit", task="classification", config={"model": {"path": "tiny"}},
        data_report={"source": "x.csv", "format": "csv", "raw_rows": 10, "kept_rows": 8,
                     "dropped": {"missing_label": 2}, "dropped_examples": {"missing_label": ["x.csv line 3"]},
                     "split_sizes": {"train": 6, "validation": 1, "test": 1}, "class_counts": {},
                     "max_length": 128, "notes": []},
        runs=[run("full", "full", 0.80, 1_000_000, 80_000_000, 100.0),
              run("lora", "lora", 0.78, 3_000, 1_000_000, 50.0),
              RunResult(name="prefix_tuning", method="prefix_tuning", task="classification", status="failed",
                        error="cannot be applied")],
        environment={"device": "cpu", "seed": 42})


def test_summary_is_computed_from_the_numbers(experiment: ExperimentResult) -> None:
    sentences = summary_sentences(experiment)
    assert sentences[0] == "Best test macro F1: full (0.8000)."
    assert sentences[1] == ("lora reaches 97.5% of full's macro F1 with 0.3% of the trainable parameters and 1/80 "
                            "of the disk size, in 0.50x the training time.")


def test_write_report_renders_every_file(tmp_path: Path, experiment: ExperimentResult) -> None:
    paths = write_report(experiment, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "| lora | 3.0K (0.30%)" in markdown
    assert "prefix_tuning (failed)" in markdown and "missing_label: 2 (e.g. x.csv line 3)" in markdown
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["method"] for r in rows] == ["full", "lora", "prefix_tuning"]
    assert rows[1]["test_f1_macro"] == "0.78"
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 4 and "<script" not in html
    for plot in ("loss.png", "quality.png", "costs.png", "pareto.png"):
        assert (tmp_path / "plots" / plot).stat().st_size > 1000


def test_results_json_round_trips(tmp_path: Path, experiment: ExperimentResult) -> None:
    write_report(experiment, tmp_path)
    loaded = ExperimentResult.load(tmp_path / "results.json")
    assert loaded == experiment
    assert json.loads((tmp_path / "results.json").read_text())["runs"][1]["trainable_params"] == 3000


def test_report_command_rerenders_from_saved_results(tmp_path: Path, experiment: ExperimentResult) -> None:
    from typer.testing import CliRunner

    from peftlab.cli import app

    write_report(experiment, tmp_path)
    (tmp_path / "report.md").unlink()
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.md").is_file()
