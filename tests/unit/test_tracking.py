"""training.report_to: a tiny run tracked to TensorBoard and MLflow, read back with each tool's own reader."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from peftlab.config import dump_config, load_config
from peftlab.errors import ConfigError
from peftlab.experiment import run_experiment
from tests.conftest import review_rows, write_rows

pytest.importorskip("tensorboard", reason="the tracking extra is not installed: pip install 'peftlab[tracking]'")
pytest.importorskip("mlflow", reason="the tracking extra is not installed: pip install 'peftlab[tracking]'")

METHODS = [{"method": "full", "learning_rate": 1e-3}, {"method": "lora", "learning_rate": 1e-2}]
STEPS_PER_EPOCH = 9  # 72 training rows of review_rows() in batches of 8


def tree(model: Path, data: Path, **training: object) -> dict:
    return {"name": "tracked", "data": {"path": str(data), "max_length": 32}, "model": {"path": str(model)},
            "methods": METHODS,
            "training": {"epochs": 2, "batch_size": 8, "eval_batch_size": 16, "warmup_ratio": 0.0,
                         "method_process": False, **training}}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("tracked")
    data = write_rows(folder / "reviews.csv", review_rows())
    config = load_config(data=tree(tiny_bert, data, report_to=["tensorboard", "mlflow"]))
    run_experiment(config, folder / "run")
    results = json.loads((folder / "run" / "results.json").read_text(encoding="utf-8"))
    return folder / "run", {r["name"]: r for r in results["runs"]}


def test_tensorboard_has_each_epoch_and_the_test_metrics(tracked_run: tuple[Path, dict]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, runs = tracked_run
    for name, run in runs.items():
        assert run["tracking"]["tensorboard_dir"] == f"tensorboard/{name}"
        events = EventAccumulator(str(run_dir / run["tracking"]["tensorboard_dir"]))
        events.Reload()
        for tag in ("train/loss", "eval/loss", "eval/f1_macro"):  # the Trainer's callback, once per epoch
            assert [e.step for e in events.Scalars(tag)] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH], tag
        for metric, value in run["test_metrics"].items():  # added by peftlab after the test evaluation
            (event,) = events.Scalars(f"test/{metric}")
            assert event.value == pytest.approx(value, rel=1e-6) and event.step == run["train_steps"]
        assert events.Scalars("cost/trainable_params")[0].value == run["trainable_params"]


def test_mlflow_has_one_run_per_method_with_params_history_test_metrics_and_the_report(
        tracked_run: tuple[Path, dict]) -> None:
    import mlflow

    run_dir, runs = tracked_run
    uri = (run_dir / "mlruns").as_uri()
    assert {r["tracking"]["mlflow_tracking_uri"] for r in runs.values()} == {uri}
    mlflow.set_tracking_uri(uri)  # the fluent search reads the global URI; reset below for other tests
    try:
        found = mlflow.search_runs(experiment_names=["tracked"], output_format="list")
        client = mlflow.MlflowClient(uri)
        assert sorted(r.info.run_name for r in found) == ["full", "lora"]
        for tracked in found:
            run = runs[tracked.info.run_name]
            assert tracked.info.run_id == run["tracking"]["mlflow_run_id"]
            params = tracked.data.params
            assert float(params["learning_rate"]) == run["learning_rate"]  # the Trainer's arguments
            assert params["peftlab.method"] == run["method"] and params["peftlab.seed"] == "42"  # peftlab's own
            history = client.get_metric_history(tracked.info.run_id, "eval_f1_macro")
            assert [m.step for m in history] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
            assert [m.value for m in history] == pytest.approx([h["metrics"]["f1_macro"] for h in run["history"]])
            for metric, value in run["test_metrics"].items():
                assert tracked.data.metrics[f"test_{metric}"] == pytest.approx(value, rel=1e-9)
            assert tracked.data.metrics["wall_time_s"] == pytest.approx(run["wall_time_s"])
            report = {a.path for a in client.list_artifacts(tracked.info.run_id, "report")}
            assert report == {"report/report.html", "report/report.md", "report/results.json"}
            html = Path(mlflow.artifacts.download_artifacts(run_id=tracked.info.run_id,
                                                            artifact_path="report/report.html"))
            assert html.read_text(encoding="utf-8") == (run_dir / "report.html").read_text(encoding="utf-8")
    finally:
        mlflow.set_tracking_uri(None)


def test_no_tracker_by_default_and_the_key_stays_out_of_the_saved_config() -> None:
    plain = load_config(data={"data": {"path": "x.csv"}, "methods": ["lora"]})
    assert plain.training.report_to == [] and "report_to" not in dump_config(plain)
    one = load_config(data={"data": {"path": "x.csv"}, "methods": ["lora"]}, overrides=["training.report_to=mlflow"])
    assert one.training.report_to == ["mlflow"] and "report_to:\n  - mlflow" in dump_config(one)


def test_a_tracker_that_is_not_installed_is_a_config_error_naming_the_install_command(
        tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_rows(tmp_path / "reviews.csv", review_rows())
    # mlflow is installed here: a None entry in sys.modules makes `import mlflow` fail as it does without it.
    monkeypatch.setitem(sys.modules, "mlflow", None)
    config = load_config(data=tree(tiny_bert, data, report_to=["tensorboard", "mlflow"]))
    expected = r"asks for mlflow, not installed here: .*`pip install 'peftlab\[tracking\]'`"
    with pytest.raises(ConfigError, match=expected):
        run_experiment(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written
