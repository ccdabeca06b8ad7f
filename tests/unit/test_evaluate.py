"""Metrics against values computed by hand."""

from __future__ import annotations

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
