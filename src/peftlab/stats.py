"""Statistics of a comparison: bootstrap intervals from saved test predictions, paired verdicts, seeds.

A test split of a few hundred rows makes macro-F1 differences of a few points noise. This module says
how much: everything is recomputed from each method's saved test predictions (row ``i`` = test row ``i``),
so ``peftlab report RUN_DIR`` gives the same numbers as the run itself.

Choices, stated once:

* **Percentile bootstrap over test rows.** Resample ``i`` is ``rng.integers(0, rows, rows)`` from
  ``numpy.random.default_rng(seed)``, drawn in order; the interval is the ``(1 - confidence) / 2`` and
  ``(1 + confidence) / 2`` quantiles (numpy's default linear interpolation) of the metric over resamples.
* **Paired differences.** Every method is scored on the *same* resampled rows, and the interval is the
  one of ``metric(method) - metric(reference)`` on each resample: the row-to-row difficulty both share
  cancels out, which is what makes a paired interval much narrower than two separate ones.
* **Verdict.** "better than" / "worse than" when the paired interval excludes 0, otherwise
  "no detectable difference from" — at this test size, not "equal".
* **Several seeds.** The test rows are the same for every seed (the split has its own seed), so each
  resample draws rows once and a method's metric on it is the *mean over its seeds* of the per-seed
  metrics on those rows. The interval is then about the seed-averaged metric under test-set sampling;
  the seed-to-seed spread is reported separately as mean ± std (sample std, ``ddof=1``) over seeds.
* **Macro F1** averages over *all* classes, a class never predicted nor present scoring 0: the same as
  ``sklearn.metrics.f1_score(average="macro", labels=range(classes), zero_division=0)``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peftlab.config import ReportConfig
from peftlab.errors import RunDirError
from peftlab.results import ExperimentResult, SavedPredictions, load_predictions

logger = logging.getLogger(__name__)

METRICS = ("f1_macro", "accuracy")
METRIC_NAMES = {"f1_macro": "macro F1", "accuracy": "accuracy"}
BETTER, WORSE, NO_DIFFERENCE = "better than", "worse than", "no detectable difference from"
# Resamples scored per block: bounds memory at block x rows indices (250 x 100k rows = 200 MB) on big test sets.
_BLOCK = 250


@dataclass
class Interval:
    """A point estimate on the whole test split and its bootstrap interval."""

    estimate: float
    low: float
    high: float


@dataclass
class Comparison:
    """One method against the reference on one metric, from paired resamples."""

    metric: str
    reference: str
    difference: Interval  # method minus reference
    verdict: str  # BETTER, WORSE or NO_DIFFERENCE


@dataclass
class MethodStats:
    """Intervals, seed spread, classes never predicted and the verdict of one method (all its seeds)."""

    name: str
    seeds: list[int | None]
    metrics: dict[str, Interval]
    per_seed: dict[str, list[float]]  # metric -> value per seed, in ``seeds`` order
    std: dict[str, float | None]  # metric -> sample std over seeds; None with one seed
    never_predicted: dict[str, int]  # class -> in how many of the seeds it is never predicted
    comparisons: dict[str, Comparison] = field(default_factory=dict)  # empty for the reference itself


@dataclass
class ExperimentStats:
    """Statistics of every method with saved predictions, and the settings that produced them."""

    reference: str | None
    confidence: float
    bootstrap_samples: int
    seed: int
    test_rows: int
    methods: list[MethodStats]
    notes: list[str] = field(default_factory=list)
    # Macro F1 and accuracy of always predicting the test split's most frequent class: the floor a method must clear.
    majority: dict[str, float] = field(default_factory=dict)

    def method(self, name: str) -> MethodStats | None:
        return next((m for m in self.methods if m.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentStats":
        methods = []
        for m in data.get("methods", []):
            comparisons = {k: Comparison(metric=c["metric"], reference=c["reference"],
                                         difference=Interval(**c["difference"]), verdict=c["verdict"])
                           for k, c in m.get("comparisons", {}).items()}
            methods.append(MethodStats(name=m["name"], seeds=list(m["seeds"]),
                                       metrics={k: Interval(**v) for k, v in m["metrics"].items()},
                                       per_seed=dict(m["per_seed"]), std=dict(m["std"]),
                                       never_predicted=dict(m["never_predicted"]), comparisons=comparisons))
        return cls(reference=data.get("reference"), confidence=data["confidence"],
                   bootstrap_samples=data["bootstrap_samples"], seed=data["seed"], test_rows=data["test_rows"],
                   methods=methods, notes=list(data.get("notes", [])), majority=dict(data.get("majority") or {}))


# --------------------------------------------------------------------------- metrics


def macro_f1(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Macro F1 over all ``num_classes`` classes (sklearn's ``zero_division=0``)."""
    return float(_scores(np.asarray(true)[None, :], np.asarray(predicted)[None, :], num_classes)["f1_macro"][0])


def _scores(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Macro F1 and accuracy of each row of ``(resamples, rows)`` label matrices, in one bincount each.

    Per class F1 = 2 TP / (true count + predicted count), 0 when both counts are 0: sklearn's formula.
    """
    samples = true.shape[0]
    offsets = (np.arange(samples) * num_classes)[:, None]
    size = samples * num_classes
    correct = true == predicted
    true_counts = np.bincount((true + offsets).ravel(), minlength=size).reshape(samples, num_classes)
    predicted_counts = np.bincount((predicted + offsets).ravel(), minlength=size).reshape(samples, num_classes)
    hits = np.bincount((true + offsets).ravel(), weights=correct.ravel(), minlength=size).reshape(samples, num_classes)
    denominator = true_counts + predicted_counts
    f1 = np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0)
    return {"f1_macro": f1.mean(axis=1), "accuracy": correct.mean(axis=1)}


def point_metrics(predictions: SavedPredictions) -> dict[str, float]:
    """Macro F1 and accuracy on the whole test split."""
    scores = _scores(predictions.true[None, :], predictions.predicted[None, :], len(predictions.labels))
    return {metric: float(values[0]) for metric, values in scores.items()}


def majority_metrics(predictions: SavedPredictions) -> dict[str, float]:
    """Macro F1 and accuracy of predicting the most frequent true class for every test row.

    A method at this floor has learnt nothing but the class balance; with ``k`` classes and a majority share
    ``p`` it is ``(2p / (1 + p)) / k`` macro F1 and ``p`` accuracy (ties: the first class).
    """
    counts = np.bincount(predictions.true, minlength=len(predictions.labels))
    constant = np.full_like(predictions.true, int(np.argmax(counts)))
    scores = _scores(predictions.true[None, :], constant[None, :], len(predictions.labels))
    return {metric: float(values[0]) for metric, values in scores.items()}


# --------------------------------------------------------------------------- bootstrap


def resample_blocks(rows: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap row indices, ``(block, rows)`` at a time; concatenated, row ``i`` is resample ``i``.

    Drawing ``(block, rows)`` from one generator yields the same numbers as ``rows`` draws per resample
    in order, so the resamples do not depend on the block size.
    """
    rng = np.random.default_rng(seed)
    for start in range(0, samples, _BLOCK):
        yield rng.integers(0, rows, size=(min(_BLOCK, samples - start), rows))


def resampled_metrics(runs: Sequence[Sequence[SavedPredictions]], samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Each method's metrics on the same bootstrap resamples of the test rows.

    Args:
        runs: per method, its predictions per seed (all on the same test rows).
        samples: number of resamples.
        seed: seed of the resampling.

    Returns:
        Per method, metric -> array ``(samples,)``: the mean over that method's seeds on each resample.
    """
    first = runs[0][0]
    num_classes = len(first.labels)
    out: list[dict[str, list[np.ndarray]]] = [{m: [] for m in METRICS} for _ in runs]
    for indices in resample_blocks(len(first), samples, seed):
        true = first.true[indices]
        for method_index, seeds in enumerate(runs):
            per_seed = [_scores(true, p.predicted[indices], num_classes) for p in seeds]
            for metric in METRICS:
                out[method_index][metric].append(np.mean([s[metric] for s in per_seed], axis=0))
    return [{m: np.concatenate(values[m]) for m in METRICS} for values in out]


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` share of ``values`` (percentile method, linear interpolation)."""
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_interval(predictions: SavedPredictions, metric: str, samples: int = 1000, confidence: float = 0.95,
                       seed: int = 0) -> Interval:
    """Percentile bootstrap interval of ``metric`` (``f1_macro`` or ``accuracy``) of one run."""
    values = resampled_metrics([[predictions]], samples, seed)[0][metric]
    return Interval(point_metrics(predictions)[metric], *percentile_interval(values, confidence))


def paired_comparison(method: Sequence[SavedPredictions], reference: Sequence[SavedPredictions], reference_name: str,
                      metric: str, samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> Comparison:
    """Paired bootstrap of ``metric(method) - metric(reference)`` on the same resampled test rows."""
    _check_same_rows([*method, *reference])
    resampled = resampled_metrics([method, reference], samples, seed)
    estimate = _seed_mean(method, metric) - _seed_mean(reference, metric)
    return _compare(metric, reference_name, estimate, resampled[0][metric] - resampled[1][metric], confidence)


def _compare(metric: str, reference: str, estimate: float, differences: np.ndarray, confidence: float) -> Comparison:
    low, high = percentile_interval(differences, confidence)
    return Comparison(metric=metric, reference=reference, difference=Interval(estimate, low, high),
                      verdict=verdict(low, high))


def verdict(low: float, high: float) -> str:
    """"better than" / "worse than" when the interval of the difference excludes 0, else no detectable difference."""
    if low > 0:
        return BETTER
    if high < 0:
        return WORSE
    return NO_DIFFERENCE


def _seed_mean(seeds: Sequence[SavedPredictions], metric: str) -> float:
    return float(np.mean([point_metrics(p)[metric] for p in seeds]))


def _check_same_rows(predictions: Sequence[SavedPredictions]) -> None:
    first = predictions[0]
    for other in predictions[1:]:
        if other.labels != first.labels or not np.array_equal(other.true, first.true):
            raise RunDirError("saved test predictions are not on the same test rows and classes (labels "
                              f"{first.labels} vs {other.labels}, {len(first)} vs {len(other)} rows): were the "
                              "methods run with different data settings? Rerun them in one run directory")


# --------------------------------------------------------------------------- experiment


def experiment_statistics(runs: Sequence[tuple[str, int | None, SavedPredictions]], reference: str | None,
                          samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> ExperimentStats:
    """Intervals, seed spread and verdicts of every method against ``reference``.

    Args:
        runs: ``(method name, training seed, predictions)`` per run; a name may repeat with other seeds.
        reference: the method every other one is compared against (None: no comparisons).
        samples: bootstrap resamples.
        confidence: interval coverage, e.g. 0.95.
        seed: seed of the resampling (every interval uses the same resamples).

    Returns:
        An :class:`ExperimentStats` with one :class:`MethodStats` per method, in first-seen order.

    Raises:
        RunDirError: when the predictions are not all on the same test rows.
    """
    groups: dict[str, list[tuple[int | None, SavedPredictions]]] = {}
    for name, run_seed, predictions in runs:
        groups.setdefault(name, []).append((run_seed, predictions))
    notes: list[str] = []
    if not groups:
        return ExperimentStats(reference, confidence, samples, seed, 0, [], notes)
    everything = [p for _, _, p in runs]
    _check_same_rows(everything)
    names = list(groups)
    resampled = resampled_metrics([[p for _, p in groups[n]] for n in names], samples, seed)
    if reference is not None and reference not in groups:
        notes.append(f"the reference {reference} has no saved test predictions: no verdicts")
        reference = None
    methods = []
    for name, values in zip(names, resampled):
        seeds_predictions = [p for _, p in groups[name]]
        per_seed = {m: [point_metrics(p)[m] for p in seeds_predictions] for m in METRICS}
        metrics = {m: Interval(float(np.mean(per_seed[m])), *percentile_interval(values[m], confidence))
                   for m in METRICS}
        std = {m: float(np.std(per_seed[m], ddof=1)) if len(per_seed[m]) > 1 else None for m in METRICS}
        stats = MethodStats(name=name, seeds=[s for s, _ in groups[name]], metrics=metrics, per_seed=per_seed,
                            std=std, never_predicted=_never_predicted(seeds_predictions))
        if reference is not None and name != reference:
            reference_values = resampled[names.index(reference)]
            reference_predictions = [p for _, p in groups[reference]]
            for m in METRICS:
                estimate = metrics[m].estimate - _seed_mean(reference_predictions, m)
                stats.comparisons[m] = _compare(m, reference, estimate, values[m] - reference_values[m], confidence)
        methods.append(stats)
    return ExperimentStats(reference, confidence, samples, seed, len(everything[0]), methods, notes,
                           majority_metrics(everything[0]))


def _never_predicted(seeds: Sequence[SavedPredictions]) -> dict[str, int]:
    """Class -> number of seeds whose predictions never name it (classes every seed predicts are left out)."""
    labels = seeds[0].labels
    missing: dict[str, int] = {}
    for predictions in seeds:
        counts = np.bincount(predictions.predicted, minlength=len(labels))
        for index, name in enumerate(labels):
            if counts[index] == 0:
                missing[name] = missing.get(name, 0) + 1
    return missing


def reference_name(names: Sequence[str], methods: Sequence[str], configured: str | None) -> str | None:
    """The configured reference, else the first full fine-tuning run, else the first run (None without runs)."""
    if configured is not None:
        return configured
    full = [n for n, m in zip(names, methods) if m == "full"]
    return full[0] if full else (names[0] if names else None)


def run_statistics(experiment: ExperimentResult, run_dir: Path) -> ExperimentStats | None:
    """Recompute every interval and verdict from the predictions saved in ``run_dir``.

    Settings come from the run's ``report`` config section (reference, bootstrap_samples, confidence,
    seed), so ``peftlab report RUN_DIR`` reproduces the run's own numbers.

    Returns:
        None for causal LM (no predictions); otherwise the statistics of the finished runs that saved
        predictions (others are named in ``notes``).

    Raises:
        RunDirError: a predictions file is missing, damaged, or not on the same test rows as the others.
    """
    if experiment.task != "classification":
        return None
    settings = ReportConfig.model_validate(experiment.config.get("report") or {})
    ok = [r for r in experiment.runs if r.status == "ok"]
    saved = [r for r in ok if r.predictions_file]
    notes = [f"{r.name}: no saved test predictions (an older run?), so no interval" for r in ok if not r.predictions_file]
    runs = [(r.name, r.seed, load_predictions(run_dir / r.predictions_file)) for r in saved]
    names = list(dict.fromkeys(r.name for r in ok))
    methods = [next(r.method for r in ok if r.name == n) for n in names]
    reference = reference_name(names, methods, settings.reference)
    stats = experiment_statistics(runs, reference, settings.bootstrap_samples, settings.confidence, settings.seed)
    stats.notes = notes + stats.notes
    return stats
