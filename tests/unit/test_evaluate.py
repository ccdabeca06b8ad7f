"""Metrics against values computed by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peftlab.evaluate import classification_metrics, confusion, per_class_report, perplexity, softmax


def test_macro_metrics_count_absent_classes_as_zero() -> None:
    labels = np.array([0, 0, 1, 1])
    predictions = np.array([0, 1, 1, 1])
    metrics = classification_metrics(labels, predictions, num_labels=3)
    assert metrics["accuracy"] == pytest.approx(0.75)
    # class 0: P 1, R .5, F1 2/3; class 1: P 2/3, R 1, F1 .8; class 2 never occurs: 0
    assert metrics["precision_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert metrics["recall_macro"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert metrics["f1_macro"] == pytest.approx((2 / 3 + 0.8 + 0) / 3)


def test_per_class_and_confusion() -> None:
    labels, predictions = np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2])
    report = per_class_report(labels, predictions, ["a", "b", "c"])
    assert report["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert confusion(labels, predictions, 3) == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_softmax_and_perplexity() -> None:
    probs = softmax(np.array([[0.0, 0.0], [1000.0, 0.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [1.0, 0.0]])
    assert perplexity(0.0) == 1.0 and perplexity(None) is None and perplexity(1e6) == float("inf")


def test_saved_test_predictions_are_in_the_test_splits_row_order(tmp_path: Path, tiny_bert: Path,
                                                                 reviews_csv: Path) -> None:
    """Row i of test_predictions.jsonl is test row i, although the eval sampler groups rows by length."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from peftlab.config import load_config
    from peftlab.data import prepare_data
    from peftlab.experiment import run_experiment
    from peftlab.predict import load_predictor
    from peftlab.results import load_predictions

    config = load_config(data={"data": {"path": str(reviews_csv), "max_length": 32}, "model": {"path": str(tiny_bert)},
                               "methods": [{"method": "full", "learning_rate": 1e-3}],
                               "training": {"epochs": 1, "batch_size": 8, "eval_batch_size": 4, "group_by_length": True}})
    result = run_experiment(config, tmp_path / "run")
    run = result.runs[0]
    data = prepare_data(config.data)
    saved = load_predictions(tmp_path / "run" / run.predictions_file)

    # The order trainer.predict would have used (transformers' LengthGroupedSampler with the data seed) is not
    # the split's, so this test fails if predictions are saved in the sampler's order.
    tokenizer = load_predictor(tmp_path / "run" / "full").tokenizer
    lengths = [len(ids) for ids in tokenizer(data.test.texts, truncation=True, max_length=32)["input_ids"]]
    sampler_order = get_length_grouped_indices(lengths, 4, generator=torch.Generator().manual_seed(42))
    assert sampler_order != list(range(len(data.test)))

    assert saved.labels == data.labels
    assert saved.true.tolist() == data.test.labels
    expected = load_predictor(tmp_path / "run" / "full").predict_proba(data.test.texts)
    np.testing.assert_allclose(saved.probabilities, expected, atol=1e-5)
    assert saved.predicted.tolist() == expected.argmax(-1).tolist()
    assert run.test_metrics["accuracy"] == pytest.approx(float(np.mean(saved.predicted == saved.true)))
