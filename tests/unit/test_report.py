"""Report rendering from results alone: tables, computed summary, self-contained HTML, re-render from JSON."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from peftlab.evaluate import classification_metrics, confusion, per_class_report
from peftlab.report import summary_sentences, write_report
from peftlab.results import EpochRecord, ExperimentResult, RunResult, SavedPredictions, save_predictions
from peftlab.stats import paired_comparison


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


def test_summary_without_saved_predictions_says_there_is_no_interval(experiment: ExperimentResult) -> None:
    sentences = summary_sentences(experiment)
    assert sentences[0] == "Best test macro F1: full (0.8000)."
    assert sentences[1] == ("lora's test macro F1 differs from full's by -0.0200 (no saved test predictions, so no "
                            "interval: whether this is more than noise is unknown), with 0.3% of the trainable "
                            "parameters and 1/80 of the disk size, in 0.50x the training time.")


def test_write_report_renders_every_file(tmp_path: Path, experiment: ExperimentResult) -> None:
    paths = write_report(experiment, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "| lora | 3.0K (0.30%)" in markdown
    assert "prefix_tuning (failed)" in markdown and "missing_label: 2 (e.g. x.csv line 3)" in markdown
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["method"] for r in rows] == ["full", "lora", "prefix_tuning"]
    assert rows[1]["test_f1_macro"] == "0.78"
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 4 and "<script" not in html  # no predictions: no interval plot
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


# --------------------------------------------------------------------------- intervals from saved predictions

LABELS = ["negative", "neutral", "positive"]
TRUE = np.arange(150) % 3


def predicted_with(errors: int, seed: int, never: int | None = None) -> np.ndarray:
    """TRUE with ``errors`` rows changed; with ``never``, that class is replaced by the next one everywhere."""
    rng = np.random.default_rng(seed)
    predicted = TRUE.copy()
    rows = rng.permutation(len(TRUE))[:errors]
    predicted[rows] = (TRUE[rows] + 1) % 3
    if never is not None:
        predicted[predicted == never] = (never + 1) % 3
    return predicted


def saved_run(run_dir: Path, name: str, method: str, predicted: np.ndarray, seed: int = 42,
              trainable: int = 1000) -> RunResult:
    """A finished run whose metrics and predictions file agree, as train.py writes them."""
    path = run_dir / (name if seed == 42 else f"{name}-seed{seed}") / "test_predictions.jsonl"
    save_predictions(path, SavedPredictions(labels=LABELS, true=TRUE, predicted=predicted,
                                            probabilities=np.eye(3)[predicted]))
    return RunResult(name=name, method=method, task="classification", seed=seed, trainable_params=trainable,
                     total_params=1_000_000, model_size_bytes=10 * trainable, wall_time_s=10.0,
                     test_metrics={"loss": 0.5, **classification_metrics(TRUE, predicted, 3)},
                     per_class=per_class_report(TRUE, predicted, LABELS),
                     confusion_matrix=confusion(TRUE, predicted, 3),
                     predictions_file=str(path.relative_to(run_dir)))


def saved_experiment(runs: list[RunResult], **config: object) -> ExperimentResult:
    return ExperimentResult(
        name="stats", task="classification", config={"model": {"path": "tiny"}, **config},
        data_report={"source": "x.csv", "format": "csv", "raw_rows": 150, "kept_rows": 150, "dropped": {},
                     "split_sizes": {"train": 100, "validation": 50, "test": 150}, "class_counts": {},
                     "max_length": 128, "notes": [],
                     "warnings": ["class 'neutral' has 12 of 100 training rows (12.0%, under 20%)"]},
        runs=runs, environment={"device": "cpu", "seed": 42})


def test_report_states_a_paired_verdict_with_its_interval(tmp_path: Path) -> None:
    full, lora = predicted_with(10, seed=0), predicted_with(60, seed=1, never=1)
    experiment = saved_experiment([saved_run(tmp_path, "full", "full", full, trainable=100_000),
                                   saved_run(tmp_path, "lora", "lora", lora)])
    paths = write_report(experiment, tmp_path)
    expected = paired_comparison([SavedPredictions(LABELS, TRUE, lora, np.eye(3)[lora])],
                                 [SavedPredictions(LABELS, TRUE, full, np.eye(3)[full])], "full", "f1_macro")
    sentences = summary_sentences(experiment)
    verdict = next(s for s in sentences if s.startswith("lora: "))
    d = expected.difference
    assert verdict.startswith(f"lora: worse than full in macro F1 (difference {d.estimate:+.4f}, 95% CI "
                              f"{d.low:+.4f} to {d.high:+.4f}), with 1% of the trainable parameters")
    assert "lora never predicts neutral on the test split" in " ".join(sentences)
    assert not any(s.startswith("full never predicts") for s in sentences)
    markdown = paths["markdown"].read_text()
    assert "macro F1 (95% CI)" in markdown and verdict in markdown
    assert "**warning**: class 'neutral' has 12 of 100 training rows" in markdown
    saved = json.loads(paths["json"].read_text())["statistics"]
    lora_stats = next(m for m in saved["methods"] if m["name"] == "lora")
    assert lora_stats["comparisons"]["f1_macro"]["difference"]["low"] == pytest.approx(d.low)
    assert lora_stats["metrics"]["f1_macro"]["estimate"] == pytest.approx(experiment.runs[1].test_metrics["f1_macro"])
    interval = lora_stats["metrics"]["f1_macro"]
    assert f"{interval['estimate']:.4f} ({interval['low']:.4f}–{interval['high']:.4f})" in markdown
    row = next(r for r in csv.DictReader(paths["csv"].open()) if r["method"] == "lora")
    assert row["f1_macro_verdict"] == "worse than full"
    assert float(row["test_f1_macro_ci_low"]) == pytest.approx(interval["low"], abs=1e-6)
    assert (tmp_path / "plots" / "test_quality.png").stat().st_size > 1000
    assert paths["html"].read_text().count("data:image/png;base64,") == 5


def test_identical_predictions_are_no_detectable_difference(tmp_path: Path) -> None:
    same = predicted_with(20, seed=0)
    experiment = saved_experiment([saved_run(tmp_path, "full", "full", same), saved_run(tmp_path, "lora", "lora", same)])
    write_report(experiment, tmp_path)
    verdict = next(s for s in summary_sentences(experiment) if s.startswith("lora: "))
    assert verdict.startswith("lora: no detectable difference from full in macro F1 on these 150 test rows "
                              "(difference +0.0000, 95% CI +0.0000 to +0.0000)")


def test_report_command_recomputes_the_verdict_from_the_saved_predictions(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from peftlab.cli import app

    full = predicted_with(10, seed=0)
    experiment = saved_experiment([saved_run(tmp_path, "full", "full", full),
                                   saved_run(tmp_path, "lora", "lora", predicted_with(60, seed=1))])
    write_report(experiment, tmp_path)
    assert "lora: worse than full" in (tmp_path / "report.md").read_text()
    # Overwrite lora's saved predictions with full's: only a report that rereads the files can notice.
    save_predictions(tmp_path / "lora" / "test_predictions.jsonl",
                     SavedPredictions(LABELS, TRUE, full, np.eye(3)[full]))
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report.md").read_text()
    assert "lora: no detectable difference from full" in markdown and "lora: worse than" not in markdown


def test_reference_is_configurable(tmp_path: Path) -> None:
    experiment = saved_experiment([saved_run(tmp_path, "full", "full", predicted_with(10, seed=0)),
                                   saved_run(tmp_path, "lora", "lora", predicted_with(60, seed=1))],
                                  report={"reference": "lora", "bootstrap_samples": 200},
                                  training={"class_weights": "balanced"})
    write_report(experiment, tmp_path)
    assert experiment.statistics["reference"] == "lora" and experiment.statistics["bootstrap_samples"] == 200
    sentences = summary_sentences(experiment)
    assert any(s.startswith("full: better than lora in macro F1") for s in sentences)
    assert "losses are class-weighted cross-entropy (training.class_weights: balanced)" in " ".join(sentences)


def test_several_seeds_show_mean_std_and_per_seed_rows(tmp_path: Path) -> None:
    runs = [saved_run(tmp_path, "full", "full", predicted_with(10, seed=0)),
            saved_run(tmp_path, "lora", "lora", predicted_with(30, seed=1), seed=1),
            saved_run(tmp_path, "lora", "lora", predicted_with(50, seed=2), seed=2)]
    experiment = saved_experiment(runs)
    paths = write_report(experiment, tmp_path)
    f1s = [r.test_metrics["f1_macro"] for r in runs[1:]]
    lora = next(m for m in experiment.statistics["methods"] if m["name"] == "lora")
    assert lora["seeds"] == [1, 2] and lora["per_seed"]["f1_macro"] == pytest.approx(f1s)
    assert lora["metrics"]["f1_macro"]["estimate"] == pytest.approx(np.mean(f1s))
    markdown = paths["markdown"].read_text()
    mean_row = next(line for line in markdown.splitlines() if line.startswith("| lora | mean of 2 |"))
    assert f"{np.mean(f1s):.4f} ± {np.std(f1s, ddof=1):.4f}" in mean_row
    assert "| lora | 1 |" in markdown and "| lora | 2 |" in markdown and "### lora, seed 2" in markdown
    assert any(s.startswith("Seeds 1, 2, 42: metrics are the mean ± std") for s in summary_sentences(experiment))


def test_never_predicted_class_is_flagged_from_the_confusion_matrix_without_predictions(
        experiment: ExperimentResult) -> None:
    experiment.runs[1].confusion_matrix = [[3, 0], [3, 0]]  # nothing predicted as pos
    assert "lora never predicts pos on the test split (recall 0 for that class)." in summary_sentences(experiment)
