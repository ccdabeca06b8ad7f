"""The saved-folder format: names agree with peft/transformers, foreign folders are read, sizes count weights only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab import artifacts
from peftlab.errors import AdapterError


def test_file_names_are_the_libraries_own() -> None:
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
    from transformers.utils import CONFIG_NAME as MODEL_CONFIG
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    assert artifacts.ADAPTER_CONFIG_FILE == CONFIG_NAME
    assert artifacts.MODEL_CONFIG_FILE == MODEL_CONFIG
    assert {SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME} <= set(
        artifacts.WEIGHT_FILES)


def test_metadata_round_trips_and_documents_every_field(tmp_path: Path) -> None:
    (tmp_path / artifacts.MODEL_CONFIG_FILE).write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    meta = artifacts.new_metadata(task="classification", method="lora", name="lora", labels=["a", "b"],
                                  base_model=tmp_path, base_model_name="tiny", max_length=64, clean="basic",
                                  trust_remote_code=False)
    artifacts.write_metadata(tmp_path, meta)
    assert artifacts.read_metadata(tmp_path) == json.loads(json.dumps(meta))
    assert meta["is_adapter"] is True
    assert meta["base_fingerprint"]["model_type"] == "bert" and meta["base_fingerprint"]["hidden_size"] == 32
    assert set(meta) <= set(artifacts.Metadata.__annotations__)
    # every schema field carries a comment saying what it means
    source = Path(artifacts.__file__).read_text(encoding="utf-8")
    schema = source.split("class Metadata")[1].split("\n\n\n")[0]
    for name in artifacts.Metadata.__annotations__:
        line = next(row for row in schema.splitlines() if row.strip().startswith(f"{name}:"))
        assert "#" in line, name


def test_a_folder_saved_by_another_tool_is_read_from_its_own_config(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / artifacts.ADAPTER_CONFIG_FILE).write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "/models/base"}))
    assert artifacts.read_metadata(adapter) == {"is_adapter": True, "clean": "none", "max_length": 512,
                                                "base_model": "/models/base", "task": "causal-lm", "method": "lora"}
    full = tmp_path / "full"
    full.mkdir()
    (full / artifacts.MODEL_CONFIG_FILE).write_text(json.dumps(
        {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "neg", "1": "pos"}}))
    meta = artifacts.read_metadata(full)
    assert (meta["is_adapter"], meta["task"], meta["method"], meta["labels"]) == (False, "classification", "full",
                                                                                  ["neg", "pos"])


def test_find_model_dir_accepts_a_method_folder_and_names_a_run_directory(tmp_path: Path) -> None:
    model = tmp_path / "run" / "lora" / artifacts.MODEL_DIR
    model.mkdir(parents=True)
    (model / artifacts.ADAPTER_CONFIG_FILE).write_text("{}")
    assert artifacts.find_model_dir(tmp_path / "run" / "lora") == model
    assert artifacts.find_model_dir(model) == model
    with pytest.raises(AdapterError, match=r"run directory with methods \['lora'\]"):
        artifacts.find_model_dir(tmp_path / "run")


def test_saved_size_counts_weights_and_configs_not_the_tokenizer(tmp_path: Path) -> None:
    sizes = {"adapter_model.safetensors": 100, artifacts.ADAPTER_CONFIG_FILE: 10, "model-00001-of-00002.safetensors": 7,
             artifacts.TOKENIZER_CONFIG_FILE: 1000, "tokenizer.json": 5000, artifacts.METADATA_FILE: 300}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
    assert artifacts.saved_size(tmp_path) == 117
    assert artifacts.saved_size(tmp_path / "absent") == 0


def test_is_main_process_follows_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from peftlab.dist import is_main_process

    monkeypatch.delitem(sys.modules, "accelerate.state", raising=False)  # no accelerate state yet: RANK decides
    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()


def test_shipped_bases_are_recorded_by_hub_id_and_resolved_back_offline(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from peftlab import models

    assert {a.name: a.hub_id for a in models.ALIASES.values()} == {
        "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
        "multilingual-e5-small": "intfloat/multilingual-e5-small",
        "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    prepared: list[str] = []
    monkeypatch.setattr(models, "prepare_model", lambda alias, force=False: prepared.append(alias) or tmp_path / alias)
    assert models.resolve_model_path("intfloat/multilingual-e5-small") == tmp_path / "multilingual-e5-small"
    assert models.resolve_model_path("sentence-transformers/all-minilm-l6-v2") == tmp_path / "minilm-l6"
    assert prepared == ["multilingual-e5-small", "minilm-l6"]
    # a user's folder laid out like a hub id is theirs, not the shipped copy
    own = tmp_path / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    own.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == own.resolve()
    # by alias, by hub id, or by the prepared folder; a user's own folder has no hub id
    monkeypatch.setattr(models, "cache_dir", lambda: tmp_path / "cache")
    assert models.hub_id_of("multilingual-e5-small") == "intfloat/multilingual-e5-small"
    assert models.hub_id_of(str(tmp_path / "x"), tmp_path / "cache" / "smollm2-135m") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.hub_id_of(str(tmp_path / "mine"), tmp_path / "mine") is None


def test_a_missing_base_names_every_place_tried(tmp_path: Path) -> None:
    meta = {"base_model": str(tmp_path / "gone"), "base_model_name": "also-gone", "base_model_id": None}
    with pytest.raises(AdapterError, match=r"tried .*gone .*; also-gone .*pass --base"):
        artifacts.adapter_base_folder(tmp_path, meta, None)
