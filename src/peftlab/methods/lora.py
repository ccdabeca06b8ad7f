"""LoRA and its relatives (DoRA, LoHa, AdaLoRA): low-rank updates of chosen linear layers."""

from __future__ import annotations

from typing import Any

from peftlab.methods.space import TARGETS, Choice, LogFloat, Parameter

_RANK = Choice("r", (4, 8, 16), "Rank of the update matrices (the update is scaled by alpha / r).")
_LR = LogFloat("learning_rate", 1e-4, 5e-3, "Peak learning rate (log scale).")

SEARCH_SPACE: tuple[Parameter, ...] = (_LR, _RANK, TARGETS)  # LoRA and DoRA
LOHA_SEARCH_SPACE: tuple[Parameter, ...] = (_LR, _RANK, TARGETS)
# AdaLoRA prunes from init_r (default 12) down to r: a target rank above init_r would prune nothing.
ADALORA_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 2e-4, 1e-2, "Peak learning rate (log scale)."),
    Choice("r", (4, 8), "Average target rank after pruning (below init_r)."),
    TARGETS,
)

# target_modules None lets peft pick per architecture (query/value for BERT/XLM-R, q_proj/v_proj for Llama).


def build_lora(method_config: Any, context: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type=context.task_type, r=method_config.r, lora_alpha=method_config.alpha,
                      lora_dropout=method_config.dropout, target_modules=method_config.target_modules,
                      use_rslora=method_config.use_rslora)


def build_dora(method_config: Any, context: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type=context.task_type, r=method_config.r, lora_alpha=method_config.alpha,
                      lora_dropout=method_config.dropout, target_modules=method_config.target_modules, use_dora=True)


def build_loha(method_config: Any, context: Any) -> Any:
    from peft import LoHaConfig

    return LoHaConfig(task_type=context.task_type, r=method_config.r, alpha=method_config.alpha,
                      module_dropout=method_config.dropout, target_modules=method_config.target_modules)


def build_adalora(method_config: Any, context: Any) -> Any:
    from peft import AdaLoraConfig

    # AdaLoRA prunes ranks on a step schedule, so it must know the run's length up front.
    total = max(context.total_steps, 3)
    tinit = int(total * method_config.tinit_fraction)
    tfinal = int(total * method_config.tfinal_fraction)
    if tinit >= total - tfinal:
        tinit, tfinal = 0, 0
    return AdaLoraConfig(task_type=context.task_type, init_r=method_config.init_r, target_r=method_config.r,
                         lora_alpha=method_config.alpha, lora_dropout=method_config.dropout,
                         target_modules=method_config.target_modules, total_step=total, tinit=tinit, tfinal=tfinal,
                         deltaT=max(1, (total - tinit - tfinal) // 10))
