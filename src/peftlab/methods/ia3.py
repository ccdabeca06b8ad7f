"""IA3: learned vectors that rescale keys, values and feed-forward activations."""

from __future__ import annotations

from typing import Any

from peftlab.methods.space import LogFloat, Parameter

# IA3 learns rescaling vectors initialised at 1: it needs large steps to move them.
# Upper end raised 3x: docs/benchmarks.md section 3's study chose 3.6e-2, at the top of the former range (1e-3 to 5e-2).
SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 1e-3, 1.5e-1, "Peak learning rate (log scale)."),
)


def build(method_config: Any, context: Any) -> Any:
    from peft import IA3Config

    return IA3Config(task_type=context.task_type, target_modules=method_config.target_modules,
                     feedforward_modules=method_config.feedforward_modules)
