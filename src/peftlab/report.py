"""Render results: console tables, report.md, results.csv/json, plots and a self-contained report.html.

The only module that turns measured results into text or pictures. Every
number shown comes from :class:`ExperimentResult`; the summary sentences are
computed from it, never written by hand. The report is built once, as the
markdown of report.md; report.html is that text rendered by markdown-it-py into
the page template (``resources/templates/report.html.j2``), pictures inlined,
so the two cannot drift apart. Paths are shown relative to the run directory.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import logging
import math
import os
import re
import urllib.parse
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from peftlab import fsutil
from peftlab.evaluate import perplexity
from peftlab.results import ExperimentResult, RunResult, StudyResult, load_predictions
from peftlab.stats import NO_DIFFERENCE, ExperimentStats, Interval, MethodStats, reference_name, run_statistics

logger = logging.getLogger(__name__)

PLOTS = "plots"


# --------------------------------------------------------------------------- formatting


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def human_count(value: int) -> str:
    if value >= 1_000_000:
        return f"{value / 1e6:.2f}M"
    if value >= 1_000:
        return f"{value / 1e3:.1f}K"
    return str(value)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _ratio(value: float) -> str:
    """'1/80' for small ratios, '2.3x' for large ones."""
    if value <= 0:
        return "0x"
    if value < 1:
        return f"1/{1 / value:.0f}" if value < 0.5 else f"{value:.2f}x"
    return f"{value:.2f}x"


# --------------------------------------------------------------------------- tables


def _ok(runs: list[RunResult]) -> list[RunResult]:
    return [r for r in runs if r.status == "ok"]


def _statistics(experiment: ExperimentResult) -> ExperimentStats | None:
    """The intervals and verdicts :func:`write_report` computed (None before it ran, or for causal LM)."""
    return ExperimentStats.from_dict(experiment.statistics) if experiment.statistics else None


def _groups(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """Runs by name, in first-seen order: one entry per method, several runs when it was trained with several seeds."""
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.name, []).append(run)
    return groups


def _several_seeds(experiment: ExperimentResult) -> bool:
    return any(len(runs) > 1 for runs in _groups(experiment.runs).values())


def _level(stats: ExperimentStats) -> str:
    return f"{100 * stats.confidence:g}%"


def _interval_text(interval: Interval, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{interval.low:{sign}.4f} to {interval.high:{sign}.4f}"


def results_rows(experiment: ExperimentResult) -> list[dict[str, Any]]:
    """One flat row per run (per method and seed): the comparison table users assemble by hand.

    Intervals and verdicts are per method (over its seeds), repeated on each of its rows.
    """
    stats = _statistics(experiment)
    rows = []
    for run in experiment.runs:
        row: dict[str, Any] = {
            "method": run.name, "type": run.method, "status": run.status, "seed": run.seed,
            "learning_rate": run.learning_rate,
            "trainable_params": run.trainable_params, "total_params": run.total_params,
            "trainable_pct": round(run.trainable_pct, 4),
            "wall_time_s": round(run.wall_time_s, 2), "train_samples_per_s": round(run.train_samples_per_s, 2),
            "step_time_s": round(run.step_time_s, 4),
            "peak_rss_mb": round(run.peak_rss_bytes / 2**20, 1),
            "peak_accelerator_mb": round(run.peak_accelerator_bytes / 2**20, 1) if run.peak_accelerator_bytes else None,
            "model_size_mb": round(run.model_size_bytes / 2**20, 3),
            "optimizer_state_mb": round(run.optimizer_state_bytes / 2**20, 3),
            "best_epoch": run.best_epoch, "epochs_run": run.epochs_run,
        }
        if run.parameter_parts is not None:
            parts = run.parameter_parts
            row.update({"params_adapter": parts.adapter, "params_head": parts.head, "params_prompt": parts.prompt,
                        "params_other": parts.other, "base_params": parts.base})
        for key, value in run.test_metrics.items():
            row[f"test_{key}"] = round(value, 6)
        method_stats = stats.method(run.name) if stats and run.status == "ok" else None
        if method_stats is not None:
            for metric, interval in method_stats.metrics.items():
                row[f"test_{metric}_ci_low"] = round(interval.low, 6)
                row[f"test_{metric}_ci_high"] = round(interval.high, 6)
            for metric, comparison in method_stats.comparisons.items():
                row[f"{metric}_minus_{comparison.reference}"] = round(comparison.difference.estimate, 6)
                row[f"{metric}_minus_{comparison.reference}_ci_low"] = round(comparison.difference.low, 6)
                row[f"{metric}_minus_{comparison.reference}_ci_high"] = round(comparison.difference.high, 6)
                row[f"{metric}_verdict"] = f"{comparison.verdict} {comparison.reference}"
        if run.error:
            row["error"] = run.error
        rows.append(row)
    return rows


def summary_sentences(experiment: ExperimentResult) -> list[str]:
    """Data-driven comparisons of each method against the reference (full fine-tuning by default)."""
    return _comparison_sentences(experiment) + missing_sentences(experiment)


def missing_sentences(experiment: ExperimentResult) -> list[str]:
    """Which runs of the config this report lacks (another process trains them, or nobody ran them yet)."""
    if not experiment.missing:
        return []
    # No markup: summary sentences are escaped as text (md_escape), so backticks would show as written.
    return [f"Not in this report yet: {'; '.join(experiment.missing)}. Once they finish, peftlab report RUN_DIR "
            f"merges them."]


def _comparison_sentences(experiment: ExperimentResult) -> list[str]:
    runs = _ok(experiment.runs)
    if not runs:
        return ["No method finished; see the errors in the table."]
    if experiment.task == "classification":
        return _classification_summary(experiment, runs)
    best = min(runs, key=lambda r: r.test_metrics.get("loss", float("inf")))
    sentences = [f"Lowest test loss: {best.name} ({best.test_metrics.get('loss', 0):.4f}, "
                 f"perplexity {best.test_metrics.get('perplexity', float('nan')):.2f})."]
    if experiment.base_eval_loss is not None:
        sentences.append(f"The base model's test loss before training was {experiment.base_eval_loss:.4f}.")
    reference = next((r for r in runs if r.method == "full"), None)
    if reference is None:
        return sentences
    for run in runs:
        if run is reference:
            continue
        delta = run.test_metrics.get("loss", 0) - reference.test_metrics.get("loss", 0)
        sentences.append(f"{run.name}'s test loss is {delta:+.4f} against {reference.name}'s {_cost_clause(run, reference)}.")
    return sentences


def _percent(share: float) -> str:
    """A share as a percentage with two significant digits and no exponent: 100%, 12%, 1.3%, 1%, 0.041%."""
    pct = 100 * share
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def _cost_clause(run: RunResult, reference: RunResult) -> str:
    params = run.trainable_params / max(1, reference.trainable_params)
    disk = run.model_size_bytes / max(1, reference.model_size_bytes)
    time_ratio = run.wall_time_s / max(1e-9, reference.wall_time_s)
    return (f"with {_percent(params)} of the trainable parameters and {_ratio(disk)} of the disk size, in "
            f"{_ratio(time_ratio)} the training time")


def _mean_metric(runs: list[RunResult], stats: MethodStats | None, metric: str) -> float:
    if stats is not None:
        return stats.metrics[metric].estimate
    return sum(r.test_metrics.get(metric, 0.0) for r in runs) / len(runs)


def _classification_summary(experiment: ExperimentResult, runs: list[RunResult]) -> list[str]:
    """Best method, one verdict per method against the reference with its paired interval, classes never predicted."""
    stats = _statistics(experiment)
    groups = _groups(runs)
    by_name = {name: stats.method(name) if stats else None for name in groups}
    f1 = {name: _mean_metric(group, by_name[name], "f1_macro") for name, group in groups.items()}
    best = max(f1, key=f1.get)  # type: ignore[arg-type]
    several = any(len(group) > 1 for group in groups.values())
    best_stats = by_name[best]
    detail = f"{f1[best]:.4f}"
    if best_stats is not None:
        if several and best_stats.std["f1_macro"] is not None:
            detail = f"mean {detail} ± {best_stats.std['f1_macro']:.4f} over {len(best_stats.seeds)} seeds"
        detail += f", {_level(stats)} CI {_interval_text(best_stats.metrics['f1_macro'])}"  # type: ignore[arg-type]
    sentences = [f"Best test macro F1: {best} ({detail})."]
    if stats is not None:
        # Said once so that the verdicts below are read as "at this test size", not "equal".
        sentences.append(f"Intervals: {_level(stats)} percentile bootstrap over the {stats.test_rows} test rows "
                         f"({stats.bootstrap_samples} resamples, seed {stats.seed}); each verdict is a paired "
                         f"bootstrap of the difference on the same resampled rows.")
    if several:
        seeds = sorted({str(r.seed) for r in runs})
        sentences.append(f"Seeds {', '.join(seeds)}: metrics are the mean ± std over each method's seeds; the "
                         f"intervals resample test rows and average the seeds' metrics on each resample.")
    configured = (experiment.config.get("report") or {}).get("reference")
    reference = stats.reference if stats else reference_name(list(groups), [g[0].method for g in groups.values()],
                                                             configured)
    if reference in groups:
        for name, group in groups.items():
            if name == reference:
                continue
            sentences.append(_verdict_sentence(name, reference, group, groups[reference], by_name[name], stats,
                                               f1[name] - f1[reference]))
    for name, group in groups.items():
        sentence = _never_predicted_sentence(name, group, by_name[name])
        if sentence:
            sentences.append(sentence)
    if stats is not None and stats.majority:
        sentences.append(_floor_sentence(stats.majority["f1_macro"], f1))
    weights = (experiment.config.get("training") or {}).get("class_weights", "none")
    if weights != "none":  # the Trainer's loss is the weighted one, in evaluation too
        sentences.append(f"Training, validation and test losses are class-weighted cross-entropy "
                         f"(training.class_weights: {weights}); accuracy and F1 are not weighted.")
    if stats is not None:
        sentences += stats.notes
    return sentences


# A method this close to always predicting the most frequent class has learnt little beyond the class balance.
FLOOR_MARGIN = 0.15


def _floor_sentence(floor: float, f1: dict[str, float]) -> str:
    """The majority-class floor, and the methods within FLOOR_MARGIN of it (with what to do about them)."""
    text = f"Always predicting the most frequent class scores macro F1 {floor:.4f} on this test split"
    near = [name for name, value in f1.items() if value < floor + FLOOR_MARGIN]
    if not near:
        return text + f"; every method is more than {FLOOR_MARGIN} above it."
    verb = "is" if len(near) == 1 else "are"
    return (text + f"; {_and(near)} {verb} within {FLOOR_MARGIN} of it: little learnt beyond the class balance. "
            "Its settings may be at fault: tune it within the same budget as the others (`peftlab run --tune`) "
            "and read its study, or train longer.")


def _verdict_sentence(name: str, reference: str, runs: list[RunResult], reference_runs: list[RunResult],
                      stats: MethodStats | None, experiment_stats: ExperimentStats | None, difference: float) -> str:
    comparison = stats.comparisons.get("f1_macro") if stats else None
    costs = _cost_clause(_mean_run(runs), _mean_run(reference_runs))
    if comparison is None or experiment_stats is None:
        return (f"{name}'s test macro F1 differs from {reference}'s by {difference:+.4f} (no saved test predictions, "
                f"so no interval: whether this is more than noise is unknown), {costs}.")
    where = f"on these {experiment_stats.test_rows} test rows" if comparison.verdict == NO_DIFFERENCE else ""
    return (f"{name}: {comparison.verdict} {reference} in macro F1{' ' + where if where else ''} (difference "
            f"{comparison.difference.estimate:+.4f}, {_level(experiment_stats)} CI "
            f"{_interval_text(comparison.difference, signed=True)}), {costs}.")


def _mean_run(runs: list[RunResult]) -> RunResult:
    """A run whose costs are the mean over seeds (parameters and sizes do not change with the seed)."""
    if len(runs) == 1:
        return runs[0]
    return dataclasses.replace(runs[0], wall_time_s=sum(r.wall_time_s for r in runs) / len(runs))


def _never_predicted_sentence(name: str, runs: list[RunResult], stats: MethodStats | None) -> str | None:
    """'lora never predicts neutral': from the saved predictions, else from the confusion matrices."""
    if stats is not None:
        missing, seeds = stats.never_predicted, len(stats.seeds)
    else:
        missing, seeds = {}, len(runs)
        for run in runs:
            labels = list(run.per_class)
            for j, label in enumerate(labels):
                if run.confusion_matrix and sum(row[j] for row in run.confusion_matrix) == 0:
                    missing[label] = missing.get(label, 0) + 1
    if not missing:
        return None
    always = [c for c, n in missing.items() if n == seeds]
    some = [c for c, n in missing.items() if n < seeds]
    parts = []
    if always:
        parts.append(f"{name} never predicts {_and(always)} on the test split (recall 0 for "
                     f"{'that class' if len(always) == 1 else 'those classes'})"
                     + (f" in any of its {seeds} seeds" if seeds > 1 else ""))
    if some:
        parts.append(f"{name} never predicts " + ", ".join(f"{c} in {missing[c]} of {seeds} seeds" for c in some))
    return "; ".join(parts) + "."


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


# --------------------------------------------------------------------------- plots


def make_plots(experiment: ExperimentResult, folder: Path) -> dict[str, Path]:
    """Loss curves, quality curves and cost bars as PNG files; returns title -> path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = _ok(experiment.runs)
    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    if not runs:
        return plots
    classify = experiment.task == "classification"

    several = _several_seeds(experiment)
    label = {id(r): f"{r.name} seed {r.seed}" if several else r.name for r in runs}
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        epochs = [h.epoch for h in run.history]
        ax.plot(epochs, [h.eval_loss for h in run.history], "-o", color=color, label=f"{label[id(run)]} eval")
        train = [(h.epoch, h.train_loss) for h in run.history if h.train_loss is not None]
        if train:
            ax.plot(*zip(*train), "--", color=color, alpha=0.6, label=f"{label[id(run)]} train")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no 1.2, 1.4 ticks
    ax.set_ylabel("loss")
    ax.set_title("Train (dashed) and validation (solid) loss")
    ax.legend(fontsize=7)
    plots["Loss per epoch"] = _save(fig, folder / "loss.png")

    metric = "f1_macro" if classify else "perplexity"
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, run in enumerate(runs):
        ax.plot([h.epoch for h in run.history], [h.metrics.get(metric) for h in run.history], "-o",
                color=f"C{index % 10}", label=label[id(run)])
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation " + ("macro F1" if classify else "perplexity"))
    ax.set_title(("Validation macro F1" if classify else "Validation perplexity") + " per epoch")
    ax.legend(fontsize=7)
    plots["Validation " + ("macro F1" if classify else "perplexity") + " per epoch"] = _save(fig, folder / "quality.png")

    names = [label[id(r)] for r in runs]
    bars = [
        ("Training time (s)", [r.wall_time_s for r in runs], False),
        ("Peak memory, RSS (MB)", [r.peak_rss_bytes / 2**20 for r in runs], False),
        ("Size on disk (MB, log)", [max(r.model_size_bytes, 1) / 2**20 for r in runs], True),
        ("Trainable parameters (log)", [max(r.trainable_params, 1) for r in runs], True),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, values, log) in zip(axes.flat, bars):
        ax.bar(names, values, color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        for i, value in enumerate(values):
            ax.annotate(f"{value:.3g}" if value < 1000 else human_count(int(value)), (i, value), ha="center",
                        va="bottom", fontsize=7)
    fig.suptitle("Cost per method")
    plots["Cost per method"] = _save(fig, folder / "costs.png")

    if classify:
        stats = _statistics(experiment)
        groups = _groups(runs)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for index, (name, group) in enumerate(groups.items()):
            method_stats = stats.method(name) if stats else None
            x = max(group[0].trainable_params, 1)
            y = _mean_metric(group, method_stats, "f1_macro")
            if method_stats is not None:
                interval = method_stats.metrics["f1_macro"]
                ax.errorbar(x, y, yerr=[[y - interval.low], [interval.high - y]], fmt="o", markersize=7, capsize=4,
                            color=f"C{index % 10}")
            else:
                ax.scatter(x, y, s=60, color=f"C{index % 10}")
            ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("test macro F1")
        ax.set_title("Quality against cost" + (f" ({_level(stats)} CI)" if stats else ""))
        plots["Quality against cost"] = _save(fig, folder / "pareto.png")
        if stats is not None and stats.methods:
            plots[f"Test quality with {_level(stats)} intervals"] = _test_quality_plot(stats, folder / "test_quality.png")
    return plots


def _test_quality_plot(stats: ExperimentStats, path: Path) -> Path:
    """Macro F1 and accuracy per method with their bootstrap intervals as error bars; one dot per seed."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    first_with_seeds = next((m.name for m in stats.methods if len(m.seeds) > 1), None)
    for ax, metric, title in zip(axes, ("f1_macro", "accuracy"), ("macro F1", "accuracy")):
        for index, method in enumerate(stats.methods):
            interval = method.metrics[metric]
            ax.errorbar(index, interval.estimate, yerr=[[interval.estimate - interval.low],
                                                        [interval.high - interval.estimate]],
                        fmt="o", capsize=5, markersize=7, color=f"C{index % 10}")
            if len(method.seeds) > 1:
                ax.scatter([index + 0.15] * len(method.seeds), method.per_seed[metric], s=12, color="grey",
                           zorder=3, label="one seed" if method.name == first_with_seeds else None)
        ax.set_xticks(range(len(stats.methods)), [m.name for m in stats.methods], rotation=30, fontsize=8)
        ax.set_ylabel(f"test {title}")
        ax.set_title(f"Test {title}, {_level(stats)} bootstrap CI ({stats.test_rows} rows)")
        if first_with_seeds is not None:
            ax.legend(fontsize=7)
    return _save(fig, path)


@dataclasses.dataclass(frozen=True)
class ConfusionPicture:
    """A confusion-matrix picture; ``numbered``: its classes are drawn as 0..n-1 (the font lacks their glyphs)."""

    path: Path
    numbered: bool = False


def make_confusion_plots(experiment: ExperimentResult, run_dir: Path) -> dict[int, ConfusionPicture]:
    """One confusion-matrix picture per finished classification run, keyed by its index in ``experiment.runs``.

    The counts are the run's saved test confusion matrix (or, for a result without one, its saved test
    predictions): the test split is never read again. Colour is the row's share (recall per true class).
    """
    if experiment.task != "classification":
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures: dict[int, ConfusionPicture] = {}
    names: set[str] = set()
    for index, run in enumerate(experiment.runs):
        if run.status != "ok":
            continue
        labels, matrix = _saved_confusion(run, run_dir)
        if not matrix:
            continue
        counts = [[int(v) for v in row] for row in matrix]
        n = len(labels)
        ticks = labels if all(_drawable(label) for label in labels) else [str(i) for i in range(n)]
        side = 1.6 + 0.55 * n
        fig, ax = plt.subplots(figsize=(side + 0.6, side))
        shares = [[v / max(1, sum(row)) for v in row] for row in counts]
        ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i][j]), ha="center", va="center", fontsize=9,
                        color="white" if shares[i][j] > 0.6 else "black")
        ax.set_xticks(range(n), ticks, rotation=30 if max(len(t) for t in ticks) > 6 else 0, fontsize=8)
        ax.set_yticks(range(n), ticks, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        title = _run_title(experiment, run)
        ax.set_title(title if _drawable(title) else f"method {index + 1}", fontsize=9)
        path = _save(fig, run_dir / PLOTS / f"confusion_{_file_stem(title, names)}.png")
        pictures[index] = ConfusionPicture(path, numbered=ticks != labels)
    return pictures


def _saved_confusion(run: RunResult, run_dir: Path) -> tuple[list[str], list[list[int]]]:
    """Class names and the test confusion matrix as the run saved them (its predictions file as a fallback)."""
    if run.confusion_matrix:
        return list(run.per_class), run.confusion_matrix
    if run.predictions_file and (run_dir / run.predictions_file).is_file():
        saved = load_predictions(run_dir / run.predictions_file)
        matrix = [[0] * len(saved.labels) for _ in saved.labels]
        for true, predicted in zip(saved.true, saved.predicted):
            matrix[int(true)][int(predicted)] += 1
        return saved.labels, matrix
    return list(run.per_class), []


def _drawable(text: str) -> bool:
    """Whether matplotlib's default font has every glyph of ``text`` (Hangul is missing from DejaVu Sans)."""
    from matplotlib.font_manager import FontProperties, findfont, get_font

    font = get_font(findfont(FontProperties()))
    return all(font.get_char_index(ord(c)) != 0 for c in text if not c.isspace())


def _file_stem(name: str, taken: set[str]) -> str:
    """A file-name-safe, unique stem for ``name``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "method"
    candidate, number = stem, 2
    while candidate in taken:
        candidate, number = f"{stem}_{number}", number + 1
    taken.add(candidate)
    return candidate


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    fsutil.write_bytes(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------- documents


def _markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    """A table cell: one line, its pipes escaped (a pipe that is already escaped stays as it is)."""
    return re.sub(r"(?<!\\)\|", r"\\|", str(value).replace("\n", " "))


def _comparison(experiment: ExperimentResult) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of the results table: one row per method, plus one per seed when there are several."""
    classify = experiment.task == "classification"
    stats = _statistics(experiment)
    several = _several_seeds(experiment)
    level = f" ({_level(stats)} CI)" if stats else ""
    columns = ["method"] + (["seed"] if several else []) + ["trainable", "time", "samples/s", "peak RSS",
                                                            "model/adapter", "optimizer state", "best epoch"]
    columns += (["test loss", f"accuracy{level}", "macro P", "macro R", f"macro F1{level}"] if classify
                else ["test loss", "perplexity"])
    rows = []
    if not classify and experiment.base_eval_loss is not None:  # the bar every method must clear
        rows.append({"method": "base (no training)", "trainable": "0", "test loss": _fmt(experiment.base_eval_loss),
                     "perplexity": _fmt(perplexity(experiment.base_eval_loss), 2)})
    for name, group in _groups(experiment.runs).items():
        finished = _ok(group)
        method_stats = stats.method(name) if stats and finished else None
        if len(group) > 1 and finished:
            rows.append(_seed_summary_row(name, finished, method_stats, classify, level))
        for run in group:
            row = _run_row(run, classify, level)
            if several:
                row["seed"] = "-" if run.seed is None else str(run.seed)
            if len(group) == 1 and method_stats is not None:  # one seed: the interval sits on the run's own row
                for metric, column in (("accuracy", "accuracy"), ("f1_macro", "macro F1")):
                    row[column + level] = _with_interval(method_stats.metrics[metric])
            rows.append(row)
    return columns, rows


def _run_row(run: RunResult, classify: bool, level: str) -> dict[str, Any]:
    if run.status != "ok":
        return {"method": f"{run.name} (failed)", "trainable": run.error or ""}
    pct = f"{run.trainable_pct:.2f}" if run.trainable_pct >= 0.01 else f"{run.trainable_pct:.2g}"
    row = {"method": run.name, "trainable": f"{human_count(run.trainable_params)} ({pct}%)",
           "time": f"{run.wall_time_s:.1f} s", "samples/s": f"{run.train_samples_per_s:.1f}",
           "peak RSS": human_bytes(run.peak_rss_bytes), "model/adapter": human_bytes(run.model_size_bytes),
           "optimizer state": human_bytes(run.optimizer_state_bytes),
           "best epoch": _fmt(run.best_epoch, 0), "test loss": _fmt(run.test_metrics.get("loss"))}
    if classify:
        row.update({f"accuracy{level}": _fmt(run.test_metrics.get("accuracy")),
                    "macro P": _fmt(run.test_metrics.get("precision_macro")),
                    "macro R": _fmt(run.test_metrics.get("recall_macro")),
                    f"macro F1{level}": _fmt(run.test_metrics.get("f1_macro"))})
    else:
        row["perplexity"] = _fmt(run.test_metrics.get("perplexity"), 2)
    return row


def _seed_summary_row(name: str, runs: list[RunResult], stats: MethodStats | None, classify: bool,
                      level: str) -> dict[str, Any]:
    """Mean ± std over a method's seeds, with the interval of the seed-averaged metric."""
    mean_time = sum(r.wall_time_s for r in runs) / len(runs)
    row: dict[str, Any] = {"method": name, "seed": f"mean of {len(runs)}",
                           "trainable": human_count(runs[0].trainable_params), "time": f"{mean_time:.1f} s",
                           "model/adapter": human_bytes(runs[0].model_size_bytes)}
    if not classify:
        losses = [r.test_metrics.get("loss", float("nan")) for r in runs]
        row["test loss"] = _mean_std(losses)
        return row
    for metric, column in (("accuracy", "accuracy"), ("f1_macro", "macro F1"), ("precision_macro", "macro P"),
                           ("recall_macro", "macro R")):
        key = column + level if metric in ("accuracy", "f1_macro") else column
        row[key] = _mean_std([r.test_metrics.get(metric, float("nan")) for r in runs])
        if stats is not None and metric in stats.metrics:
            interval = stats.metrics[metric]
            row[key] += f" ({interval.low:.4f}–{interval.high:.4f})"
    row["test loss"] = _mean_std([r.test_metrics.get("loss", float("nan")) for r in runs])
    return row


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def _with_interval(interval: Interval) -> str:
    return f"{interval.estimate:.4f} ({interval.low:.4f}–{interval.high:.4f})"


def _data_lines(report: dict[str, Any], show: Callable[[str], str] = str) -> list[str]:
    """The data report as markdown list lines; ``show`` rewrites absolute paths (see :func:`_path_display`)."""
    lines = [f"- source: `{show(report['source'])}` ({report['format']})",
             f"- rows: {report['raw_rows']} raw, {report['kept_rows']} kept, "
             f"{sum(report['dropped'].values())} dropped"]
    files = report.get("files") or {}
    if files:
        shown = ", ".join(f"`{show(name)}` {count}" for name, count in list(files.items())[:_LISTED_FILES])
        more = f" and {len(files) - _LISTED_FILES} more" if len(files) > _LISTED_FILES else ""
        lines.append(f"- files read, in order (records): {shown}{more}")
    if report.get("columns"):
        lines.append("- columns found: " + ", ".join(f"`{c}`" for c in report["columns"]))
    for reason, count in report["dropped"].items():
        where = ", ".join(md_escape(show(e)) for e in report.get("dropped_examples", {}).get(reason, [])[:3])
        lines.append(f"  - {reason}: {count}" + (f" (e.g. {where})" if where else ""))
    lines.append(f"- splits: " + ", ".join(f"{k} {v}" for k, v in report["split_sizes"].items()))
    for split, counts in report.get("class_counts", {}).items():
        lines.append(f"  - {split}: " + ", ".join(f"{md_escape(str(k))} {v}" for k, v in counts.items()))
    if report.get("token_length"):
        tl = report["token_length"]
        lines.append(f"- tokens per text: p50 {tl['p50']:.0f}, p90 {tl['p90']:.0f}, p99 {tl['p99']:.0f}, "
                     f"max {tl['max']:.0f}; truncated at {report['max_length']}: "
                     + ", ".join(f"{k} {v}" for k, v in report.get("truncated", {}).items()))
    if report.get("cleaning", "none") != "none":
        lines.append(f"- cleaning `{report['cleaning']}` changed {report['cleaning_changed']} texts")
        for before, after in report.get("cleaning_examples", [])[:3]:
            lines.append(f"  - {md_escape(repr(before[:60]))} → {md_escape(repr(after[:60]))}")
    for note in report.get("notes", []):
        lines.append(f"- note: {md_escape(show(note))}")
    for warning in report.get("warnings", []):
        lines.append(f"- **warning**: {md_escape(show(warning))}")
    return lines


_LISTED_FILES = 10  # a folder of hundreds of files lists its first ten and a count


def md_escape(text: str) -> str:
    """``text`` with the characters markdown would read as markup escaped (data texts, messages, labels)."""
    return re.sub(r"([\\`*\[\]<>&|])", r"\\\1", text)


def _path_display(experiment: ExperimentResult, run_dir: Path) -> Callable[[str], str]:
    """A function that rewrites the absolute paths of ``experiment``'s inputs as the report shows them.

    A shipped data set is shown as the user gave it (``shipped:NAME``), never as its place inside the
    installation; any other input path relative to the run directory, so the report reads the same on the
    machine the run directory is copied to.
    """
    data = experiment.config.get("data") or {}
    report = experiment.data_report or {}
    replacements: dict[str, str] = {}
    given = data.get("path")
    if isinstance(given, str) and given.startswith("shipped:") and not str(report.get("source", "")).startswith("shipped:"):
        replacements[str(report.get("source", ""))] = given
    model = (experiment.config.get("model") or {}).get("path")
    candidates = [given, model, *((data.get("splits") or {}).values()), *(report.get("files") or {})]
    here = Path(run_dir).resolve()
    for candidate in candidates:
        if isinstance(candidate, str) and candidate and Path(candidate).is_absolute():
            replacements[candidate] = os.path.relpath(candidate, here)
    replacements.pop("", None)
    ordered = sorted(replacements, key=len, reverse=True)  # a file inside a folder before the folder

    def show(text: str) -> str:
        for old in ordered:
            text = text.replace(old, replacements[old])
        return text

    return show


def _epoch_text(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return f"{epoch:.0f}" if float(epoch).is_integer() else f"{epoch:.2f}"


def _parts_cell(count: int, base: int) -> str:
    pct = 100.0 * count / base if base else 0.0
    if not count:
        return "0"
    return f"{human_count(count)} ({pct:.2f}%)" if pct >= 0.01 else f"{human_count(count)} ({pct:.2g}%)"


def parameter_rows(experiment: ExperimentResult) -> list[dict[str, str]]:
    """One row per method: its trainable parameters by part, each with its share of the base model."""
    rows = []
    for name, group in _groups(_ok(experiment.runs)).items():
        parts = group[0].parameter_parts  # the same at every seed
        if parts is None:
            continue
        rows.append({"method": name, "adapter weights": _parts_cell(parts.adapter, parts.base),
                     "head (modules_to_save)": _parts_cell(parts.head, parts.base),
                     "prompt": _parts_cell(parts.prompt, parts.base), "other": _parts_cell(parts.other, parts.base),
                     "trainable": _parts_cell(parts.trainable, parts.base), "base model": human_count(parts.base)})
    return rows


PARAMETER_NOTE = ("Adapter weights are the peft tuner weights (LoRA's A and B matrices, IA3's vectors, ...), never "
                  "the frozen base weights inside the layers they wrap; head is the trainable copy of the classifier "
                  "that peft keeps in `modules_to_save` (its frozen original is part of the base model), or the "
                  "model's own head in full fine-tuning; prompt is the virtual-token embeddings or prompt encoder; "
                  "other is any other trainable weight (in full fine-tuning: every weight of the base model). "
                  "Percentages are of the base model's parameters.")


def render_markdown(experiment: ExperimentResult, plots: dict[str, Path], run_dir: Path,
                    confusion: dict[int, ConfusionPicture] | None = None) -> str:
    """report.md: every table and picture of the report; report.html is rendered from this text.

    Args:
        experiment: the results (with ``statistics`` already computed by :func:`write_report`).
        plots: title -> picture, from :func:`make_plots`.
        run_dir: the run directory; every path in the report is relative to it.
        confusion: run index -> confusion-matrix picture, from :func:`make_confusion_plots`.
    """
    confusion = confusion or {}
    show = _path_display(experiment, run_dir)
    columns, rows = _comparison(experiment)
    seeds = sorted({r.seed for r in experiment.runs if r.seed is not None})
    seed_text = (f"seeds {', '.join(map(str, seeds))}" if len(seeds) > 1
                 else f"seed {experiment.environment.get('seed')}")
    parts = [f"# peftlab report: {md_escape(experiment.name)}", "",
             f"Task: {experiment.task}; model: `{show(str(experiment.config['model']['path']))}`; "
             f"device: {experiment.environment.get('device', '?')}; {seed_text}.", "",
             "## Summary", ""]
    parts += [f"- {md_escape(s)}" for s in summary_sentences(experiment)]
    parts += ["", "## Results (test split)", "", _markdown_table(rows, columns), "",
              "Time is `Trainer.train()` wall clock including per-epoch evaluation; peak RSS is the process's "
              "resident memory while that method trained; model/adapter is what must be kept on disk "
              "(weights + config, tokenizer excluded); optimizer state is the in-memory Adam moments.", ""]
    parameters = parameter_rows(experiment)
    if parameters:
        parts += ["## Trainable parameters by part", "", _markdown_table(parameters, list(parameters[0])), "",
                  PARAMETER_NOTE, ""]
    parts += ["## Data", ""] + _data_lines(experiment.data_report, show) + [""]
    if experiment.task == "classification":
        parts += ["## Per-class test results", ""]
        for index, run in enumerate(experiment.runs):
            if run.status != "ok":
                continue
            title = _run_title(experiment, run)
            parts += [f"### {md_escape(title)}", "", _markdown_table(
                [{"class": c, **{k: _fmt(v) if k != "support" else int(v) for k, v in m.items()}}
                 for c, m in run.per_class.items()], ["class", "precision", "recall", "f1", "support"]), ""]
            labels = list(run.per_class)
            matrix_rows = [{"true \\ predicted": labels[i], **{labels[j]: v for j, v in enumerate(row)}}
                           for i, row in enumerate(run.confusion_matrix)]
            if matrix_rows:
                parts += [_markdown_table(matrix_rows, ["true \\ predicted"] + labels), ""]
            if index in confusion:
                parts += [f"![Confusion matrix: {md_escape(title)}]({_relative(confusion[index].path, run_dir)})", ""]
                if confusion[index].numbered:
                    parts += ["Classes are numbered on the picture in the table's order: "
                              + ", ".join(f"{i} {md_escape(label)}" for i, label in enumerate(labels)) + ".", ""]
    parts += _generation_markdown(experiment)
    parts += ["## Per-epoch history", ""]
    for run in _ok(experiment.runs):
        hist_rows = [{"epoch": _epoch_text(h.epoch), "train loss": _fmt(h.train_loss), "eval loss": _fmt(h.eval_loss),
                      **{k: _fmt(v) for k, v in h.metrics.items()}} for h in run.history]
        keys = ["epoch", "train loss", "eval loss"] + (list(run.history[0].metrics) if run.history else [])
        parts += [f"### {md_escape(_run_title(experiment, run))} (best epoch {_epoch_text(run.best_epoch)} by "
                  f"{run.best_metric_name})", "", _markdown_table(hist_rows, keys), ""]
    parts += ["## Plots", ""]
    for title, path in plots.items():
        parts += [f"![{md_escape(title)}]({_relative(path, run_dir)})", ""]
    env = experiment.environment
    parts += ["## Environment", "", _markdown_table([{"item": k, "value": v} for k, v in env.items()],
                                                    ["item", "value"]), ""]
    return "\n".join(parts)


def _relative(path: Path, run_dir: Path) -> str:
    """``path`` as a link from a document in ``run_dir`` (a space in it written as %20, as markdown links need)."""
    return path.relative_to(run_dir).as_posix().replace(" ", "%20")


def _run_title(experiment: ExperimentResult, run: RunResult) -> str:
    return f"{run.name}, seed {run.seed}" if _several_seeds(experiment) else run.name


def _generation_markdown(experiment: ExperimentResult) -> list[str]:
    if experiment.task != "causal-lm" or not (experiment.base_generations or any(r.generations for r in experiment.runs)):
        return []
    settings = experiment.generation_settings
    parts = ["## Generations", "",
             "Decoding: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".", ""]
    prompts = list(experiment.base_generations) or list(next(r.generations for r in experiment.runs if r.generations))
    for prompt in prompts:
        rows = [{"model": "base (before training)", "generation": experiment.base_generations.get(prompt, "")}]
        rows += [{"model": r.name, "generation": r.generations.get(prompt, "")} for r in _ok(experiment.runs)]
        for row in rows:
            row["generation"] = md_escape(row["generation"])
        parts += [f"**{md_escape(prompt)}**", "", _markdown_table(rows, ["model", "generation"]), ""]
    return parts


def render_html(experiment: ExperimentResult, plots: dict[str, Path], run_dir: Path,
                confusion: dict[int, ConfusionPicture] | None = None) -> str:
    """report.html: :func:`render_markdown`'s document as a self-contained page (see :func:`render_page`)."""
    return render_page(render_markdown(experiment, plots, run_dir, confusion), run_dir)


PAGE_TEMPLATE = "report.html.j2"


def render_page(markdown: str, base_dir: Path) -> str:
    """A markdown report as one self-contained HTML page: the same text, every picture inlined as base64.

    The one HTML renderer of peftlab's reports, so the page holds exactly what the markdown holds. Raw HTML in
    the markdown is not passed through (data texts are escaped, never markup).

    Args:
        markdown: the document (report.md's text).
        base_dir: the folder the document's relative picture links start from.
    """
    import jinja2
    from markdown_it import MarkdownIt
    from markupsafe import Markup

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    parser.add_render_rule("image", _inline_image_rule(Path(base_dir)))
    tokens = parser.parse(markdown)
    title = next((tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open" and t.tag == "h1"),
                 "peftlab report")
    body = parser.renderer.render(tokens, parser.options, {})
    template = (resources.files("peftlab") / "resources" / "templates" / PAGE_TEMPLATE).read_text(encoding="utf-8")
    page = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(template)
    return page.render(title=title, body=Markup(body))


def _inline_image_rule(base_dir: Path) -> Callable[..., str]:
    """A markdown-it render rule that writes a local picture as a data: URI (the page opens anywhere)."""

    def render(renderer: Any, tokens: list[Any], index: int, options: Any, env: Any) -> str:
        token = tokens[index]
        source = urllib.parse.unquote(str(token.attrGet("src") or ""))
        path = base_dir / source
        if source and not urllib.parse.urlparse(source).scheme and path.is_file():
            kind = "png" if path.suffix.lower() == ".png" else path.suffix.lower().lstrip(".")
            token.attrSet("src", f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}")
        return renderer.image(tokens, index, options, env)

    return render


def write_report(experiment: ExperimentResult, run_dir: Path) -> dict[str, Path]:
    """Write results.json, results.csv, report.md, report.html and plots/ into ``run_dir``.

    report.html is rendered from report.md's text (:func:`render_page`), so the two never differ.
    The intervals and verdicts are recomputed from the test predictions saved in ``run_dir`` (see
    :func:`peftlab.stats.run_statistics`) and stored in ``experiment.statistics`` (so results.json and a
    later :func:`render_results_console` show them).

    Raises:
        RunDirError: a saved predictions file is missing or damaged.
    """
    stats = run_statistics(experiment, run_dir)
    # Without any saved predictions (causal LM, runs from before they were saved) the summary says so per method.
    experiment.statistics = stats.to_dict() if stats is not None and stats.methods else {}
    plots = make_plots(experiment, run_dir / PLOTS)
    confusion = make_confusion_plots(experiment, run_dir)
    fsutil.write_json(run_dir / "results.json", experiment.to_dict())
    rows = results_rows(experiment)
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    fsutil.write_text(run_dir / "results.csv", buffer.getvalue())
    markdown = render_markdown(experiment, plots, run_dir, confusion)
    fsutil.write_text(run_dir / "report.md", markdown)
    fsutil.write_text(run_dir / "report.html", render_page(markdown, run_dir))
    _cards_with_intervals(experiment, stats, run_dir)
    return {"markdown": run_dir / "report.md", "html": run_dir / "report.html",
            "csv": run_dir / "results.csv", "json": run_dir / "results.json"}


def _cards_with_intervals(experiment: ExperimentResult, stats: ExperimentStats | None, run_dir: Path) -> None:
    """Rewrite each saved folder's model card with its test intervals, once the report has computed them.

    Only for a method trained at one seed: with several, the intervals are about the mean over seeds, which
    no single saved folder is.
    """
    from peftlab import artifacts

    if stats is None:
        return
    for run in experiment.runs:
        method = stats.method(run.name)
        folder = run_dir / run.output_dir if run.output_dir else None
        if run.status != "ok" or method is None or len(method.seeds) != 1 or folder is None or not folder.is_dir():
            continue
        artifacts.write_model_card(folder, result=run, intervals=method.metrics, confidence=stats.confidence)


# --------------------------------------------------------------------------- console


CONSOLE_WIDTH = 100  # the results table and summary fit it, whatever the terminal (tested at exactly this width)


def _console() -> Any:
    """A console of at most :data:`CONSOLE_WIDTH` columns (the terminal's own width when that is narrower)."""
    from rich.console import Console

    console = Console(stderr=False)
    return Console(stderr=False, width=min(console.width, CONSOLE_WIDTH) if console.is_terminal else CONSOLE_WIDTH)


def render_data_report_console(report: Any) -> None:
    """Print the data report as rich tables."""
    from rich.table import Table

    data = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else report
    console = _console()
    table = Table(title=f"Data report: {data['source']}", show_lines=False)
    table.add_column("item")
    table.add_column("value", overflow="fold")
    table.add_row("raw rows", str(data["raw_rows"]))
    table.add_row("kept rows", str(data["kept_rows"]))
    for reason, count in data["dropped"].items():
        examples = ", ".join(data["dropped_examples"].get(reason, [])[:3])
        table.add_row(f"dropped: {reason}", f"{count}" + (f"  (e.g. {examples})" if examples else ""))
    if data.get("labels_seen_outside_map"):
        table.add_row("labels outside the map", ", ".join(f"{k!r}×{v}" for k, v in data["labels_seen_outside_map"].items()))
    for split, size in data["split_sizes"].items():
        counts = data.get("class_counts", {}).get(split, {})
        table.add_row(f"{split}", f"{size}" + ("  (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")" if counts else ""))
    if data.get("char_length"):
        cl = data["char_length"]
        table.add_row("characters per text", f"p50 {cl['p50']:.0f}, p90 {cl['p90']:.0f}, p99 {cl['p99']:.0f}, max {cl['max']:.0f}")
    if data.get("token_length"):
        tl = data["token_length"]
        table.add_row("tokens per text", f"p50 {tl['p50']:.0f}, p90 {tl['p90']:.0f}, p99 {tl['p99']:.0f}, max {tl['max']:.0f}")
        table.add_row(f"truncated at {data['max_length']}", ", ".join(f"{k} {v}" for k, v in data["truncated"].items()))
    if data.get("cleaning") != "none":
        table.add_row(f"cleaning ({data['cleaning']})", f"changed {data['cleaning_changed']} texts")
        for before, after in data.get("cleaning_examples", [])[:3]:
            table.add_row("", f"{before[:50]!r} -> {after[:50]!r}")
    for note in data.get("notes", []):
        table.add_row("note", note)
    for warning in data.get("warnings", []):
        table.add_row("[yellow]warning[/yellow]", f"[yellow]{warning}[/yellow]")
    console.print(table)


def render_results_console(experiment: ExperimentResult, console: Any = None) -> None:
    """Print the comparison table (the columns a reader compares first; report.md has them all) and the summary.

    Args:
        experiment: the finished experiment.
        console: a ``rich.console.Console`` to print on (default: standard output, :data:`CONSOLE_WIDTH` wide).
    """
    from rich import box
    from rich.table import Table

    columns, rows = _console_rows(experiment)
    # Every cell is split into lines here, so no column needs wrapping: rich's table shrinks its widest columns
    # first, whatever their words, and would cut a number in two. Only a long method name may fold.
    table = Table(title=f"peftlab: {experiment.name}", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1),
                  pad_edge=False, collapse_padding=True)
    for column in columns:
        text = column in ("method", "seed")
        table.add_column(column, justify="left" if text else "right", overflow="fold", no_wrap=not text)
    for row in rows:
        table.add_row(*row)
    console = console or _console()
    console.print(table)
    for sentence in summary_sentences(experiment):
        console.print(f"• {sentence}")


def _console_rows(experiment: ExperimentResult) -> tuple[list[str], list[list[str]]]:
    """The console table, a subset of report.md's: a row per method (and seed), its detail on the lines below.

    Two lines per run (a count, then its share; an estimate, then its interval), three for the mean over seeds
    (mean, ± std, interval); 3-decimal intervals. A failed method's error is left to the messages after the table.
    """
    classify = experiment.task == "classification"
    stats = _statistics(experiment)
    several = _several_seeds(experiment)
    level = f"\n({_level(stats)} CI)" if stats else ""
    metrics = [("accuracy", "accuracy" + level), ("f1_macro", "macro F1" + level)] if classify else \
        [("loss", "test\nloss"), ("perplexity", "perplexity")]
    columns = ["method"] + (["seed"] if several else []) + ["trainable", "time", "peak\nRSS", "size", "best\nepoch"]
    columns += [title for _, title in metrics]
    rows: list[list[str]] = []

    def add(cells: dict[str, str]) -> None:
        rows.append([cells.get(c, "") for c in columns])

    if not classify and experiment.base_eval_loss is not None:
        add({"method": "base\n(no training)", "trainable": "0", "test\nloss": _fmt(experiment.base_eval_loss),
             "perplexity": _fmt(perplexity(experiment.base_eval_loss), 2)})
    for name, group in _groups(experiment.runs).items():
        finished = _ok(group)
        method_stats = stats.method(name) if stats and finished else None
        if len(group) > 1 and finished:  # mean ± std over the seeds, with the interval of the mean
            cells = {"method": name, "seed": "mean", "trainable": human_count(finished[0].trainable_params),
                     "time": f"{sum(r.wall_time_s for r in finished) / len(finished):.1f} s",
                     "size": human_bytes(finished[0].model_size_bytes)}
            for metric, title in metrics:
                mean, std = _mean_std([r.test_metrics.get(metric, float("nan")) for r in finished]).split(" ± ")
                cells[title] = f"{mean}\n±{std}"
                if method_stats is not None and metric in method_stats.metrics:
                    cells[title] += "\n" + _console_interval(method_stats.metrics[metric])
            add(cells)
        for run in group:
            cells = {"method": name, "seed": "-" if run.seed is None else str(run.seed)}
            if run.status != "ok":
                add({**cells, "trainable": "failed"})
                continue
            pct = f"{run.trainable_pct:.2f}" if run.trainable_pct >= 0.01 else f"{run.trainable_pct:.2g}"
            cells.update({"trainable": f"{human_count(run.trainable_params)}\n({pct}%)",
                          "time": f"{run.wall_time_s:.1f} s", "peak\nRSS": human_bytes(run.peak_rss_bytes),
                          "size": human_bytes(run.model_size_bytes), "best\nepoch": _fmt(run.best_epoch, 0)})
            for metric, title in metrics:
                cells[title] = _fmt(run.test_metrics.get(metric), 2 if metric == "perplexity" else 4)
                if len(group) == 1 and method_stats is not None and metric in method_stats.metrics:
                    cells[title] += "\n" + _console_interval(method_stats.metrics[metric])
            add(cells)
    return columns, rows


def _console_interval(interval: Interval) -> str:
    return f"{interval.low:.3f}–{interval.high:.3f}"


# --------------------------------------------------------------------------- tuning studies

STUDY_PLOT = "tune_learning_rate.png"


def _param_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_fmt(v, 3) if isinstance(v, float) else v}" for k, v in params.items())


def study_trial_rows(study: StudyResult) -> list[dict[str, Any]]:
    """One row per trial of every method: method, trial, params, validation metric, state."""
    rows = []
    for method in study.methods:
        for trial in method.trials:
            state = trial.state.lower()
            if trial.error and trial.state == "FAIL":
                state += f" ({trial.error[:80]})"
            rows.append({"method": method.name, "trial": trial.number, "params": _param_text(trial.params),
                         f"validation {study.metric}": _fmt(trial.value),
                         "epochs": len(trial.intermediate), "state": state,
                         "chosen": "yes" if trial.number == method.best_trial else ""})
    return rows


def study_summary_rows(study: StudyResult) -> list[dict[str, Any]]:
    """One row per method: trials by state and the settings chosen."""
    rows = []
    for method in study.methods:
        states = [t.state for t in method.trials]
        rows.append({"method": method.name, "trials": len(states), "complete": states.count("COMPLETE"),
                     "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
                     f"best validation {study.metric}": _fmt(method.best_value),
                     "best trial": "" if method.best_trial is None else method.best_trial,
                     "chosen settings": _param_text(method.chosen) if method.chosen else "none (no trial completed)"})
    return rows


def _study_sentences(study: StudyResult) -> list[str]:
    lines = [f"Every method had the same budget: {study.budget} trial(s) per method, chosen on the validation split "
             f"by {study.metric} (the test split was not read).",
             f"Sampler: {study.sampler}. Pruner: {study.pruner}. Storage: {study.storage}."]
    for method in study.methods:
        if method.best_trial is None:
            lines.append(f"{method.name}: no trial completed, so its settings were not changed.")
        for edge in method.range_edges():
            wider = ({"low": edge.low / 10, "high": edge.high} if edge.end == "low"
                     else {"low": edge.low, "high": edge.high * 10})
            lines.append(f"{method.name}: the best {edge.name}, {edge.value:.2g}, is at the {edge.end} end of the "
                         f"range searched ({edge.low:.2g} to {edge.high:.2g}): a better one may lie beyond it. Widen "
                         f"the range with tune.search: {{{method.name}: {{{edge.name}: {{low: {wider['low']:.0e}, "
                         f"high: {wider['high']:.0e}}}}}}} and tune again.")
    return lines


def make_study_plot(study: StudyResult, folder: Path) -> dict[str, Path]:
    """Learning rate against the validation metric, one panel per method (complete: dots, pruned: crosses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in study.methods if any(t.value is not None for t in m.trials)]
    if not panels:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, method in zip(axes[0], panels):
        for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
            points = [(t.params["learning_rate"], t.value) for t in method.trials
                      if t.state == state and t.value is not None and "learning_rate" in t.params]
            if points:
                ax.scatter(*zip(*points), marker=marker, label=state.lower())
        best = next((t for t in method.trials if t.number == method.best_trial), None)
        if best is not None and "learning_rate" in best.params:
            ax.scatter([best.params["learning_rate"]], [best.value], marker="*", s=160, color="gold",
                       edgecolors="black", label="chosen", zorder=3)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"validation {study.metric}")
        ax.set_title(method.name)
        ax.legend(fontsize=7)
    return {"Learning rate against the validation metric": _save(fig, folder / STUDY_PLOT)}


def render_study_markdown(study: StudyResult, plots: dict[str, Path], run_dir: Path) -> str:
    """The study section: the budget, the settings chosen per method, every trial, the plot."""
    summary = study_summary_rows(study)
    trials = study_trial_rows(study)
    lines = [f"# peftlab tuning: {md_escape(study.name)}", "", *[f"- {md_escape(s)}" for s in _study_sentences(study)], "",
             f"Tuned config: `{study.tuned_config}` (run it with `peftlab run {study.tuned_config}`).", "",
             "## Chosen settings", "", _markdown_table(summary, list(summary[0]) if summary else []), "",
             "## Search spaces", ""]
    for method in study.methods:
        for p in method.space:
            where = (f"{_fmt(p['low'], 3)} to {_fmt(p['high'], 3)} (log scale)" if p["kind"] != "choice"
                     else ", ".join(str(c) for c in p["choices"]))
            lines.append(f"- {method.name} `{p['name']}`: {where}. {p['description']}")
    lines += ["", "## Trials", "", _markdown_table(trials, list(trials[0]) if trials else []), ""]
    if plots:
        lines += ["## Plots", ""]
    for title, path in plots.items():
        lines += [f"![{md_escape(title)}]({_relative(path, run_dir)})", ""]
    if study.environment:
        lines += ["## Environment", "", _markdown_table([{"item": k, "value": v} for k, v in study.environment.items()],
                                                        ["item", "value"]), ""]
    return "\n".join(lines)


def render_study_html(study: StudyResult, plots: dict[str, Path], run_dir: Path) -> str:
    """The study report as a self-contained page, rendered from :func:`render_study_markdown`'s text."""
    return render_page(render_study_markdown(study, plots, run_dir), run_dir)


def write_study_report(study: StudyResult, run_dir: Path) -> dict[str, Path]:
    """Write study.json, report.md, report.html (from report.md's text) and plots/ of a tune directory."""
    plots = make_study_plot(study, run_dir / PLOTS)
    fsutil.write_json(run_dir / "study.json", study.to_dict())
    markdown = render_study_markdown(study, plots, run_dir)
    fsutil.write_text(run_dir / "report.md", markdown)
    fsutil.write_text(run_dir / "report.html", render_page(markdown, run_dir))
    return {"markdown": run_dir / "report.md", "html": run_dir / "report.html", "json": run_dir / "study.json"}


def render_study_console(study: StudyResult) -> None:
    """Print the settings chosen per method."""
    from rich.table import Table

    rows = study_summary_rows(study)
    table = Table(title=f"peftlab tune: {study.name} ({study.budget} trial(s) per method, validation {study.metric})")
    for column in (list(rows[0]) if rows else []):
        table.add_column(str(column), overflow="fold")
    for row in rows:
        table.add_row(*[str(v) for v in row.values()])
    _console().print(table)
