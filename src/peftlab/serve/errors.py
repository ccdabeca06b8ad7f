"""The server's error types: each is one HTTP status (see :func:`peftlab.serve.schemas.as_api_error`)."""

from __future__ import annotations

from peftlab.errors import AdapterError, PeftlabError


class InvalidAdapterNameError(AdapterError):
    """An adapter name that is not a plain name (path separators, '..', a leading dot, odd characters)."""


class UnknownAdapterError(AdapterError):
    """No adapter of that name is registered."""


class AdapterUnavailableError(AdapterError):
    """The adapter is registered but failed to load."""


class InvalidAdapterError(AdapterUnavailableError):
    """The adapter's files are unusable: damaged, pickle without opt-in, or weights that do not fit its config/base."""


class TextError(PeftlabError):
    """One text of a request cannot be classified (empty after cleaning, or the tokenizer/model failed on it).

    Attributes:
        index: the text's position within its request, once :class:`~peftlab.serve.batching.BatchQueue` knows it (else its batch row).
    """

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


class WrongTaskError(AdapterError):
    """The adapter exists but serves another task (a classifier asked to generate, or the reverse)."""


class NotReadyError(PeftlabError):
    """The base model is still loading (or failed to load)."""
