"""The run directory: its top-level names, who may write it (a lock), and what --overwrite may delete.

A run directory is only ever replaced or written by peftlab when it can tell the folder is its own:

- ``.peftlab-run`` marks a folder peftlab created (older runs are recognised by ``config.yaml`` +
  ``environment.json``).
- ``--overwrite`` replaces a run only when every entry in it is something peftlab writes; anything
  else (a thesis, photos, notes dropped into the folder) is listed and the run is refused.
- One writer at a time: ``.<name>.lock`` *beside* the run directory (so it survives the move-aside of
  ``--overwrite``) is created in one step (hard link) and holds host, pid and start time. A second writer is refused
  with the holder's name; a lock whose process is gone can be taken over with ``--resume`` or ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from peftlab.artifacts import MODEL_DIR, RESULT_FILE
from peftlab.errors import FilesystemError, PeftlabError, RunDirError

logger = logging.getLogger(__name__)

MARKER = ".peftlab-run"
CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
DATA_REPORT = "data_report.json"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS = "plots"
BASELINE = "base_model.json"  # causal LM: the base model's loss and generations, reused by --resume
TENSORBOARD = "tensorboard"  # training.report_to: event files, one folder per method and seed
MLRUNS = "mlruns"  # training.report_to: the MLflow file store (when MLFLOW_TRACKING_URI names none)
# Everything peftlab writes at the top of a run directory; method folders are recognised by their content.
TOP_LEVEL = {MARKER, CONFIG, ENVIRONMENT, DATA_REPORT, RESULTS_JSON, RESULTS_CSV, REPORT_MD, REPORT_HTML, PLOTS,
             BASELINE, TENSORBOARD, MLRUNS}
# What a method folder may hold (the saved model, its checkpoints, its measurements and predictions).
METHOD_ENTRIES = {MODEL_DIR, "checkpoints", RESULT_FILE, "test_predictions.jsonl", "seeds"}


class RunLockedError(PeftlabError):
    """Another peftlab process holds the run directory."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory, as written in its lock file."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC
    command: str = ""

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}" + (f" ({self.command})" if self.command else "")

    def is_stale(self) -> bool:
        """True when the holder is known to be gone: same host, and its pid is dead (or was reused later)."""
        if self.host != socket.gethostname():
            return False  # another machine's process cannot be checked from here; never assume it is gone
        import psutil

        if not psutil.pid_exists(self.pid):
            return True
        try:
            created = _dt.datetime.fromtimestamp(psutil.Process(self.pid).create_time(), _dt.timezone.utc)
            started = _dt.datetime.fromisoformat(self.started)
        except (psutil.Error, ValueError):
            return False
        return created > started + _dt.timedelta(seconds=2)  # the pid was reused by a newer process


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


def _read_holder(path: Path) -> LockHolder | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(host=str(data["host"]), pid=int(data["pid"]), started=str(data["started"]),
                          command=str(data.get("command", "")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # Half-written (the writer died between create and write) or edited by hand: nobody can be named.
        return LockHolder(host="?", pid=-1, started="?", command="unreadable lock file")


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists, in one step: the content is written to a private file
    first and hard-linked into place, so nobody ever reads a lock that exists but is still empty."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)  # atomic, and fails if path exists (also on NFS, unlike O_EXCL on old clients)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise FilesystemError(f"cannot create the run directory's lock {path}: {exc.strerror}; {path.parent} must "
                              f"be writable. Choose another --output") from None
    finally:
        with contextlib.suppress(OSError):  # absent, or on a read-only filesystem never created
            os.unlink(tmp)


@contextlib.contextmanager
def hold(run_dir: Path, *, takeover: bool) -> Iterator[LockHolder]:
    """Hold the run directory's lock for the duration of the block.

    Args:
        run_dir: the run directory (it need not exist yet).
        takeover: take over a stale lock (its process is gone); a live holder is never taken over.

    Raises:
        RunLockedError: another process holds the lock, or a stale lock exists and ``takeover`` is False.
    """
    path = lock_path(run_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FilesystemError(f"cannot create {path.parent} for the run directory: {exc.strerror}; choose another "
                          f"--output") from None
    me = LockHolder(host=socket.gethostname(), pid=os.getpid(),
                    started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    command=" ".join(["peftlab", *sys.argv[1:]])[:200])
    for _ in range(3):  # a lost race for a stale lock is retried; a live holder is refused at once
        if _create_exclusive(path, json.dumps(asdict(me))):
            break
        holder = _read_holder(path)
        if holder is None:
            continue  # released between our attempt and our read
        if holder.pid == -1 or holder.is_stale():
            if not takeover:
                raise RunLockedError(
                    f"{run_dir} has a lock left by a process that is no longer running ({holder.describe()}). "
                    f"Rerun with --resume to take it over and continue, or --overwrite to replace the run")
            logger.warning("taking over the stale lock of %s (%s)", run_dir, holder.describe())
            # Rename, not unlink: of two processes taking over at once, only one rename succeeds.
            aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(path, aside)
                os.unlink(aside)
            continue
        raise RunLockedError(f"{run_dir} is being written by another peftlab run: {holder.describe()}. Wait for "
                             f"it to finish, or write elsewhere with --output")
    else:
        raise RunLockedError(f"could not take the lock {path}: other processes keep taking it; retry")
    try:
        yield me
    finally:
        if _read_holder(path) == me:  # never remove a lock that another process took over
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def check_target(run_dir: Path) -> Path:
    """Refuse run directories that cannot be one: a file, a path under a file, the current folder's ancestors."""
    resolved = run_dir.expanduser().resolve()
    for parent in [resolved, *resolved.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == resolved else f"is under {parent}, which is a file"
            raise RunDirError(f"--output {run_dir} {where}; give a folder path")
    return resolved


def is_run(run_dir: Path) -> bool:
    """A folder peftlab created as a run directory (the marker, or a run written before the marker existed)."""
    return (run_dir / MARKER).is_file() or ((run_dir / CONFIG).is_file() and (run_dir / ENVIRONMENT).is_file())


def foreign_entries(run_dir: Path) -> list[str]:
    """Entries of ``run_dir`` that peftlab did not write (what --overwrite would otherwise delete)."""
    foreign = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if name in TOP_LEVEL:
            continue
        if name.startswith(".") and any(name.startswith(f".{known}.") for known in TOP_LEVEL):
            continue  # a temporary file or folder of an atomic write that was interrupted
        if entry.is_dir() and not entry.is_symlink() and _is_method_dir(entry):
            continue
        foreign.append(name + ("/" if entry.is_dir() else ""))
    return foreign


def _is_method_dir(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return bool(names) and all(n in METHOD_ENTRIES or n.startswith(".") for n in names)


def refuse_existing(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing folder unless the user said so, and never one that is not a run."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not (overwrite or resume):
        raise RunDirError(f"run directory {run_dir} already exists. Use --resume to continue it, --overwrite to "
                          f"replace it, or --output to write elsewhere")
    if not is_run(run_dir):
        found = ", ".join(foreign_entries(run_dir)[:10]) or "no peftlab files"
        raise RunDirError(f"{run_dir} is not a peftlab run directory (found: {found}); refusing to "
                          f"{'replace' if overwrite else 'resume'} it. Give a new --output")
    if overwrite:
        cwd = Path.cwd().resolve()
        if run_dir == cwd or run_dir in cwd.parents:
            raise RunDirError(f"--overwrite would replace {run_dir}, which holds the current folder; run from "
                              f"elsewhere or give another --output")
        foreign = foreign_entries(run_dir)
        if foreign:
            raise RunDirError(f"--overwrite would delete {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} of "
                              f"{run_dir} that peftlab did not write: {', '.join(foreign[:10])}. Move them out "
                              f"first, or give another --output")


def create(run_dir: Path, *, overwrite: bool) -> None:
    """Create the run directory (replacing an existing run with --overwrite) and mark it as peftlab's."""
    import peftlab
    from peftlab import fsutil

    try:
        if overwrite and run_dir.exists() and any(run_dir.iterdir()):
            # Move aside first, delete after: a crash in between leaves the old run recoverable.
            aside = run_dir.with_name(f".{run_dir.name}.replaced-{os.getpid()}")
            os.replace(run_dir, aside)
            shutil.rmtree(aside, ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        fsutil.write_json(run_dir / MARKER, {"peftlab": peftlab.__version__})
    except OSError as exc:
        raise FilesystemError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}; choose another "
                          f"--output") from None


def check_intact(run_dir: Path) -> None:
    """The run directory still is the one this run created (it was not deleted or replaced under it)."""
    if not (run_dir / MARKER).is_file():
        raise FilesystemError(f"the run directory {run_dir} was deleted or replaced while this run was writing to it; "
                          f"its results are incomplete. Rerun into a new --output")
