"""`peftlab export --merge`: merged folders predict as their adapters do; unmergeable methods say so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import make_adapter, make_full_model

from peftlab.errors import AdapterError, MethodError, PeftlabError
from peftlab.export import export_merged

TEXTS = ["the movie was great", "awful plot and dull acting", "a very very fine story it was", "ok"]


@pytest.mark.parametrize("method", ["lora", "ia3", "loha", "dora"])
def test_merged_model_predicts_as_the_adapter(tiny_bert: Path, tmp_path: Path, method: str) -> None:
    from peftlab.predict import load_predictor

    run_method = tmp_path / "run" / method
    make_adapter(tiny_bert, run_method / "model", method, seed=3)
    output = export_merged(run_method, tmp_path / "merged")

    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    assert not (output / "adapter_config.json").exists()
    assert (output / "tokenizer.json").is_file()
    meta = json.loads((output / "peftlab.json").read_text())
    assert meta["is_adapter"] is False and meta["merged_method"] == method
    merged = load_predictor(output)
    adapter = load_predictor(run_method)
    assert merged.labels == adapter.labels
    np.testing.assert_allclose(merged.predict_proba(TEXTS), adapter.predict_proba(TEXTS), atol=1e-5, rtol=0)
    # A plain transformers folder: loads without peft, with the class names in its config.
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(str(output))
    assert [plain.config.id2label[i] for i in range(plain.config.num_labels)] == adapter.labels


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_prompt_learning_cannot_merge(tiny_bert: Path, tmp_path: Path, method: str) -> None:
    folder = make_adapter(tiny_bert, tmp_path / method, method)
    with pytest.raises(MethodError, match="cannot be merged"):
        export_merged(folder, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_full_model_is_not_an_adapter(tiny_bert: Path, tmp_path: Path) -> None:
    folder = make_full_model(tiny_bert, tmp_path / "full")
    with pytest.raises(AdapterError, match="nothing to merge"):
        export_merged(folder, tmp_path / "merged")


def test_refuses_to_overwrite_without_flag(tiny_bert: Path, tmp_path: Path) -> None:
    folder = make_adapter(tiny_bert, tmp_path / "lora", "lora")
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(PeftlabError, match="--overwrite"):
        export_merged(folder, output)
    assert (output / "keep.txt").read_text() == "mine"
    export_merged(folder, output, overwrite=True)
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    with pytest.raises(PeftlabError, match="would replace the adapter"):
        export_merged(folder, folder, overwrite=True)


def run_cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    from peftlab.cli import main

    monkeypatch.setattr(sys, "argv", ["peftlab", *args])
    try:
        main()
    except SystemExit as exc:  # main() always exits with its code
        return int(exc.code or 0)
    return 0


def test_cli_export(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    lora = make_adapter(tiny_bert, tmp_path / "lora", "lora")
    prompt = make_adapter(tiny_bert, tmp_path / "prompt", "prompt_tuning")
    assert run_cli(monkeypatch, "export", str(lora), "--merge", "--output", str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert run_cli(monkeypatch, "export", str(lora), "--merge", "--output", str(tmp_path / "out")) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(monkeypatch, "export", str(prompt), "--merge", "-o", str(tmp_path / "p")) == 1
    assert "cannot be merged" in capsys.readouterr().err
    assert run_cli(monkeypatch, "export", str(lora), "-o", str(tmp_path / "x")) == 2  # --merge is required
