"""Whole-model methods: full fine-tuning (every weight trains) and BitFit (only the bias terms and the head).

Neither has a peft config; both are saved as a whole model folder that plain transformers loads.
"""

from __future__ import annotations

from typing import Any

from peftlab.errors import MethodError
from peftlab.methods.space import LogFloat, Parameter

# Every weight moves, so the stable range sits an order of magnitude below the adapters'.
SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 1e-5, 2e-4, "Peak learning rate (log scale)."),
)
# BitFit's paper searched 1e-4 to 1e-3 on BERT (Ben Zaken et al. 2022); the space reaches a little beyond.
BITFIT_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 1e-4, 5e-3, "Peak learning rate (log scale)."),
)

# The classifier head's module names, as peft lists them for SEQ_CLS (peft_model.py: classifier_module_names).
HEAD_MODULES = ("classifier", "score")


def build(method_config: Any, context: Any) -> None:
    """Full fine-tuning and BitFit have no peft config."""
    return None


def train_everything(model: Any, method_config: Any, context: Any) -> Any:
    """Full fine-tuning: every parameter trains."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def train_biases(model: Any, method_config: Any, context: Any) -> Any:
    """BitFit: the bias terms train, and for a classifier its new head; every other weight is frozen.

    Default learning rate 1.2e-3, tuned (docs/methods.md). The study started from 1e-3, the top of the range the
    BitFit paper searched on BERT (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning");
    `peftlab tune` replaces it.

    Raises:
        MethodError: the model has no bias terms (Llama-likes have none), so BitFit would train nothing but a head.
    """
    classify = context.task != "causal-lm"
    head = [name for name in HEAD_MODULES if classify and hasattr(model, name)]
    biases = 0
    for name, parameter in model.named_parameters():
        is_bias = name == "bias" or name.endswith(".bias")
        in_head = any(name == h or name.startswith(h + ".") for h in head)
        parameter.requires_grad_(is_bias or in_head)
        biases += int(is_bias and not in_head)
    if not biases:
        raise MethodError(f"method {method_config.run_name!r} (bitfit) cannot be applied to this {context.model_type} "
                          f"model: it has no bias terms, so BitFit would train "
                          f"{'only the classifier head' if head else 'nothing'}. Choose another method (e.g. lora)")
    return model
