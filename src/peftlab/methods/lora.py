"""LoRA and its relatives (rsLoRA, DoRA, LoHa, LoKr, AdaLoRA): low-rank updates of chosen linear layers."""

from __future__ import annotations

import tempfile
import weakref
from pathlib import Path
from typing import Any

from peftlab import artifacts
from peftlab.methods.space import TARGETS, Choice, LogFloat, Parameter

_RANK = Choice("r", (4, 8, 16), "Rank of the update matrices (the update is scaled by alpha / r).")
_LR = LogFloat("learning_rate", 1e-4, 5e-3, "Peak learning rate (log scale).")

SEARCH_SPACE: tuple[Parameter, ...] = (_LR, _RANK, TARGETS)  # LoRA and DoRA
# Upper end raised 3x: docs/benchmarks.md section 3's study chose 4.7e-3, at the top of the former range (1e-4 to 5e-3).
LOHA_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 1e-4, 1.5e-2, "Peak learning rate (log scale)."), _RANK, TARGETS)
# rsLoRA's point is that ranks far above LoRA's keep learning (alpha / sqrt(r) does not shrink the update).
RSLORA_SEARCH_SPACE: tuple[Parameter, ...] = (
    _LR, Choice("r", (16, 32, 64), "Rank of the update matrices (the update is scaled by alpha / sqrt(r))."), TARGETS)
# Upper end raised 3x: docs/benchmarks.md section 3's study chose 8.1e-3, at the top of the former range (5e-4 to 1e-2).
LOKR_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 5e-4, 3e-2, "Peak learning rate (log scale)."), _RANK, TARGETS)
# AdaLoRA prunes from init_r (default 12) down to r: a target rank above init_r would prune nothing.
ADALORA_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 2e-4, 1e-2, "Peak learning rate (log scale)."),
    Choice("r", (4, 8), "Average target rank after pruning (below init_r)."),
    TARGETS,
)

# target_modules None lets peft pick per architecture (query/value for BERT/XLM-R, q_proj/v_proj for Llama).

# The `init` option as peft's init_lora_weights. PiSSA and OLoRA move part of each target weight into A and B.
INIT_LORA_WEIGHTS: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
MUTATING_INITS = {"pissa", "olora"}
# The adapter's tensors right after a PiSSA/OLoRA initialisation, per model: the save converts against them.
_INITIAL: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def build_lora(method_config: Any, context: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type=context.task_type, r=method_config.r, lora_alpha=method_config.alpha,
                      lora_dropout=method_config.dropout, target_modules=method_config.target_modules,
                      use_rslora=method_config.use_rslora, init_lora_weights=INIT_LORA_WEIGHTS[method_config.init])


def build_rslora(method_config: Any, context: Any) -> Any:
    """rsLoRA: LoRA with ``use_rslora`` (scaling alpha / sqrt(r)); r 64, alpha 64 as peft's MetaMathQA run.

    Default learning rate 5e-4, tuned (docs/methods.md: the study kept it). It started as LoRA's; peft's method
    comparison (method_comparison/MetaMathQA, lora/llama-3.2-3B-rank64-rslora) trains rsLoRA r64 at the same
    learning rate as LoRA r32 (1e-4 there).
    """
    from peft import LoraConfig

    return LoraConfig(task_type=context.task_type, r=method_config.r, lora_alpha=method_config.alpha,
                      lora_dropout=method_config.dropout, target_modules=method_config.target_modules,
                      use_rslora=True, init_lora_weights=INIT_LORA_WEIGHTS[method_config.init])


def build_dora(method_config: Any, context: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(task_type=context.task_type, r=method_config.r, lora_alpha=method_config.alpha,
                      lora_dropout=method_config.dropout, target_modules=method_config.target_modules, use_dora=True)


def build_loha(method_config: Any, context: Any) -> Any:
    from peft import LoHaConfig

    return LoHaConfig(task_type=context.task_type, r=method_config.r, alpha=method_config.alpha,
                      module_dropout=method_config.dropout, target_modules=method_config.target_modules)


def build_lokr(method_config: Any, context: Any) -> Any:
    """LoKr (LyCORIS): a Kronecker product of a small full factor and a low-rank one.

    Default learning rate 8.1e-3, tuned (docs/methods.md); alpha = 2r. The study started from 3e-3: peft's method
    comparison (method_comparison/MetaMathQA, lokr/llama-3.2-3B-rank32-factor4-lr0.003: r 32, alpha 64, lr 3e-3).
    """
    from peft import LoKrConfig

    return LoKrConfig(task_type=context.task_type, r=method_config.r, alpha=method_config.alpha,
                      module_dropout=method_config.dropout, decompose_factor=method_config.decompose_factor,
                      target_modules=method_config.target_modules)


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


def remember_initial_adapter(model: Any) -> None:
    """Keep a PiSSA/OLoRA adapter's starting tensors (rank-r, a few MB at most) for :func:`save_converted`."""
    from peft import get_peft_model_state_dict

    _INITIAL[model] = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def initial_adapter(model: Any) -> dict[str, Any] | None:
    """The starting tensors :func:`remember_initial_adapter` kept for ``model``, or None."""
    return _INITIAL.get(model)


def save_converted(model: Any, folder: Path, initial: dict[str, Any]) -> None:
    """Save a PiSSA/OLoRA adapter as the plain LoRA that gives the same outputs on the unchanged base.

    PiSSA and OLoRA subtract A0 B0 from the base weights; saved as is, the adapter would need that residual
    base. peft's ``path_initial_model_for_weight_conversion`` writes dW = A B - A0 B0 instead, as a rank-2r LoRA
    ([A | A0], [B | -B0]) on the original weights. peft 0.21.2 then writes only the lora_A / lora_B tensors, so a
    classifier's head (modules_to_save) would be lost and the folder would not load: it is put back here.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "initial"  # peft loads it as an adapter of that name, then deletes it
        start.mkdir()
        save_file(initial, str(start / artifacts.ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
        model.save_pretrained(str(folder), safe_serialization=True,
                              path_initial_model_for_weight_conversion=str(start))
    weights = folder / artifacts.ADAPTER_WEIGHTS_FILE
    converted = load_file(str(weights))
    for key, tensor in get_peft_model_state_dict(model).items():
        if "lora_A" not in key and "lora_B" not in key:
            converted.setdefault(key, tensor.detach().contiguous())
    save_file(converted, str(weights), metadata={"format": "pt"})
