"""Many adapters on one shared base model: discovery, loading with an LRU limit, and a batching queue.

The base model's weights are loaded once. Adapters are grouped by what can
live in one ``PeftModel``: peft refuses to mix peft types in one model, and a
classifier head's shape depends on the number of classes. Each group gets a
*skeleton* model built on the meta device whose parameters are the very tensors
of the one loaded base (no copy), so a group costs only its adapters and heads.

Inside a group of plain LoRA adapters, rows for different adapters share one
forward pass (peft's ``adapter_names``). Other methods (DoRA, IA3, LoHa,
prompt learning, ...) run one forward pass per adapter after ``set_adapter``:
peft 0.21 silently *accepts* ``adapter_names`` for IA3 and prompt tuning and
ignores it -- every row would get the active adapter's result.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Sequence

from peftlab import artifacts
from peftlab.errors import AdapterError, PeftlabError

logger = logging.getLogger(__name__)

# Plain names only: they appear in URLs and JSON, never as paths.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
# Heads peft puts in modules_to_save for sequence classification: each adapter brings its own copy,
# so the skeleton's head may start as zeros when its class count differs from the loaded base's.
CLASSIFIER_HEADS = ("classifier", "score")


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
        index: the text's position within its request, once :class:`BatchQueue` knows it (else its batch row).
    """

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


class WrongTaskError(AdapterError):
    """The adapter exists but serves another task (a classifier asked to generate, or the reverse)."""


class NotReadyError(PeftlabError):
    """The base model is still loading (or failed to load)."""


def check_adapter_name(name: str) -> str:
    """Return ``name`` if it is a plain adapter name, else raise :class:`InvalidAdapterNameError`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
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
    peft_name: str = ""  # the name inside peft; see AdapterRegistry._register

    @property
    def group_key(self) -> tuple[str, str, bool, int]:
        """Adapters with the same key can live in one PeftModel."""
        return self.task, self.peft_type, self.use_dora, len(self.labels)

    @property
    def mixable(self) -> bool:
        """Plain LoRA: rows of different adapters can share one forward pass (peft ``adapter_names``)."""
        return self.peft_type == "LORA" and not self.use_dora

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


@dataclass
class _Group:
    """A PeftModel over a skeleton that shares the base weights; hosts adapters of one group key."""

    model: Any
    mixable: bool
    members: list[str] = field(default_factory=list)  # registry names


class AdapterRegistry:
    """Registered adapters over one shared base model; thread-safe (one lock around every model use).

    Args:
        base: base model alias or folder.
        adapters_dir: folder whose subfolders are adapters (see :func:`discover_adapters`).
        max_loaded: most adapters held in memory (least recently used are unloaded); 0 for no limit.
        device: torch device; default CUDA when available.
        dtype: auto (bf16 on GPUs that support it, else fp32), float32, bfloat16 or float16.
        max_batch_rows: texts per forward pass.
        trust_remote_code: run the base model folder's own Python code (as ``model.trust_remote_code``).
        allow_pickle: accept pickle weights (``.bin``) for the base and adapters (as ``model.allow_pickle``).

    Raises:
        AdapterError: ``adapters_dir`` holds no adapter.
    """

    def __init__(self, base: str, adapters_dir: Path, *, max_loaded: int = 32, device: str | None = None,
                 dtype: str = "auto", max_batch_rows: int = 64, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> None:
        self.base = base
        self.trust_remote_code = trust_remote_code
        self.allow_pickle = allow_pickle
        self.adapters_dir = adapters_dir
        self.max_loaded = max(0, int(max_loaded))
        self.max_batch_rows = max(1, int(max_batch_rows))
        self._device_name = device
        self._dtype_name = dtype
        self.entries: dict[str, AdapterEntry] = {}
        for entry in discover_adapters(adapters_dir):
            self._register(entry)
        if not self.entries:
            raise AdapterError(f"no adapters under {adapters_dir}: expected subfolders with "
                               f"{artifacts.ADAPTER_CONFIG_FILE} "
                               f"(or <method>/model/ of a run); full models (FFT) are not served as adapters")
        self.state = "starting"  # starting -> ready | failed
        self.error: str | None = None
        self.forward_passes = 0  # for tests and /health: proof that rows share passes
        self._lock = threading.RLock()
        self._groups: dict[tuple[str, str, bool, int], _Group] = {}
        self._shared: dict[str, Any] = {}
        self._config: Any = None
        self._tokenizer: Any = None
        self._device: Any = None
        self._dtype: Any = None

    def _register(self, entry: AdapterEntry) -> None:
        # peft warns (and may mis-load) when an adapter name is a substring of its tuner's key prefix:
        # "lora" in "lora_", "ia3" in "ia3_" -- exactly the names of a run's method folders.
        entry.peft_name = f"peftlab_{len(self.entries)}"
        self.entries[entry.name] = entry

    # -- lifecycle

    @property
    def ready(self) -> bool:
        """True once the base model is loaded (and, with ``eager``, the adapters)."""
        return self.state == "ready"

    def start(self, eager: bool = False) -> None:
        """Load the base model (once) and, if ``eager``, adapters up to ``max_loaded``; then be ready.

        Never raises: a failed base model leaves the registry ``failed`` with its error (``/health`` says
        why); a failed adapter keeps its error on its entry and the others load.
        """
        try:
            self._load_base()
        except Exception as exc:  # the server stays up and /health says why
            logger.exception("loading base model %s failed", self.base)
            self.error = f"base model {self.base} failed to load: {exc}"[:500]
            self.state = "failed"
            return
        if eager:
            candidates = [e for e in self.entries.values() if e.error is None]
            if self.max_loaded and len(candidates) > self.max_loaded:
                logger.warning("--eager: loading the first %d of %d adapters (--max-loaded); the rest load on "
                               "first use", self.max_loaded, len(candidates))
                candidates = candidates[:self.max_loaded]
            with self._lock:
                for entry in candidates:
                    try:
                        self._ensure_loaded(entry, keep={entry.name})
                    except AdapterError:
                        pass  # recorded on the entry; the others still load
        self.state = "ready"
        logger.info("serving %d adapters on %s (%d loaded)", len(self.entries), self.base, self._loaded_count())

    def _load_base(self) -> None:
        import torch

        from peftlab.cpu import configure_threads
        from peftlab.models import load_base_model, load_tokenizer, resolve_dtype, resolve_model_path

        configure_threads()
        folder = resolve_model_path(self.base)
        for entry in self.entries.values():
            trained_on = Path(entry.base_model).expanduser() if entry.base_model else None
            if trained_on is not None and trained_on.exists() and trained_on.resolve() != folder.resolve():
                # Same architecture loads without error but predicts wrongly; a shape mismatch fails on load.
                logger.warning("adapter %s was trained on %s, not on the served base %s", entry.name, trained_on,
                               folder)
        self._device = torch.device(self._device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._dtype = resolve_dtype(self._dtype_name)
        # The base's tokenizer; a bare weights folder falls back to the one saved with an adapter.
        with_tokenizer = [folder] + [e.folder for e in self.entries.values()]
        self._tokenizer = load_tokenizer(next((f for f in with_tokenizer if artifacts.has_tokenizer(f)),
                                              folder), self.trust_remote_code)
        # One class is loaded; skeletons of the other task share its weights by name (heads aside).
        task = "classification" if any(e.task == "classification" for e in self.entries.values()) else "causal-lm"
        started = time.perf_counter()
        # load_base_model runs check_model_folder: remote code and pickle weights need the same opt-ins as `run`.
        model = load_base_model(folder, task, ["0", "1"] if task == "classification" else None, dtype=self._dtype,
                                trust_remote_code=self.trust_remote_code, allow_pickle=self.allow_pickle,
                                pad_token_id=self._tokenizer.pad_token_id)
        model.to(self._device).eval().requires_grad_(False)
        self._config = model.config
        self._shared = dict(chain(model.named_parameters(remove_duplicate=False),
                                  model.named_buffers(remove_duplicate=False)))
        logger.info("base model %s loaded in %.1f s", folder, time.perf_counter() - started)

    # -- lookup and status

    def entry(self, name: str) -> AdapterEntry:
        """The entry for ``name``.

        Raises:
            InvalidAdapterNameError: not a plain name.
            UnknownAdapterError: no such adapter; the message lists the available ones.
        """
        check_adapter_name(name)
        entry = self.entries.get(name)
        if entry is None:
            raise UnknownAdapterError(f"unknown adapter {name!r}; available: {', '.join(sorted(self.entries))}")
        return entry

    def classifier(self, name: str) -> AdapterEntry:
        """The entry for ``name`` if it is a classifier (the one check of a classify row, at the door and per row).

        Raises:
            InvalidAdapterNameError, UnknownAdapterError: see :meth:`entry`.
            WrongTaskError: ``name`` is a causal-LM adapter.
        """
        entry = self.entry(name)
        if entry.task != "classification":
            raise WrongTaskError(f"adapter {name!r} is a {entry.task} adapter, not a classifier; use /v1/generate")
        return entry

    def adapters(self) -> list[dict[str, Any]]:
        """Every registered adapter's :meth:`AdapterEntry.info`, by name (no lock: answers during a batch)."""
        return [self.entries[n].info() for n in sorted(self.entries)]

    def counts(self) -> dict[str, int]:
        """Adapters registered, loaded and failed, and forward passes run so far."""
        return {"adapters": len(self.entries), "loaded": self._loaded_count(),
                "failed": sum(e.error is not None for e in self.entries.values()),
                "forward_passes": self.forward_passes}

    def _loaded_count(self) -> int:
        return sum(e.loaded for e in self.entries.values())

    def require_ready(self) -> None:
        """Raise :class:`NotReadyError` (with the reason) unless the base model is loaded."""
        if self.state != "ready":
            raise NotReadyError(self.error or "the server is loading its base model; retry shortly")

    # -- load / unload

    def load(self, name: str) -> dict[str, Any]:
        """Load adapter ``name`` (retrying one that failed before), evicting the least recently used if full.

        Raises:
            AdapterUnavailableError: it failed to load (the error is kept on its entry).
        """
        entry = self.entry(name)
        self.require_ready()
        with self._lock:
            if not entry.loaded:
                if not entry.broken:
                    entry.error = None  # an explicit load retries an adapter that failed before
                self._ensure_loaded(entry, keep={name})
            return entry.info()

    def unload(self, name: str) -> dict[str, Any]:
        """Drop adapter ``name`` from memory (it stays registered and loads again on use)."""
        entry = self.entry(name)
        self.require_ready()
        with self._lock:
            if entry.loaded:
                self._unload(entry)
            return entry.info()

    def _ensure_loaded(self, entry: AdapterEntry, keep: set[str]) -> None:
        entry.last_used = time.monotonic()
        if entry.loaded:
            return
        if entry.error is not None:
            kind = AdapterUnavailableError if entry.out_of_memory else InvalidAdapterError
            raise kind(f"adapter {entry.name!r} failed to load: {entry.error}")
        self._evict(keep | {entry.name})
        try:
            self._check_files(entry)
            self._load_into_group(entry)
        except Exception as exc:  # peft/torch raise many kinds; one bad adapter must not stop the others
            logger.warning("adapter %s (%s) failed to load: %s", entry.name, entry.folder, exc,
                           exc_info=logger.isEnabledFor(logging.DEBUG))
            entry.error = (str(exc) if isinstance(exc, InvalidAdapterError) else f"{type(exc).__name__}: {exc}")[:500]
            # Out of memory is the server's state, not the adapter's fault: retrying later may work (500).
            # Anything else raised while reading and attaching its files means the files are unusable (422).
            entry.out_of_memory = _is_out_of_memory(exc)
            kind = AdapterUnavailableError if entry.out_of_memory else InvalidAdapterError
            raise kind(f"adapter {entry.name!r} failed to load: {entry.error}") from None
        entry.loaded = True
        logger.info("adapter %s loaded (%s, %d held)", entry.name, entry.method, self._loaded_count())

    def _check_files(self, entry: AdapterEntry) -> None:
        names = {p.name for p in entry.folder.iterdir()}
        pickled = artifacts.ADAPTER_PICKLE_FILE in names and artifacts.ADAPTER_WEIGHTS_FILE not in names
        if pickled and not self.allow_pickle:
            raise InvalidAdapterError(f"{entry.folder} stores its weights as pickle ({artifacts.ADAPTER_PICKLE_FILE}), "
                                      f"which can run "
                                      f"arbitrary code when loaded. Re-save it with safe_serialization=True, or if you "
                                      f"trust it start the server with --allow-pickle")

    def _load_into_group(self, entry: AdapterEntry) -> None:
        from peft import PeftConfig, get_peft_model

        folder = str(entry.folder)
        group = self._groups.get(entry.group_key)
        new_group = group is None
        if group is None:
            # get_peft_model + load_adapter rather than PeftModel.from_pretrained: only load_adapter returns the
            # missing / unexpected keys (from_pretrained just warns and serves random weights for missing ones).
            config = PeftConfig.from_pretrained(folder)
            config.inference_mode = True
            model = get_peft_model(self._skeleton(entry.task, len(entry.labels)), config,
                                   adapter_name=entry.peft_name)
            group = _Group(model=model, mixable=entry.mixable)
        try:
            _check_load_result(entry, group.model.load_adapter(folder, adapter_name=entry.peft_name),
                               group.model.peft_config[entry.peft_name].is_prompt_learning)
        except Exception:
            # peft injects the adapter's layers before reading its weights: drop the half-made adapter.
            if not new_group and entry.peft_name in group.model.peft_config:
                group.model.delete_adapter(entry.peft_name)
            raise
        self._groups[entry.group_key] = group
        group.model.to(self._device)  # moves only the new adapter weights: base tensors are there already
        group.model.eval()
        group.members.append(entry.name)

    def _evict(self, keep: set[str]) -> None:
        if not self.max_loaded:
            return
        while self._loaded_count() >= self.max_loaded:
            victims = sorted((e for e in self.entries.values() if e.loaded and e.name not in keep),
                             key=lambda e: e.last_used)
            if not victims:
                return
            logger.info("unloading adapter %s (least recently used; --max-loaded %d)", victims[0].name,
                        self.max_loaded)
            self._unload(victims[0])

    def _unload(self, entry: AdapterEntry) -> None:
        group = self._groups[entry.group_key]
        group.members.remove(entry.name)
        if not group.members:
            del self._groups[entry.group_key]  # the skeleton holds only shared tensors and this adapter
        else:
            model = group.model
            if entry.peft_name in model.active_adapters:
                model.set_adapter(self.entries[group.members[0]].peft_name)  # peft warns if the active one goes
            model.delete_adapter(entry.peft_name)
        entry.loaded = False

    def _skeleton(self, task: str, num_labels: int) -> Any:
        """A model of ``task``'s class whose parameters are the loaded base's tensors (no copy)."""
        import copy

        import torch
        from accelerate.utils import set_module_tensor_to_device
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        config = copy.deepcopy(self._config)
        if task == "classification":
            config.num_labels = num_labels
            config.id2label = {i: str(i) for i in range(num_labels)}
            config.label2id = {str(i): i for i in range(num_labels)}
        model_class = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
        with torch.device("meta"):
            model = model_class.from_config(config, dtype=self._dtype)
        model.requires_grad_(False)  # frozen like the base; set_module_tensor_to_device keeps the flag
        missing = []
        for name, tensor in list(chain(model.named_parameters(remove_duplicate=False),
                                       model.named_buffers(remove_duplicate=False))):
            shared = self._shared.get(name)
            if shared is not None and shared.shape == tensor.shape:
                # Same device and dtype: the skeleton gets the base's very storage, not a copy.
                set_module_tensor_to_device(model, name, self._device, value=shared)
            else:
                missing.append(name)
        model.tie_weights()  # a causal LM's output layer may be the (now shared) input embeddings
        current = dict(chain(model.named_parameters(remove_duplicate=False),
                             model.named_buffers(remove_duplicate=False)))
        for name in missing:
            tensor = current[name]
            if not tensor.is_meta:
                continue
            if task == "classification" and name.split(".")[0] in CLASSIFIER_HEADS:
                # Never used for an adapter's rows: each adapter's head is in its modules_to_save.
                set_module_tensor_to_device(model, name, self._device,
                                            value=torch.zeros(tensor.shape, dtype=tensor.dtype))
            else:
                raise AdapterError(f"the base model was loaded for another task and has no weight {name} for a "
                                   f"{task} model; serve {task} adapters from a separate server")
        return model.eval()

    # -- inference

    def classify(self, rows: Sequence[tuple[str, str]]) -> list[dict[str, Any] | Exception]:
        """Classify ``(adapter, text)`` rows; rows of all adapters share forward passes where peft allows.

        Returns:
            Per row, a dict (adapter, label, score, probabilities) or the exception that row failed with: an
            :class:`AdapterError`, or a :class:`TextError` for a text the tokenizer or model failed on alone.
        """
        self.require_ready()
        results: list[dict[str, Any] | Exception | None] = [None] * len(rows)
        by_name: dict[str, list[int]] = {}
        for index, (name, _) in enumerate(rows):
            by_name.setdefault(name, []).append(index)
        names = list(by_name)
        # More distinct adapters than may be held: take them in chunks, each fully loaded while it runs.
        step = self.max_loaded or len(names)
        with self._lock:
            for start in range(0, len(names), step):
                chunk = names[start:start + step]
                runnable = []
                for name in chunk:
                    try:
                        entry = self.classifier(name)
                        self._ensure_loaded(entry, keep=set(chunk))
                        runnable.append(entry)
                    except AdapterError as exc:
                        for index in by_name[name]:
                            results[index] = exc
                by_group: dict[tuple[str, str, bool, int], list[AdapterEntry]] = {}
                for entry in runnable:
                    by_group.setdefault(entry.group_key, []).append(entry)
                for key, entries in by_group.items():
                    group = self._groups[key]
                    if group.mixable:
                        self._run_rows(group.model, [i for e in entries for i in by_name[e.name]], rows, results,
                                       mixed=True)
                        continue
                    for entry in entries:
                        group.model.set_adapter(entry.peft_name)
                        self._run_rows(group.model, by_name[entry.name], rows, results, mixed=False)
        return results  # type: ignore[return-value]

    def _run_rows(self, model: Any, indices: list[int], rows: Sequence[tuple[str, str]],
                  results: list[Any], mixed: bool) -> None:
        from peftlab.data import clean_text

        runnable = []
        for index in indices:
            entry = self.entries[rows[index][0]]
            if clean_text(rows[index][1], entry.clean):
                runnable.append(index)
            else:  # training drops such rows: no adapter has learnt a label for them
                results[index] = TextError(f"the text is empty after cleaning (adapter {entry.name!r} cleans with "
                                           f"{entry.clean!r}): remove it", index)
        # Longest first, as the predictor does: similar lengths share a pass (less padding).
        order = sorted(runnable, key=lambda i: -len(rows[i][1]))
        for start in range(0, len(order), self.max_batch_rows):
            batch = order[start:start + self.max_batch_rows]
            try:
                self._forward(model, batch, rows, results, mixed)
            except Exception as exc:  # one bad text must not fail its batch mates: each row again, alone
                if len(batch) == 1:
                    logger.warning("classifying one text failed: %s", exc, exc_info=True)
                    results[batch[0]] = TextError(f"the tokenizer or model failed on this text ({type(exc).__name__}: "
                                                  f"{str(exc)[:200]})", batch[0])
                    continue
                logger.info("a shared forward pass of %d rows failed (%s); running each row alone", len(batch), exc)
                for index in batch:
                    self._run_rows(model, [index], rows, results, mixed)

    def _forward(self, model: Any, batch: list[int], rows: Sequence[tuple[str, str]], results: list[Any],
                 mixed: bool) -> None:
        import torch

        from peftlab.evaluate import softmax

        inputs = self._encode([(self.entries[rows[i][0]], rows[i][1]) for i in batch])
        kwargs = {"adapter_names": [self.entries[rows[i][0]].peft_name for i in batch]} if mixed else {}
        with torch.inference_mode():
            logits = model(**inputs, **kwargs).logits
        self.forward_passes += 1
        probabilities = softmax(logits.float().cpu().numpy())  # fp32 first: bf16 has no numpy dtype
        for index, row in zip(batch, probabilities):
            entry = self.entries[rows[index][0]]
            entry.last_used = time.monotonic()
            best = int(row.argmax())
            results[index] = {"adapter": entry.name, "label": entry.labels[best], "score": float(row[best]),
                              "probabilities": {n: float(p) for n, p in zip(entry.labels, row)}}

    def _encode(self, items: list[tuple[AdapterEntry, str]]) -> Any:
        """Tokenise texts, each cleaned and truncated as its adapter was trained, padded together."""
        from peftlab.data import clean_text

        texts = [clean_text(text, entry.clean) for entry, text in items]
        lengths = {entry.max_length for entry, _ in items}
        if len(lengths) == 1:  # the usual case: one tokenizer call, as the predictor makes
            encoded = self._tokenizer(texts, padding=True, truncation=True, max_length=lengths.pop(),
                                      return_tensors="pt")
        else:
            features = [dict(self._tokenizer(text, truncation=True, max_length=entry.max_length))
                        for (entry, _), text in zip(items, texts)]
            encoded = self._tokenizer.pad(features, padding=True, return_tensors="pt")
        return encoded.to(self._device)

    def generate(self, name: str, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy continuations of ``prompts`` with causal-LM adapter ``name`` (via :mod:`peftlab.generate`).

        Raises:
            WrongTaskError: ``name`` is not a causal-LM adapter.
        """
        from peftlab.generate import Generator
        from peftlab.generate import generate as generate_texts

        entry = self.entry(name)
        if entry.task != "causal-lm":
            raise WrongTaskError(f"adapter {name!r} is not a causal LM adapter (task {entry.task}); use /v1/classify")
        self.require_ready()
        with self._lock:
            self._ensure_loaded(entry, keep={name})
            model = self._groups[entry.group_key].model
            model.set_adapter(entry.peft_name)
            # One prompt at a time, unpadded (peftlab.generate's choice): output never depends on batch mates.
            texts = generate_texts(Generator(model=model, tokenizer=self._tokenizer), list(prompts),
                                   max_new_tokens=max_new_tokens)
            self.forward_passes += len(prompts)
        return texts


def _check_load_result(entry: AdapterEntry, result: Any, prompt_learning: bool) -> None:
    """Refuse an adapter whose weights file lacks keys its config implies, or holds keys no module takes."""
    # peft keeps only this adapter's own keys in missing_keys, named with peft's adapter name inserted
    # (`lora_B.peftlab_3.weight`); the file names them without it.
    missing = [k.replace(f".{entry.peft_name}", "") for k in result.missing_keys]
    # peft loads a prompt-learning adapter's prompt_embeddings itself, beside load_state_dict: not unexpected.
    unexpected = [k for k in result.unexpected_keys if not (prompt_learning and k == "prompt_embeddings")]
    if missing or unexpected:
        parts = [f"{label} keys {keys[:5]}{f' and {len(keys) - 5} more' if len(keys) > 5 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise InvalidAdapterError(f"the adapter weights in {entry.folder} do not match its {artifacts.ADAPTER_CONFIG_FILE} "
                                  f"({'; '.join(parts)}); it would serve with random or ignored weights. Re-save "
                                  f"the adapter with peft's save_pretrained")


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


@dataclass
class _Job:
    rows: list[tuple[str, str]]
    future: Future


_STOP = object()


class BatchQueue:
    """Collect classify requests for a short window and run them together on one worker thread.

    A request waits at most ``window_s`` for others to join its batch, so under load
    concurrent requests share forward passes, and alone it pays only the window.

    Args:
        run: classifies rows (see :meth:`AdapterRegistry.classify`).
        window_s: how long the first request of a batch waits for more, in seconds.
        max_rows: stop collecting once a batch has this many rows.
    """

    def __init__(self, run: Callable[[list[tuple[str, str]]], list[Any]], *, window_s: float = 0.005,
                 max_rows: int = 64) -> None:
        self._run = run
        self.window_s = max(0.0, float(window_s))
        self.max_rows = max(1, int(max_rows))
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches run, for tests and /health

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peftlab-batcher", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, answer queued requests with :class:`NotReadyError`, stop the worker."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, rows: list[tuple[str, str]]) -> Future:
        """Queue ``rows``; the future resolves to their results (or the first row error)."""
        future: Future = Future()
        self._queue.put(_Job(list(rows), future))
        return future

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            jobs = [first]
            total = len(first.rows)
            deadline = time.monotonic() + self.window_s
            while total < self.max_rows:
                remaining = deadline - time.monotonic()
                try:
                    job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP:
                    stopping = True
                    break
                jobs.append(job)
                total += len(job.rows)
            self._run_jobs(jobs)
        while True:  # requests that arrived after the stop: answer them rather than leave them waiting
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP and job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotReadyError("the server is shutting down"))

    def _run_jobs(self, jobs: list[_Job]) -> None:
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # a client gave up: skip its rows
        if not jobs:
            return
        self.batches += 1
        try:
            results = self._run([row for job in jobs for row in job.rows])
        except Exception as exc:
            if len(jobs) > 1:  # one request's failure must not fail the others: each request again, alone
                logger.info("a batch of %d requests failed (%s); running each request alone", len(jobs), exc)
                for job in jobs:
                    self._run_alone(job)
                return
            if not isinstance(exc, PeftlabError):
                logger.exception("batch of %d requests failed", len(jobs))
            jobs[0].future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            self._resolve(job, results[start:start + len(job.rows)])
            start += len(job.rows)

    def _run_alone(self, job: _Job) -> None:
        try:
            results = self._run(job.rows)
        except Exception as exc:  # reported to this request only; the worker keeps serving
            if not isinstance(exc, PeftlabError):
                logger.exception("a request of %d rows failed", len(job.rows))
            job.future.set_exception(exc)
            return
        self._resolve(job, results)

    @staticmethod
    def _resolve(job: _Job, results: list[Any]) -> None:
        for index, result in enumerate(results):
            if isinstance(result, Exception):
                if isinstance(result, TextError):
                    result.index = index  # its position in this request, for the message
                job.future.set_exception(result)
                return
        job.future.set_result(results)
