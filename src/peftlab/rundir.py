"""The run directory: its top-level names, who may write it (a lock, and a claim per method), and what
--overwrite may delete.

A run directory is only ever replaced or written by peftlab when it can tell the folder is its own:

- ``.peftlab-run`` marks a folder peftlab created (older runs are recognised by ``config.yaml`` +
  ``environment.json``).
- ``--overwrite`` replaces a run only when every entry in it is something peftlab writes; anything
  else (a thesis, photos, notes dropped into the folder) is listed and the run is refused. It is refused as
  well while another process holds a claim on one of its methods.
- The run lock, ``.<name>.lock`` *beside* the run directory (so it survives the move-aside of ``--overwrite``),
  is created in one step (hard link) and holds host, pid, start time and a scope. ``peftlab run`` holds it only
  while it creates the directory and claims its methods, and again while it writes the merged report (scope
  ``setup``): another invocation waits for it. ``peftlab tune`` and ``run --tune`` hold it for their whole
  length (scope ``run``): another invocation is refused at once, with the holder's name.
- A claim per method, ``.<name>.claims/<method>.lock`` beside the run directory, made the same way: the
  invocation that trains a method holds its claim until it has written its report, so several ``peftlab run
  --methods X`` processes (on one machine, or on several over a shared filesystem) write one run directory
  without overwriting each other. A second claim on the same method is refused with the holder's name.
- Stale: a lock or claim whose process is gone (same host, dead pid, or a pid reused since) or whose file has not
  been refreshed for ``timeout`` seconds (its holder touches it every :data:`HEARTBEAT_S` seconds; this is the
  only test that works across hosts, and it assumes their clocks agree to well within the timeout). A stale lock
  or claim is taken over with ``--resume`` (or ``--overwrite``), never silently.
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
import threading
import time
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
WORKER_LOG = "worker.log"  # a method's output when several run side by side (--workers)
METHOD_ENTRIES = {MODEL_DIR, "checkpoints", RESULT_FILE, "test_predictions.jsonl", "seeds", WORKER_LOG}


class RunLockedError(PeftlabError):
    """Another peftlab process holds the run directory, or a method of it."""


SETUP = "setup"  # the run lock is held for seconds (creating the directory, writing the report): wait for it
RUN = "run"  # the run lock is held for the whole run (tune, run --tune): refuse at once
CLAIM = "method"
CLAIM_TIMEOUT_S = 600.0  # default: a lock or claim not refreshed for this long is stale, whatever its host
HEARTBEAT_S = 30.0  # how often a holder refreshes its lock and claims (their mtime)
SETUP_WAIT_S = 300.0  # how long an invocation waits for another's setup or report writing


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory (or a method's claim), as written in its lock file."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC
    command: str = ""
    scope: str = RUN  # SETUP, RUN or CLAIM; lock files of earlier versions have none and mean the whole run

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


def claims_dir(run_dir: Path) -> Path:
    """Where the run directory's method claims live: beside it, like its lock."""
    return run_dir.parent / f".{run_dir.name}.claims"


def claim_path(run_dir: Path, method: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in method)
    return claims_dir(run_dir) / f"{safe}.lock"


def _read_holder(path: Path) -> LockHolder | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(host=str(data["host"]), pid=int(data["pid"]), started=str(data["started"]),
                          command=str(data.get("command", "")), scope=str(data.get("scope", RUN)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # Half-written (the writer died between create and write) or edited by hand: nobody can be named.
        return LockHolder(host="?", pid=-1, started="?", command="unreadable lock file")


def _is_stale(holder: LockHolder, path: Path, timeout_s: float | None) -> bool:
    """Gone (see :meth:`LockHolder.is_stale`), unreadable, or not refreshed for ``timeout_s`` seconds."""
    if holder.pid == -1 or holder.is_stale():
        return True
    if timeout_s is None:
        return False
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: the caller retries
    return age > timeout_s


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists, in one step: the content is written to a private file
    first and hard-linked into place, so nobody ever reads a lock that exists but is still empty."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
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


def _me(scope: str) -> LockHolder:
    return LockHolder(host=socket.gethostname(), pid=os.getpid(),
                      started=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                      command=" ".join(["peftlab", *sys.argv[1:]])[:200], scope=scope)


def _take_over(path: Path, holder: LockHolder, what: str) -> None:
    logger.warning("taking over the stale %s (%s)", what, holder.describe())
    # Rename, not unlink: of two processes taking over at once, only one rename succeeds.
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{threading.get_ident()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, aside)
        os.unlink(aside)


def _release(path: Path, me: LockHolder) -> None:
    if _read_holder(path) == me:  # never remove a lock that another process took over
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class _Heartbeat:
    """Refreshes the mtime of the lock files this process holds, so that other hosts can tell it is alive."""

    def __init__(self, paths: list[Path], me: LockHolder, interval_s: float = HEARTBEAT_S) -> None:
        self._paths, self._me, self._interval = paths, me, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="peftlab-heartbeat", daemon=True)

    def __enter__(self) -> "_Heartbeat":
        if self._paths:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            for path in self._paths:
                if _read_holder(path) == self._me:  # a lock taken over by another is theirs to refresh
                    with contextlib.suppress(OSError):
                        os.utime(path)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FilesystemError(f"cannot create {path.parent} for the run directory: {exc.strerror}; choose another "
                              f"--output") from None


@contextlib.contextmanager
def hold(run_dir: Path, *, takeover: bool, scope: str = RUN, wait_s: float = 0.0,
         timeout_s: float | None = CLAIM_TIMEOUT_S) -> Iterator[LockHolder]:
    """Hold the run directory's lock for the duration of the block.

    Args:
        run_dir: the run directory (it need not exist yet).
        takeover: take over a stale lock (its process is gone); a live holder is never taken over.
        scope: :data:`SETUP` for a hold of seconds (others wait for it), :data:`RUN` for a whole run.
        wait_s: how long to wait for a live holder whose scope is :data:`SETUP` (a :data:`RUN` holder is refused
            at once).
        timeout_s: a lock not refreshed for this long is stale (None: only a dead process makes it stale).

    Raises:
        RunLockedError: another process holds the lock, or a stale lock exists and ``takeover`` is False.
    """
    path = lock_path(run_dir)
    _make_parent(path)
    me = _me(scope)
    deadline = time.monotonic() + wait_s
    attempts = 0
    while True:
        if _create_exclusive(path, json.dumps(asdict(me))):
            break
        holder = _read_holder(path)
        if holder is None:
            continue  # released between our attempt and our read
        if _is_stale(holder, path, timeout_s):
            if not takeover:
                raise RunLockedError(
                    f"{run_dir} has a lock left by a process that is no longer running ({holder.describe()}). "
                    f"Rerun with --resume to take it over and continue, or --overwrite to replace the run")
            attempts += 1
            if attempts > 3:  # a lost race for a stale lock is retried a few times
                raise RunLockedError(f"could not take the lock {path}: other processes keep taking it; retry")
            _take_over(path, holder, f"lock of {run_dir}")
            continue
        if holder.scope == SETUP and time.monotonic() < deadline:
            time.sleep(0.1)  # another invocation is creating the directory or writing its report: seconds
            continue
        raise RunLockedError(f"{run_dir} is being written by another peftlab run: {holder.describe()}. Wait for "
                             f"it to finish, or write elsewhere with --output")
    try:
        with _Heartbeat([path], me):
            yield me
    finally:
        _release(path, me)


def in_progress(run_dir: Path, timeout_s: float | None = CLAIM_TIMEOUT_S) -> bool:
    """Another process is writing ``run_dir`` now: it holds a method claim, or it is setting the directory up."""
    if claim_holders(run_dir, timeout_s):
        return True
    path = lock_path(run_dir)
    holder = _read_holder(path)
    return holder is not None and holder.scope == SETUP and not _is_stale(holder, path, timeout_s)


def claim_holders(run_dir: Path, timeout_s: float | None = CLAIM_TIMEOUT_S) -> dict[str, LockHolder]:
    """The live claims on ``run_dir``'s methods: method file stem -> holder (stale ones left out)."""
    folder = claims_dir(run_dir)
    if not folder.is_dir():
        return {}
    live = {}
    for path in sorted(folder.glob("*.lock")):
        holder = _read_holder(path)
        if holder is not None and not _is_stale(holder, path, timeout_s):
            live[path.stem] = holder
    return live


def claim_holder(run_dir: Path, method: str, timeout_s: float | None = CLAIM_TIMEOUT_S) -> LockHolder | None:
    """Who holds a live claim on ``method`` of ``run_dir`` (None: nobody, or only a stale claim)."""
    path = claim_path(run_dir, method)
    holder = _read_holder(path)
    return None if holder is None or _is_stale(holder, path, timeout_s) else holder


def refuse_if_claimed(run_dir: Path, timeout_s: float | None = CLAIM_TIMEOUT_S) -> None:
    """``--overwrite`` would delete the work of a live process: refuse, naming it."""
    holders = claim_holders(run_dir, timeout_s)
    if holders:
        method, holder = next(iter(holders.items()))
        raise RunLockedError(f"{run_dir} is being written by another peftlab run: {holder.describe()}, which trains "
                             f"{method}; --overwrite would delete its work. Wait for it to finish, or write "
                             f"elsewhere with --output")


def clear_stale_claims(run_dir: Path, timeout_s: float | None = CLAIM_TIMEOUT_S) -> None:
    """Remove the claims of processes that are gone (``--overwrite`` replaces their run)."""
    folder = claims_dir(run_dir)
    for path in sorted(folder.glob("*.lock")) if folder.is_dir() else []:
        holder = _read_holder(path)
        if holder is not None and _is_stale(holder, path, timeout_s):
            _take_over(path, holder, f"claim {path.stem} of {run_dir}")
    with contextlib.suppress(OSError):
        folder.rmdir()


@contextlib.contextmanager
def claim(run_dir: Path, methods: list[str], *, takeover: bool,
          timeout_s: float | None = CLAIM_TIMEOUT_S) -> Iterator[LockHolder]:
    """Claim each of ``methods`` of ``run_dir`` for the duration of the block: all of them, or none.

    Args:
        run_dir: the run directory.
        methods: the run names this process will train.
        takeover: take over stale claims (``--resume``); a live holder is never taken over.
        timeout_s: a claim not refreshed for this long is stale.

    Raises:
        RunLockedError: another live process holds one of the claims (it is named), or a stale claim exists
            and ``takeover`` is False.
    """
    me = _me(CLAIM)
    taken: list[Path] = []
    try:
        for method in methods:
            path = claim_path(run_dir, method)
            _make_parent(path)
            for _ in range(4):
                if _create_exclusive(path, json.dumps(asdict(me))):
                    taken.append(path)
                    break
                holder = _read_holder(path)
                if holder is None:
                    continue
                if _is_stale(holder, path, timeout_s):
                    if not takeover:
                        raise RunLockedError(
                            f"method {method} of {run_dir} has a claim left by a process that is no longer running "
                            f"({holder.describe()}). Rerun with --resume to take it over and train it again")
                    _take_over(path, holder, f"claim on {method} of {run_dir}")
                    continue
                raise RunLockedError(
                    f"method {method} of {run_dir} is being trained by another peftlab run: {holder.describe()}. "
                    f"Choose other methods with --methods, or wait for it to finish")
            else:
                raise RunLockedError(f"could not claim {method} of {run_dir}: other processes keep taking it; retry")
        with _Heartbeat(taken, me):
            yield me
    finally:
        for path in taken:
            _release(path, me)
        with contextlib.suppress(OSError):  # only when empty: other invocations' claims stay
            claims_dir(run_dir).rmdir()


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


def refuse_existing(run_dir: Path, *, overwrite: bool, resume: bool, join: bool = False) -> None:
    """Refuse to touch an existing folder unless the user said so, and never one that is not a run.

    ``join``: another live process is writing the run right now (it holds a claim); a run with the same config
    may add its methods to it without ``--resume``.
    """
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    if not (overwrite or resume or join):
        raise RunDirError(f"run directory {run_dir} already exists. Use --resume to continue it, --overwrite to "
                          f"replace it, or --output to write elsewhere")
    if not is_run(run_dir):
        found = ", ".join(foreign_entries(run_dir)[:10]) or "no peftlab files"
        raise RunDirError(f"{run_dir} is not a peftlab run directory (found: {found}); refusing to "
                          f"{'replace' if overwrite else 'resume' if resume else 'write into'} it. Give a new --output")
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
