"""Atomic writes: a crash never leaves a half-written file or folder where a good one was.

Files come out 0644 and folders 0755, less the user's umask, as ``open()`` and ``mkdir`` would make them:
``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 (private, meant for secrets), which would leave a run's
report unreadable to a teammate or a web server once renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FILE_MODE = 0o666  # before the umask: what open() asks for
DIR_MODE = 0o777  # before the umask: what mkdir asks for


def umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc/self/status).

    ``os.umask`` can only be read by setting it; another thread creating a file in between would get the
    temporary value, so it is the fallback only.
    """
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` atomically (see :func:`write_bytes`)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # POSIX; Windows has no mode bits to fix
            os.fchmod(fd, FILE_MODE & ~umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(DIR_MODE & ~umask())
        yield tmp
        _default_modes(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _default_modes(folder: Path) -> None:
    """Give what was written below ``folder`` the modes open() / mkdir give, the executable bit kept.

    Writers inside a saved folder do not all follow the umask: safetensors creates its weight files 0600.
    """
    mask = umask()
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        current = stat.S_IMODE(path.stat().st_mode)
        executable = path.is_dir() or current & 0o111
        path.chmod((DIR_MODE if executable else FILE_MODE) & ~mask)

