"""Saved folders describe themselves: a model card, the base's hub id, the labels, readable permissions.

A run on a tiny random BERT that stands in for a shipped alias (its hub id is recorded, not its folder) is
copied elsewhere and loaded there with plain transformers + peft, as a user without peftlab would.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import peftlab
from peftlab import artifacts, models
from peftlab.config import load_config
from peftlab.experiment import run_experiment
from tests.conftest import write_rows, review_rows

ALIAS, HUB_ID = "tiny-test-bert", "peftlab-tests/Tiny-BERT"
TEXTS = ["the movie was great", "awful and boring plot", "it was okay &lt;3"]


@pytest.fixture(scope="module")
def shipped_tiny(tiny_bert: Path) -> object:
    """The tiny BERT registered as a shipped alias with a hub id, for this module only."""
    patch = pytest.MonkeyPatch()
    alias = models.ModelAlias(ALIAS, "classification", "none", "a tiny random BERT", "MIT", lambda: tiny_bert, HUB_ID)
    patch.setitem(models.ALIASES, ALIAS, alias)
    yield alias
    patch.undo()


@pytest.fixture(scope="module")
def copied_run(tmp_path_factory: pytest.TempPathFactory, shipped_tiny: object) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("card")
    data = write_rows(folder / "reviews.csv", review_rows())
    config = load_config(data={
        "data": {"path": str(data), "max_length": 32, "clean": "basic"},
        "model": {"path": ALIAS},
        "methods": [{"method": "lora", "learning_rate": 1e-2}, {"method": "full", "learning_rate": 1e-3}],
        # in this process: the alias above exists only here
        "training": {"epochs": 1, "batch_size": 8, "warmup_ratio": 0.0, "method_process": False},
    })
    result = run_experiment(config, folder / "run")
    copy = tmp_path_factory.mktemp("elsewhere") / "run copy"
    shutil.copytree(folder / "run", copy)
    shutil.rmtree(folder / "run")  # nothing may still point at the original
    return copy, result


def test_adapter_records_the_hub_id_and_the_labels_a_plain_client_reads(copied_run: tuple[Path, object]) -> None:
    from transformers import AutoConfig

    run_dir, _ = copied_run
    folder = run_dir / "lora" / "model"
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == HUB_ID
    config = AutoConfig.from_pretrained(str(folder))
    assert config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert config.label2id == {"negative": 0, "neutral": 1, "positive": 2}
    # the head's config is the base's, not part of the adapter's size
    assert artifacts.saved_size(folder) == sum((folder / n).stat().st_size
                                               for n in ("adapter_config.json", "adapter_model.safetensors"))


def test_copied_adapter_loads_with_plain_peft_and_predicts_as_peftlab(copied_run: tuple[Path, object]) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from peftlab.data import clean_text

    run_dir, _ = copied_run
    folder = run_dir / "lora" / "model"
    # What the card tells a user: the base by its hub id, mapped to the local copy offline.
    base_path = str(models.resolve_model_path(json.loads((folder / "adapter_config.json").read_text())
                                              ["base_model_name_or_path"]))
    config = AutoConfig.from_pretrained(str(folder))
    base = AutoModelForSequenceClassification.from_pretrained(base_path, config=config)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with torch.inference_mode():
        batch = tokenizer([clean_text(t, "basic") for t in TEXTS], padding=True, truncation=True, max_length=32,
                          return_tensors="pt")
        expected = model(**batch).logits.softmax(-1).numpy()
    predictor = peftlab.load(str(run_dir / "lora"))
    np.testing.assert_allclose(predictor.predict_proba(TEXTS), expected, atol=1e-5)
    assert predictor.labels == [config.id2label[i] for i in range(3)]


def test_a_copy_whose_recorded_base_folder_is_gone_finds_the_base_by_alias(copied_run: tuple[Path, object],
                                                                           tmp_path: Path) -> None:
    run_dir, _ = copied_run
    folder = tmp_path / "model"
    shutil.copytree(run_dir / "lora" / "model", folder)
    meta = artifacts.read_metadata(folder)
    meta["base_model"] = "/another/machine/.cache/peftlab/models/tiny"  # the folder of the machine it came from
    artifacts.write_metadata(folder, meta)
    assert artifacts.adapter_base_folder(folder, meta, None) == models.resolve_model_path(ALIAS)
    (folder / artifacts.METADATA_FILE).unlink()  # a folder from the Hub: only adapter_config.json's hub id
    foreign = artifacts.read_metadata(folder)
    assert foreign["base_model"] == HUB_ID and foreign["labels"] == ["negative", "neutral", "positive"]
    assert artifacts.adapter_base_folder(folder, foreign, None) == models.resolve_model_path(ALIAS)


def test_model_card_describes_task_labels_base_data_metrics_costs_and_loading(copied_run: tuple[Path, object]) -> None:
    run_dir, result = copied_run
    lora = next(r for r in result.runs if r.name == "lora")
    card = (run_dir / "lora" / "model" / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in card  # peft's template is gone
    assert card.startswith("---\nlibrary_name: peft\nbase_model: peftlab-tests/Tiny-BERT\n"
                           "pipeline_tag: text-classification\n")
    assert "| 0 | negative |" in card and "| 2 | positive |" in card
    assert f"`{HUB_ID}` (peftlab alias `{ALIAS}`)" in card
    assert "reviews.csv" in card and "train 72, validation 9, test 9" in card
    # the report step rewrote the card with the test intervals it computed from the saved predictions
    interval = result.statistics["methods"][[m["name"] for m in result.statistics["methods"]].index("lora")]["metrics"]
    assert (f"| accuracy | {lora.test_metrics['accuracy']:.4f} | {interval['accuracy']['low']:.4f} – "
            f"{interval['accuracy']['high']:.4f} |") in card
    assert f"| macro F1 | {lora.test_metrics['f1_macro']:.4f} | {interval['f1_macro']['low']:.4f} – " in card
    assert "| loss (cross-entropy) |" in card and "| - |" in card  # no interval for the loss
    assert f"{lora.trainable_params:,} of {lora.total_params:,}" in card
    assert "PeftModel.from_pretrained(base, folder)" in card and 'peftlab.load("path/to/this/folder")' in card
    assert "clean_text(text, 'basic')" in card
    full_card = (run_dir / "full" / "model" / "README.md").read_text(encoding="utf-8")
    assert full_card.startswith("---\nlibrary_name: transformers\n") and "PeftModel" not in full_card
    assert "AutoModelForSequenceClassification.from_pretrained(folder)" in full_card


def test_the_card_code_blocks_run(copied_run: tuple[Path, object], monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain-client code in each card is what a user copies: it must run as written, on the folder."""
    run_dir, _ = copied_run
    for method in ("lora", "full"):
        folder = run_dir / method / "model"
        card = (folder / "README.md").read_text(encoding="utf-8")
        blocks = card.split("```python\n")[1:]
        for block in blocks:
            code = block.split("```")[0].replace("path/to/this/folder", str(folder))
            code = code.replace(f"base_path = {HUB_ID!r}", f"base_path = {str(models.resolve_model_path(ALIAS))!r}")
            namespace: dict = {}
            exec(compile(code, f"{method} card", "exec"), namespace)  # noqa: S102 - our own card
        assert "labels" in namespace and len(namespace["labels"]) == 1


def test_write_model_card_adds_intervals(copied_run: tuple[Path, object], tmp_path: Path) -> None:
    from peftlab.stats import Interval

    run_dir, result = copied_run
    folder = tmp_path / "model"
    shutil.copytree(run_dir / "lora" / "model", folder)
    lora = next(r for r in result.runs if r.name == "lora")
    acc = lora.test_metrics["accuracy"]
    artifacts.write_model_card(folder, result=lora, confidence=0.95,
                               intervals={"accuracy": Interval(acc, 0.25, 0.75), "f1_macro": (0.125, 0.5)})
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "| metric | test | 95% interval |" in card
    assert f"| accuracy | {acc:.4f} | 0.2500 – 0.7500 |" in card
    assert "| macro F1 |" in card and "0.1250 – 0.5000 |" in card
    assert "| loss (cross-entropy) |" in card and card.count(" | - |") == 3  # loss, precision, recall: none


def test_saved_files_and_folders_are_readable_by_others(copied_run: tuple[Path, object], tiny_bert: Path,
                                                        tmp_path: Path) -> None:
    """Under umask 022 files are 0644 and folders 0755 (mkstemp/mkdtemp would give 0600 / 0700)."""
    import os

    from peftlab import fsutil

    old = os.umask(0o022)
    try:
        fsutil.write_text(tmp_path / "report.html", "<html>")
        with fsutil.atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_bytes(b"x")
        assert stat.S_IMODE((tmp_path / "report.html").stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
        os.umask(0o027)  # a user who shares with the group only
        fsutil.write_json(tmp_path / "results.json", {})
        with fsutil.atomic_dir(tmp_path / "private") as tmp:
            pass
        assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o640
        assert stat.S_IMODE((tmp_path / "private").stat().st_mode) == 0o750
    finally:
        os.umask(old)
    # the run itself (copytree keeps modes): every file and folder as open() / mkdir would have made it
    run_dir, _ = copied_run
    mask = fsutil.umask()
    for path in [run_dir, *run_dir.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_the_report_puts_the_test_intervals_into_the_saved_card(tmp_path: Path, tiny_bert: Path) -> None:
    import csv

    from peftlab.config import load_config
    from peftlab.experiment import run_experiment
    from tests.conftest import review_rows

    data = tmp_path / "reviews.csv"
    with data.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(review_rows())
    config = load_config(data={"data": {"path": str(data), "max_length": 32}, "model": {"path": str(tiny_bert)},
                               "methods": [{"method": "lora", "learning_rate": 1e-2}],
                               "training": {"epochs": 1, "batch_size": 8, "method_process": False}})
    result = run_experiment(config, tmp_path / "run")
    card = (tmp_path / "run" / "lora" / "model" / "README.md").read_text(encoding="utf-8")
    low, high = result.statistics["methods"][0]["metrics"]["f1_macro"]["low"], \
        result.statistics["methods"][0]["metrics"]["f1_macro"]["high"]
    assert f"{low:.4f} – {high:.4f}" in card
