"""AI-Hub data as it ships (a folder of JSON files, a space and Hangul in its name) trained on the shipped
multilingual encoder; the run is copied elsewhere and its adapter loaded there with plain transformers + peft."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
HUB_ID = "intfloat/multilingual-e5-small"
TEXTS = ["배송이 너무 느려요", "정말 만족스러운 제품입니다 &lt;3", "그냥 보통이에요"]


@pytest.fixture(scope="module")
def copied_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("aihub")
    folder = root / "SNS" / "04. IT기기"
    folder.mkdir(parents=True)
    sample = json.loads((REPO / "tests/data/aihub_sns_sample.json").read_text(encoding="utf-8"))["data"]
    records = [{"Index": str(i), "ReviewScore": "5", "Aspects": [], **r,
                "RawText": f"{r['RawText']} {i}" if r.get("RawText") else r.get("RawText")}
               for i, r in enumerate(sample * 3)]
    half = len(records) // 2
    (folder / "IT기기_02.json").write_text(json.dumps({"data": records[half:]}, ensure_ascii=False), encoding="utf-8")
    (folder / "IT기기_01.json").write_text(json.dumps(records[:half], ensure_ascii=False), encoding="utf-8")
    out = root / "run"
    command = [sys.executable, "-m", "peftlab.cli", "run", str(REPO / "configs/aihub_sns.yaml"), "--output", str(out),
               "--methods", "lora", "--set", f"data.path={folder}", "--set", "training.epochs=1",
               "--set", "data.max_length=48"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    assert list(report["files"]) == [str(folder / "IT기기_01.json"), str(folder / "IT기기_02.json")]
    assert {"Index", "ReviewScore", "Aspects"} <= set(report["columns"])
    dropped = [e for examples in report["dropped_examples"].values() for e in examples]
    assert dropped and all(" record " in e and "IT기기_0" in e for e in dropped)
    copy = tmp_path_factory.mktemp("elsewhere") / "copied run"
    shutil.copytree(out, copy)
    shutil.rmtree(out)
    return copy, folder


def test_adapter_names_its_base_by_hub_id_and_carries_a_card(copied_run: tuple[Path, Path]) -> None:
    run_dir, _ = copied_run
    folder = run_dir / "lora" / "model"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in card and f"base_model: {HUB_ID}" in card
    assert "| 0 | 부정 |" in card and "| 2 | 긍정 |" in card and "dequantized" in card
    assert "04. IT기기" in card


def test_copied_adapter_predicts_the_same_with_plain_peft(copied_run: tuple[Path, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    import peftlab
    from peftlab.data import clean_text
    from peftlab.models import resolve_model_path

    run_dir, _ = copied_run
    folder = run_dir / "lora" / "model"
    config = AutoConfig.from_pretrained(str(folder))
    assert [config.id2label[i] for i in range(3)] == ["부정", "중립", "긍정"]
    base = AutoModelForSequenceClassification.from_pretrained(str(resolve_model_path(HUB_ID)), config=config)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with torch.inference_mode():
        batch = tokenizer([clean_text(t, "korean") for t in TEXTS], padding=True, truncation=True, max_length=48,
                          return_tensors="pt")
        expected = model(**batch).logits.softmax(-1).numpy()
    np.testing.assert_allclose(peftlab.load(str(run_dir / "lora")).predict_proba(TEXTS), expected, atol=1e-5)
