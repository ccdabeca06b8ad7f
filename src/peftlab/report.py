"""Render results: console tables, report.md, results.csv/json, plots and a self-contained report.html.

The only module that turns measured results into text or pictures. Every
number shown comes from :class:`ExperimentResult`; the summary sentences are
computed from it, never written by hand.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import logging
import math
from pathlib import Path
from typing import Any

from peftlab import fsutil
from peftlab.evaluate import perplexity
from peftlab.results import ExperimentResult, RunResult

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


def results_rows(experiment: ExperimentResult) -> list[dict[str, Any]]:
    """One flat row per method: the comparison table users assemble by hand."""
    rows = []
    for run in experiment.runs:
        row: dict[str, Any] = {
            "method": run.name, "type": run.method, "status": run.status,
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
        for key, value in run.test_metrics.items():
            row[f"test_{key}"] = round(value, 6)
        if run.error:
            row["error"] = run.error
        rows.append(row)
    return rows


def summary_sentences(experiment: ExperimentResult) -> list[str]:
    """Data-driven comparisons of each PEFT method against full fine-tuning (or the best run)."""
    runs = _ok(experiment.runs)
    if not runs:
        return ["No method finished; see the errors in the table."]
    classify = experiment.task == "classification"
    key = "f1_macro" if classify else "loss"
    reference = next((r for r in runs if r.method == "full"), None)
    sentences = []
    if classify:
        best = max(runs, key=lambda r: r.test_metrics.get(key, -1))
        sentences.append(f"Best test macro F1: {best.name} ({best.test_metrics.get(key, 0):.4f}).")
    else:
        best = min(runs, key=lambda r: r.test_metrics.get(key, float("inf")))
        sentences.append(f"Lowest test loss: {best.name} ({best.test_metrics.get(key, 0):.4f}, "
                         f"perplexity {best.test_metrics.get('perplexity', float('nan')):.2f}).")
        if experiment.base_eval_loss is not None:
            sentences.append(f"The base model's test loss before training was {experiment.base_eval_loss:.4f}.")
    if reference is None:
        return sentences
    for run in runs:
        if run is reference:
            continue
        params = run.trainable_params / max(1, reference.trainable_params)
        disk = run.model_size_bytes / max(1, reference.model_size_bytes)
        time_ratio = run.wall_time_s / max(1e-9, reference.wall_time_s)
        if classify:
            quality = 100 * run.test_metrics.get(key, 0) / max(1e-9, reference.test_metrics.get(key, 0))
            head = f"{run.name} reaches {quality:.1f}% of {reference.name}'s macro F1"
        else:
            delta = run.test_metrics.get("loss", 0) - reference.test_metrics.get("loss", 0)
            head = f"{run.name}'s test loss is {delta:+.4f} against {reference.name}'s"
        sentences.append(f"{head} with {100 * params:.2g}% of the trainable parameters and {_ratio(disk)} of the "
                         f"disk size, in {_ratio(time_ratio)} the training time.")
    return sentences


# --------------------------------------------------------------------------- plots


def make_plots(experiment: ExperimentResult, folder: Path) -> dict[str, Path]:
    """Loss curves, quality curves and cost bars as PNG files; returns title -> path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    runs = _ok(experiment.runs)
    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path] = {}
    if not runs:
        return plots
    classify = experiment.task == "classification"

    fig, ax = plt.subplots(figsize=(7, 4))
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        epochs = [h.epoch for h in run.history]
        ax.plot(epochs, [h.eval_loss for h in run.history], "-o", color=color, label=f"{run.name} eval")
        train = [(h.epoch, h.train_loss) for h in run.history if h.train_loss is not None]
        if train:
            ax.plot(*zip(*train), "--", color=color, alpha=0.6, label=f"{run.name} train")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Train (dashed) and validation (solid) loss")
    ax.legend(fontsize=7)
    plots["Loss per epoch"] = _save(fig, folder / "loss.png")

    metric = "f1_macro" if classify else "perplexity"
    fig, ax = plt.subplots(figsize=(7, 4))
    for index, run in enumerate(runs):
        ax.plot([h.epoch for h in run.history], [h.metrics.get(metric) for h in run.history], "-o",
                color=f"C{index % 10}", label=run.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation " + ("macro F1" if classify else "perplexity"))
    ax.set_title(("Validation macro F1" if classify else "Validation perplexity") + " per epoch")
    ax.legend(fontsize=7)
    plots["Validation " + ("macro F1" if classify else "perplexity") + " per epoch"] = _save(fig, folder / "quality.png")

    names = [r.name for r in runs]
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
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for index, run in enumerate(runs):
            ax.scatter(max(run.trainable_params, 1), run.test_metrics.get("f1_macro", 0), s=60, color=f"C{index % 10}")
            ax.annotate(run.name, (max(run.trainable_params, 1), run.test_metrics.get("f1_macro", 0)), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("test macro F1")
        ax.set_title("Quality against cost")
        plots["Quality against cost"] = _save(fig, folder / "pareto.png")
    return plots


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
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _comparison(experiment: ExperimentResult) -> tuple[list[str], list[dict[str, Any]]]:
    classify = experiment.task == "classification"
    columns = ["method", "trainable", "time", "samples/s", "peak RSS", "model/adapter", "optimizer state",
               "best epoch"]
    columns += ["test loss", "accuracy", "macro P", "macro R", "macro F1"] if classify else ["test loss", "perplexity"]
    rows = []
    if not classify and experiment.base_eval_loss is not None:  # the bar every method must clear
        rows.append({"method": "base (no training)", "trainable": "0", "test loss": _fmt(experiment.base_eval_loss),
                     "perplexity": _fmt(perplexity(experiment.base_eval_loss), 2)})
    for run in experiment.runs:
        if run.status != "ok":
            rows.append({"method": f"{run.name} (failed)", "trainable": run.error or ""})
            continue
        pct = f"{run.trainable_pct:.2f}" if run.trainable_pct >= 0.01 else f"{run.trainable_pct:.2g}"
        row = {"method": run.name, "trainable": f"{human_count(run.trainable_params)} ({pct}%)",
               "time": f"{run.wall_time_s:.1f} s", "samples/s": f"{run.train_samples_per_s:.1f}",
               "peak RSS": human_bytes(run.peak_rss_bytes), "model/adapter": human_bytes(run.model_size_bytes),
               "optimizer state": human_bytes(run.optimizer_state_bytes),
               "best epoch": _fmt(run.best_epoch, 0), "test loss": _fmt(run.test_metrics.get("loss"))}
        if classify:
            row.update({"accuracy": _fmt(run.test_metrics.get("accuracy")),
                        "macro P": _fmt(run.test_metrics.get("precision_macro")),
                        "macro R": _fmt(run.test_metrics.get("recall_macro")),
                        "macro F1": _fmt(run.test_metrics.get("f1_macro"))})
        else:
            row["perplexity"] = _fmt(run.test_metrics.get("perplexity"), 2)
        rows.append(row)
    return columns, rows


def _data_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"- source: `{report['source']}` ({report['format']})",
             f"- rows: {report['raw_rows']} raw, {report['kept_rows']} kept, "
             f"{sum(report['dropped'].values())} dropped"]
    for reason, count in report["dropped"].items():
        where = ", ".join(report.get("dropped_examples", {}).get(reason, [])[:3])
        lines.append(f"  - {reason}: {count}" + (f" (e.g. {where})" if where else ""))
    lines.append(f"- splits: " + ", ".join(f"{k} {v}" for k, v in report["split_sizes"].items()))
    for split, counts in report.get("class_counts", {}).items():
        lines.append(f"  - {split}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if report.get("token_length"):
        tl = report["token_length"]
        lines.append(f"- tokens per text: p50 {tl['p50']:.0f}, p90 {tl['p90']:.0f}, p99 {tl['p99']:.0f}, "
                     f"max {tl['max']:.0f}; truncated at {report['max_length']}: "
                     + ", ".join(f"{k} {v}" for k, v in report.get("truncated", {}).items()))
    if report.get("cleaning", "none") != "none":
        lines.append(f"- cleaning `{report['cleaning']}` changed {report['cleaning_changed']} texts")
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    return lines


def render_markdown(experiment: ExperimentResult, plots: dict[str, Path], run_dir: Path) -> str:
    columns, rows = _comparison(experiment)
    parts = [f"# peftlab report: {experiment.name}", "",
             f"Task: {experiment.task}; model: `{experiment.config['model']['path']}`; "
             f"device: {experiment.environment.get('device', '?')}; seed {experiment.environment.get('seed')}.", "",
             "## Summary", ""]
    parts += [f"- {s}" for s in summary_sentences(experiment)]
    parts += ["", "## Results (test split)", "", _markdown_table(rows, columns), "",
              "Time is `Trainer.train()` wall clock including per-epoch evaluation; peak RSS is the process's "
              "resident memory while that method trained; model/adapter is what must be kept on disk "
              "(weights + config, tokenizer excluded); optimizer state is the in-memory Adam moments.", ""]
    parts += ["## Data", ""] + _data_lines(experiment.data_report) + [""]
    if experiment.task == "classification":
        parts += ["## Per-class test results", ""]
        for run in _ok(experiment.runs):
            parts += [f"### {run.name}", "", _markdown_table(
                [{"class": c, **{k: _fmt(v) if k != "support" else int(v) for k, v in m.items()}}
                 for c, m in run.per_class.items()], ["class", "precision", "recall", "f1", "support"]), ""]
            labels = list(run.per_class)
            matrix_rows = [{"true \\ predicted": labels[i], **{labels[j]: v for j, v in enumerate(row)}}
                           for i, row in enumerate(run.confusion_matrix)]
            parts += [_markdown_table(matrix_rows, ["true \\ predicted"] + labels), ""]
    parts += _generation_markdown(experiment)
    parts += ["## Per-epoch history", ""]
    for run in _ok(experiment.runs):
        hist_rows = [{"epoch": _fmt(h.epoch, 2), "train loss": _fmt(h.train_loss), "eval loss": _fmt(h.eval_loss),
                      **{k: _fmt(v) for k, v in h.metrics.items()}} for h in run.history]
        keys = ["epoch", "train loss", "eval loss"] + (list(run.history[0].metrics) if run.history else [])
        parts += [f"### {run.name} (best epoch {_fmt(run.best_epoch, 0)} by {run.best_metric_name})", "",
                  _markdown_table(hist_rows, keys), ""]
    parts += ["## Plots", ""] + [f"![{title}]({path.relative_to(run_dir).as_posix()})" for title, path in plots.items()]
    env = experiment.environment
    parts += ["", "## Environment", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(parts)


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
            row["generation"] = row["generation"].replace("|", "\\|").replace("\n", " ")
        parts += [f"**{prompt}**", "", _markdown_table(rows, ["model", "generation"]), ""]
    return parts


def render_html(experiment: ExperimentResult, plots: dict[str, Path]) -> str:
    """A single file with inline CSS and base64 PNGs: opens anywhere, attaches to an email."""
    columns, rows = _comparison(experiment)
    esc = html.escape
    table = "<table><thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr></thead><tbody>"
    for row in rows:
        table += "<tr>" + "".join(f"<td>{esc(str(row.get(c, '')))}</td>" for c in columns) + "</tr>"
    table += "</tbody></table>"
    images = "".join(
        f"<figure><img alt='{esc(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(path.read_bytes()).decode()}'><figcaption>{esc(title)}</figcaption></figure>"
        for title, path in plots.items())
    summary = "".join(f"<li>{esc(s)}</li>" for s in summary_sentences(experiment))
    data = "".join(f"<li>{esc(line.strip().lstrip('- '))}</li>" for line in _data_lines(experiment.data_report))
    generations = ""
    if experiment.task == "causal-lm":
        generations = "<h2>Generations</h2>" + "".join(
            f"<h3>{esc(prompt)}</h3><table><tr><th>model</th><th>generation</th></tr>"
            f"<tr><td>base</td><td>{esc(text)}</td></tr>"
            + "".join(f"<tr><td>{esc(r.name)}</td><td>{esc(r.generations.get(prompt, ''))}</td></tr>"
                      for r in _ok(experiment.runs)) + "</table>"
            for prompt, text in experiment.base_generations.items())
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
             "figure{display:inline-block;margin:0.5em}img{max-width:100%}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>peftlab report: {esc(experiment.name)}"
            f"</title><style>{style}</style></head><body><h1>peftlab report: {esc(experiment.name)}</h1>"
            f"<p>Task {esc(experiment.task)}, model <code>{esc(str(experiment.config['model']['path']))}</code>, "
            f"device {esc(str(experiment.environment.get('device', '?')))}.</p>"
            f"<h2>Summary</h2><ul>{summary}</ul><h2>Results (test split)</h2>{table}"
            f"<h2>Data</h2><ul>{data}</ul>{generations}<h2>Plots</h2>{images}</body></html>")


def write_report(experiment: ExperimentResult, run_dir: Path) -> dict[str, Path]:
    """Write results.json, results.csv, report.md, report.html and plots/ into ``run_dir``."""
    plots = make_plots(experiment, run_dir / PLOTS)
    fsutil.write_json(run_dir / "results.json", experiment.to_dict())
    rows = results_rows(experiment)
    buffer = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    fsutil.write_text(run_dir / "results.csv", buffer.getvalue())
    fsutil.write_text(run_dir / "report.md", render_markdown(experiment, plots, run_dir))
    fsutil.write_text(run_dir / "report.html", render_html(experiment, plots))
    return {"markdown": run_dir / "report.md", "html": run_dir / "report.html",
            "csv": run_dir / "results.csv", "json": run_dir / "results.json"}


# --------------------------------------------------------------------------- console


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=False, width=140)


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
    console.print(table)


def render_results_console(experiment: ExperimentResult) -> None:
    """Print the comparison table and summary sentences."""
    from rich.table import Table

    columns, rows = _comparison(experiment)
    table = Table(title=f"peftlab: {experiment.name}")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[str(row.get(c, "")) for c in columns])
    console = _console()
    console.print(table)
    for sentence in summary_sentences(experiment):
        console.print(f"• {sentence}")
