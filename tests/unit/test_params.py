"""Trainable parameters by part on a tiny random BERT, against counts made by hand from its shapes."""

from __future__ import annotations

import pytest

from peftlab.params import parameter_parts
from peftlab.results import ParameterParts, RunResult

HIDDEN, LAYERS, INTERMEDIATE, LABELS = 32, 2, 37, 3
HEAD = HIDDEN * LABELS + LABELS  # classifier Linear(32 -> 3): weight and bias


def tiny_classifier() -> object:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=INTERMEDIATE, max_position_embeddings=64, num_labels=LABELS))


@pytest.fixture(scope="module")
def base_count() -> int:
    return sum(p.numel() for p in tiny_classifier().parameters())


def trainable(model: object) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # type: ignore[attr-defined]


def test_lora_counts_only_a_and_b_never_the_frozen_weight_it_wraps(base_count: int) -> None:
    from peft import LoraConfig, get_peft_model

    r = 4
    model = get_peft_model(tiny_classifier(), LoraConfig(task_type="SEQ_CLS", r=r, target_modules=["query", "value"]))
    parts = parameter_parts(model)
    # Per wrapped Linear(32 -> 32): A is r x in, B is out x r. Two per layer (query, value), two layers.
    assert parts.adapter == LAYERS * 2 * r * (HIDDEN + HIDDEN) == 1024
    # peft copies the classifier into modules_to_save: the trainable copy is the head, the frozen original base.
    assert parts.head == HEAD and parts.prompt == 0 and parts.other == 0
    assert parts.base == base_count
    assert parts.trainable == trainable(model) == model.get_nb_trainable_parameters()[0]
    # The notebook mistake: everything inside a LoRA-wrapped layer counted as LoRA (base weights included).
    wrapped = sum(p.numel() for n, p in model.named_parameters() if ".query." in n or ".value." in n)
    assert wrapped == parts.adapter + LAYERS * 2 * (HIDDEN * HIDDEN + HIDDEN)  # + the frozen weights and biases
    assert parts.pct(parts.adapter) == pytest.approx(100 * 1024 / base_count)


def test_ia3_vectors_are_sized_by_out_or_in_features(base_count: int) -> None:
    from peft import IA3Config, get_peft_model

    ffn_output = r".*layer\.\d+\.output\.dense"  # the FFN's Linear(37 -> 32), not attention.output.dense
    config = IA3Config(task_type="SEQ_CLS", target_modules=rf"(.*\.value)|({ffn_output})",
                       feedforward_modules=ffn_output)
    parts = parameter_parts(get_peft_model(tiny_classifier(), config))
    # value: one scale per output feature (32); a feed-forward module scales its input (37).
    assert parts.adapter == LAYERS * (HIDDEN + INTERMEDIATE) == 138
    assert (parts.head, parts.prompt, parts.other, parts.base) == (HEAD, 0, 0, base_count)


def test_prompt_tuning_counts_virtual_tokens_and_head(base_count: int) -> None:
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(tiny_classifier(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5))
    parts = parameter_parts(model)
    assert parts.prompt == 5 * HIDDEN  # one embedding row per virtual token
    assert (parts.adapter, parts.head, parts.other, parts.base) == (0, HEAD, 0, base_count)
    assert parts.trainable == trainable(model)


def test_full_fine_tuning_is_head_plus_the_base_weights(base_count: int) -> None:
    parts = parameter_parts(tiny_classifier())
    assert (parts.adapter, parts.head, parts.prompt) == (0, HEAD, 0)
    assert parts.other == base_count - HEAD and parts.base == base_count


def test_results_without_parts_still_load() -> None:
    old = RunResult.from_dict({"name": "lora", "method": "lora", "task": "classification"})
    assert old.parameter_parts is None
    new = RunResult.from_dict({"name": "lora", "method": "lora", "task": "classification",
                               "parameter_parts": {"adapter": 3, "head": 1, "prompt": 0, "other": 0, "base": 100}})
    assert new.parameter_parts == ParameterParts(adapter=3, head=1, base=100) and new.parameter_parts.trainable == 4
