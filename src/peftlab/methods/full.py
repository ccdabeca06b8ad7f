"""Full fine-tuning: no adapter; every weight of the base model and the head is trained."""

from __future__ import annotations

from typing import Any


def build(method_config: Any, context: Any) -> None:
    """Full fine-tuning has no peft config."""
    return None
