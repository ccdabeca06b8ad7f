"""Finding the adapters to serve: each folder under ``--adapters`` read through :mod:`peftlab.artifacts`.

An adapter's name is its folder's name, so it must be a plain name (it appears in URLs and JSON).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab import artifacts
from peftlab.errors import AdapterError
from peftlab.serve.errors import InvalidAdapterNameError

logger = logging.getLogger(__name__)

# Plain names only: they appear in URLs and JSON, never as paths.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


def check_adapter_name(name: str) -> str:
    """Return ``name`` if it is a plain adapter name, else raise :class:`InvalidAdapterNameError`."""
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidAdapterNameError(f"invalid adapter name {str(name)[:80]!r}: use letters, digits, '_', '-' "
                                      f"and '.', not starting with '.' (names are not paths)")
    return name


@dataclass
class AdapterEntry:
    """One registered adapter: what its folder says, and whether it is loaded."""

    name: str
    folder: Path
    method: str
    task: str
    labels: list[str]
    max_length: int
    clean: str
    size_bytes: int
    peft_type: str
    use_dora: bool = False
    base_model: str | None = None
    error: str | None = None
    broken: bool = False  # unusable as found on disk (no retry helps); `error` says why
    out_of_memory: bool = False  # its last load failed for want of memory: the server's state, not its files
    loaded: bool = False
    last_used: float = 0.0
    peft_name: str = ""  # the name inside peft; see AdapterStore._register

    @property
    def group_key(self) -> tuple[str, str, bool, int]:
        """Adapters with the same key can live in one PeftModel."""
        return self.task, self.peft_type, self.use_dora, len(self.labels)

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/adapters`` shows for this adapter."""
        return {"name": self.name, "method": self.method, "task": self.task, "labels": list(self.labels),
                "size_bytes": self.size_bytes, "loaded": self.loaded, "error": self.error}


def discover_adapters(adapters_dir: Path) -> list[AdapterEntry]:
    """Every adapter folder directly under ``adapters_dir`` (or its ``<name>/model`` folder).

    Full-model (FFT) folders are skipped with a logged note; folders whose name is
    not a plain name are skipped with a warning; an adapter whose files cannot be
    read is registered with its error, so ``/v1/adapters`` can show it.

    Raises:
        AdapterError: ``adapters_dir`` is not a folder.
    """
    if not adapters_dir.is_dir():
        raise AdapterError(f"--adapters {adapters_dir} is not a folder; give a folder whose subfolders are adapters "
                           f"(e.g. a run directory with lora/, ia3/, ...)")
    entries = []
    for child in sorted(adapters_dir.iterdir()):
        if not child.is_dir() or child.name.startswith("."):  # atomic writes leave hidden temp folders
            continue
        try:
            check_adapter_name(child.name)
        except InvalidAdapterNameError:
            logger.warning("%s: folder name is not a plain adapter name; skipped", child)
            continue
        try:
            folder = artifacts.find_model_dir(child)
        except AdapterError:
            logger.debug("%s holds no model or adapter; skipped", child)
            continue
        try:
            meta = artifacts.read_metadata(folder)
        except (OSError, ValueError) as exc:
            entries.append(_broken_entry(child.name, folder, f"cannot read its metadata: {exc}"))
            continue
        if not meta.get("is_adapter"):
            logger.info("%s is a full model (method %s), not an adapter: skipped (serve it with `peftlab predict`)",
                        folder, meta.get("method", "full"))
            continue
        entries.append(_entry(child.name, folder, meta))
    return entries


def _entry(name: str, folder: Path, meta: dict[str, Any]) -> AdapterEntry:
    try:
        adapter_config = artifacts.adapter_config(folder)
    except (OSError, ValueError) as exc:
        return _broken_entry(name, folder, f"{artifacts.ADAPTER_CONFIG_FILE} unreadable: {exc}", meta)
    task = meta.get("task", "classification")
    entry = AdapterEntry(
        name=name, folder=folder, method=str(meta.get("method") or adapter_config.get("peft_type", "")).lower(),
        task=task, labels=[str(x) for x in meta.get("labels") or []], max_length=int(meta.get("max_length", 512)),
        clean=str(meta.get("clean", "none")), size_bytes=artifacts.saved_size(folder),
        peft_type=str(adapter_config.get("peft_type", "")).upper(), use_dora=bool(adapter_config.get("use_dora")),
        base_model=meta.get("base_model"))
    if task == "classification" and not entry.labels:
        entry.error = (f"no class names recorded ({artifacts.METADATA_FILE} missing or without labels); it was not "
                       f"saved by peftlab")
        entry.broken = True
    return entry


def _broken_entry(name: str, folder: Path, error: str, meta: dict[str, Any] | None = None) -> AdapterEntry:
    meta = meta or {}
    return AdapterEntry(name=name, folder=folder, method=str(meta.get("method", "unknown")),
                        task=str(meta.get("task", "unknown")), labels=list(meta.get("labels") or []), max_length=512,
                        clean="none", size_bytes=artifacts.saved_size(folder), peft_type="", error=error, broken=True)
