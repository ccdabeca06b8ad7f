"""The shipped default experiment, on a small subset, end to end with the real shipped English encoder.

Then reload what it saved with plain transformers + peft and check the predictions equal peftlab's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default") / "run"
    command = [sys.executable, "-m", "peftlab.cli", "run", str(REPO / "configs/default.yaml"), "--output", str(out),
               "--set", "data.max_train_samples=192", "--set", "data.max_eval_samples=96",
               "--set", "training.epochs=1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report:" in result.stdout
    return out


def test_report_compares_every_method(run_dir: Path) -> None:
    import json

    results = json.loads((run_dir / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["full", "lora", "prompt_tuning"]
    assert all(r["status"] == "ok" for r in results["runs"])
    full, lora, prompt = results["runs"]
    assert lora["trainable_params"] < full["trainable_params"] / 100
    assert lora["model_size_bytes"] < full["model_size_bytes"] / 50
    assert prompt["trainable_params"] < lora["trainable_params"]
    markdown = (run_dir / "report.md").read_text()
    # a verdict against the reference with its paired interval, for each method, never a bare ratio
    for method in ("lora", "prompt_tuning"):
        assert re.search(rf"{method}: (better than|worse than|no detectable difference from) full in macro F1"
                         r"( on these \d+ test rows)? \(difference [+-]\d\.\d+, 95% CI", markdown), markdown[-3000:]


@pytest.mark.parametrize("method", ["full", "lora", "prompt_tuning"])
def test_plain_transformers_and_peft_reload_predicts_like_peftlab(run_dir: Path, method: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftlab.models import resolve_model_path
    from peftlab.predict import load_predictor

    texts = ["A gorgeous, moving film.", "Dull, lifeless and far too long.", "It is a movie about a bank."]
    folder = run_dir / method / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if method == "full":
        model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    else:
        base = AutoModelForSequenceClassification.from_pretrained(str(resolve_model_path("minilm-l6")), num_labels=3)
        model = PeftModel.from_pretrained(base, str(folder))
    model.eval()
    with torch.inference_mode():
        probs = torch.softmax(model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.float(), -1).numpy()
    predictor = load_predictor(run_dir / method)
    np.testing.assert_allclose(predictor.predict_proba(texts), probs, atol=1e-5)
    assert predictor.labels == ["negative", "neutral", "positive"]


def test_predict_command_prints_labels_and_probabilities(run_dir: Path) -> None:
    import json

    result = subprocess.run([sys.executable, "-m", "peftlab.cli", "predict", str(run_dir / "lora"),
                             "What a wonderful film", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["label"] in ("negative", "neutral", "positive")
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_predict_on_the_wrong_shipped_base_is_refused(run_dir: Path) -> None:
    """The red-team case: a MiniLM adapter on multilingual-e5 (same width) gave near-uniform probabilities, exit 0."""
    result = subprocess.run([sys.executable, "-m", "peftlab.cli", "predict", str(run_dir / "lora"), "A fine film",
                             "--base", "multilingual-e5-small"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-1000:] + result.stderr[-2000:]
    assert "was trained on minilm-l6" in result.stderr and "--base minilm-l6" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not result.stdout.strip()
