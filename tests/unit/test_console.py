"""The console: one live line per method, no dict logs or third-party warnings, a results table within 100
columns with every word whole, and `peftlab predict` printing its results only."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from peftlab.results import EpochRecord, ExperimentResult, RunResult
from peftlab.stats import Comparison, ExperimentStats, Interval, MethodStats
from tests.conftest import review_rows, write_rows

TEXTS = ["the movie was great", "awful and boring plot", "it was okay"]
# tqdm's and HF's marks: a bar's rate, the Trainer's dict logs, the loading and saving bars.
NOISE = re.compile(r"it/s|s/it|\{'(loss|eval_loss|train_runtime)'|Loading weights|Writing model shards")


def peftlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftlab.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """`peftlab run` as a user runs it: LoRA (a PEFT model: peft reads the deprecated alias) in its own process."""
    folder = tmp_path_factory.mktemp("console")
    data = write_rows(folder / "reviews.csv", review_rows())
    config = folder / "exp.yaml"
    config.write_text(f"data: {{path: {data}, max_length: 32}}\nmodel: {{path: {tiny_bert}}}\n"
                      f"methods: [{{method: lora, learning_rate: 0.01}}]\n"
                      f"training: {{epochs: 2, batch_size: 8, eval_batch_size: 16}}\n", encoding="utf-8")
    return folder / "run", peftlab("run", str(config), "--output", str(folder / "run"))


def test_run_shows_one_line_per_method_and_no_warning_bar_or_dict_log(
        cli_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    _, result = cli_run
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert not [line for line in lines if "Warning" in line or "warnings.warn" in line], result.stderr
    assert not NOISE.search(result.stderr + result.stdout), result.stderr
    # Off a terminal rich prints the display once, when the method is done: 72 rows in batches of 8, 2 epochs.
    display = [line for line in lines if line.startswith("lora epoch")]
    assert len(display) == 1, result.stderr
    assert re.fullmatch(r"lora epoch 2/2 \S+ step 18/18 loss \d\.\d{4} val f1_macro \d\.\d{4} took 0:\d\d:\d\d",
                        display[0]), display[0]


def test_run_ends_with_a_table_within_100_columns(cli_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    _, result = cli_run
    table = result.stdout[result.stdout.index("peftlab: run"):result.stdout.index("\nreport: ")]  # then a path
    assert max(len(line) for line in table.splitlines()) <= 100, table
    # LoRA r=8 on query and value of the tiny BERT, and the new head: 2,147 of 23,280 parameters.
    assert "macro F1" in table and re.search(r"^lora +2\.1K +[\d.]+ s ", table, re.M) and "(9.22%)" in table, table


def test_predict_prints_only_its_results(cli_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, _ = cli_run
    result = peftlab("predict", str(run_dir / "lora"), *TEXTS)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(TEXTS)
    for line, text in zip(lines, TEXTS):
        label, probabilities, echoed = line.split("\t")
        assert label in ("negative", "neutral", "positive") and echoed == text and probabilities.startswith("(")


def test_the_trainers_dict_logs_only_under_verbose(tiny_bert: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, PrinterCallback, Trainer, TrainingArguments

    from peftlab.train import quiet_trainer

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3)
    peftlab_logger = logging.getLogger("peftlab")
    before = peftlab_logger.level
    shown = {}
    try:
        for level in (logging.INFO, logging.DEBUG):  # the default, --verbose
            peftlab_logger.setLevel(level)
            trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), disable_tqdm=True,
                                                                  report_to="none", use_cpu=True))
            quiet_trainer(trainer)
            shown[level] = any(isinstance(c, PrinterCallback) for c in trainer.callback_handler.callbacks)
    finally:
        peftlab_logger.setLevel(before)
    assert shown == {logging.INFO: False, logging.DEBUG: True}


# --------------------------------------------------------------------------- the results table, by hand


def _run(name: str, method: str, seed: int, trainable: int, total: int, **metrics: float) -> RunResult:
    return RunResult(name=name, method=method, task="classification", seed=seed, trainable_params=trainable,
                     total_params=total, wall_time_s=1234.5, train_samples_per_s=12.3, peak_rss_bytes=12_300_000_000,
                     model_size_bytes=90_000_000 if method == "full" else 310_000, optimizer_state_bytes=1_000_000,
                     best_epoch=2.0, history=[EpochRecord(1.0, 10, 0.9, 0.8), EpochRecord(2.0, 20, 0.7, 0.6)],
                     test_metrics={"loss": 0.61, "accuracy": metrics.get("accuracy", 0.7912),
                                   "precision_macro": 0.7, "recall_macro": 0.69, "f1_macro": metrics.get("f1", 0.6998)})


def _stats(names: list[str], seeds: list[int]) -> dict:
    interval = Interval(estimate=0.7, low=0.6512, high=0.7488)
    difference = Interval(-0.012, -0.0451, 0.0213)
    methods = [MethodStats(name=n, seeds=list(seeds), metrics={"accuracy": interval, "f1_macro": interval},
                           per_seed={m: [0.7] * len(seeds) for m in ("accuracy", "f1_macro")},
                           std={m: 0.0123 if len(seeds) > 1 else None for m in ("accuracy", "f1_macro")},
                           never_predicted={},
                           comparisons={} if n == names[0] else {"f1_macro": Comparison(
                               "f1_macro", names[0], difference, "no detectable difference from")})
               for n in names]
    return ExperimentStats(reference=names[0], confidence=0.95, bootstrap_samples=1000, seed=0, test_rows=1061,
                           methods=methods).to_dict()


def one_seed() -> ExperimentResult:
    runs = [_run("full", "full", 42, 22_713_219, 22_713_219), _run("lora", "lora", 42, 74_883, 22_788_102),
            _run("prompt_tuning", "prompt_tuning", 42, 5_379, 22_718_598)]
    return ExperimentResult(name="default", task="classification", config={}, data_report={}, runs=runs,
                            statistics=_stats(["full", "lora", "prompt_tuning"], [42]))


def three_seeds_and_a_failure() -> ExperimentResult:
    runs = [_run(n, n, s, 74_883, 22_788_102, f=0.6 + s / 1000) for n in ("full", "lora") for s in (42, 43, 44)]
    runs.append(RunResult(name="prefix_tuning", method="prefix_tuning", task="classification", status="failed",
                          seed=42, error="MethodError: training diverged at step 3: " + "a long reason " * 20))
    return ExperimentResult(name="seeds", task="classification", config={}, data_report={}, runs=runs,
                            statistics=_stats(["full", "lora"], [42, 43, 44]))


def causal_lm() -> ExperimentResult:
    runs = [RunResult(name=n, method=n, task="causal-lm", seed=42, trainable_params=t, total_params=134_515_008,
                      wall_time_s=321.0, peak_rss_bytes=3_000_000_000, model_size_bytes=540_000_000,
                      best_epoch=1.0, test_metrics={"loss": 2.3456, "perplexity": 10.44})
            for n, t in (("full", 134_515_008), ("prompt_tuning", 11_520))]
    return ExperimentResult(name="quotes", task="causal-lm", config={}, data_report={}, runs=runs, base_eval_loss=3.1)


@pytest.mark.parametrize("make", [one_seed, three_seeds_and_a_failure, causal_lm], ids=lambda f: f.__name__)
def test_results_table_fits_100_columns_with_every_word_whole(make) -> None:
    from rich.console import Console

    from peftlab.report import _console_rows, render_results_console

    experiment = make()
    console = Console(width=100, record=True, file=open("/dev/null", "w", encoding="utf-8"))  # noqa: SIM115
    render_results_console(experiment, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    words = set(text.split())
    columns, rows = _console_rows(experiment)
    for cell in [*columns, *(c for row in rows for c in row)]:
        for word in cell.split():
            assert word in words, f"{word!r} was broken across lines:\n{text}"
    assert rows and all(len(row) == len(columns) for row in rows)
