"""Turn raw records into clean, labelled, split examples plus a report of what happened.

Order matters and is the same for every run: read -> text (template or column)
-> clean -> label map/bins -> drop invalid rows (counted by reason) -> drop
duplicate texts -> split (stratified, seeded) -> cap sizes. Every method of an
experiment trains on the exact output of this function.
"""

from __future__ import annotations

import html
import logging
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from peftlab.config import DataConfig, label_key
from peftlab.data.loading import (
    MISSING,
    RawTable,
    dataset_dict_splits,
    detect_format,
    get_field,
    has_column,
    is_glob,
    read_data,
    read_table,
    resolve_data_path,
)
from peftlab.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

# Drop reasons, in the order they are checked; the data report uses these names.
EMPTY_TEXT = "empty_text"
EMPTY_AFTER_CLEANING = "empty_after_cleaning"
MISSING_LABEL = "missing_label"
LABEL_NOT_IN_MAP = "label_not_in_map"
LABEL_NOT_NUMERIC = "label_not_numeric"
DUPLICATE_TEXT = "duplicate_text"


@dataclass
class Split:
    """Texts and integer labels of one split (labels empty for causal LM)."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class DataReport:
    """What loading did to the data: the table users build by hand in notebooks."""

    source: str
    format: str
    task: str
    raw_rows: int
    kept_rows: int
    dropped: dict[str, int]
    dropped_examples: dict[str, list[str]]
    labels: list[str]
    class_counts: dict[str, dict[str, int]]
    split_sizes: dict[str, int]
    char_length: dict[str, float]
    token_length: dict[str, float] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)
    max_length: int = 0
    cleaning: str = "none"
    cleaning_changed: int = 0
    cleaning_examples: list[tuple[str, str]] = field(default_factory=list)
    labels_seen_outside_map: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # problems that may make the comparison misleading
    columns: list[str] = field(default_factory=list)  # every field found, used or not (extra fields are ignored)
    files: dict[str, int] = field(default_factory=dict)  # folder/glob sources: file -> records read, in reading order


@dataclass
class PreparedData:
    """The splits every method trains and evaluates on, with their report."""

    train: Split
    validation: Split
    test: Split
    labels: list[str]
    report: DataReport

    def split(self, name: str) -> Split:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]


def prepare_data(config: DataConfig, task: str = "classification", tokenizer: Any = None) -> PreparedData:
    """Load, clean, label, de-duplicate and split the data described by ``config``.

    Args:
        config: the ``data`` section of the experiment config.
        task: ``classification`` (needs labels) or ``causal-lm`` (texts only).
        tokenizer: when given, token lengths and truncation at ``max_length`` are counted.

    Returns:
        The three splits, the class names (index = label id) and a :class:`DataReport`.

    Raises:
        DataError: naming the file, row and column, when nothing usable remains or a column is missing.
    """
    classify = task == "classification"
    if config.splits is not None:
        tables, source, fmt = _read_given_splits(config)
    else:
        assert config.path is not None
        if not is_glob(config.path):
            path = resolve_data_path(config.path)
            if detect_format(path, config.format) == "datasets" and dataset_dict_splits(path):
                raise DataError(f"{path} is a DatasetDict with splits {dataset_dict_splits(path)}; name them in "
                                f"data.splits (e.g. splits: {{train: train, validation: validation}}) instead of "
                                f"data.path")
        table, fmt = read_data(config.path, config.format, record_path=config.record_path, header=config.header,
                               column_names=config.column_names)
        tables, source = {"all": table}, table.source

    dropped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    outside: Counter[str] = Counter()
    changed: list[tuple[str, str]] = []
    raw_rows = 0
    rows_by_table: dict[str, list[tuple[str, str | None]]] = {}
    for name, table in tables.items():
        _check_columns(table, config, classify)
        raw_rows += len(table.records)
        rows_by_table[name] = _extract(table, config, classify, dropped, examples, outside, changed)

    labels = _class_names(config, [lab for rows in rows_by_table.values() for _, lab in rows]) if classify else []
    label_to_id = {name: i for i, name in enumerate(labels)}

    if config.drop_duplicates:
        _drop_duplicates(rows_by_table, dropped, examples)

    kept = sum(len(rows) for rows in rows_by_table.values())
    if kept == 0:
        raise DataError(_nothing_left_message(source, raw_rows, dropped, examples, outside, config))
    present = sorted({lab for rows in rows_by_table.values() for _, lab in rows}) if classify else []
    if classify and len(present) < 2:
        # One class trains a one-label head that "predicts" it with probability 1: garbage reported as F1 1.0.
        raise DataError(f"{source}: only one class ({present[0]!r}) is left after cleaning ({kept} rows); a "
                        f"classifier needs at least 2. Check data.label_column and data.label_map")

    notes: list[str] = [note for table in tables.values() for note in table.notes]
    if config.clean == "none":
        notes += _entity_note(tables, config)
    if "all" in rows_by_table:
        splits = _split(rows_by_table["all"], config, classify, notes)
    else:
        splits = _given(rows_by_table, notes)
    splits = _cap(splits, config)

    prepared = {
        name: Split([t for t, _ in rows], [label_to_id[lab] for _, lab in rows] if classify else [])
        for name, rows in splits.items() if name != "test"
    }
    # The same object when test reuses validation: tokenised and evaluated once, flagged in reports.
    same = splits["test"] is splits["validation"]
    prepared["test"] = prepared["validation"] if same else Split(
        [t for t, _ in splits["test"]], [label_to_id[lab] for _, lab in splits["test"]] if classify else [])
    if classify:
        _check_class_coverage(prepared, labels, notes)

    report = DataReport(
        source=source,
        format=fmt,
        task=task,
        raw_rows=raw_rows,
        kept_rows=kept,
        dropped=dict(dropped),
        dropped_examples=examples,
        labels=labels,
        class_counts={n: _counts(s, labels) for n, s in prepared.items()} if classify else {},
        split_sizes={n: len(s) for n, s in prepared.items()},
        char_length=_percentiles([len(t) for s in prepared.values() for t in s.texts]),
        max_length=config.max_length,
        cleaning=config.clean,
        cleaning_changed=len(changed),
        cleaning_examples=changed[:5],
        labels_seen_outside_map=dict(outside.most_common(20)),
        notes=notes,
        warnings=_small_class_warnings(prepared["train"], labels) if classify else [],
        columns=list(dict.fromkeys(c for table in tables.values() for c in table.columns)),
        files={f: n for table in tables.values() for f, n in table.files.items()},
    )
    for warning in report.warnings:
        logger.warning("data: %s", warning)
    if tokenizer is not None:
        _count_tokens(report, prepared, tokenizer, config.max_length)
    data = PreparedData(prepared["train"], prepared["validation"], prepared["test"], labels, report)
    logger.info("data: %d raw rows, %d kept, splits %s", raw_rows, kept, report.split_sizes)
    return data


# --------------------------------------------------------------------------- reading


def _read_given_splits(config: DataConfig) -> tuple[dict[str, RawTable], str, str]:
    assert config.splits is not None
    tables: dict[str, RawTable] = {}
    sources = []
    fmt = "auto"
    dict_path = resolve_data_path(config.path) if config.path else None
    for split in SPLITS:
        value = getattr(config.splits, split)
        if value is None:
            continue
        if dict_path is not None:  # data.path is a DatasetDict folder and splits name its splits
            fmt = "datasets"
            tables[split] = read_table(dict_path, "datasets", split=value)
        else:
            tables[split], fmt = read_data(value, config.format, record_path=config.record_path,
                                           header=config.header, column_names=config.column_names)
        sources.append(tables[split].source)
    return tables, ", ".join(sources), fmt


def _check_columns(table: RawTable, config: DataConfig, classify: bool) -> None:
    needed = []
    if config.template:
        needed += re.findall(r"\{([^{}:!]+)[^{}]*\}", config.template)
    else:
        needed.append(config.text_column)
    if classify:
        needed.append(config.label_column)
    missing = [c for c in needed if not has_column(table, c)]
    if missing:
        which = "data.template" if config.template and config.label_column not in missing else (
            "data.label_column" if missing == [config.label_column] else "data.text_column")
        guess = _guess_column(table.columns, missing[0])
        raise DataError(f"{table.source}: column(s) {missing} not found; columns found: {table.columns}. "
                        f"Set {which}{guess}")


def _guess_column(columns: list[str], wanted: str) -> str:
    import difflib

    close = difflib.get_close_matches(wanted, columns, n=1, cutoff=0.4)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- rows


def _extract(table: RawTable, config: DataConfig, classify: bool, dropped: Counter[str],
             examples: dict[str, list[str]], outside: Counter[str],
             changed: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """(text, class name) for every usable row; unusable rows are counted by reason."""

    def drop(reason: str, index: int) -> None:
        dropped[reason] += 1
        listed = examples.setdefault(reason, [])
        if len(listed) < 5:
            listed.append(table.where(index))

    rows: list[tuple[str, str | None]] = []
    for index, record in enumerate(table.records):
        text = _text_of(record, config)
        if text is None or not text.strip():
            drop(EMPTY_TEXT, index)
            continue
        cleaned = clean_text(text, config.clean)
        if cleaned != text.strip():
            if len(changed) < 1_000_000:
                changed.append((text, cleaned))
        if not cleaned:
            drop(EMPTY_AFTER_CLEANING, index)
            continue
        label: str | None = None
        if classify:
            raw = get_field(record, config.label_column)
            if _is_missing(raw):
                drop(MISSING_LABEL, index)
                continue
            label, reason = _map_label(raw, config)
            if label is None:
                outside[label_key(raw)] += 1
                drop(reason, index)
                continue
        rows.append((cleaned, label))
    return rows


def _text_of(record: dict[str, Any], config: DataConfig) -> str | None:
    if config.template:
        values = {}
        for key in re.findall(r"\{([^{}:!]+)[^{}]*\}", config.template):
            value = get_field(record, key)
            if _is_missing(value):
                return None
            values[key] = value
        try:
            return config.template.format(**values)
        except (KeyError, IndexError, ValueError) as exc:
            raise DataError(f"data.template {config.template!r} cannot be filled ({exc}); "
                            f"use {{column}} placeholders") from None
    value = get_field(record, config.text_column)
    if _is_missing(value):
        return None
    return str(value)


def _is_missing(value: Any) -> bool:
    if value is None or value is MISSING:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "null", "na", "n/a")


def _map_label(raw: Any, config: DataConfig) -> tuple[str | None, str]:
    key = label_key(raw)
    if config.label_map is not None:
        return config.label_map.get(key), LABEL_NOT_IN_MAP
    if config.label_bins is not None:
        try:
            score = float(key)
        except ValueError:
            return None, LABEL_NOT_NUMERIC
        if math.isnan(score):
            return None, LABEL_NOT_NUMERIC
        return config.label_bins.labels[int(np.searchsorted(config.label_bins.edges, score, side="right"))], ""
    return key, ""


def _class_names(config: DataConfig, found: list[str | None]) -> list[str]:
    """Class order: the label map's order, the bins' order, or sorted (numbers numerically)."""
    if config.label_map is not None:
        return list(dict.fromkeys(config.label_map.values()))
    if config.label_bins is not None:
        return list(config.label_bins.labels)
    names = sorted({f for f in found if f is not None}, key=_natural_key)
    return names


def _natural_key(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


_TAG = re.compile(r"<[^>]{1,200}>")
_SPACE = re.compile(r"\s+")
# Hangul syllables and jamo, Latin letters, digits, whitespace and everyday punctuation.
# < > & are kept: they are what HTML entities stand for (&lt; &gt; &amp;), so an escaped "<3" or "R&D" survives.
_NOT_KOREAN_SAFE = re.compile(r"[^\uac00-\ud7a3\u1100-\u11ff\u3130-\u318fA-Za-z0-9\s.,!?~'\"()%\-:;/<>&]")
_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")


def clean_text(text: str, mode: str) -> str:
    """Normalise one text. ``none`` only strips; ``basic`` removes HTML tags, unescapes HTML entities
    (``&lt;3`` is ``<3``) and squeezes spaces; ``korean`` also keeps only Hangul, Latin, digits and basic
    punctuation (emoji and symbols go)."""
    if mode == "none":
        return text.strip()
    # Tags before entities: an escaped "&lt;b&gt;" is text that shows as "<b>", not a tag, and unescaping it
    # first would make it one (and "&lt;3 ... &gt;" would lose everything between).
    text = _TAG.sub(" ", text)
    text = unicodedata.normalize("NFC", html.unescape(text))
    if mode == "korean":
        text = _NOT_KOREAN_SAFE.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def _entity_note(tables: dict[str, RawTable], config: DataConfig) -> list[str]:
    """With ``clean: none`` the model sees entities as written (``&lt;3``, not ``<3``): say so when there are any."""
    found, example = 0, ""
    for table in tables.values():
        for record in table.records:
            text = _text_of(record, config)
            if text and _ENTITY.search(text):
                found += 1
                example = example or _ENTITY.search(text).group(0)  # type: ignore[union-attr]
    if not found:
        return []
    return [f"{found} text(s) contain HTML entities (e.g. {example!r}); data.clean is none, so the model reads them "
            f"as written. Set data.clean: basic (or korean) to unescape them (&lt;3 becomes <3)"]


def _drop_duplicates(rows_by_table: dict[str, list[tuple[str, str | None]]], dropped: Counter[str],
                     examples: dict[str, list[str]]) -> None:
    # Across given splits too: a text in both train and test would inflate test scores.
    seen: set[str] = set()
    for name in list(rows_by_table):
        unique = []
        for text, label in rows_by_table[name]:
            key = _SPACE.sub(" ", text.casefold())
            if key in seen:
                dropped[DUPLICATE_TEXT] += 1
                listed = examples.setdefault(DUPLICATE_TEXT, [])
                if len(listed) < 5:
                    listed.append(repr(text[:60]))
                continue
            seen.add(key)
            unique.append((text, label))
        rows_by_table[name] = unique


# --------------------------------------------------------------------------- splits


def _split(rows: list[tuple[str, str | None]], config: DataConfig, classify: bool,
           notes: list[str]) -> dict[str, list[tuple[str, str | None]]]:
    from sklearn.model_selection import train_test_split

    ratios = config.split
    labels = [lab for _, lab in rows] if classify and ratios.stratify else None
    if labels is not None:
        counts = Counter(labels)
        smallest = min(counts, key=lambda k: counts[k])
        needed = 2 if ratios.test == 0 or ratios.validation == 0 else 3
        if counts[smallest] < needed:
            raise DataError(f"class {smallest!r} has only {counts[smallest]} row(s): a stratified "
                            f"train/validation/test split needs at least {needed} per class. Add rows of that "
                            f"class, drop it from data.label_map, or set data.split.stratify: false")
    held_out = ratios.validation + ratios.test
    try:
        train, rest = train_test_split(rows, test_size=held_out, random_state=ratios.seed, stratify=labels)
        if ratios.test == 0 or ratios.validation == 0:
            validation, test = rest, []
        else:
            rest_labels = [lab for _, lab in rest] if labels is not None else None
            validation, test = train_test_split(rest, test_size=ratios.test / held_out, random_state=ratios.seed,
                                                stratify=rest_labels)
    except ValueError as exc:
        raise DataError(f"cannot split {len(rows)} rows with ratios train {ratios.train}, validation "
                        f"{ratios.validation}, test {ratios.test}: {exc}. Use more data or other ratios") from None
    if not test:
        test = validation
        notes.append("no test split (data.split.test is 0): test metrics are computed on the validation split, "
                     "which also chose the best epoch, so they are optimistic")
    return {"train": train, "validation": validation, "test": test}


def _given(rows_by_table: dict[str, list[tuple[str, str | None]]],
           notes: list[str]) -> dict[str, list[tuple[str, str | None]]]:
    train = rows_by_table.get("train", [])
    validation = rows_by_table.get("validation")
    test = rows_by_table.get("test")
    if validation is None and test is None:
        raise DataError("data.splits gives only train; add validation (or test) so epochs can be evaluated")
    if validation is None:
        validation = test
        notes.append("no validation split given: the test split chooses the best epoch, so test metrics are optimistic")
    if test is None:
        test = validation
        notes.append("no test split given: test metrics are computed on the validation split, "
                     "which also chose the best epoch, so they are optimistic")
    return {"train": train, "validation": validation, "test": test}  # type: ignore[dict-item]


def _cap(splits: dict[str, list[Any]], config: DataConfig) -> dict[str, list[Any]]:
    capped = dict(splits)
    if config.max_train_samples:
        capped["train"] = splits["train"][: config.max_train_samples]
    if config.max_eval_samples:
        same = splits["test"] is splits["validation"]
        capped["validation"] = splits["validation"][: config.max_eval_samples]
        capped["test"] = capped["validation"] if same else splits["test"][: config.max_eval_samples]
    for name in SPLITS:
        if not capped[name]:
            raise DataError(f"the {name} split is empty after splitting; use more data or larger ratios for {name}")
    return capped


def _check_class_coverage(prepared: dict[str, Split], labels: list[str], notes: list[str]) -> None:
    for name, split in prepared.items():
        present = set(split.labels)
        absent = [labels[i] for i in range(len(labels)) if i not in present]
        if absent and name == "train":
            raise DataError(f"class(es) {absent} have no training rows after the split; add rows of those classes "
                            f"or remove them from data.label_map")
        if absent:
            notes.append(f"class(es) {absent} are absent from the {name} split; their recall there is undefined")


# --------------------------------------------------------------------------- report helpers


SMALL_CLASS_SHARE = 0.20


def _small_class_warnings(train: Split, labels: list[str]) -> list[str]:
    """Classes with under 20% of the training rows: models then often learn never to predict them.

    With more than four classes a balanced class already has 20% or less, so there the bar is 80% of the
    balanced share (1 / classes) instead.
    """
    bar = min(SMALL_CLASS_SHARE, 0.8 / len(labels))
    total = len(train.labels)
    warnings = []
    for name, count in _counts(train, labels).items():
        if count < bar * total:
            warnings.append(f"class {name!r} has {count} of {total} training rows ({100 * count / total:.1f}%, under "
                            f"{100 * bar:.0f}%): a model may learn never to predict it; check the per-class recall. "
                            f"training.class_weights: balanced (the default when macro F1 picks the best epoch) "
                            f"counters it")
    return warnings


def _counts(split: Split, labels: list[str]) -> dict[str, int]:
    counts = Counter(split.labels)
    return {name: counts.get(i, 0) for i, name in enumerate(labels)}


def _percentiles(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    values = np.asarray(lengths)
    return {"min": float(values.min()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)),
            "max": float(values.max()), "mean": float(values.mean())}


def _count_tokens(report: DataReport, prepared: dict[str, Split], tokenizer: Any, max_length: int) -> None:
    lengths_all = []
    for name, split in prepared.items():
        if name == "test" and split is prepared["validation"]:
            report.truncated[name] = report.truncated["validation"]
            continue
        encoded = tokenizer(split.texts, add_special_tokens=True, truncation=False)["input_ids"]
        lengths = [len(ids) for ids in encoded]
        report.truncated[name] = sum(1 for n in lengths if n > max_length)
        lengths_all += lengths
    report.token_length = _percentiles(lengths_all)


def _nothing_left_message(source: str, raw_rows: int, dropped: Counter[str], examples: dict[str, list[str]],
                          outside: Counter[str], config: DataConfig) -> str:
    reasons = ", ".join(f"{r}: {n}" for r, n in dropped.most_common())
    message = f"{source}: all {raw_rows} rows were dropped ({reasons}); nothing left to train on."
    if outside:
        seen = ", ".join(f"{k!r} ({n})" for k, n in outside.most_common(10))
        expected = list(config.label_map) if config.label_map else "numbers"
        message += (f" Labels seen in column {config.label_column!r}: {seen}; the label map expects {expected}. "
                    f"Fix data.label_map or data.label_column.")
    if dropped.get(EMPTY_TEXT) == raw_rows:
        message += f" Column {config.text_column!r} is empty in every row: check data.text_column."
    first = next(iter(examples.values()), [])
    if first:
        message += f" First dropped: {', '.join(first[:3])}."
    return message


