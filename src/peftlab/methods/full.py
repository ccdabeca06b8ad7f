"""Full fine-tuning: no adapter; every weight of the base model and the head is trained."""

from __future__ import annotations

from typing import Any

from peftlab.methods.space import LogFloat, Parameter

# Every weight moves, so the stable range sits an order of magnitude below the adapters'.
SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 1e-5, 2e-4, "Peak learning rate (log scale)."),
)


def build(method_config: Any, context: Any) -> None:
    """Full fine-tuning has no peft config."""
    return None
