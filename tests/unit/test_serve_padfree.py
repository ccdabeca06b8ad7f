"""Padding-free linear layers for a forward pass (peftlab.serve.padfree) on a tiny random BERT (offline, seconds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from peftlab.serve.padfree import Tokens, padding_free  # noqa: E402

TEXTS = ["ok", "the movie was great", "the film was really quite boring and the acting was weak"]


def classifier(base: Path, config: Any = None) -> Any:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=3)
    if config is not None:
        model = peft.get_peft_model(model, config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name or "prompt_encoder" in name:
                    parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def batch(base: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(str(base))(TEXTS, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("config", [None, "lora", "prompt"], ids=["plain", "lora", "prompt-tuning"])
def test_a_padded_batch_gives_what_it_gives_with_the_padding_computed(tiny_bert: Path, config: str | None) -> None:
    made = {None: None, "lora": peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
            "prompt": peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3, inference_mode=True)}[config]
    model = classifier(tiny_bert, made)
    inputs = batch(tiny_bert)
    assert not inputs["attention_mask"].all()  # the texts differ in length: there is padding to leave out
    tree = model.get_base_model() if config else model
    query = tree.bert.encoder.layer[0].attention.self.query
    query = getattr(query, "base_layer", query)
    seen: list[Any] = []
    query.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.inference_mode():
        want = model(**inputs).logits
        with padding_free(tree) as tokens:
            got = model(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # The pass skipped the padding: the layer's outputs there are zeros (its bias otherwise), the rest as before.
    mask = torch.cat([torch.ones(len(TEXTS), 3), inputs["attention_mask"]], 1) if config == "prompt" \
        else inputs["attention_mask"]
    assert tokens.shape == tuple(mask.shape)
    real = mask.bool()
    assert seen[0][~real].abs().max() > 0 and seen[1][~real].abs().max() == 0
    torch.testing.assert_close(seen[1][real], seen[0][real], atol=1e-6, rtol=0)


def test_the_forwards_are_only_there_for_the_pass(tiny_bert: Path) -> None:
    model = classifier(tiny_bert, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    tree = model.get_base_model()
    linears = [m for m in tree.modules() if type(m) is torch.nn.Linear]
    hooked = tree.bert.encoder.layer[0].output.dense
    hooked.forward = lambda x: torch.nn.functional.linear(x, hooked.weight, hooked.bias)  # someone else's forward
    theirs = hooked.forward
    cache: dict[Any, Any] = {}
    with pytest.raises(RuntimeError, match="boom"), padding_free(tree, cache):
        replaced = [m for m in linears if "forward" in m.__dict__]
        raise RuntimeError("boom")
    own = [forward.module for forward in cache["linears", id(tree)]]
    # The model's own layers (query's base layer, not LoRA's A and B); the one with a forward of its own kept it.
    query = tree.bert.encoder.layer[0].attention.self.query
    assert query.base_layer in own and not any(m is query.lora_A["default"] for m in own)
    assert hooked.forward is theirs and set(map(id, replaced)) == {id(m) for m in own if m is not hooked} | {id(hooked)}
    assert all("forward" not in m.__dict__ for m in linears if m is not hooked)
    assert not tree._forward_pre_hooks


def test_no_padding_or_no_mask_is_a_plain_pass() -> None:
    tokens = Tokens()
    tokens.set(torch.ones(2, 5, dtype=torch.long))
    assert tokens.shape is None
    tokens.set(None)
    assert tokens.shape is None
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 5, 4)
    tokens.set(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert tokens.shape == (2, 5)
    out = tokens.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(out[0, :3], layer(x)[0, :3])
    torch.testing.assert_close(out[1], layer(x)[1])
    assert out[0, 3:].abs().max() == 0
    torch.testing.assert_close(tokens.linear(x[:, 0], layer.weight, layer.bias), layer(x[:, 0]))  # another layout: every row
