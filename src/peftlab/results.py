"""Measured results as plain dataclasses; ``report.py`` is the only module that renders them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EpochRecord:
    """One evaluation during training (normally once per epoch)."""

    epoch: float
    step: int
    train_loss: float | None
    eval_loss: float | None
    metrics: dict[str, float] = field(default_factory=dict)


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
    seed: int | None = None  # training.seed of this run; several per method when training.seeds has several

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        data = dict(data)
        data["history"] = [EpochRecord(**h) for h in data.get("history", [])]
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
