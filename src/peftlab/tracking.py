"""Experiment tracking (``training.report_to``): TensorBoard and MLflow, through the Trainer's own integrations.

One tracking run per method and seed. The Trainer's callbacks (``TensorBoardCallback``, ``MLflowCallback``,
switched on by ``TrainingArguments.report_to``) log the training arguments, the model config and each epoch's
train and validation metrics; they are told where through their environment variables, set here around each
method (a child process inherits them). peftlab then adds what the Trainer never logs: the method's own
settings, the test metrics and costs (:func:`log_result`), and the report once it exists (:func:`log_report`).

Where: TensorBoard event files in ``RUN_DIR/tensorboard/<run>``; MLflow in ``MLFLOW_TRACKING_URI`` when the
user set one, else a file store in ``RUN_DIR/mlruns`` (offline, no server; MLflow 3 opens a file store only
with ``MLFLOW_ALLOW_FILE_STORE=true``, which peftlab sets for its own calls). Both trackers are the optional
extra ``tracking``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peftlab import rundir
from peftlab.errors import ConfigError

logger = logging.getLogger(__name__)

INSTALL = "pip install 'peftlab[tracking]'"
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
# The report files logged to each MLflow run as artifacts, once the report is written.
_REPORT_FILES = (rundir.REPORT_HTML, rundir.REPORT_MD, rundir.RESULTS_JSON)
# Costs logged beside the test metrics, from the RunResult: the comparison's other axis.
_COSTS = ("wall_time_s", "train_samples_per_s", "step_time_s", "peak_rss_bytes", "trainable_params",
          "total_params", "model_size_bytes", "optimizer_state_bytes")


def check_installed(report_to: list[str] | tuple[str, ...]) -> None:
    """Refuse a tracker whose package is missing, before anything is trained or written.

    Raises:
        ConfigError: naming the trackers and the install command.
    """
    missing = []
    for tracker in report_to:
        try:
            importlib.import_module(_MODULES[tracker])
        except ImportError:
            missing.append(tracker)
    if missing:
        names = " and ".join(missing)
        raise ConfigError(f"training.report_to asks for {names}, not installed here: install the tracking extra "
                          f"with `{INSTALL}`, or remove {names} from training.report_to")


def run_name(name: str, seed: int | None, seeds: list[int]) -> str:
    """The tracking run's name: the method's run name, with its seed when the method is trained at several."""
    return name if len(seeds) <= 1 or seed is None else f"{name}-seed{seed}"


def tensorboard_dir(run_dir: Path, name: str) -> Path:
    return run_dir / rundir.TENSORBOARD / name


def mlflow_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if the user set one, else the file store inside the run directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (run_dir.resolve() / rundir.MLRUNS).as_uri()


@contextlib.contextmanager
def environment(report_to: list[str], run_dir: Path, name: str, experiment: str) -> Iterator[None]:
    """Point the Trainer's tracking callbacks at this run for one method; the previous environment comes back after.

    Args:
        report_to: ``training.report_to``.
        run_dir: the run directory (the default home of both trackers).
        name: the tracking run's name (:func:`run_name`).
        experiment: the MLflow experiment (unless ``MLFLOW_EXPERIMENT_NAME`` is set): the experiment's name.
    """
    with _environ(variables(report_to, run_dir, name, experiment)):
        yield


def variables(report_to: list[str], run_dir: Path, name: str, experiment: str) -> dict[str, str]:
    """The environment that points the Trainer's tracking callbacks at this run (for a child process's own env)."""
    values: dict[str, str] = {}
    if "tensorboard" in report_to:
        values["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir(run_dir.resolve(), name))
    if "mlflow" in report_to:
        values.update(_mlflow_store(run_dir))
        values["MLFLOW_EXPERIMENT_NAME"] = os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment
    return values


def _mlflow_store(run_dir: Path) -> dict[str, str]:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return {}
    # mlflow 3.x refuses its file store ("maintenance mode") unless asked for it; it is the one store that needs
    # no server and no database migration (creating a new sqlite store took 16 s here).
    return {"MLFLOW_TRACKING_URI": mlflow_uri(run_dir), "MLFLOW_ALLOW_FILE_STORE": "true"}


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def recorder(report_to: Any) -> Any:
    """A Trainer callback that notes the MLflow run the Trainer's ``MLflowCallback`` started (its ``ids``).

    Added after the integration callbacks (the Trainer puts those first), so the run has started when it looks.
    """
    from transformers import TrainerCallback

    class TrackingRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.ids: dict[str, str] = {}

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not report_to or report_to == "none" or not state.is_world_process_zero:
                return
            self.ids["run_name"] = args.run_name
            if "mlflow" in report_to:
                import mlflow

                active = mlflow.active_run()
                if active is not None:
                    self.ids["mlflow_run_id"] = active.info.run_id

    return TrackingRecorder()


def detach(trainer: Any) -> None:
    """Remove the Trainer's tracking callbacks once training is over: they have ended their runs, and a later
    ``trainer.evaluate()`` (a run shorter than an epoch is evaluated once at the end) would start a stray one."""
    if not trainer.args.report_to or trainer.args.report_to == "none":
        return
    from transformers.integrations import MLflowCallback, TensorBoardCallback

    for callback in (MLflowCallback, TensorBoardCallback):
        trainer.remove_callback(callback)


def log_result(report_to: list[str], run_dir: Path, result: Any) -> None:
    """Log what the Trainer does not: the method's settings, its test metrics and its costs.

    Args:
        report_to: ``training.report_to``.
        run_dir: the run directory.
        result: the method's :class:`~peftlab.results.RunResult`; its ``tracking`` gets the locations.
    """
    if result.status != "ok" or not report_to:
        return
    with _warn_on_failure(f"{result.name}'s test metrics"):
        _log_result(report_to, run_dir, result)


def _log_result(report_to: list[str], run_dir: Path, result: Any) -> None:
    final = {f"test_{key}": float(value) for key, value in result.test_metrics.items()}
    final.update({key: float(getattr(result, key)) for key in _COSTS})
    step = int(result.train_steps)
    name = result.tracking.get("run_name") or result.name
    if "tensorboard" in report_to:
        from torch.utils.tensorboard import SummaryWriter

        folder = tensorboard_dir(run_dir, name)
        writer = SummaryWriter(log_dir=str(folder))
        try:
            for key, value in final.items():
                writer.add_scalar(key.replace("test_", "test/", 1) if key.startswith("test_") else f"cost/{key}",
                                  value, global_step=step)
        finally:
            writer.close()
        result.tracking["tensorboard_dir"] = str(folder.relative_to(run_dir))
    run_id = result.tracking.get("mlflow_run_id")
    if "mlflow" in report_to and run_id:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        settings = {"method": result.method, "name": result.name, "seed": result.seed,
                    "learning_rate": result.learning_rate, **result.options}
        with _mlflow_client(run_dir) as client:
            # Prefixed: the Trainer already logged its own `learning_rate` and `seed`, and a param is write-once.
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in final.items()],
                             params=[Param(f"peftlab.{k}", str(v)[:500]) for k, v in settings.items()])
        result.tracking["mlflow_tracking_uri"] = mlflow_uri(run_dir)


def log_report(report_to: list[str], run_dir: Path, runs: list[Any]) -> None:
    """Attach the report (HTML, markdown, results.json) to each method's MLflow run, once it has been written."""
    if "mlflow" not in report_to:
        return
    ids = [run.tracking["mlflow_run_id"] for run in runs if run.tracking.get("mlflow_run_id")]
    if not ids:
        return
    with _warn_on_failure("the report"), _mlflow_client(run_dir) as client:
        for run_id in ids:
            for name in _REPORT_FILES:
                if (run_dir / name).is_file():
                    client.log_artifact(run_id, str(run_dir / name), artifact_path="report")


@contextlib.contextmanager
def _warn_on_failure(what: str) -> Iterator[None]:
    """A tracker that fails (a server gone, a full disk) costs its copy of the results, never the run itself."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the results are saved in the run directory either way
        logger.warning("training.report_to: could not log %s (%s: %s); the run directory has them",
                       what, type(exc).__name__, exc)


@contextlib.contextmanager
def _mlflow_client(run_dir: Path) -> Iterator[Any]:
    """An ``MlflowClient`` on the run's store (the file store's opt-in is read on each call, so it stays set)."""
    from mlflow import MlflowClient

    with _environ(_mlflow_store(run_dir)):
        yield MlflowClient(tracking_uri=mlflow_uri(run_dir))
