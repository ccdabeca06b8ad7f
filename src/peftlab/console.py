"""The terminal: the third-party output peftlab silences (each with its reason) and the live training display.

The CLI and each method's child process (``peftlab.worker``) call :func:`quiet_third_party` once at start, so
both print the same: peftlab's own log lines, one live display per method while it trains, the results.
``--verbose`` brings back HF's dict logs, the loading bars and transformers' logs.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any

# Libraries whose info logs are about their own machinery (a new experiment created, a file locked), not the run.
_NOISY_LOGGERS = ("peft", "accelerate", "datasets", "httpx", "filelock", "optuna", "mlflow")


def quiet_third_party(verbose: bool) -> None:
    """Silence the warnings, bars and logs of other libraries that say nothing about the user's run.

    Args:
        verbose: ``--verbose``: keep the loading bars and transformers' logs; the warnings filtered below stay
            filtered (each is known not to concern the run), and so do the info logs of the libraries above.
    """
    # peft (0.21.2, PeftModel.__init__) reads transformers' deprecated `is_gradient_checkpointing` alias on
    # every PEFT model it builds or loads, and transformers 5.23 warns on each read. The call is peft's, not
    # peftlab's (peftlab asks for `activation_checkpointing`), so there is nothing of ours to fix.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning, module=r"transformers\.modeling_utils")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if verbose:
        return
    # mlflow sets its own logger's level when it is imported (later, and in each method's process): "Creating a
    # new experiment" at INFO on every run. Its environment variable is read then, and a child inherits it.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import transformers

    # A table of newly initialised weights for every classification head, which peftlab creates on purpose.
    transformers.utils.logging.set_verbosity_error()
    # "Loading weights" and "Writing model shards" bars on every load and save (and the hub's bars with them):
    # milliseconds for these models, and under them the live display of the training.
    transformers.utils.logging.disable_progress_bar()


def wants_hf_logs() -> bool:
    """HF's dict logs (``{'eval_loss': ...}``) only under ``--verbose``, which sets peftlab's logger to DEBUG."""
    return logging.getLogger("peftlab").isEnabledFor(logging.DEBUG)


def wants_progress() -> bool:
    """The live display, except under ``--quiet`` (peftlab's logger at WARNING: warnings and errors only)."""
    return logging.getLogger("peftlab").isEnabledFor(logging.INFO)


def training_display(label: str, metric: str, console: Any = None) -> Any:
    """A Trainer callback that shows one rich progress line for a method: epoch, step, loss, validation metric, ETA.

    It replaces the Trainer's nested tqdm bars (training, then one per evaluation). On a terminal the line is
    redrawn in place; elsewhere (a log file, CI) rich prints it once, when training ends. Call ``close()`` when
    ``trainer.train`` raises, so the terminal gets its cursor back.

    Args:
        label: what the line is called (the method's run name, and its seed when there are several).
        metric: the validation metric to show (``f1_macro``, ``loss``, ...).
        console: a ``rich.console.Console`` (default: one on standard error, beside the logs).
    """
    from transformers import TrainerCallback

    class TrainingDisplay(TrainerCallback):
        def __init__(self) -> None:
            self._progress: Any = None
            self._task: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), TextColumn("epoch {task.fields[epoch]}"),
                BarColumn(bar_width=20), TextColumn("step"), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                TextColumn("{task.fields[validation]}"), _time_column(),
                console=console or _stderr_console(), refresh_per_second=4)
            self._progress.start()
            self._task = self._progress.add_task(label, total=state.max_steps or None, completed=state.global_step,
                                                 epoch=self._epoch(state), loss="loss -", validation="")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._update(completed=state.global_step, epoch=self._epoch(state))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self._update(loss=f"loss {logs['loss']:.4f}")

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
            value = (metrics or {}).get(f"eval_{metric}")
            if value is not None:
                self._update(validation=f"val {metric} {value:.4f}")

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.close()

        def close(self) -> None:
            if self._progress is not None:
                done = self._progress.tasks[0].completed  # stopped early (early stopping, a failure): done here
                self._progress.update(self._task, total=max(done, 1))
                self._progress.stop()
                self._progress = None

        def _update(self, **fields: Any) -> None:
            if self._progress is not None:
                self._progress.update(self._task, **fields)

        @staticmethod
        def _epoch(state: Any) -> str:
            # state.epoch is fractional (1.5: halfway through the second epoch; 1.0: the first just ended)
            total = math.ceil(state.num_train_epochs or 1)
            return f"{min(max(1, math.ceil(state.epoch or 0)), total)}/{total}"

    return TrainingDisplay()


def _stderr_console() -> Any:
    """Standard error, beside the logs; off a terminal (a log file, CI) wide enough that the line is never cut."""
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=120)


def _time_column() -> Any:
    """``ETA 0:01:10`` while training, ``took 0:03:20`` once done (rich's own columns show one or the other)."""
    from datetime import timedelta

    from rich.progress import ProgressColumn
    from rich.text import Text

    class TimeColumn(ProgressColumn):
        def render(self, task: Any) -> Any:
            if task.finished:
                return Text(f"took {timedelta(seconds=int(task.finished_time or task.elapsed or 0))}")
            remaining = task.time_remaining
            return Text("ETA -:--:--" if remaining is None else f"ETA {timedelta(seconds=int(remaining))}")

    return TimeColumn()
