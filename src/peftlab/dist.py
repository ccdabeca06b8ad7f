"""Distributed runs: the one answer to "am I the main process?" (the process that writes files)."""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    """True on the global main process under ``torchrun`` / ``accelerate launch``, and in a single-process run.

    Once accelerate's state exists (the Trainer creates it) its answer is used: it is the one the Trainer
    itself follows. Before that, ``RANK`` is what both launchers set for every process.
    """
    # Looked up in sys.modules, not imported: importing accelerate (and torch) only to learn that nothing
    # is distributed would cost seconds for the CLI's light commands.
    state = sys.modules.get("accelerate.state")
    if state is not None and state.PartialState._shared_state:
        return bool(state.PartialState().is_main_process)
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by torchrun and accelerate launch); 1 alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))
