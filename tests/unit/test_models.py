"""Model folder checks: incomplete folders, remote code without opt-in, pickle weights, adapter/base mismatch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from peftlab.errors import AdapterError, ModelError
from peftlab.models import ALIASES, check_model_folder, resolve_dtype, resolve_model_path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_complete_folder_passes(tiny_bert: Path) -> None:
    assert check_model_folder(tiny_bert)["model_type"] == "bert"


def test_missing_folder_and_unknown_alias(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither a shipped alias .* nor an existing folder"):
        resolve_model_path(str(tmp_path / "nope"))
    assert set(ALIASES) >= {"minilm-l6", "multilingual-e5-small", "smollm2-135m"}


def test_folder_without_config_or_weights(tmp_path: Path, tiny_bert: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        check_model_folder(tmp_path)
    folder = copy_model(tiny_bert, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weights"):
        check_model_folder(folder)


def test_remote_code_needs_the_opt_in(tmp_path: Path, tiny_bert: Path) -> None:
    folder = copy_model(tiny_bert, tmp_path / "kobert")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_kobert.KoBertModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="model.trust_remote_code: true"):
        check_model_folder(folder)
    assert check_model_folder(folder, trust_remote_code=True)["auto_map"]


def test_pickle_weights_are_refused_unless_allowed(tmp_path: Path, tiny_bert: Path) -> None:
    import torch
    from safetensors.torch import load_file

    folder = copy_model(tiny_bert, tmp_path / "pickled")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="model.allow_pickle: true"):
        check_model_folder(folder)
    assert check_model_folder(folder, allow_pickle=True)


def test_auto_dtype_is_fp32_on_cpu() -> None:
    import torch

    if not torch.cuda.is_available():
        assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16


def test_adapter_on_the_wrong_base_is_a_clear_error(tmp_path: Path, tiny_bert: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

    from peftlab.predict import load_predictor

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4)).save_pretrained(str(adapter))
    (adapter / "peftlab.json").write_text(json.dumps({"task": "classification", "labels": ["a", "b"],
                                                      "base_model": str(tiny_bert), "is_adapter": True}))
    other = tmp_path / "other_base"
    shutil.copytree(tiny_bert, other)
    BertModel(BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37)).save_pretrained(str(other))
    with pytest.raises(AdapterError, match="does not fit base model"):
        load_predictor(adapter, base_model=str(other))
    assert load_predictor(adapter).predict(["great"])[0] in ("a", "b")
