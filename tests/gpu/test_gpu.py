"""GPU checks: bf16 auto dtype, a short training run on CUDA, fp32 probabilities. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_auto_dtype_is_bf16_on_capable_gpus() -> None:
    from peftlab.models import resolve_dtype

    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert resolve_dtype("auto") == expected


def test_train_and_predict_on_cuda(tmp_path: Path, tiny_bert: Path, reviews_csv: Path) -> None:
    from peftlab.config import load_config
    from peftlab.experiment import run_experiment
    from peftlab.predict import load_predictor

    config = load_config(data={"data": {"path": str(reviews_csv)}, "model": {"path": str(tiny_bert)},
                               "methods": ["full", "lora"], "training": {"epochs": 1, "batch_size": 8}})
    result = run_experiment(config, tmp_path / "run")
    assert all(r.status == "ok" and r.peak_accelerator_bytes for r in result.runs)
    predictor = load_predictor(tmp_path / "run" / "lora")
    assert predictor.device.type == "cuda"
    proba = predictor.predict_proba(["great movie", "awful film"])
    assert proba.dtype == np.float64 and np.allclose(proba.sum(1), 1.0)
