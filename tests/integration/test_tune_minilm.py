"""`peftlab tune` on the shipped English encoder: full fine-tuning and LoRA, 2 trials each, then the tuned run.

A few hundred rows and one epoch keep it near two minutes on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_tune_full_and_lora_on_minilm_then_run_the_tuned_config(tmp_path: Path) -> None:
    overrides = ["data.max_train_samples=240", "data.max_eval_samples=80", "training.epochs=1",
                 "training.method_process=false"]
    tune_dir = tmp_path / "tune"
    command = [sys.executable, "-m", "peftlab.cli", "tune", str(REPO / "configs/default.yaml"), "--output",
               str(tune_dir), "--methods", "full,lora", "--trials", "2",
               *[arg for o in overrides for arg in ("--set", o)]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    study = json.loads((tune_dir / "study.json").read_text())
    assert study["budget"] == 2 and [m["name"] for m in study["methods"]] == ["full", "lora"]
    for method in study["methods"]:
        assert len(method["trials"]) == 2 and method["best_trial"] is not None
        assert all(t["state"] in ("COMPLETE", "PRUNED") for t in method["trials"])
        assert 0 <= method["best_value"] <= 1  # validation f1_macro
    assert not list(tune_dir.rglob("test_predictions.jsonl"))

    tuned = yaml.safe_load((tune_dir / "tuned.yaml").read_text())
    lora = next(m for m in study["methods"] if m["name"] == "lora")
    assert next(m for m in tuned["methods"] if m["method"] == "lora")["learning_rate"] == lora["chosen"]["learning_rate"]
    assert [m["method"] for m in tuned["methods"]] == ["full", "lora", "prompt_tuning"]  # prompt tuning kept as is

    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "peftlab.cli", "run", str(tune_dir / "tuned.yaml"), "--output",
                           str(run_dir), "--methods", "full,lora"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((run_dir / "results.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["ok", "ok"]
