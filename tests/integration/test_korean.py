"""Korean end to end: the converted multilingual encoder, the shipped Korean set, LoRA, Korean predictions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TEXTS = ["배송이 너무 느려요", "정말 만족스러운 제품입니다 👍", "색상은 사진이랑 비슷하고 사이즈는 정사이즈예요"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ko") / "run"
    command = [sys.executable, "-m", "peftlab.cli", "run", str(REPO / "configs/ko_reviews.yaml"), "--output", str(out),
               "--methods", "lora", "--set", "data.max_train_samples=96", "--set", "data.max_eval_samples=48",
               "--set", "training.epochs=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_korean_tokenization_has_no_unknown_tokens() -> None:
    from transformers import AutoTokenizer

    from peftlab.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("multilingual-e5-small")))
    for text in TEXTS[:1] + ["이 영화 정말 재미있었어요!", "가격 대비 괜찮은 편입니다."]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_lora_adapter_reloads_with_plain_peft_and_predicts_like_peftlab(run_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftlab.models import resolve_model_path
    from peftlab.predict import load_predictor

    folder = run_dir / "lora" / "model"
    base = AutoModelForSequenceClassification.from_pretrained(str(resolve_model_path("multilingual-e5-small")),
                                                              num_labels=3)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with torch.inference_mode():
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    expected = torch.softmax(logits.float(), dim=-1).numpy()
    predictor = load_predictor(run_dir / "lora")
    assert predictor.labels == ["부정", "중립", "긍정"]
    np.testing.assert_allclose(predictor.predict_proba(TEXTS), expected, atol=1e-5)


def test_predict_cli_prints_korean_labels_and_all_probabilities(run_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "peftlab.cli", "predict", str(run_dir / "lora"), TEXTS[0],
                             "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["text"] == TEXTS[0]
    assert set(row["probabilities"]) == {"부정", "중립", "긍정"} and row["label"] in row["probabilities"]
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    plain = subprocess.run([sys.executable, "-m", "peftlab.cli", "predict", str(run_dir / "lora"), TEXTS[0]],
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "부정" in plain.stdout and "긍정" in plain.stdout


def test_bf16_probabilities_are_computed_in_fp32(run_dir: Path) -> None:
    from peftlab.predict import load_predictor

    predictor = load_predictor(run_dir / "lora", dtype="bfloat16")
    assert next(predictor.model.parameters()).dtype == torch.bfloat16
    proba = predictor.predict_proba(TEXTS)
    assert proba.dtype == np.float64 and np.allclose(proba.sum(axis=1), 1.0)
