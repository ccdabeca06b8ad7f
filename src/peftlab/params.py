"""Trainable parameters by part: adapter weights, classifier head (``modules_to_save``), prompt, other.

"74.9K trainable" hides the split users ask about: how much is LoRA and how much the classifier head that
peft trains beside it. The split is read from peft's own module types, never from parameter names:

- adapter: every parameter of a peft tuner layer (``BaseTunerLayer``) that is not in its wrapped
  ``base_layer``. A LoRA-wrapped ``Linear`` keeps the frozen base weight inside it; counting that weight as
  "LoRA parameters" is the mistake that reports 15% instead of well under 1%.
- head: the trainable copy inside peft's ``ModulesToSaveWrapper`` (its ``original_module`` is the frozen
  base copy, which is base, not head), or the model's own ``classifier`` / ``score`` module when nothing wraps
  it (full fine-tuning).
- prompt: the prompt-learning ``prompt_encoder`` (virtual-token embeddings, prefix MLP, p-tuning encoder).
- other: any trainable parameter left (full fine-tuning: the base model's own weights; LoRA ``bias: all``).

The base model's size, the denominator of every percentage, is every parameter the method did not add.
"""

from __future__ import annotations

from typing import Any

from peftlab.results import ParameterParts

# The names peft gives a sequence-classification head when it adds it to modules_to_save (peft_model.py).
HEAD_NAMES = ("classifier", "score")


def parameter_parts(model: Any) -> ParameterParts:
    """Count ``model``'s trainable parameters by part (see the module docstring).

    Args:
        model: a transformers model (full fine-tuning) or a ``peft.PeftModel``.

    Returns:
        The counts; ``trainable`` equals the number of parameters with ``requires_grad``.
    """
    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    adapter: set[int] = set()
    head: set[int] = set()
    prompt: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            wrapped = {id(p) for p in module.get_base_layer().parameters()}
            adapter |= {id(p) for p in module.parameters() if id(p) not in wrapped}
        elif isinstance(module, ModulesToSaveWrapper):
            head |= {id(p) for p in module.modules_to_save.parameters()}
    added = adapter | head  # what the method put into the model; the base model is the rest
    encoder = getattr(model, "prompt_encoder", None) if isinstance(model, PeftModel) else None
    if isinstance(encoder, torch.nn.Module):  # prompt learning only; a ModuleDict of one encoder per adapter
        prompt = {id(p) for p in encoder.parameters()}
        added |= prompt
    transformers_model = model.get_base_model() if isinstance(model, PeftModel) else model
    for name in HEAD_NAMES:  # a head nothing wraps (full fine-tuning) is still the head
        module = getattr(transformers_model, name, None)
        if module is not None and not isinstance(module, ModulesToSaveWrapper) and hasattr(module, "parameters"):
            head |= {id(p) for p in module.parameters() if id(p) not in added}

    parts = ParameterParts()
    for parameter in model.parameters():  # each tensor once (tied weights are one tensor)
        count = _numel(parameter)
        key = id(parameter)
        if key not in added:
            parts.base += count
        if not parameter.requires_grad:
            continue
        if key in adapter:
            parts.adapter += count
        elif key in prompt:
            parts.prompt += count
        elif key in head:
            parts.head += count
        else:
            parts.other += count
    return parts


def _numel(parameter: Any) -> int:
    """Elements of ``parameter``; a bitsandbytes 4-bit tensor packs two per byte (as peft counts it)."""
    count = parameter.numel()
    if parameter.__class__.__name__ == "Params4bit":
        count *= 2 * (parameter.element_size() if hasattr(parameter, "element_size") else 1)
    return int(count)
