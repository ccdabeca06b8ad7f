"""Prompt-learning methods: virtual tokens (prompt tuning, p-tuning) or per-layer prefixes."""

from __future__ import annotations

from typing import Any

from peftlab.methods.space import Choice, LogFloat, Parameter

_TOKENS = Choice("num_virtual_tokens", (10, 20, 40), "Virtual tokens prepended to every input.")

# Prompt learning trains a few embeddings from scratch: its learning rates are 10-100x LoRA's.
# Upper end raised 3x: docs/benchmarks.md section 3's study chose 2.8e-1, at the top of the former range (3e-3 to 3e-1).
PROMPT_TUNING_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 3e-3, 9e-1, "Peak learning rate (log scale)."), _TOKENS)
PREFIX_TUNING_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 1e-3, 5e-2, "Peak learning rate (log scale)."), _TOKENS)
# Measured (docs/benchmarks.md section 3): widening this to 1e-5 found nothing below 1e-4 (1.6e-5: the
# majority-class floor); p-tuning's results vary more between two draws of 4 trials than across this range.
P_TUNING_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 1e-4, 1e-2, "Peak learning rate (log scale)."), _TOKENS)


def num_virtual_tokens(method_config: Any, context: Any) -> int:
    """The configured count, else the init text's token count (TEXT init) or 20."""
    if method_config.num_virtual_tokens:
        return int(method_config.num_virtual_tokens)
    if method_config.init == "TEXT" and context.tokenizer is not None:
        # Counted as peft tokenizes the init text (special tokens included): with a tokenizer that adds
        # BOS, a count without it would make peft cut the text's last token.
        return len(context.tokenizer(method_config.init_text)["input_ids"])
    return 20


def build_prompt_tuning(method_config: Any, context: Any) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    kwargs: dict[str, Any] = {}
    if method_config.init == "TEXT":
        # peft loads the tokenizer from this path to embed the init text; it must be a local folder here.
        kwargs = {"prompt_tuning_init": PromptTuningInit.TEXT, "prompt_tuning_init_text": method_config.init_text,
                  "tokenizer_name_or_path": context.tokenizer_path}
    else:
        kwargs = {"prompt_tuning_init": PromptTuningInit.RANDOM}
    return PromptTuningConfig(task_type=context.task_type,
                              num_virtual_tokens=num_virtual_tokens(method_config, context), **kwargs)


def build_prefix_tuning(method_config: Any, context: Any) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=context.task_type, num_virtual_tokens=method_config.num_virtual_tokens,
                              prefix_projection=method_config.prefix_projection)


def build_p_tuning(method_config: Any, context: Any) -> Any:
    """P-tuning: virtual tokens produced by a small prompt encoder (MLP or LSTM) that trains with them.

    Default learning rate 1e-3, provisional: two studies under docs/benchmarks.md section 3's budget disagreed
    (4 trials each: one chose 1.4e-4, test macro F1 0.278; the other 5.6e-3, 0.424), so the first-round default
    stays until a larger study settles it.
    """
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type=context.task_type, num_virtual_tokens=method_config.num_virtual_tokens,
                               encoder_hidden_size=method_config.encoder_hidden_size,
                               encoder_reparameterization_type=method_config.encoder_type)
