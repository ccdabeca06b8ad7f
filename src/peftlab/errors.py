"""Typed errors. The library raises these; only ``cli.py`` turns them into exit codes.

Every message says what was wrong, where (file / row / column / key) and how to fix it.
"""

from __future__ import annotations


class PeftlabError(Exception):
    """Base class for every error peftlab raises on purpose.

    Attributes:
        exit_code: the CLI exit code (1 for bad input, 2 for bad usage).
    """

    exit_code: int = 1


class ConfigError(PeftlabError):
    """The experiment config (YAML, overrides or flags) is invalid."""

    exit_code = 2


class DataError(PeftlabError):
    """The data cannot be loaded or leaves nothing to train on."""


class ModelError(PeftlabError):
    """A model folder or alias is missing, incomplete or unsafe to load."""


class MethodError(PeftlabError):
    """A fine-tuning method cannot be applied to this model or task."""


class RunDirError(PeftlabError):
    """The run directory exists (and would be overwritten) or is not a run."""

    exit_code = 2


class FilesystemError(PeftlabError):
    """A path cannot be read or written (a file where a folder is expected, read-only, no space, removed)."""


class AdapterError(PeftlabError):
    """An adapter folder is missing, unknown or does not match its base model."""
