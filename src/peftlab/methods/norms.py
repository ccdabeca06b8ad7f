"""LN tuning: only the layer norms train (as an adapter: peft keeps a trainable copy of each norm)."""

from __future__ import annotations

from typing import Any

from peftlab.methods.space import LogFloat, Parameter

SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 1e-4, 1e-2, "Peak learning rate (log scale)."),
)

# peft's LN-tuning map (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING) has no BERT-likes; they all name
# their norms LayerNorm (embeddings, attention output, layer output).
_BERT_NORMS = ["LayerNorm"]


def build(method_config: Any, context: Any) -> Any:
    """LN tuning (Qi et al. 2022): the norms' scale and shift train, every other weight is frozen.

    Default learning rate 1e-3, tuned (docs/methods.md: the study kept it). It was first chosen without a source:
    peft's MetaMathQA run at the default 1e-4 (ln_tuning/llama-3.2-3B-default) scored 0% test accuracy, and 1e-3 is
    IA3's range (both train per-feature vectors).
    """
    from peft import LNTuningConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as KNOWN

    targets = method_config.target_modules
    if targets is None and context.model_type not in KNOWN:
        targets = list(_BERT_NORMS)
    return LNTuningConfig(task_type=context.task_type, target_modules=targets)
