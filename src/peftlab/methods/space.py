"""Search spaces: what `peftlab tune` may vary for a method, declared next to the method's builder.

Each method module exports ``SEARCH_SPACE``: a tuple of :class:`LogFloat` / :class:`Choice` parameters, each
named after the method config field it sets and carrying a one-line description (shown in the tune report).
``tune.search.<method>.<param>`` in the config narrows or widens a range, or replaces a list of choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LogFloat:
    """A float searched on a log scale between ``low`` and ``high`` (both included)."""

    name: str
    low: float
    high: float
    description: str

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError(f"{self.name}: need 0 < low <= high, got low {self.low}, high {self.high}")


@dataclass(frozen=True)
class Choice:
    """One of a few values. ``config_values`` maps a choice's name to the config value it sets (default: itself)."""

    name: str
    choices: tuple[Any, ...]
    description: str
    config_values: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"{self.name}: a choice needs at least one value")

    def to_config(self, choice: Any) -> Any:
        """The value the method config gets for ``choice``."""
        return self.config_values.get(choice, choice)

    def from_config(self, value: Any) -> Any:
        """The choice that sets ``value`` (None when no choice does)."""
        for choice in self.choices:
            if self.to_config(choice) == value:
                return choice
        return None


Parameter = LogFloat | Choice

# "attention": peft's per-architecture default, which adapts attention projections only (query/value for
# BERT-likes, q_proj/v_proj for Llama-likes); "all-linear": every linear layer but the head.
TARGETS = Choice("target_modules", ("attention", "all-linear"),
                 "Layers to adapt: attention only (peft's default for the architecture) or every linear layer.",
                 config_values={"attention": None})
