"""Measured results as plain dataclasses; ``report.py`` is the only module that renders them.

Also owns the saved test predictions of each method (``test_predictions.jsonl``): one JSON object per
test row, in the test split's row order, so intervals and verdicts can be recomputed from the run
directory alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peftlab import fsutil
from peftlab.errors import RunDirError

PREDICTIONS_FILE = "test_predictions.jsonl"


@dataclass
class EpochRecord:
    """One evaluation during training (normally once per epoch)."""

    epoch: float
    step: int
    train_loss: float | None
    eval_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ParameterParts:
    """Where a method's trainable parameters are, counted by :func:`peftlab.params.parameter_parts`.

    Each part counts trainable parameters only; ``base`` is the base model's own parameter count (what the
    method adds is not in it), the denominator of every percentage in the report.
    """

    adapter: int = 0  # peft tuner weights: lora_A/lora_B, IA3 vectors, ... (never the frozen base weight they wrap)
    head: int = 0  # classifier head: the trainable copy in peft's modules_to_save, or the model's own head
    prompt: int = 0  # prompt learning: virtual-token embeddings or the prompt encoder
    other: int = 0  # any other trainable weight (full fine-tuning: the base model's own weights)
    base: int = 0

    @property
    def trainable(self) -> int:
        return self.adapter + self.head + self.prompt + self.other

    def pct(self, count: int) -> float:
        """``count`` as a percentage of the base model's parameters."""
        return 100.0 * count / self.base if self.base else 0.0


@dataclass
class RunResult:
    """Everything measured for one method of an experiment."""

    name: str
    method: str
    task: str
    status: str = "ok"  # "ok" or "failed"
    error: str | None = None
    learning_rate: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0  # trainer.train() wall clock, evaluation during training included
    train_samples_per_s: float = 0.0
    train_steps: int = 0
    epochs_run: float = 0.0
    step_time_s: float = 0.0  # mean seconds inside an optimizer step (evaluation excluded), this process's steps
    peak_rss_bytes: int = 0  # peak resident memory of the process while this method trained
    peak_accelerator_bytes: int | None = None
    trainable_params: int = 0
    total_params: int = 0
    model_size_bytes: int = 0  # what must be kept: full weights, or adapter + head
    optimizer_state_bytes: int = 0
    best_epoch: float | None = None
    best_metric_name: str = ""
    best_metric: float | None = None
    history: list[EpochRecord] = field(default_factory=list)
    test_metrics: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    generations: dict[str, str] = field(default_factory=dict)
    output_dir: str = ""
    resumed: bool = False
    seed: int | None = None  # training seed of this run; several runs may share a name with different seeds
    predictions_file: str = ""  # test predictions, relative to the run directory ("" when not saved)
    parameter_parts: ParameterParts | None = None  # trainable parameters by part (None in runs from before it)
    # Where the run was tracked (training.report_to): mlflow_run_id, mlflow_tracking_uri, tensorboard_dir.
    tracking: dict[str, str] = field(default_factory=dict)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        data = dict(data)
        data["history"] = [EpochRecord(**h) for h in data.get("history", [])]
        if isinstance(data.get("parameter_parts"), dict):
            data["parameter_parts"] = ParameterParts(**data["parameter_parts"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class ExperimentResult:
    """An experiment: its config, the data report and one result per method."""

    name: str
    task: str
    config: dict[str, Any]
    data_report: dict[str, Any]
    runs: list[RunResult]
    environment: dict[str, Any] = field(default_factory=dict)
    base_generations: dict[str, str] = field(default_factory=dict)
    base_eval_loss: float | None = None
    generation_settings: dict[str, Any] = field(default_factory=dict)
    # Intervals and verdicts recomputed from the saved predictions by each report (see peftlab.stats).
    statistics: dict[str, Any] = field(default_factory=dict)
    # Runs of the config with no result in the run directory yet: "<label> (being trained by ...)" / "(not run)".
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentResult":
        data = dict(data)
        data["runs"] = [RunResult.from_dict(r) for r in data.get("runs", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: Path) -> "ExperimentResult":
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


@dataclass
class SavedPredictions:
    """One method's predictions on the test split, row ``i`` being test row ``i``.

    Attributes:
        labels: class names; index = label id.
        true: true label id per row, shape ``(rows,)``.
        predicted: predicted label id per row (argmax of the logits), shape ``(rows,)``.
        probabilities: softmax probabilities, shape ``(rows, classes)``.
    """

    labels: list[str]
    true: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray

    def __len__(self) -> int:
        return len(self.true)


def save_predictions(path: Path, predictions: SavedPredictions) -> None:
    """Write ``predictions`` as JSON lines, atomically (a crash never leaves half a file)."""
    names = predictions.labels
    lines = []
    for row, (true, predicted, probs) in enumerate(zip(predictions.true, predictions.predicted,
                                                        predictions.probabilities)):
        lines.append(json.dumps({"row": row, "label": names[int(true)], "predicted": names[int(predicted)],
                                 "probabilities": {n: round(float(p), 6) for n, p in zip(names, probs)}},
                                ensure_ascii=False))
    fsutil.write_text(path, "\n".join(lines) + "\n")


def load_predictions(path: Path) -> SavedPredictions:
    """Read a file written by :func:`save_predictions`.

    Raises:
        RunDirError: the file is missing, not JSON lines, or its rows are out of order.
    """
    if not path.is_file():
        raise RunDirError(f"{path} not found: the run saved no test predictions there (runs before peftlab saved "
                          f"them have none; rerun the method to get intervals)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{path} line {number} is not JSON ({exc.msg}); the file is damaged, rerun the method") from None
    if not rows:
        raise RunDirError(f"{path} holds no rows; rerun the method")
    labels = list(rows[0]["probabilities"])
    index = {name: i for i, name in enumerate(labels)}
    if [r["row"] for r in rows] != list(range(len(rows))):
        raise RunDirError(f"{path}: rows are not numbered 0..{len(rows) - 1} in order; the file is damaged, rerun the method")
    try:
        true = np.array([index[r["label"]] for r in rows], dtype=np.int64)
        predicted = np.array([index[r["predicted"]] for r in rows], dtype=np.int64)
        probabilities = np.array([[r["probabilities"][n] for n in labels] for r in rows], dtype=np.float64)
    except KeyError as exc:
        raise RunDirError(f"{path}: label {exc.args[0]!r} is not one of the classes {labels}; rerun the method") from None
    return SavedPredictions(labels=labels, true=true, predicted=predicted, probabilities=probabilities)


@dataclass
class TrialRecord:
    """One tuning trial of one method, as its Optuna study holds it."""

    number: int
    state: str  # COMPLETE, PRUNED, FAIL or RUNNING (Optuna's TrialState names); "interrupted" trials are FAIL
    params: dict[str, Any] = field(default_factory=dict)  # the searched values, as the search space names them
    value: float | None = None  # best validation metric (pruned: the last one reported)
    intermediate: list[float] = field(default_factory=list)  # validation metric after each epoch
    error: str | None = None  # why a FAIL trial failed (divergence, a method that cannot apply, interrupted)


@dataclass
class MethodStudy:
    """The study of one method: its search space, its trials and the settings chosen."""

    name: str  # run name of the method in the config
    method: str
    study_name: str
    direction: str  # "maximize" or "minimize"
    space: list[dict[str, Any]] = field(default_factory=list)  # each parameter: name, kind, range/choices, description
    trials: list[TrialRecord] = field(default_factory=list)
    best_trial: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)  # as the search space names them
    chosen: dict[str, Any] = field(default_factory=dict)  # the method config fields written to tuned.yaml

    def range_edges(self) -> list[RangeEdge]:
        """The log-scale parameters whose best value lies at an end of the range searched."""
        return range_edges(self.space, self.best_params)


# A best value within this factor of an end of its log-scale range is "at the edge": the optimum may lie outside.
EDGE_FACTOR = 1.5


@dataclass(frozen=True)
class RangeEdge:
    """A searched parameter whose best value is at an end of its range."""

    name: str
    value: float
    low: float
    high: float

    @property
    def end(self) -> str:
        return "low" if self.value < EDGE_FACTOR * self.low else "high"


def range_edges(space: list[dict[str, Any]], best: dict[str, Any]) -> list[RangeEdge]:
    """Each log-scale parameter of ``space`` whose value in ``best`` is within EDGE_FACTOR of an end."""
    edges = []
    for parameter in space:
        value = best.get(parameter["name"])
        if parameter.get("kind") != "log-uniform" or not isinstance(value, (int, float)):
            continue
        low, high = float(parameter["low"]), float(parameter["high"])
        if value < EDGE_FACTOR * low or value > high / EDGE_FACTOR:
            edges.append(RangeEdge(parameter["name"], float(value), low, high))
    return edges


@dataclass
class StudyResult:
    """A tuning run: one study per method, the same trial budget for each, on the validation split only."""

    name: str
    metric: str  # validation metric the studies optimise (training.metric_for_best_model; loss for causal LMs)
    budget: int  # trials per method
    storage: str  # where the studies live (credentials masked)
    sampler: str
    pruner: str
    methods: list[MethodStudy] = field(default_factory=list)
    tuned_config: str = ""  # the tuned config's file name in the tune directory
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StudyResult":
        data = dict(data)
        methods = []
        for study in data.get("methods", []):
            study = dict(study)
            study["trials"] = [TrialRecord(**t) for t in study.get("trials", [])]
            methods.append(MethodStudy(**study))
        data["methods"] = methods
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
