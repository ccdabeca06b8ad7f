"""Rows of different adapters in one forward pass (peftlab.serve.mixed) on tiny random models (offline, seconds).

Every gathered pass is checked against the reference it must equal: each row alone, through peft's own
single-adapter forward (set_adapter, then a plain pass), to 1e-5.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from peftlab.serve import mixed  # noqa: E402

TEXTS = ["the movie was great", "awful plot and dull acting", "a very very fine story it was", "ok",
         "the film was really quite boring and the acting was weak"]


def tiny_models(base: Path, configs: dict[str, Any], seed: int = 0, roberta: bool = False) -> Any:
    """A PeftModel for sequence classification holding one adapter per entry of ``configs``, each perturbed
    with its own random weights (so that every adapter, head included, predicts differently)."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    if roberta:  # its head is dense + tanh + out_proj: not one nn.Linear
        model = RobertaForSequenceClassification(RobertaConfig(
            vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=130, pad_token_id=0, num_labels=3))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=3)
    names = list(configs)
    model = peft.get_peft_model(model, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if any(f".{name}." in f"{key}." for name in names):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def rows_for(names: list[str], copies: int = 2) -> list[tuple[str, str]]:
    rows = [(name, text) for name in names for text in TEXTS] * copies
    random.Random(0).shuffle(rows)
    return rows[:len(rows) // copies + 3]


def tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def per_row(model: Any, tok: Any, rows: list[tuple[str, str]]) -> np.ndarray:
    """The reference: each row alone, with peft's own single-adapter forward."""
    out = []
    with torch.inference_mode():
        for name, text in rows:
            out.append(mixed.forward(model, dict(tok([text], return_tensors="pt")), [name], mixed.ALONE).logits[0])
    return torch.stack(out).numpy()


def run_plan(model: Any, tok: Any, rows: list[tuple[str, str]], passes: list[mixed.Pass]) -> np.ndarray:
    logits = np.zeros((len(rows), 3), dtype=np.float32)
    with torch.inference_mode():
        for step in passes:
            indices = [i for i, (name, _) in enumerate(rows) if name in step.adapters]
            inputs = dict(tok([rows[i][1] for i in indices], padding=True, return_tensors="pt"))
            logits[indices] = mixed.forward(model, inputs, [rows[i][0] for i in indices], step.how).logits.numpy()
    return logits


LORA = {"r4": lambda: peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8),
        # another rank, rsLoRA scaling, lora_B biases and other layers (attention and FFN "dense", the pooler's
        # two-dimensional input): rows of the others get no update there
        "r8": lambda: peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=4, use_rslora=True, lora_bias=True,
                                      target_modules=["query", "key", "dense"]),
        "r2": lambda: peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=2, target_modules=["value"])}
IA3 = {"i1": lambda: peft.IA3Config(task_type="SEQ_CLS"),  # key, value and the feed-forward output (input scaled)
       "i2": lambda: peft.IA3Config(task_type="SEQ_CLS"),
       "i3": lambda: peft.IA3Config(task_type="SEQ_CLS", target_modules=["query", "output.dense"],
                                       feedforward_modules=["output.dense"])}
PROMPT = {name: (lambda n=n: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=n, inference_mode=True))
          for name, n in (("p4", 4), ("p4-b", 4), ("p4-c", 4))}
P_TUNING = {name: (lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3, encoder_hidden_size=16,
                                                    inference_mode=True)) for name in ("pt", "pt-b")}


@pytest.mark.parametrize("family", [LORA, IA3, PROMPT, P_TUNING], ids=["lora", "ia3", "prompt_tuning", "p_tuning"])
def test_one_gathered_pass_equals_one_pass_per_row(tiny_bert: Path, family: dict[str, Any]) -> None:
    model = tiny_models(tiny_bert, {name: make() for name, make in family.items()})
    names = list(family)
    passes = mixed.plan(model, names)
    assert passes == [mixed.Pass(tuple(names), mixed.GATHERED)]
    rows = rows_for(names)
    tok = tokenizer(tiny_bert)
    want = per_row(model, tok, rows)
    np.testing.assert_allclose(run_plan(model, tok, rows, passes), want, atol=1e-5, rtol=0)
    # the reference is not trivially equal: the adapters (heads included) disagree on the same text
    by_adapter = {name: want[[i for i, r in enumerate(rows) if r == (name, TEXTS[0])]] for name in names}
    assert len({tuple(np.round(v[0], 4)) for v in by_adapter.values() if len(v)}) > 1
    # the patched forwards are gone after the pass: plain passes are peft's own again
    assert not any("forward" in m.__dict__ for m in model.modules()) and "get_prompt" not in model.__dict__


def test_prompts_of_other_lengths_get_their_own_pass_and_a_composite_head_runs_per_adapter(tiny_bert: Path) -> None:
    configs = {**{n: make() for n, make in PROMPT.items()},
               "p6": peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=6, inference_mode=True)}
    model = tiny_models(tiny_bert, configs)
    passes = mixed.plan(model, list(configs))
    assert passes == [mixed.Pass(("p4", "p4-b", "p4-c"), mixed.GATHERED), mixed.Pass(("p6",), mixed.ALONE)]
    tok = tokenizer(tiny_bert)
    rows = rows_for(list(configs))
    np.testing.assert_allclose(run_plan(model, tok, rows, passes), per_row(model, tok, rows), atol=1e-5, rtol=0)

    roberta = tiny_models(tiny_bert, {n: make() for n, make in LORA.items()}, roberta=True)
    passes = mixed.plan(roberta, list(LORA))
    assert passes == [mixed.Pass(tuple(LORA), mixed.GATHERED)]
    rows = rows_for(list(LORA))
    np.testing.assert_allclose(run_plan(roberta, tok, rows, passes), per_row(roberta, tok, rows), atol=1e-5, rtol=0)


def test_what_cannot_be_gathered_runs_per_adapter_or_through_peft(tiny_bert: Path) -> None:
    tok = tokenizer(tiny_bert)
    dora = tiny_models(tiny_bert, {n: peft.LoraConfig(task_type="SEQ_CLS", r=4, use_dora=True) for n in ("d", "d-b")})
    assert mixed.plan(dora, ["d", "d-b"], peft_mixes=False) == [mixed.Pass(("d",), mixed.ALONE),
                                                                 mixed.Pass(("d-b",), mixed.ALONE)]
    rows = rows_for(["d", "d-b"])
    np.testing.assert_allclose(run_plan(dora, tok, rows, mixed.plan(dora, ["d", "d-b"])), per_row(dora, tok, rows),
                               atol=1e-5, rtol=0)
    # A LoRA embedding layer is not gathered: peft's adapter_names where the method allows it, else one per adapter.
    configs = {n: peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "word_embeddings"])
               for n in ("e", "e-b")}
    embedded = tiny_models(tiny_bert, configs)
    assert mixed.plan(embedded, ["e", "e-b"], peft_mixes=True) == [mixed.Pass(("e", "e-b"), mixed.PEFT)]
    assert len(mixed.plan(embedded, ["e", "e-b"], peft_mixes=False)) == 2
    rows = rows_for(["e", "e-b"])
    np.testing.assert_allclose(run_plan(embedded, tok, rows, mixed.plan(embedded, ["e", "e-b"], peft_mixes=True)),
                               per_row(embedded, tok, rows), atol=1e-5, rtol=0)
    # gather=False (the measurement's baseline): one pass per adapter even where gathering works
    lora = tiny_models(tiny_bert, {n: make() for n, make in LORA.items()})
    assert [p.how for p in mixed.plan(lora, list(LORA), gather=False)] == [mixed.ALONE] * 3
