"""IA3: learned vectors that rescale keys, values and feed-forward activations."""

from __future__ import annotations

from typing import Any


def build(method_config: Any, context: Any) -> Any:
    from peft import IA3Config

    return IA3Config(task_type=context.task_type, target_modules=method_config.target_modules,
                     feedforward_modules=method_config.feedforward_modules)
