"""The adapter store: one base model loaded once, adapters loaded beside it with an LRU limit.

Adapters are grouped by what can live in one ``PeftModel``: peft refuses to mix peft types in one model, and a
classifier head's shape depends on the number of classes. Each group gets a *skeleton* model built on the meta
device whose parameters are the very tensors of the one loaded base (no copy), so a group costs only its
adapters and heads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

from peftlab import artifacts
from peftlab.errors import AdapterError, ConfigError
from peftlab.serve.discovery import AdapterEntry, check_adapter_name, discover_adapters
from peftlab.serve.mixed import DEFAULT_MODE, MODES
from peftlab.serve.errors import (
    AdapterUnavailableError,
    InvalidAdapterError,
    NotReadyError,
    UnknownAdapterError,
    WrongTaskError,
)

logger = logging.getLogger(__name__)

# Heads peft puts in modules_to_save for sequence classification: each adapter brings its own copy,
# so the skeleton's head may start as zeros when its class count differs from the loaded base's.
_CLASSIFIER_HEADS = ("classifier", "score")


@dataclass
class AdapterGroup:
    """A PeftModel over a skeleton that shares the base weights; hosts adapters of one group key."""

    model: Any
    members: list[str] = field(default_factory=list)  # registry names


class AdapterStore:
    """Registered adapters over one shared base model; thread-safe (a lock per task around every model use).

    Args:
        base: base model alias or folder.
        adapters_dir: folder whose subfolders are adapters (see :func:`discover_adapters`).
        max_loaded: most adapters held in memory (least recently used are unloaded); 0 for no limit.
        device: torch device; default CUDA when available.
        dtype: auto (bf16 on GPUs that support it, else fp32), float32, bfloat16 or float16.
        max_batch_rows: texts per forward pass.
        trust_remote_code: run the base model folder's own Python code (as ``model.trust_remote_code``).
        allow_pickle: accept pickle weights (``.bin``) for the base and adapters (as ``model.allow_pickle``).
        mixing: how far rows of different LoRA, IA3 and prompt-tuning adapters share gathered forward passes
            (:data:`peftlab.serve.mixed.MODES`): ``one`` pass for them all (the default, measured fastest at
            the load test's batches, docs/benchmarks.md); one per number of virtual ``tokens`` (prompt rows
            apart); one per ``method``; or one per ``adapter`` (no gathering; to measure what it is worth).
        skip_padding: the model's own linear layers compute each pass's real tokens only
            (:mod:`peftlab.serve.padfree`); False computes the padding too, to measure what that is worth.

    Attributes:
        forward_passes: forward passes run so far; inference counts them (:meth:`count_passes`).

    Each task (classification, causal-lm) has its own lock (:meth:`lock_for`), held around every use of that
    task's models: loading, unloading, inference. Its groups and entries are that task's alone, so a
    generation never holds up a classify batch; only an eviction across tasks needs the other lock, and takes
    it only if it is free. On the shared cores a generation also steps aside before each module of each token
    while a classify call runs (:meth:`classifying`, :meth:`yield_to_classify`): a classify request waits for one
    module, not for a generation.

    Raises:
        AdapterError: ``adapters_dir`` holds no adapter.
    """

    def __init__(self, base: str, adapters_dir: Path, *, max_loaded: int = 32, device: str | None = None,
                 dtype: str = "auto", max_batch_rows: int = 64, trust_remote_code: bool = False,
                 allow_pickle: bool = False, mixing: str = DEFAULT_MODE, skip_padding: bool = True) -> None:
        self.base = base
        self.trust_remote_code = trust_remote_code
        self.allow_pickle = allow_pickle
        if mixing not in MODES:
            raise ConfigError(f"mixing {mixing!r}: choose from {', '.join(MODES)}")
        self.mixing = mixing
        self.skip_padding = skip_padding
        self.mixing_cache: dict[Any, Any] = {}  # serve.mixed's memo; emptied whenever an adapter (un)loads
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
        self._locks = {task: threading.RLock() for task in ("classification", "causal-lm")}
        self._count_lock = threading.Lock()
        self._classifying = 0  # classify calls running; a generation waits for none before each module
        self._classify_done = threading.Condition()
        self._groups: dict[tuple[str, str, bool, int], AdapterGroup] = {}
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
            for entry in candidates:
                with self.lock_for(entry.task):
                    try:
                        self.ensure_loaded(entry, keep={entry.name})
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

    # -- locks and counts

    def lock_for(self, task: str) -> Any:
        """The lock held around every use of ``task``'s models (classification or causal-lm)."""
        return self._locks.get(task, self._locks["classification"])

    @contextlib.contextmanager
    def classifying(self) -> Iterator[None]:
        """Mark a classify call as running (generations yield to it at their next token, :meth:`yield_to_classify`)."""
        with self._classify_done:
            self._classifying += 1
        try:
            yield
        finally:
            with self._classify_done:
                self._classifying -= 1
                self._classify_done.notify_all()

    def yield_to_classify(self, timeout_s: float = 1.0) -> None:
        """Wait (at most ``timeout_s``) until no classify call runs: a generation calls it before each module of
        each token, so a classify batch gets the cores to itself, and generation still moves on under constant
        classify traffic. With none running it still lets go of the GIL for a moment (``sleep(0)``): a thread that
        waits for it (a classify request being parsed, queued, answered) gets it now, not at the end of the
        interpreter's 5 ms switch interval."""
        with self._classify_done:
            if self._classifying:
                self._classify_done.wait_for(lambda: self._classifying == 0, timeout=timeout_s)
                return
        time.sleep(0)

    def count_passes(self, count: int) -> None:
        """Add ``count`` forward passes to :attr:`forward_passes` (from either task's thread)."""
        with self._count_lock:
            self.forward_passes += count

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

    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer (None until :meth:`start` has loaded the base)."""
        return self._tokenizer

    @property
    def device(self) -> Any:
        """The torch device the models are on (None until :meth:`start` has loaded the base)."""
        return self._device

    def group(self, entry: AdapterEntry) -> AdapterGroup:
        """The group a loaded ``entry`` lives in: its PeftModel and whether its rows can be mixed."""
        return self._groups[entry.group_key]

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
        with self.lock_for(entry.task):
            if not entry.loaded:
                if not entry.broken:
                    entry.error = None  # an explicit load retries an adapter that failed before
                self.ensure_loaded(entry, keep={name})
            return entry.info()

    def unload(self, name: str) -> dict[str, Any]:
        """Drop adapter ``name`` from memory (it stays registered and loads again on use)."""
        entry = self.entry(name)
        self.require_ready()
        with self.lock_for(entry.task):
            if entry.loaded:
                self._unload(entry)
            return entry.info()

    def ensure_loaded(self, entry: AdapterEntry, keep: set[str]) -> None:
        """Load ``entry`` unless it is loaded (evicting the least recently used but ``keep``); call holding
        ``lock_for(entry.task)``.

        Raises:
            InvalidAdapterError: its files are unusable (kept on the entry: it is not retried on use).
            AdapterUnavailableError: it failed to load for want of memory, now or before.
        """
        entry.last_used = time.monotonic()
        if entry.loaded:
            return
        if entry.error is not None:
            kind = AdapterUnavailableError if entry.out_of_memory else InvalidAdapterError
            raise kind(f"adapter {entry.name!r} failed to load: {entry.error}")
        self._evict(keep | {entry.name}, entry.task)
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
        self.mixing_cache.clear()
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
            group = AdapterGroup(model=model)
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

    def _evict(self, keep: set[str], task: str) -> None:
        """Unload least recently used adapters (not in ``keep``) until there is room; the caller holds ``task``'s
        lock. An adapter of the other task is unloaded only if that task's lock is free: waiting for it (a long
        generation) is what this lock split avoids, and two tasks each waiting for the other would deadlock."""
        if not self.max_loaded:
            return
        while self._loaded_count() >= self.max_loaded:
            victims = sorted((e for e in self.entries.values() if e.loaded and e.name not in keep),
                             key=lambda e: e.last_used)
            for victim in victims:
                lock = self.lock_for(victim.task)
                if not lock.acquire(blocking=victim.task == task):
                    continue
                try:
                    logger.info("unloading adapter %s (least recently used; --max-loaded %d)", victim.name,
                                self.max_loaded)
                    self._unload(victim)
                finally:
                    lock.release()
                break
            else:  # everything else is in use: load over the limit rather than fail the request
                return

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
        self.mixing_cache.clear()

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
        _tie(model)  # a causal LM's output layer may be the (now shared) input embeddings
        current = dict(chain(model.named_parameters(remove_duplicate=False),
                             model.named_buffers(remove_duplicate=False)))
        for name in missing:
            tensor = current[name]
            if not tensor.is_meta:
                continue
            if task == "classification" and name.split(".")[0] in _CLASSIFIER_HEADS:
                # Never used for an adapter's rows: each adapter's head is in its modules_to_save.
                set_module_tensor_to_device(model, name, self._device,
                                            value=torch.zeros(tensor.shape, dtype=tensor.dtype))
            else:
                raise AdapterError(f"the base model was loaded for another task and has no weight {name} for a "
                                   f"{task} model; serve {task} adapters from a separate server")
        return model.eval()


def _tie(model: Any) -> None:
    """Tie ``model``'s tied weights (a causal LM's output layer to its input embeddings) by hand.

    Not ``model.tie_weights()``: while any thread is inside transformers' ``from_pretrained`` (a predictor or
    another model loading in this process), ``PreTrainedModel.tie_weights`` is globally a no-op
    (``transformers.initialization.no_tie_weights``), and the skeleton would keep a meta output layer.
    """
    tied = getattr(model, "get_expanded_tied_weights_keys", None)
    if tied is None:  # an older transformers: its own method
        model.tie_weights()
        return
    for target, source in tied(all_submodels=True).items():
        parent_name, _, name = target.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, name, model.get_parameter(source))


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
