"""Report rendering from results alone: tables, computed summary, self-contained HTML, re-render from JSON."""

from __future__ import annotations

import base64
import csv
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from peftlab.evaluate import classification_metrics, confusion, per_class_report
from peftlab.report import summary_sentences, write_report
from peftlab.results import (
    EpochRecord,
    ExperimentResult,
    ParameterParts,
    RunResult,
    SavedPredictions,
    save_predictions,
)
from peftlab.stats import paired_comparison


def run(name: str, method: str, f1: float, trainable: int, size: int, seconds: float,
        parts: ParameterParts | None = None) -> RunResult:
    history = [EpochRecord(epoch=e, step=10 * e, train_loss=1.0 / e, eval_loss=1.1 / e,
                           metrics={"f1_macro": f1 - 0.1 / e, "accuracy": f1}) for e in (1, 2)]
    return RunResult(name=name, method=method, task="classification", trainable_params=trainable,
                     total_params=1_000_000, model_size_bytes=size, wall_time_s=seconds, train_samples_per_s=10.0,
                     peak_rss_bytes=2**30, optimizer_state_bytes=2 * size, best_epoch=2, best_metric_name="f1_macro",
                     best_metric=f1, history=history,
                     test_metrics={"loss": 0.5, "accuracy": f1, "precision_macro": f1, "recall_macro": f1, "f1_macro": f1},
                     per_class={"neg": {"precision": 1, "recall": 1, "f1": 1, "support": 3},
                                "pos": {"precision": 1, "recall": 1, "f1": 1, "support": 3}},
                     confusion_matrix=[[3, 0], [0, 3]], parameter_parts=parts)


@pytest.fixture
def experiment() -> ExperimentResult:
    return ExperimentResult(
        name="unit", task="classification", config={"model": {"path": "tiny"}},
        data_report={"source": "x.csv", "format": "csv", "raw_rows": 10, "kept_rows": 8,
                     "dropped": {"missing_label": 2}, "dropped_examples": {"missing_label": ["x.csv line 3"]},
                     "split_sizes": {"train": 6, "validation": 1, "test": 1}, "class_counts": {},
                     "max_length": 128, "notes": []},
        runs=[run("full", "full", 0.80, 1_000_000, 80_000_000, 100.0, ParameterParts(head=2_000, other=998_000,
                                                                                     base=1_000_000)),
              run("lora", "lora", 0.78, 3_000, 1_000_000, 50.0, ParameterParts(adapter=1_000, head=2_000,
                                                                                base=1_000_000)),
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
    # 4 plots (no predictions: no interval plot) and one confusion matrix per finished method.
    assert html.count("data:image/png;base64,") == 6 and "<script" not in html
    for plot in ("loss.png", "quality.png", "costs.png", "pareto.png", "confusion_full.png", "confusion_lora.png"):
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
    assert paths["html"].read_text().count("data:image/png;base64,") == 7  # 5 plots, 2 confusion matrices


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


# --------------------------------------------------------------------------- one document, two renderings


class _Page(HTMLParser):
    """Headings, tables (header cells, body rows) and pictures of an HTML page, as a reader sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.tables: list[tuple[list[str], int]] = []
        self.images: list[tuple[str, str]] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("h1", "h2", "h3", "h4", "th"):
            self._text = []
        elif tag == "table":
            self.tables.append(([], 0))
        elif tag == "tr" and self.tables and self._in_body:
            header, rows = self.tables[-1]
            self.tables[-1] = (header, rows + 1)
        elif tag == "tbody":
            self._in_body = True
        elif tag == "img":
            values = dict(attrs)
            self.images.append((values.get("alt") or "", values.get("src") or ""))

    _in_body = False

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2", "h3", "h4") and self._text is not None:
            self.headings.append("".join(self._text))
        elif tag == "th" and self._text is not None:
            self.tables[-1][0].append("".join(self._text))
        elif tag in ("tbody", "table"):
            self._in_body = False
        if tag in ("h1", "h2", "h3", "h4", "th"):
            self._text = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def _plain(markdown_text: str) -> str:
    """What a reader sees of an inline markdown text: escapes and code marks gone."""
    return re.sub(r"\\([\\`*\[\]<>&|])", r"\1", markdown_text.replace("`", ""))


def markdown_structure(markdown: str) -> tuple[list[str], list[tuple[list[str], int]], list[tuple[str, str]]]:
    """Headings, tables (header cells, body rows) and pictures (alt, link) of a markdown document."""
    lines = markdown.splitlines()
    headings = [_plain(m) for m in re.findall(r"^#{1,6} (.+)$", markdown, flags=re.MULTILINE)]
    tables = []
    for index, line in enumerate(lines):
        if re.fullmatch(r"\|(---\|)+", line):
            header = [_plain(c.strip()) for c in re.split(r"(?<!\\)\|", lines[index - 1])[1:-1]]
            rows = 0
            while index + 1 + rows < len(lines) and lines[index + 1 + rows].startswith("|"):
                rows += 1
            tables.append((header, rows))
    images = [(_plain(alt), link) for alt, link in re.findall(r"^!\[(.*)\]\((\S+)\)$", markdown, flags=re.MULTILINE)]
    return headings, tables, images


def assert_html_holds_the_markdown(run_dir: Path) -> _Page:
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    page = _Page()
    page.feed((run_dir / "report.html").read_text(encoding="utf-8"))
    headings, tables, images = markdown_structure(markdown)
    assert headings and page.headings == headings
    assert tables and page.tables == tables
    assert [alt for alt, _ in page.images] == [alt for alt, _ in images]
    for (_, link), (_, src) in zip(images, page.images):
        assert (run_dir / link).is_file()  # the markdown links a file of the run directory ...
        # ... and the page carries that very file, so it opens anywhere.
        assert src == "data:image/png;base64," + base64.b64encode((run_dir / link).read_bytes()).decode()
    return page


def test_html_holds_every_heading_table_and_picture_of_the_markdown(tmp_path: Path, experiment: ExperimentResult,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from peftlab import report

    ticks: dict[str, list[float]] = {}
    save = report._save

    def recording_save(fig: object, path: Path) -> Path:
        fig.canvas.draw()  # type: ignore[attr-defined]
        ticks[path.name] = [t.get_position()[0] for t in fig.axes[0].get_xticklabels()]  # type: ignore[attr-defined]
        return save(fig, path)

    monkeypatch.setattr(report, "_save", recording_save)
    experiment.data_report["dropped_examples"]["missing_label"] = ["x.csv line 3 <3 | &amp; *not emphasis*"]
    write_report(experiment, tmp_path)
    page = assert_html_holds_the_markdown(tmp_path)
    for heading in ("Per-class test results", "Per-epoch history", "Environment", "Trainable parameters by part",
                    "Plots"):
        assert heading in page.headings
    assert sum(1 for header, _ in page.tables if header == ["class", "precision", "recall", "f1", "support"]) == 2
    assert "x.csv line 3 &lt;3 | &amp;amp; *not emphasis*" in (tmp_path / "report.html").read_text()
    # Integer epoch ticks on a 2-epoch run (matplotlib's default would put them at 1.2, 1.4, ...).
    for plot in ("loss.png", "quality.png"):
        assert ticks[plot] and all(float(t).is_integer() for t in ticks[plot]), ticks[plot]
    assert {"confusion_full.png", "confusion_lora.png"} <= set(ticks)


def test_parameter_parts_are_in_the_report_and_the_csv(tmp_path: Path, experiment: ExperimentResult) -> None:
    from peftlab.report import parameter_rows, results_rows

    rows = {r["method"]: r for r in parameter_rows(experiment)}
    assert rows["lora"] == {"method": "lora", "adapter weights": "1.0K (0.10%)", "head (modules_to_save)": "2.0K (0.20%)",
                            "prompt": "0", "other": "0", "trainable": "3.0K (0.30%)", "base model": "1.00M"}
    assert rows["full"]["other"] == "998.0K (99.80%)" and "prefix_tuning" not in rows  # failed: nothing counted
    csv_row = results_rows(experiment)[1]
    assert (csv_row["params_adapter"], csv_row["params_head"], csv_row["base_params"]) == (1_000, 2_000, 1_000_000)


def test_paths_are_shown_relative_to_the_run_directory(tmp_path: Path, experiment: ExperimentResult) -> None:
    from peftlab.report import render_markdown

    folder = tmp_path / "data" / "SNS" / "04. IT기기"
    files = [str(folder / "a.json"), str(folder / "b.json")]
    experiment.config = {"model": {"path": str(tmp_path / "models" / "tiny")}, "data": {"path": str(folder)}}
    experiment.data_report.update(source=f"{folder} (2 files)", files={files[0]: 4, files[1]: 6},
                                  dropped_examples={"missing_label": [f"{files[1]} record 3"]})
    markdown = render_markdown(experiment, {}, tmp_path / "runs" / "x")
    assert str(tmp_path) not in markdown
    assert "source: `../../data/SNS/04. IT기기 (2 files)`" in markdown
    assert "missing_label: 2 (e.g. ../../data/SNS/04. IT기기/b.json record 3)" in markdown
    assert "model: `../../models/tiny`" in markdown and "`../../data/SNS/04. IT기기/a.json` 4" in markdown

    installed = "/venv/lib/python3.11/site-packages/peftlab/resources/data/ko_reviews.csv"
    experiment.config["data"] = {"path": "shipped:ko-reviews"}
    experiment.data_report.update(source=installed, files={}, dropped_examples={"missing_label": [f"{installed} line 9"]})
    markdown = render_markdown(experiment, {}, tmp_path / "runs" / "x")
    assert "source: `shipped:ko-reviews`" in markdown and "shipped:ko-reviews line 9" in markdown
    assert "site-packages" not in markdown


def test_study_page_holds_the_study_markdown(tmp_path: Path) -> None:
    from peftlab.report import write_study_report
    from peftlab.results import MethodStudy, StudyResult, TrialRecord

    trials = [TrialRecord(number=0, state="COMPLETE", params={"learning_rate": 1e-3}, value=0.6, intermediate=[0.5, 0.6]),
              TrialRecord(number=1, state="PRUNED", params={"learning_rate": 1e-2}, value=0.4, intermediate=[0.4])]
    study = StudyResult(name="unit", metric="f1_macro", budget=2, storage="in memory", sampler="TPESampler",
                        pruner="MedianPruner", tuned_config="tuned.yaml", environment={"optuna": "5.0.0"},
                        methods=[MethodStudy(name="lora", method="lora", study_name="unit-lora", direction="maximize",
                                             space=[{"name": "learning_rate", "kind": "log_float", "low": 1e-4,
                                                     "high": 1e-2, "description": "Peak learning rate."}],
                                             trials=trials, best_trial=0, best_value=0.6,
                                             chosen={"learning_rate": 1e-3})])
    write_study_report(study, tmp_path)
    page = assert_html_holds_the_markdown(tmp_path)
    assert {"Chosen settings", "Trials", "Plots", "Environment"} <= set(page.headings) and len(page.images) == 1


def test_class_names_the_plot_font_cannot_draw_are_numbered_and_named_below(tmp_path: Path) -> None:
    import warnings

    from peftlab.report import make_confusion_plots, render_markdown

    korean = ["부정", "중립", "긍정"]
    predicted = predicted_with(30, seed=0)
    result = RunResult(name="lora", method="lora", task="classification",
                       per_class=per_class_report(TRUE, predicted, korean), confusion_matrix=confusion(TRUE, predicted, 3))
    experiment = saved_experiment([result])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns for every glyph missing from its font
        pictures = make_confusion_plots(experiment, tmp_path)
    assert pictures[0].numbered and pictures[0].path == tmp_path / "plots" / "confusion_lora.png"
    markdown = render_markdown(experiment, {}, tmp_path, pictures)
    assert "![Confusion matrix: lora](plots/confusion_lora.png)" in markdown
    assert "Classes are numbered on the picture in the table's order: 0 부정, 1 중립, 2 긍정." in markdown


def test_summary_names_methods_near_the_majority_class_floor(tmp_path: Path) -> None:
    """Balanced 3 classes: always one class scores F1 (2/4)/3 = 1/6; a constant predictor is flagged, a good one not."""
    constant = np.zeros_like(TRUE)
    experiment = saved_experiment([saved_run(tmp_path, "full", "full", predicted_with(10, seed=0)),
                                   saved_run(tmp_path, "p_tuning", "p_tuning", constant)])
    write_report(experiment, tmp_path)
    floor = next(s for s in summary_sentences(experiment) if s.startswith("Always predicting"))
    assert floor.startswith(f"Always predicting the most frequent class scores macro F1 {1 / 6:.4f}")
    assert "p_tuning is within 0.15 of it" in floor and "full" not in floor.split(";")[1]


@pytest.mark.parametrize("share, text", [(1.0, "100%"), (0.123, "12%"), (0.0134, "1.3%"), (0.01, "1%"), (0.00041, "0.041%")])
def test_shares_read_as_plain_percentages(share, text):
    from peftlab.report import _percent

    assert _percent(share) == text


def test_study_report_says_when_the_best_learning_rate_is_at_an_end_of_its_range(tmp_path: Path) -> None:
    from peftlab.report import render_study_markdown
    from peftlab.results import MethodStudy, StudyResult, TrialRecord

    space = [{"name": "learning_rate", "kind": "log-uniform", "low": 1e-4, "high": 1e-2, "description": "lr"},
             {"name": "num_virtual_tokens", "kind": "choice", "choices": [10, 20], "description": "tokens"}]

    def method(name: str, best_lr: float) -> MethodStudy:
        trials = [TrialRecord(number=0, state="COMPLETE", params={"learning_rate": best_lr, "num_virtual_tokens": 10},
                              value=0.3, intermediate=[0.3])]
        return MethodStudy(name=name, method="p_tuning", study_name=name, direction="maximize", space=space,
                           trials=trials, best_trial=0, best_value=0.3,
                           best_params={"learning_rate": best_lr, "num_virtual_tokens": 10},
                           chosen={"learning_rate": best_lr, "num_virtual_tokens": 10})

    study = StudyResult(name="unit", metric="f1_macro", budget=1, storage="in memory", sampler="TPESampler",
                        pruner="MedianPruner", methods=[method("low", 1.3e-4), method("middle", 1e-3),
                                                        method("high", 8e-3)])
    text = render_study_markdown(study, {}, tmp_path)
    assert "low: the best learning_rate, 0.00013, is at the low end" in text
    assert "{low: {learning_rate: {low: 1e-05, high: 1e-02}}}" in text
    assert "high: the best learning_rate, 0.008, is at the high end" in text
    assert "middle: the best" not in text and "num_virtual_tokens, " not in text
