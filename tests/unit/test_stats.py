"""Bootstrap intervals and paired verdicts against values computed independently (sklearn, enumeration)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from peftlab.errors import RunDirError
from peftlab.results import SavedPredictions
from peftlab.stats import (
    BETTER,
    NO_DIFFERENCE,
    WORSE,
    bootstrap_interval,
    experiment_statistics,
    macro_f1,
    majority_metrics,
    paired_comparison,
    resampled_metrics,
)

LABELS = ["negative", "neutral", "positive"]


def predictions(true: list[int] | np.ndarray, predicted: list[int] | np.ndarray) -> SavedPredictions:
    true, predicted = np.asarray(true), np.asarray(predicted)
    return SavedPredictions(labels=LABELS, true=true, predicted=predicted,
                           probabilities=np.eye(len(LABELS))[predicted])


def with_accuracy(true: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Predictions right on the first ``share`` of a shuffled order of rows, wrong (next class) elsewhere."""
    rng = np.random.default_rng(seed)
    wrong = rng.permutation(len(true))[: int(round((1 - share) * len(true)))]
    predicted = true.copy()
    predicted[wrong] = (true[wrong] + 1) % len(LABELS)
    return predicted


def test_macro_f1_equals_sklearn_including_absent_and_never_predicted_classes() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        true = rng.integers(0, 3, size=int(rng.integers(1, 12)))
        predicted = rng.integers(0, 2, size=len(true))  # class 2 is never predicted
        expected = f1_score(true, predicted, average="macro", labels=[0, 1, 2], zero_division=0)
        assert macro_f1(true, predicted, 3) == pytest.approx(expected)


def test_interval_equals_an_independent_computation_for_a_fixed_seed() -> None:
    """The documented recipe: resample i = rng.integers(0, n, n) in order; percentiles with linear interpolation."""
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, size=40)
    predicted = np.where(rng.random(40) < 0.7, true, rng.integers(0, 3, size=40))
    samples, seed = 600, 7  # 600 spans more than one block of resamples

    draw = np.random.default_rng(seed)
    f1s, accuracies = [], []
    for _ in range(samples):
        rows = draw.integers(0, len(true), size=len(true))
        f1s.append(f1_score(true[rows], predicted[rows], average="macro", labels=[0, 1, 2], zero_division=0))
        accuracies.append(accuracy_score(true[rows], predicted[rows]))

    f1 = bootstrap_interval(predictions(true, predicted), "f1_macro", samples=samples, confidence=0.9, seed=seed)
    assert (f1.low, f1.high) == pytest.approx(tuple(np.percentile(f1s, [5, 95])))
    assert f1.estimate == pytest.approx(f1_score(true, predicted, average="macro", zero_division=0))
    accuracy = bootstrap_interval(predictions(true, predicted), "accuracy", samples=samples, confidence=0.9, seed=seed)
    assert (accuracy.low, accuracy.high) == pytest.approx(tuple(np.percentile(accuracies, [5, 95])))


def test_resampled_accuracy_follows_the_enumerated_bootstrap_distribution() -> None:
    # Three rows, one wrong: the 27 equally likely resamples give accuracy k/3 with weights 1, 6, 12, 8.
    exact = {k: sum(1 for r in itertools.product(range(3), repeat=3) if sum(i != 2 for i in r) == k) / 27
             for k in range(4)}
    values = resampled_metrics([[predictions([0, 1, 2], [0, 1, 0])]], samples=20_000, seed=1)[0]["accuracy"]
    for k, probability in exact.items():
        assert np.mean(np.isclose(values, k / 3)) == pytest.approx(probability, abs=0.01)


def test_same_seed_same_interval_other_seed_other_interval() -> None:
    rng = np.random.default_rng(5)
    true = rng.integers(0, 3, size=60)
    run = predictions(true, with_accuracy(true, 0.7, seed=1))
    first = bootstrap_interval(run, "f1_macro", samples=500, seed=11)
    assert bootstrap_interval(run, "f1_macro", samples=500, seed=11) == first
    assert bootstrap_interval(run, "f1_macro", samples=500, seed=12) != first


@pytest.mark.parametrize(("share", "expected"), [(0.95, BETTER), (0.45, WORSE), (0.7, NO_DIFFERENCE)])
def test_paired_verdict_on_constructed_predictions(share: float, expected: str) -> None:
    true = np.arange(300) % 3
    reference = predictions(true, with_accuracy(true, 0.7, seed=0))
    method = reference if expected == NO_DIFFERENCE else predictions(true, with_accuracy(true, share, seed=1))
    comparison = paired_comparison([method], [reference], "full", "accuracy", samples=1000, seed=0)
    assert comparison.verdict == expected
    assert comparison.difference.estimate == pytest.approx(share - 0.7, abs=1e-9)
    assert comparison.difference.low <= comparison.difference.estimate <= comparison.difference.high
    if expected == NO_DIFFERENCE:  # identical predictions: every resample's difference is exactly 0
        assert (comparison.difference.low, comparison.difference.high) == (0.0, 0.0)


def test_pairing_detects_a_small_consistent_gain_that_separate_intervals_miss() -> None:
    # The method fixes 8 of the reference's 90 errors on 300 rows and breaks none: +0.027 accuracy.
    true = np.arange(300) % 3
    reference = with_accuracy(true, 0.7, seed=0)
    method = reference.copy()
    fixed = np.flatnonzero(reference != true)[:8]
    method[fixed] = true[fixed]
    comparison = paired_comparison([predictions(true, method)], [predictions(true, reference)], "full", "accuracy",
                                   samples=1000, seed=0)
    assert comparison.verdict == BETTER
    alone = [bootstrap_interval(predictions(true, p), "accuracy", samples=1000, seed=0) for p in (method, reference)]
    assert alone[0].low < alone[1].high  # the unpaired intervals overlap


def test_experiment_statistics_averages_seeds_and_keeps_them() -> None:
    true = np.arange(90) % 3
    seeds = {1: with_accuracy(true, 0.6, seed=1), 2: with_accuracy(true, 0.8, seed=2)}
    runs = [("full", 42, predictions(true, true)),
            *[("lora", s, predictions(true, p)) for s, p in seeds.items()]]
    stats = experiment_statistics(runs, "full", samples=400, seed=3)
    lora = stats.method("lora")
    assert lora is not None and lora.seeds == [1, 2]
    assert lora.per_seed["accuracy"] == pytest.approx([0.6, 0.8])
    assert lora.metrics["accuracy"].estimate == pytest.approx(0.7)
    assert lora.std["accuracy"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert lora.comparisons["accuracy"].verdict == WORSE
    assert stats.method("full").comparisons == {} and stats.method("full").std["accuracy"] is None
    # The interval of the seed mean is the one of the per-resample average of the two seeds.
    both = resampled_metrics([[predictions(true, p) for p in seeds.values()]], samples=400, seed=3)[0]["accuracy"]
    assert lora.metrics["accuracy"].low == pytest.approx(np.quantile(both, 0.025))


def test_classes_never_predicted_are_counted_per_seed() -> None:
    true = np.arange(9) % 3
    runs = [("lora", 1, predictions(true, np.zeros(9, dtype=int))),  # only negative
            ("lora", 2, predictions(true, true % 2))]  # never positive
    stats = experiment_statistics(runs, None, samples=100)
    assert stats.method("lora").never_predicted == {"neutral": 1, "positive": 2}


def test_predictions_on_different_rows_are_refused() -> None:
    with pytest.raises(RunDirError, match="not on the same test rows"):
        experiment_statistics([("full", 1, predictions([0, 1, 2], [0, 1, 2])),
                               ("lora", 1, predictions([0, 1, 1], [0, 1, 2]))], "full", samples=100)


# --------------------------------------------------------------------------- config: seeds and report settings


def config_tree(**sections: object) -> dict:
    return {"data": {"path": "shipped:vader-movie-snippets"}, "methods": ["full", "lora"], **sections}


def test_seeds_default_to_the_training_seed() -> None:
    from peftlab.config import load_config

    assert load_config(data=config_tree(training={"seed": 7})).training.run_seeds == [7]
    assert load_config(data=config_tree(training={"seeds": [1, 2, 3]})).training.run_seeds == [1, 2, 3]


@pytest.mark.parametrize(("seeds", "message"), [([], "training.seeds is empty"),
                                                ([1, 2, 1], r"training.seeds repeats \[1\]")])
def test_empty_or_repeated_seeds_are_config_errors(seeds: list[int], message: str) -> None:
    from peftlab.config import load_config
    from peftlab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(data=config_tree(training={"seeds": seeds}))


def test_unknown_reference_names_the_methods() -> None:
    from peftlab.config import load_config
    from peftlab.errors import ConfigError

    assert load_config(data=config_tree(report={"reference": "lora"})).report.reference == "lora"
    with pytest.raises(ConfigError, match="report.reference 'ful' is not a method of this config; choose one of full, lora"):
        load_config(data=config_tree(report={"reference": "ful"}))
    with pytest.raises(ConfigError, match="report.confidence"):
        load_config(data=config_tree(report={"confidence": 1.5}))


def test_majority_floor_by_hand() -> None:
    """10 rows, 5 of them class 2: always "positive" has F1 2*5/(5+10) = 2/3 on it, 0 elsewhere."""
    true = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    floor = majority_metrics(predictions(true, true))
    assert floor == pytest.approx({"f1_macro": (2 / 3) / 3, "accuracy": 0.5})
    stats = experiment_statistics([("a", None, predictions(true, true))], reference=None, samples=10)
    assert stats.majority == floor
