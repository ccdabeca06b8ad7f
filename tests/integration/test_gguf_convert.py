"""Convert the shipped SmolLM2-135M-Instruct GGUF once and check the plain folder.

Slow-ish (~25 s conversion + ~20 s loading the GGUF reference on CPU), hence the
``integration`` marker. The converted folder must behave exactly like the
GGUF-loaded model and accept PEFT wrappers (prompt tuning, LoRA).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftlab.convert.gguf import convert_gguf, find_smollm2_gguf
from peftlab.errors import ModelError

pytestmark = pytest.mark.integration

PROMPT = "Two things are infinite:"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return find_smollm2_gguf()
    except ModelError as exc:  # only when the optional weights package is absent
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def converted(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "model"
    out.mkdir()
    convert_gguf(gguf_path, out)
    return out


@pytest.fixture(scope="module")
def reference(gguf_path: Path) -> tuple[torch.nn.Module, object]:
    """The GGUF loaded directly by transformers (dequantized, fp32)."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return model.eval(), tokenizer


def test_folder_is_plain_fp32_llama(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert 134_000_000 < model.num_parameters() < 135_000_000
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_logits_and_greedy_generation_match_gguf(converted: Path, reference: tuple) -> None:
    ref_model, ref_tok = reference
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    enc = ref_tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref_logits, logits = ref_model(**enc).logits, model(**enc).logits
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    kwargs = {"max_new_tokens": 16, "do_sample": False}
    ref_ids = ref_model.generate(**enc, **kwargs)
    ids = model.generate(**enc, **kwargs)
    assert torch.equal(ids, ref_ids)
    assert ids.shape[1] > enc.input_ids.shape[1]


def test_tokenizer_matches_gguf(converted: Path, reference: tuple) -> None:
    _, ref_tok = reference
    tok = AutoTokenizer.from_pretrained(converted)
    for text in (PROMPT, "Héllo, wörld!  123\n\ttabs", "<|im_start|>user\nHi<|im_end|>\n"):
        assert tok(text).input_ids == ref_tok(text).input_ids
    assert tok(PROMPT).input_ids == [10345, 1495, 359, 15865, 42]
    assert tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    assert tok.chat_template == ref_tok.chat_template and tok.chat_template
    msgs = [{"role": "user", "content": "Give me a quote."}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == ref_tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )


def _train_step(model: torch.nn.Module, tok: object) -> None:
    batch = tok([PROMPT, "Know thyself."], padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    model.train()
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, "PEFT left nothing trainable"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_prompt_tuning_forward_backward(converted: Path) -> None:
    from peft import PromptTuningConfig, TaskType, get_peft_model

    tok = AutoTokenizer.from_pretrained(converted)
    base = AutoModelForCausalLM.from_pretrained(converted)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4))
    trainable, _total = model.get_nb_trainable_parameters()
    assert trainable == 4 * 576
    _train_step(model, tok)


def test_lora_forward_backward(converted: Path) -> None:
    from peft import LoraConfig, TaskType, get_peft_model

    tok = AutoTokenizer.from_pretrained(converted)
    base = AutoModelForCausalLM.from_pretrained(converted)
    model = get_peft_model(
        base, LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    trainable, _total = model.get_nb_trainable_parameters()
    assert trainable > 0
    _train_step(model, tok)
