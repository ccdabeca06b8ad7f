"""Class imbalance: weighted cross-entropy through the Trainer's compute_loss_func, and the small-class warning."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import yaml

from peftlab.config import dump_config, load_config
from peftlab.data import prepare_data
from peftlab.errors import ConfigError
from peftlab.train import _weighted_cross_entropy, class_weights
from tests.conftest import review_rows


def imbalanced_csv(folder: Path, neutral_every: int = 4) -> Path:
    """Reviews where only every ``neutral_every``-th neutral row is kept (neutral then ~12% for 4)."""
    rows = [r for i, r in enumerate(review_rows(150)) if r["label"] != "neutral" or i % neutral_every == 1]
    path = folder / "imbalanced.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def config_for(data: Path, model: str = "unused", **training: object) -> object:
    return load_config(data={"data": {"path": str(data), "max_length": 32}, "model": {"path": model},
                             "methods": [{"method": "full", "learning_rate": 1e-3}],
                             "training": {"epochs": 1, "batch_size": 8, "eval_batch_size": 4, **training}})


def test_balanced_weights_are_sklearns_on_the_train_split(tmp_path: Path) -> None:
    from sklearn.utils.class_weight import compute_class_weight

    config = config_for(imbalanced_csv(tmp_path), class_weights="balanced")
    data = prepare_data(config.data)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=np.asarray(data.train.labels))
    assert class_weights(config, data) == pytest.approx(expected.tolist())
    assert max(class_weights(config, data)) == class_weights(config, data)[data.labels.index("neutral")]


def test_named_weights_leave_other_classes_at_one_and_none_means_unweighted(tmp_path: Path) -> None:
    path = imbalanced_csv(tmp_path)
    data = prepare_data(config_for(path).data)
    assert class_weights(config_for(path, class_weights={"neutral": 4.0}), data) == [1.0, 4.0, 1.0]
    assert class_weights(config_for(path, class_weights="none"), data) is None


def test_a_weight_for_an_unknown_class_names_it_and_lists_the_classes(tmp_path: Path) -> None:
    path = imbalanced_csv(tmp_path)
    config = config_for(path, class_weights={"neutrl": 2.0})
    with pytest.raises(ConfigError, match=r"training.class_weights names 'neutrl'.*negative, neutral, positive"):
        class_weights(config, prepare_data(config.data))


def test_invalid_weight_settings_are_config_errors(tmp_path: Path) -> None:
    path = imbalanced_csv(tmp_path)
    with pytest.raises(ConfigError, match="training.class_weights"):
        config_for(path, class_weights={"neutral": -1.0})
    with pytest.raises(ConfigError, match="training.class_weights"):
        config_for(path, class_weights="balance")
    with pytest.raises(ConfigError, match="class_weights applies to classification only"):
        load_config(data={"task": "causal-lm", "data": {"path": str(path)}, "methods": ["lora"],
                          "training": {"class_weights": "balanced"}})


def test_weighted_loss_is_the_row_mean_of_weighted_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    weights = [0.5, 3.0, 1.0]
    per_row = -torch.log_softmax(logits, dim=-1)[torch.arange(4), labels]
    expected = (torch.tensor(weights)[labels] * per_row).sum()
    loss = _weighted_cross_entropy(weights)
    assert loss({"logits": logits}, labels).item() == pytest.approx((expected / 4).item(), rel=1e-6)
    # Under gradient accumulation the Trainer passes the rows of the whole accumulated batch.
    assert loss({"logits": logits}, labels, num_items_in_batch=8).item() == pytest.approx((expected / 8).item(), rel=1e-6)
    # Equal weights give plain cross-entropy.
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert _weighted_cross_entropy([1.0, 1.0, 1.0])({"logits": logits}, labels).item() == pytest.approx(plain.item())


def test_the_trainer_trains_with_the_weighted_loss(tmp_path: Path, tiny_bert: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import peftlab.train as train
    from peftlab.experiment import run_experiment

    seen: list[list[float]] = []
    calls = []
    original = train._weighted_cross_entropy

    def recording(weights: list[float]) -> object:
        seen.append(weights)
        inner = original(weights)

        def compute_loss(outputs: object, labels: object, num_items_in_batch: object = None) -> object:
            calls.append(num_items_in_batch)
            return inner(outputs, labels, num_items_in_batch)

        return compute_loss

    monkeypatch.setattr(train, "_weighted_cross_entropy", recording)
    # In this process, so the recording loss above is the one the Trainer calls.
    config = config_for(imbalanced_csv(tmp_path), str(tiny_bert), class_weights="balanced", max_steps=2,
                        method_process=False)
    run_experiment(config, tmp_path / "run")
    data = prepare_data(config.data)
    assert seen == [pytest.approx(class_weights(config, data))]
    assert any(n is not None for n in calls)  # called in training steps (evaluation passes None)


def test_data_report_warns_about_a_small_class(tmp_path: Path) -> None:
    report = prepare_data(config_for(imbalanced_csv(tmp_path)).data).report
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith("class 'neutral' has ")
    assert "training.class_weights: balanced" in report.warnings[0]


def test_balanced_data_has_no_small_class_warning_even_with_many_classes(tmp_path: Path) -> None:
    rows = [{"text": f"text number {i}", "label": f"c{i % 6}"} for i in range(120)]  # 6 classes of 16.7%
    path = tmp_path / "six.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    assert prepare_data(config_for(path).data).report.warnings == []
    assert prepare_data(config_for(imbalanced_csv(tmp_path, neutral_every=1)).data).report.warnings == []


@pytest.mark.parametrize("training, task, expected", [
    ({}, "classification", "balanced"),  # macro F1 picks the best epoch: every class counts alike
    ({"metric_for_best_model": "recall_macro"}, "classification", "balanced"),
    ({"metric_for_best_model": "accuracy"}, "classification", "none"),
    ({"class_weights": "none"}, "classification", "none"),
    ({"class_weights": {"neutral": 2.0}}, "classification", {"neutral": 2.0}),
    ({}, "causal-lm", "none"),
])
def test_auto_class_weights_follow_the_metric(training: dict, task: str, expected: object) -> None:
    config = load_config(data={"task": task, "data": {"path": "d.csv"}, "methods": ["lora"], "training": training})
    assert config.training.class_weights == expected
    assert yaml.safe_load(dump_config(config))["training"]["class_weights"] == expected  # saved resolved
