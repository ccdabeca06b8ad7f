"""Data loading in every format, label maps and bins, drop reasons, splits and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from peftlab.config import load_config
from peftlab.data import clean_text, prepare_data
from peftlab.errors import DataError
from tests.conftest import review_rows, write_json, write_rows


def data_config(**data: object) -> object:
    return load_config(data={"data": data, "methods": ["lora"]}).data


AI_HUB = [
    {"RawText": "배송이 너무 느려요", "GeneralPolarity": "-1"},
    {"RawText": "그냥 보통이에요", "GeneralPolarity": 0},
    {"RawText": "정말 만족합니다!", "GeneralPolarity": "1"},
    {"RawText": "라벨이 없는 글"},
    {"RawText": "잘못된 라벨", "GeneralPolarity": "2"},
    {"RawText": "", "GeneralPolarity": 1},
    {"RawText": "null 라벨", "GeneralPolarity": None},
]


def ai_hub_records(copies: int = 4) -> list[dict]:
    records = []
    for i in range(copies):
        for record in AI_HUB:
            item = dict(record)
            if item.get("RawText"):
                item["RawText"] = f"{item['RawText']} {i}"
            records.append(item)
    return records


def test_csv_with_string_labels(reviews_csv: Path) -> None:
    data = prepare_data(data_config(path=str(reviews_csv)))
    assert data.labels == ["negative", "neutral", "positive"]
    assert data.report.raw_rows == 90 and data.report.kept_rows == 90
    assert sum(data.report.split_sizes.values()) == 90
    # stratified: every split keeps the class balance
    assert data.report.class_counts["test"] == {"negative": 3, "neutral": 3, "positive": 3}


def test_same_seed_same_split_other_seed_other_split(reviews_csv: Path) -> None:
    a = prepare_data(data_config(path=str(reviews_csv)))
    b = prepare_data(data_config(path=str(reviews_csv)))
    c = prepare_data(data_config(path=str(reviews_csv), split={"seed": 7}))
    assert a.test.texts == b.test.texts
    assert a.test.texts != c.test.texts


def test_ai_hub_nested_json_drops_and_counts_invalid_labels(tmp_path: Path) -> None:
    path = write_json(tmp_path / "sns.json", {"data": ai_hub_records()})
    config = data_config(path=str(path), text_column="RawText", label_column="GeneralPolarity",
                         label_map={-1: "부정", 0: "중립", 1: "긍정"}, split={"train": 0.5, "validation": 0.25, "test": 0.25})
    data = prepare_data(config)
    report = data.report
    assert data.labels == ["부정", "중립", "긍정"]
    assert report.raw_rows == 28 and report.kept_rows == 12
    assert report.dropped == {"missing_label": 8, "label_not_in_map": 4, "empty_text": 4}
    assert report.labels_seen_outside_map == {"2": 4}
    assert report.dropped_examples["missing_label"][0].endswith("record 4")


def test_json_record_path_and_dotted_columns(tmp_path: Path) -> None:
    records = [{"review": {"body": r["text"]}, "meta": {"y": r["label"]}} for r in review_rows(30)]
    path = write_json(tmp_path / "nested.json", {"export": {"items": records}})
    data = prepare_data(data_config(path=str(path), record_path="export.items", text_column="review.body",
                                    label_column="meta.y"))
    assert data.report.kept_rows == 30
    with pytest.raises(DataError, match="record_path 'export.rows' not found at 'rows'"):
        prepare_data(data_config(path=str(path), record_path="export.rows"))


def test_jsonl_and_bad_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in review_rows(30)) + "\n", encoding="utf-8")
    assert prepare_data(data_config(path=str(path))).report.kept_rows == 30
    path.write_text(json.dumps(review_rows(1)[0]) + "\n{not json}\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        prepare_data(data_config(path=str(path)))


def test_nsmc_style_tsv_with_int_labels(tmp_path: Path) -> None:
    rows = [{"id": str(i), "document": r["text"], "label": str(i % 2)} for i, r in enumerate(review_rows(40))]
    path = write_rows(tmp_path / "ratings.txt", rows, delimiter="\t")
    data = prepare_data(data_config(path=str(path), text_column="document", label_map={0: "부정", 1: "긍정"}))
    assert data.labels == ["부정", "긍정"] and data.report.kept_rows == 40


def test_headerless_tsv_with_numeric_scores_cut_into_bins(tmp_path: Path) -> None:
    path = tmp_path / "scores.tsv"
    lines = [f"{i}\t{score}\t{text}" for i, (score, text) in
             enumerate([(-3.1, "awful"), (-0.2, "okay"), (2.5, "great"), (1.0, "fine"), ("n/a", "x")] * 6)]
    path.write_text("\n".join(f"{line} {i}" for i, line in enumerate(lines)) + "\n", encoding="utf-8")
    config = data_config(path=str(path), header=False, column_names=["id", "score", "text"], label_column="score",
                         label_bins={"edges": [-1, 1], "labels": ["neg", "neu", "pos"]},
                         split={"train": 0.6, "validation": 0.2, "test": 0.2, "stratify": False})
    data = prepare_data(config)
    assert data.labels == ["neg", "neu", "pos"]
    assert data.report.dropped == {"missing_label": 6}  # "n/a" is a missing value
    counts = {k: sum(v[k] for v in data.report.class_counts.values()) for k in data.labels}
    assert counts == {"neg": 6, "neu": 6, "pos": 12}  # 1.0 falls in the upper bin


def test_datasets_folder_and_dataset_dict_splits(tmp_path: Path) -> None:
    import datasets

    rows = review_rows(60)
    sst2 = [{"sentence": r["text"], "label": i % 2} for i, r in enumerate(rows)]
    datasets.Dataset.from_list(sst2).save_to_disk(str(tmp_path / "flat"))
    data = prepare_data(data_config(path=str(tmp_path / "flat"), text_column="sentence"))
    assert data.labels == ["0", "1"] and data.report.format == "datasets"
    assert data.report.files == {} and data.report.columns == ["sentence", "label"]

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(sst2[:40]),
                               "validation": datasets.Dataset.from_list(sst2[40:])})
    dd.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="DatasetDict with splits"):
        prepare_data(data_config(path=str(tmp_path / "dict"), text_column="sentence"))
    data = prepare_data(data_config(path=str(tmp_path / "dict"), text_column="sentence",
                                    splits={"train": "train", "validation": "validation"},
                                    label_map={0: "negative", 1: "positive"}))
    assert data.report.split_sizes == {"train": 40, "validation": 20, "test": 20}
    assert data.test is data.validation
    assert any("no test split" in note for note in data.report.notes)


def test_given_split_files(tmp_path: Path) -> None:
    rows = review_rows(60)
    train = write_rows(tmp_path / "train.csv", rows[:40])
    val = write_rows(tmp_path / "val.csv", rows[40:50])
    test = write_rows(tmp_path / "test.csv", rows[50:])
    data = prepare_data(data_config(splits={"train": str(train), "validation": str(val), "test": str(test)}))
    assert data.report.split_sizes == {"train": 40, "validation": 10, "test": 10}


def test_missing_column_lists_the_columns_found(reviews_csv: Path) -> None:
    with pytest.raises(DataError) as err:
        prepare_data(data_config(path=str(reviews_csv), text_column="review"))
    assert "['review'] not found" in str(err.value) and "['text', 'label']" in str(err.value)
    assert "data.text_column" in str(err.value)


def test_every_label_outside_the_map_lists_labels_seen(reviews_csv: Path) -> None:
    with pytest.raises(DataError) as err:
        prepare_data(data_config(path=str(reviews_csv), label_map={-1: "부정", 1: "긍정"}))
    message = str(err.value)
    assert "all 90 rows were dropped" in message
    assert "'negative' (30)" in message and "expects ['-1', '1']" in message


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        prepare_data(data_config(path=str(empty)))
    header = tmp_path / "header.csv"
    header.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="no data rows"):
        prepare_data(data_config(path=str(header)))


def test_not_utf8_names_the_line_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "cp949.csv"
    path.write_bytes("text,label\n".encode() + "배송이 느려요,부정\n".encode("cp949"))
    with pytest.raises(DataError, match=r"not UTF-8 .* line 2.*iconv"):
        prepare_data(data_config(path=str(path)))


def test_wrong_delimiter_is_detected(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "tabs.csv", review_rows(10), delimiter="\t")
    with pytest.raises(DataError, match="tab-separated: set data.format to tsv"):
        prepare_data(data_config(path=str(path)))


def test_nan_and_none_texts_and_duplicates_are_dropped_and_reported(tmp_path: Path) -> None:
    rows = review_rows(30) + [{"text": "nan", "label": "positive"}, {"text": "", "label": "neutral"}]
    rows += [dict(rows[0]), {"text": rows[1]["text"].upper(), "label": rows[1]["label"]}]
    data = prepare_data(data_config(path=str(write_rows(tmp_path / "d.csv", rows))))
    assert data.report.dropped == {"empty_text": 2, "duplicate_text": 2}


def test_class_too_small_for_stratified_split(tmp_path: Path) -> None:
    rows = review_rows(30) + [{"text": "the rare one", "label": "rare"}]
    with pytest.raises(DataError, match="class 'rare' has only 1 row"):
        prepare_data(data_config(path=str(write_rows(tmp_path / "d.csv", rows))))


def test_truncation_and_token_lengths_are_counted(reviews_csv: Path, tiny_bert: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    data = prepare_data(data_config(path=str(reviews_csv), max_length=6), tokenizer=tokenizer)
    assert sum(data.report.truncated.values()) == 90  # every text is > 6 tokens with [CLS]/[SEP]
    assert data.report.token_length["min"] >= 9


def test_korean_cleaning_keeps_hangul_latin_digits_and_reports_changes(tmp_path: Path) -> None:
    assert clean_text("배송  빨라요!! 👍👍 <b>최고</b> 10점", "korean") == "배송 빨라요!! 최고 10점"
    assert clean_text("  hello\n\tworld  ", "basic") == "hello world"
    assert clean_text("  as is 👍 ", "none") == "as is 👍"
    rows = [{"text": f"좋아요 👍 {i}", "label": "긍정" if i % 2 else "부정"} for i in range(20)]
    rows += [{"text": "👍👍", "label": "긍정"}]
    data = prepare_data(data_config(path=str(write_rows(tmp_path / "k.csv", rows)), clean="korean"))
    assert data.report.cleaning_changed == 21
    assert data.report.dropped == {"empty_after_cleaning": 1}
    assert all("👍" not in t for t in data.train.texts)


def test_shipped_data_sets_load() -> None:
    vader = prepare_data(data_config(path="shipped:vader-movie-snippets", format="tsv", header=False,
                                     column_names=["id", "rating", "text"], label_column="rating",
                                     label_bins={"edges": [-1, 1], "labels": ["negative", "neutral", "positive"]}))
    assert vader.report.raw_rows == 10605
    ko = prepare_data(data_config(path="shipped:ko-reviews"))
    assert ko.labels == ["긍정", "부정", "중립"] and ko.report.raw_rows == 1650
    rotten = prepare_data(data_config(path="shipped:rotten-tomatoes", label_column="category",
                                      label_map={"rotten": "negative", "fresh": "positive"}))
    assert rotten.report.raw_rows == 13905 and rotten.report.dropped["label_not_in_map"] > 1000  # plot rows
    with pytest.raises(DataError, match="unknown shipped data set"):
        prepare_data(data_config(path="shipped:imdb"))


def test_compressed_files_are_read_by_their_inner_suffix(tmp_path: Path) -> None:
    import bz2

    plain = write_rows(tmp_path / "r.csv", review_rows(30))
    packed = tmp_path / "r.csv.bz2"
    packed.write_bytes(bz2.compress(plain.read_bytes()))
    assert prepare_data(data_config(path=str(packed))).report.kept_rows == 30
    broken = tmp_path / "broken.csv.bz2"
    broken.write_bytes(b"not bz2 at all")
    with pytest.raises(DataError, match="not a valid .bz2 file"):
        prepare_data(data_config(path=str(broken)))


# --------------------------------------------------------------------------- folders and globs of files


def _sns_record(i: int, polarity: object) -> dict:
    """An AI-Hub SNS record as it ships: extra fields around the text and the label."""
    record = {"Index": str(i), "RawText": f"배송 빨라요 제품 {i}", "Source": "SNS", "Domain": "IT기기",
              "ReviewScore": "5", "Aspects": [{"Aspect": "배송", "SentimentPolarity": "1"}]}
    if polarity is not MISSING_FIELD:
        record["GeneralPolarity"] = polarity
    return record


MISSING_FIELD = object()


def _aihub_folder(root: Path) -> Path:
    """The folder a notebook passes to load_dataset('json', data_dir=...): a space and Hangul in its name,
    files that are a list or {"data": [...]}, labels as strings or ints, missing, empty or invalid."""
    folder = root / "SNS" / "04. IT기기"
    folder.mkdir(parents=True)
    polarities = ["-1", "0", "1", -1, 0, 1]
    second = [_sns_record(100 + i, polarities[i % 6]) for i in range(12)]
    second[2]["GeneralPolarity"] = ""
    second[5]["GeneralPolarity"] = "긍정"  # invalid: not -1/0/1
    write_json(folder / "IT기기_02.json", {"data": second})
    first = [_sns_record(i, polarities[i % 6]) for i in range(12)]
    first[3] = _sns_record(3, MISSING_FIELD)
    write_json(folder / "IT기기_01.json", first)
    (folder / "README.txt").write_text("AI-Hub 속성기반 감정분석 데이터", encoding="utf-8")
    return folder


def test_ai_hub_folder_of_json_files_is_read_in_sorted_order_and_names_file_and_record(tmp_path: Path) -> None:
    folder = _aihub_folder(tmp_path)
    config = data_config(path=str(folder), record_path="data", text_column="RawText", label_column="GeneralPolarity",
                         label_map={-1: "부정", 0: "중립", 1: "긍정"}, split={"train": 0.5, "validation": 0.25, "test": 0.25})
    data = prepare_data(config)
    report = data.report
    assert data.labels == ["부정", "중립", "긍정"]
    assert report.format == "json" and report.raw_rows == 24 and report.kept_rows == 21
    assert report.dropped == {"missing_label": 2, "label_not_in_map": 1}
    # sorted order: _01 before _02, though _02 was written first; each drop names its own file and record
    assert list(report.files) == [str(folder / "IT기기_01.json"), str(folder / "IT기기_02.json")]
    assert report.files[str(folder / "IT기기_01.json")] == 12
    assert report.dropped_examples["missing_label"] == [f"{folder / 'IT기기_01.json'} record 4",
                                                        f"{folder / 'IT기기_02.json'} record 3"]
    assert report.dropped_examples["label_not_in_map"] == [f"{folder / 'IT기기_02.json'} record 6"]
    assert report.labels_seen_outside_map == {"긍정": 1}
    # extra fields are listed, and ignored
    assert {"Index", "Aspects", "ReviewScore", "RawText", "GeneralPolarity"} <= set(report.columns)
    assert any("README.txt" in note and "not json" in note for note in report.notes)
    assert report.source == f"{folder} (2 files)"


def test_a_glob_reads_only_the_files_it_matches(tmp_path: Path) -> None:
    rows = review_rows(60)
    for part in (0, 1):
        lines = [json.dumps(r) for r in rows[part * 30:(part + 1) * 30]]
        (tmp_path / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_rows(tmp_path / "other.csv", review_rows(9, seed=5))  # same folder, not matched
    (tmp_path / "part-1.jsonl").write_text((tmp_path / "part-1.jsonl").read_text() + '{"text": "x 1"}\n')
    data = prepare_data(data_config(path=str(tmp_path / "part-*.jsonl")))
    assert data.report.format == "jsonl" and data.report.raw_rows == 61
    assert list(data.report.files) == [str(tmp_path / "part-0.jsonl"), str(tmp_path / "part-1.jsonl")]
    assert data.report.dropped_examples["missing_label"] == [f"{tmp_path / 'part-1.jsonl'} line 31"]
    with pytest.raises(DataError, match=r"matches no files"):
        prepare_data(data_config(path=str(tmp_path / "*.parquet")))


def test_a_glob_in_a_config_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    rows = review_rows(90)
    write_rows(tmp_path / "data" / "b.csv", rows[45:])
    write_rows(tmp_path / "data" / "a.csv", rows[:45])
    (tmp_path / "exp.yaml").write_text("data:\n  path: data/*.csv\nmethods: [lora]\n", encoding="utf-8")
    config = load_config(tmp_path / "exp.yaml")
    data = prepare_data(config.data)
    assert list(data.report.files) == [str(tmp_path / "data" / "a.csv"), str(tmp_path / "data" / "b.csv")]


def test_mixed_or_empty_folders_are_data_errors_listing_what_was_found(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_json(mixed / "a.json", review_rows(30))
    write_rows(mixed / "b.csv", review_rows(30, seed=1))
    with pytest.raises(DataError, match=r"mixes data formats: json 1 \(a\.json\); csv 1 \(b\.csv\).*data\.format"):
        prepare_data(data_config(path=str(mixed)))
    # naming the format reads only those files, and says which were left out
    data = prepare_data(data_config(path=str(mixed), format="json"))
    assert data.report.raw_rows == 30 and any("b.csv" in n for n in data.report.notes)

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("# data\n")
    (notes / "labels.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"no CSV/TSV/JSON/JSONL files .*found: other 2 \(README\.md, labels\.xlsx\)"):
        prepare_data(data_config(path=str(notes)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty folder"):
        prepare_data(data_config(path=str(empty)))
    with pytest.raises(DataError, match=r"has no csv files \(data\.format: csv\); found: other 2"):
        prepare_data(data_config(path=str(notes), format="csv"))


def test_a_broken_file_in_a_folder_is_named(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", review_rows(30))
    (tmp_path / "b.json").write_text('[{"text": "x", "label": "y"},]', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.json line 1, column \d+: invalid JSON"):
        prepare_data(data_config(path=str(tmp_path)))


def test_html_entities_are_unescaped_by_cleaning_and_reported_without_it(tmp_path: Path) -> None:
    assert clean_text("I &lt;3 it", "basic") == "I <3 it"
    assert clean_text("&lt;3 and &gt;_&lt; too", "basic") == "<3 and >_< too"  # entities are text, not a tag
    assert clean_text("<b>bold</b> &amp; &#39;quoted&#39;", "basic") == "bold & 'quoted'"
    assert clean_text("최고 &lt;3 R&amp;D", "korean") == "최고 <3 R&D"
    assert clean_text(" &lt;3 ", "none") == "&lt;3"

    rows = [{"text": f"{r['text']} &lt;3" if i % 2 else r["text"], "label": r["label"]}
            for i, r in enumerate(review_rows(30))]
    path = write_rows(tmp_path / "e.csv", rows)
    raw = prepare_data(data_config(path=str(path)))
    assert any("15 text(s) contain HTML entities (e.g. '&lt;')" in n and "data.clean: basic" in n
               for n in raw.report.notes)
    assert any(t.endswith("&lt;3") for t in raw.train.texts)
    cleaned = prepare_data(data_config(path=str(path), clean="basic"))
    assert not any("HTML entities" in n for n in cleaned.report.notes)
    assert any(t.endswith("<3") for t in cleaned.train.texts) and not any("&lt;" in t for t in cleaned.train.texts)

