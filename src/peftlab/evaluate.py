"""Metrics: loss, accuracy, macro precision/recall/F1, per-class report, confusion matrix."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Validation metric name -> whether larger is better; shared by training (best epoch) and reports.
GREATER_IS_BETTER = {"f1_macro": True, "accuracy": True, "precision_macro": True, "recall_macro": True,
                     "loss": False, "perplexity": False}


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over all ``num_labels`` classes (absent classes count as 0)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    classes = list(range(num_labels))
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, labels=classes,
                                                               average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predictions)), "precision_macro": float(precision),
            "recall_macro": float(recall), "f1_macro": float(f1)}


def per_class_report(labels: np.ndarray, predictions: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=list(range(len(names))), zero_division=0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])} for i, name in enumerate(names)}


def confusion(labels: np.ndarray, predictions: np.ndarray, num_labels: int) -> list[list[int]]:
    """Rows: true class, columns: predicted class."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, predictions, labels=list(range(num_labels))).tolist()


def make_compute_metrics(num_labels: int) -> Any:
    """A ``compute_metrics`` for HF Trainer on sequence classification."""

    def compute_metrics(eval_prediction: Any) -> dict[str, float]:
        logits = eval_prediction.predictions
        if isinstance(logits, tuple):  # some models also return hidden states
            logits = logits[0]
        predictions = np.asarray(logits).argmax(axis=-1)
        return classification_metrics(np.asarray(eval_prediction.label_ids), predictions, num_labels)

    return compute_metrics


def perplexity(loss: float | None) -> float | None:
    """exp(mean token cross-entropy); None when the loss is unknown, inf on overflow."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (bf16 logits are upcast first)."""
    values = np.asarray(logits, dtype=np.float64)
    values = values - values.max(axis=-1, keepdims=True)
    exp = np.exp(values)
    return exp / exp.sum(axis=-1, keepdims=True)
