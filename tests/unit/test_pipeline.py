"""The whole classification path on a tiny random BERT: run, report, reload with plain transformers/peft."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from peftlab.config import load_config
from peftlab.errors import ConfigError, RunDirError
from peftlab.experiment import run_experiment
from peftlab.predict import load_predictor

ALL_METHODS = [
    {"method": "full", "learning_rate": 1e-3},
    {"method": "lora", "learning_rate": 1e-2},
    {"method": "dora", "learning_rate": 1e-2},
    {"method": "loha", "learning_rate": 1e-2},
    {"method": "adalora", "learning_rate": 1e-2},
    {"method": "ia3", "learning_rate": 1e-2},
    {"method": "prompt_tuning", "num_virtual_tokens": 4, "init": "TEXT", "init_text": "is it good or bad"},
    {"method": "prefix_tuning", "num_virtual_tokens": 4},
    {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
]


def experiment(model: Path, data: Path, methods: list, **training: object) -> object:
    # In this process unless a test asks otherwise: a child per method costs ~5 s to start, and the child path
    # has its own tests (below, tests/unit/test_bad_input.py and every integration test run the default).
    training = {"method_process": False, **training}
    return load_config(data={
        "data": {"path": str(data), "max_length": 32},
        "model": {"path": str(model)},
        "methods": methods,
        "training": {"epochs": 2, "batch_size": 8, "eval_batch_size": 16, "warmup_ratio": 0.0, **training},
    })


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> tuple[Path, object]:
    from tests.conftest import review_rows
    import csv

    folder = tmp_path_factory.mktemp("run")
    data = folder / "reviews.csv"
    with data.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(review_rows())
    config = experiment(tiny_bert, data, ALL_METHODS)
    result = run_experiment(config, folder / "out")
    return folder / "out", result


def test_every_method_trains_and_is_measured(finished_run: tuple[Path, object]) -> None:
    run_dir, result = finished_run
    assert [r.name for r in result.runs] == [m["method"] for m in ALL_METHODS]
    failed = {r.name: r.error for r in result.runs if r.status != "ok"}
    assert not failed
    by_name = {r.name: r for r in result.runs}
    full = by_name["full"]
    assert full.trainable_params == full.total_params > 0
    for run in result.runs:
        assert 0 < run.trainable_params <= run.total_params
        assert run.wall_time_s > 0 and run.train_samples_per_s > 0 and run.peak_rss_bytes > 0
        assert 0 < run.step_time_s * run.train_steps < run.wall_time_s  # evaluation is not in the step time
        assert len(run.history) == 2 and run.best_epoch in (1.0, 2.0)
        assert set(run.test_metrics) == {"loss", "accuracy", "precision_macro", "recall_macro", "f1_macro"}
        assert sum(map(sum, run.confusion_matrix)) == 9
        assert run.optimizer_state_bytes > 0
        assert run.parameter_parts is not None and run.parameter_parts.trainable == run.trainable_params
        if run.name != "full":
            assert run.trainable_params < full.trainable_params
            assert run.model_size_bytes < full.model_size_bytes
            assert (run_dir / run.name / "model" / "adapter_config.json").is_file()
    # Adam keeps two fp32 moments per trainable weight.
    assert full.optimizer_state_bytes >= 2 * 4 * full.trainable_params
    assert not (run_dir / "full" / "checkpoints").exists()


def test_run_directory_holds_report_config_and_environment(finished_run: tuple[Path, object]) -> None:
    run_dir, _ = finished_run
    for name in ("config.yaml", "environment.json", "data_report.json", "results.json", "results.csv",
                 "report.md", "report.html", "plots/loss.png", "plots/quality.png", "plots/costs.png"):
        assert (run_dir / name).is_file(), name
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["seed"] == 42 and env["peft"] and env["transformers"]
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()


def test_best_epoch_is_the_one_with_the_best_validation_f1(finished_run: tuple[Path, object]) -> None:
    _, result = finished_run
    for run in result.runs:
        if run.method == "adalora":  # ranks change shape during training: the final epoch is kept
            assert run.best_epoch == run.history[-1].epoch
            continue
        scores = [h.metrics["f1_macro"] for h in run.history]
        assert run.best_metric == pytest.approx(max(scores))
        assert run.best_epoch == run.history[scores.index(max(scores))].epoch


@pytest.mark.parametrize("method", ["full", "lora", "prompt_tuning", "ia3"])
def test_reload_with_plain_transformers_and_peft_predicts_the_same(finished_run: tuple[Path, object],
                                                                    tiny_bert: Path, method: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, _ = finished_run
    folder = run_dir / method / "model"
    texts = ["the movie was great", "awful and boring plot", "it was okay"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if method == "full":
        model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    else:
        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3)
        model = PeftModel.from_pretrained(base, str(folder))
    model.eval()
    with torch.inference_mode():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    expected = torch.softmax(logits.float(), dim=-1).numpy()
    predictor = load_predictor(run_dir / method)
    np.testing.assert_allclose(predictor.predict_proba(texts), expected, atol=1e-5)
    assert predictor.labels == ["negative", "neutral", "positive"]
    assert predictor.predict(texts) == [predictor.labels[i] for i in expected.argmax(-1)]


@pytest.mark.parametrize("method", ["full", "lora", "prompt_tuning"])
def test_reported_test_metrics_equal_the_saved_models_predictions(finished_run: tuple[Path, object],
                                                                   method: str) -> None:
    """The eval sampler reorders rows by length: metrics must pair each prediction with its own label."""
    from peftlab.data import prepare_data
    from peftlab.evaluate import classification_metrics

    run_dir, result = finished_run
    config = load_config(run_dir / "config.yaml")
    data = prepare_data(config.data)
    predicted = load_predictor(run_dir / method).predict_proba(data.test.texts).argmax(-1)
    expected = classification_metrics(np.asarray(data.test.labels), predicted, len(data.labels))
    reported = next(r for r in result.runs if r.name == method).test_metrics
    assert reported["accuracy"] == pytest.approx(expected["accuracy"])
    assert reported["f1_macro"] == pytest.approx(expected["f1_macro"])


def test_saved_adapter_reports_accuracy_consistent_with_its_test_metrics(finished_run: tuple[Path, object]) -> None:
    run_dir, result = finished_run
    run = next(r for r in result.runs if r.name == "lora")
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["split_sizes"]["test"] == 9
    assert 0.0 <= run.test_metrics["accuracy"] <= 1.0


def test_existing_run_dir_is_refused_without_overwrite_or_resume(finished_run: tuple[Path, object],
                                                                 tiny_bert: Path, reviews_csv: Path) -> None:
    run_dir, _ = finished_run
    before = (run_dir / "results.json").read_bytes()
    with pytest.raises(RunDirError, match="--resume .* --overwrite"):
        run_experiment(experiment(tiny_bert, reviews_csv, ["lora"]), run_dir)
    with pytest.raises(ConfigError, match="contradict"):
        run_experiment(experiment(tiny_bert, reviews_csv, ["lora"]), run_dir, overwrite=True, resume=True)
    assert (run_dir / "results.json").read_bytes() == before


def test_resume_keeps_finished_methods_and_same_seed_gives_same_metrics(tmp_path: Path, tiny_bert: Path,
                                                                        reviews_csv: Path) -> None:
    config = experiment(tiny_bert, reviews_csv, ["full", "lora"], epochs=1)
    first = run_experiment(config, tmp_path / "a", methods=["full"])
    assert [r.name for r in first.runs] == ["full"]
    resumed = run_experiment(config, tmp_path / "a", resume=True)
    assert [r.name for r in resumed.runs] == ["full", "lora"]
    assert resumed.runs[0].wall_time_s == first.runs[0].wall_time_s  # kept, not retrained
    again = run_experiment(config, tmp_path / "b")
    for a, b in zip(resumed.runs, again.runs):
        assert a.test_metrics == pytest.approx(b.test_metrics, abs=1e-6)
        assert [h.eval_loss for h in a.history] == pytest.approx([h.eval_loss for h in b.history], abs=1e-6)


def test_resume_refuses_a_changed_config(tmp_path: Path, tiny_bert: Path, reviews_csv: Path) -> None:
    run_experiment(experiment(tiny_bert, reviews_csv, ["lora"], epochs=1), tmp_path / "r")
    with pytest.raises(RunDirError, match="training section"):
        run_experiment(experiment(tiny_bert, reviews_csv, ["lora"], epochs=2), tmp_path / "r", resume=True)


def test_unknown_method_selection_is_a_config_error(tmp_path: Path, tiny_bert: Path, reviews_csv: Path) -> None:
    with pytest.raises(ConfigError, match="not in this config"):
        run_experiment(experiment(tiny_bert, reviews_csv, ["lora"]), tmp_path / "x", methods=["dora"])


def test_seeds_train_each_method_once_per_seed(tmp_path: Path, tiny_bert: Path, reviews_csv: Path) -> None:
    config = experiment(tiny_bert, reviews_csv, [{"method": "lora", "learning_rate": 1e-2}], epochs=1,
                        seeds=[42, 43], method_process=False)
    result = run_experiment(config, tmp_path / "s")
    assert [(r.name, r.seed, r.status) for r in result.runs] == [("lora", 42, "ok"), ("lora", 43, "ok")]
    # the first seed's folder is the method's own (what predict uses); the others sit below it
    assert [r.output_dir for r in result.runs] == ["lora/model", "lora/seeds/43/model"]
    assert (tmp_path / "s" / "lora" / "seeds" / "43" / "result.json").is_file()
    assert result.runs[0].test_metrics != result.runs[1].test_metrics  # other seeds, other heads
    saved = json.loads((tmp_path / "s" / "results.json").read_text())["statistics"]
    lora = next(m for m in saved["methods"] if m["name"] == "lora")
    assert lora["seeds"] == [42, 43] and len(lora["per_seed"]["f1_macro"]) == 2 and lora["std"]["f1_macro"] is not None
    assert "mean of 2" in (tmp_path / "s" / "report.md").read_text()


def test_each_method_in_its_own_process_gives_the_in_process_numbers(tmp_path: Path, tiny_bert: Path,
                                                                        reviews_csv: Path) -> None:
    methods = [{"method": "lora", "learning_rate": 1e-2}]
    child = run_experiment(experiment(tiny_bert, reviews_csv, methods, epochs=1, method_process=True),
                           tmp_path / "child")
    here = run_experiment(experiment(tiny_bert, reviews_csv, methods, epochs=1, method_process=False), tmp_path / "here")
    assert child.runs[0].test_metrics == pytest.approx(here.runs[0].test_metrics, abs=1e-6)
    assert child.runs[0].peak_rss_bytes > 0
