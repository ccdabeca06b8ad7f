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

    torch.manual_seed(0)  # the same base for every seed: the server's PeftModels share one base's tensors
    if roberta:  # its head is dense + tanh + out_proj: not one nn.Linear
        model = RobertaForSequenceClassification(RobertaConfig(
            vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=130, pad_token_id=0, num_labels=3))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=3)
    names = list(configs)
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if any(f".{name}." in f"{key}." for name in names):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def rows_for(names: list[str]) -> list[tuple[str, str]]:
    """Two texts per adapter (one of them the same for all), shuffled: every pass mixes adapters and lengths."""
    rows = [(name, text) for i, name in enumerate(names) for text in (TEXTS[0], TEXTS[1 + i % (len(TEXTS) - 1)])]
    random.Random(0).shuffle(rows)
    return rows


def tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base))


def per_row(models: dict[str, Any], tok: Any, rows: list[tuple[str, str]]) -> np.ndarray:
    """The reference: each row alone, with peft's own single-adapter forward (set_adapter, a plain pass)."""
    out = []
    with torch.inference_mode():
        for name, text in rows:
            models[name].set_adapter(name)
            out.append(models[name](**tok([text], return_tensors="pt")).logits[0])
    return torch.stack(out).numpy()


def run_plan(models: dict[str, Any], tok: Any, rows: list[tuple[str, str]], passes: list[mixed.Pass]) -> np.ndarray:
    logits = np.zeros((len(rows), 3), dtype=np.float32)
    with torch.inference_mode():
        for step in passes:
            indices = [i for i, (name, _) in enumerate(rows) if name in step.adapters]
            inputs = dict(tok([rows[i][1] for i in indices], padding=True, return_tensors="pt"))
            logits[indices] = mixed.forward(models, inputs, [rows[i][0] for i in indices], step.how).logits.numpy()
    return logits


def held(*models: Any) -> dict[str, Any]:
    """Each adapter's name -> the PeftModel holding it."""
    return {name: model for model in models for name in model.peft_config}


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
          for name, n in (("p4", 4), ("p4-b", 4), ("p6", 6))}
P_TUNING = {name: (lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=16,
                                                    inference_mode=True)) for name in ("pt", "pt-b")}


def build(base: Path, family: dict[str, Any], seed: int = 0, roberta: bool = False) -> Any:
    return tiny_models(base, {name: make() for name, make in family.items()}, seed=seed, roberta=roberta)


def test_one_pass_for_rows_of_lora_ia3_and_prompt_adapters_equals_one_pass_per_row(tiny_bert: Path) -> None:
    models = held(*(build(tiny_bert, family, seed) for seed, family in enumerate((LORA, IA3, PROMPT, P_TUNING))))
    tok = tokenizer(tiny_bert)
    rows = rows_for(list(models))
    want = per_row(models, tok, rows)
    # the reference is not trivially equal: the adapters (heads included) disagree on the same text
    firsts = {tuple(np.round(want[i], 4)) for i, row in enumerate(rows) if row[1] == TEXTS[0]}
    assert len(firsts) > 3
    everything = tuple(n for n in models if n != "p6")
    expected = {"one": [mixed.Pass(everything, mixed.GATHERED), mixed.Pass(("p6",), mixed.ALONE)],
                "tokens": [mixed.Pass(tuple(LORA) + tuple(IA3), mixed.GATHERED),
                           mixed.Pass(("p4", "p4-b") + tuple(P_TUNING), mixed.GATHERED), mixed.Pass(("p6",), mixed.ALONE)],
                "method": [mixed.Pass(tuple(LORA), mixed.GATHERED), mixed.Pass(tuple(IA3), mixed.GATHERED),
                           mixed.Pass(("p4", "p4-b"), mixed.GATHERED), mixed.Pass(("p6",), mixed.ALONE),
                           mixed.Pass(tuple(P_TUNING), mixed.GATHERED)],
                "adapter": [mixed.Pass((n,), mixed.ALONE) for n in models]}
    for mode, passes in expected.items():
        assert mixed.plan(models, mode=mode) == passes, mode
        np.testing.assert_allclose(run_plan(models, tok, rows, passes), want, atol=1e-5, rtol=0, err_msg=mode)
    # the replaced forwards are gone after the pass: plain passes are peft's own again
    assert not any("forward" in m.__dict__ for model in models.values() for m in model.modules())


def test_a_composite_head_runs_per_adapter_within_the_pass(tiny_bert: Path) -> None:
    models = held(build(tiny_bert, LORA, roberta=True), build(tiny_bert, IA3, seed=1, roberta=True))
    tok = tokenizer(tiny_bert)
    rows = rows_for(list(models))
    passes = mixed.plan(models)  # LoRA and IA3 rows in one pass
    assert passes == [mixed.Pass(tuple(models), mixed.GATHERED)]
    np.testing.assert_allclose(run_plan(models, tok, rows, passes), per_row(models, tok, rows), atol=1e-5, rtol=0)


def test_what_cannot_be_gathered_runs_per_adapter_or_through_peft(tiny_bert: Path) -> None:
    tok = tokenizer(tiny_bert)
    dora = held(tiny_models(tiny_bert, {n: peft.LoraConfig(task_type="SEQ_CLS", r=4, use_dora=True)
                                        for n in ("d", "d-b")}))
    lora = held(build(tiny_bert, LORA, seed=1))
    models = {**dora, **lora}
    passes = mixed.plan(models)
    assert passes == [mixed.Pass(tuple(LORA), mixed.GATHERED), mixed.Pass(("d",), mixed.ALONE),
                      mixed.Pass(("d-b",), mixed.ALONE)]
    rows = rows_for(list(models))
    np.testing.assert_allclose(run_plan(models, tok, rows, passes), per_row(models, tok, rows), atol=1e-5, rtol=0)
    # An adapter with a LoRA embedding layer beside gatherable ones in the same PeftModel: it runs alone, and the
    # gathered pass is not changed by its layer even when it was the active adapter.
    beside = held(tiny_models(tiny_bert, {**{n: make() for n, make in LORA.items()},
                                          "e": peft.LoraConfig(task_type="SEQ_CLS", r=4,
                                                               target_modules=["query", "word_embeddings"])}))
    passes = mixed.plan(beside)
    assert passes == [mixed.Pass(tuple(LORA), mixed.GATHERED), mixed.Pass(("e",), mixed.ALONE)]
    rows = rows_for(list(beside))
    want = per_row(beside, tok, rows)
    beside["e"].set_adapter("e")
    np.testing.assert_allclose(run_plan(beside, tok, rows, passes), want, atol=1e-5, rtol=0)
    # A LoRA embedding layer is not gathered: peft's adapter_names where the method allows it, else one per adapter.
    embedded = held(tiny_models(tiny_bert, {n: peft.LoraConfig(task_type="SEQ_CLS", r=4,
                                                                target_modules=["query", "word_embeddings"])
                                            for n in ("e", "e-b")}))
    assert mixed.plan(embedded, peft_mixes=lambda model: True) == [mixed.Pass(("e", "e-b"), mixed.PEFT)]
    assert len(mixed.plan(embedded)) == 2
    rows = rows_for(list(embedded))
    np.testing.assert_allclose(run_plan(embedded, tok, rows, mixed.plan(embedded, peft_mixes=lambda model: True)),
                               per_row(embedded, tok, rows), atol=1e-5, rtol=0)
