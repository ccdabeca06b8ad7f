"""The server's model API: :class:`AdapterRegistry`, the adapter store that also classifies and generates.

What each part does lives in its own module: :mod:`~peftlab.serve.discovery` finds the adapter folders,
:mod:`~peftlab.serve.store` loads them over the one shared base model, :mod:`~peftlab.serve.inference` runs
them. The HTTP app holds one registry and gives its :meth:`~AdapterRegistry.classify` to the batch queue.
"""

from __future__ import annotations

from typing import Any, Sequence

from peftlab.serve import inference
from peftlab.serve.store import AdapterStore

__all__ = ["AdapterRegistry"]


class AdapterRegistry(AdapterStore):
    """Registered adapters over one shared base model, with inference; arguments as :class:`AdapterStore`."""

    def classify(self, rows: Sequence[tuple[str, str]]) -> list[dict[str, Any] | Exception]:
        """See :func:`peftlab.serve.inference.classify`."""
        return inference.classify(self, rows)

    def generate(self, name: str, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """See :func:`peftlab.serve.inference.generate`."""
        return inference.generate(self, name, prompts, max_new_tokens)
