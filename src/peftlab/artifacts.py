"""The saved-folder format: the one module that knows what peftlab writes beside a model or adapter.

A method's saved folder is a standard Hugging Face folder that plain ``transformers`` (full fine-tuning)
or ``peft`` (adapters) load without peftlab, plus one ``peftlab.json`` with what ``predict``, ``generate``,
``export`` and ``serve`` need that those formats do not hold (class names, cleaning, the base model)::

    <method>/model/   config.json + model.safetensors (FFT), or adapter_config.json + adapter_model.safetensors
                      (+ head), tokenizer files, peftlab.json
    <method>/result.json   that method's RunResult, written last (its presence means "finished")

Folders saved by other tools (no ``peftlab.json``) are read too: :func:`read_metadata` derives what it can
from their own config files. Every other module goes through these functions and never spells a file name.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path
from typing import Any, TypedDict

from peftlab import fsutil
from peftlab.errors import AdapterError, ModelError

logger = logging.getLogger(__name__)

METADATA_FILE = "peftlab.json"
RESULT_FILE = "result.json"
MODEL_DIR = "model"  # a method's saved folder inside its run folder
# The same names as peft.utils.CONFIG_NAME / SAFETENSORS_WEIGHTS_NAME / WEIGHTS_NAME and transformers'
# CONFIG_NAME / SAFE_WEIGHTS_NAME / SAFE_WEIGHTS_INDEX_NAME (tests/unit/test_artifacts.py checks they agree);
# spelt here so that reading a folder imports neither library (both import torch).
ADAPTER_CONFIG_FILE = "adapter_config.json"
MODEL_CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_PICKLE_FILE = "adapter_model.bin"  # older peft, or safe_serialization=False: loaded only on opt-in
# Files that are the model itself. Tokenizer files are the base's, the same for every method, and not counted.
WEIGHT_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_PICKLE_FILE, MODEL_CONFIG_FILE,
                "model.safetensors", "model.safetensors.index.json")
WEIGHT_SHARDS = "model-*-of-*.safetensors"  # save_pretrained splits a large model into these shards


class Metadata(TypedDict, total=False):
    """The contents of ``peftlab.json``; folders saved by other tools get the fields :func:`read_metadata` derives."""

    peftlab_version: str  # the peftlab that wrote it
    task: str  # "classification" or "causal-lm"
    method: str  # a MethodName value ("full", "lora", ...)
    name: str  # the method's run name in its experiment
    labels: list[str]  # class names in head order (classification; absent for a causal LM)
    base_model: str  # folder of the base model the adapter (or FFT model) started from
    base_model_name: str  # that base as the user wrote it (alias or path)
    max_length: int  # tokens per text at training time; predict truncates to the same
    clean: str  # the text cleaning applied at training time (data.clean); predict applies the same
    trust_remote_code: bool  # the base needs its own Python code to load
    is_adapter: bool  # True: a PEFT adapter on ``base_model``; False: a full model folder
    base_fingerprint: dict[str, Any]  # the base's shape (model_type, sizes, vocabulary): a wrong --base is refused
    merged_from: str  # export only: the adapter folder this full model was merged from
    merged_method: str  # export only: that adapter's method


def new_metadata(*, task: str, method: str, name: str, labels: list[str], base_model: Path, base_model_name: str,
                 max_length: int, clean: str, trust_remote_code: bool) -> Metadata:
    """The metadata of a folder peftlab trains: every field of :class:`Metadata` but the export ones."""
    import peftlab
    from peftlab.config import MethodName

    return Metadata(peftlab_version=peftlab.__version__, task=task, method=method, name=name, labels=list(labels),
                    base_model=str(base_model), base_model_name=base_model_name, max_length=max_length, clean=clean,
                    trust_remote_code=trust_remote_code, is_adapter=method != MethodName.FULL.value,
                    base_fingerprint=base_fingerprint(json.loads((base_model / MODEL_CONFIG_FILE).read_text("utf-8"))))


# What must agree between the base an adapter was trained on and the one it is loaded on. Two bases with the same
# fingerprint but other weights (two fine-tunes of one model) cannot be told apart from their configs.
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "vocab_size", "max_position_embeddings")


def base_fingerprint(model_config: dict[str, Any]) -> dict[str, Any]:
    """The shape of a base model, from its ``config.json`` (a dict) or a transformers config."""
    get = model_config.get if isinstance(model_config, dict) else (lambda k: getattr(model_config, k, None))
    return {key: get(key) for key in _FINGERPRINT_KEYS}


def write_metadata(folder: Path, metadata: Metadata | dict[str, Any]) -> None:
    """Write ``peftlab.json`` into ``folder`` (atomically)."""
    fsutil.write_json(folder / METADATA_FILE, metadata)


def read_metadata(model_dir: Path) -> Metadata:
    """``peftlab.json`` if present, else what can be read from the folder itself (models saved by other tools).

    Raises:
        OSError, ValueError: a metadata or config file that cannot be read or is not JSON.
    """
    meta_file = model_dir / METADATA_FILE
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdapterError(f"{meta_file} is damaged ({type(exc).__name__}: {str(exc)[:120]}); copy the folder "
                               f"again from its run, or retrain the method") from None
        if not isinstance(meta, dict):
            raise AdapterError(f"{meta_file} is not a peftlab metadata object (got {type(meta).__name__}); copy the "
                               f"folder again from its run")
        return meta
    # A tool that does not record them trained on raw text with the tokenizer's default length.
    meta = Metadata(is_adapter=is_adapter(model_dir), clean="none", max_length=512)
    if meta["is_adapter"]:
        adapter = adapter_config(model_dir)
        meta["base_model"] = adapter.get("base_model_name_or_path")
        meta["task"] = "causal-lm" if adapter.get("task_type") == "CAUSAL_LM" else "classification"
        meta["method"] = str(adapter.get("peft_type", "")).lower()
    else:
        config = json.loads((model_dir / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
        archs = " ".join(config.get("architectures") or [])
        meta["task"] = "causal-lm" if "CausalLM" in archs else "classification"
        meta["method"] = "full"
        if config.get("id2label"):
            meta["labels"] = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    return meta


def is_adapter(folder: Path) -> bool:
    """True if ``folder`` holds a PEFT adapter (its ``adapter_config.json``)."""
    return (folder / ADAPTER_CONFIG_FILE).is_file()


def adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's own ``adapter_config.json`` (peft type, task type, base model, DoRA flag ...)."""
    return json.loads((folder / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))


def find_model_dir(path: str | Path) -> Path:
    """Accept RUN_DIR/method, RUN_DIR/method/model, or any FFT/adapter folder; return the folder to load.

    Raises:
        AdapterError: the path does not exist or holds neither a model nor an adapter (a run directory
            is named as such, with its methods).
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise AdapterError(f"{folder} does not exist; give a method folder of a run (e.g. runs/default/lora) "
                           f"or a saved model/adapter folder")
    saved = folder / MODEL_DIR
    if (saved / METADATA_FILE).is_file() or is_adapter(saved):
        return saved
    if folder.is_dir() and (is_adapter(folder) or (folder / MODEL_CONFIG_FILE).is_file()):
        return folder
    methods = sorted(p.name for p in folder.iterdir() if (p / MODEL_DIR).is_dir()) if folder.is_dir() else []
    hint = f"; this looks like a run directory with methods {methods}: add one, e.g. {folder / methods[0]}" if methods else ""
    raise AdapterError(f"{folder} holds neither a model ({MODEL_CONFIG_FILE}) nor an adapter "
                       f"({ADAPTER_CONFIG_FILE}){hint}")


def adapter_base_folder(folder: Path, meta: Metadata | dict[str, Any], base_model: str | None) -> Path:
    """The base model folder an adapter loads on: ``base_model`` if given, else the one it recorded.

    Raises:
        AdapterError: no base recorded and none given, or the base cannot be found.
    """
    from peftlab.models import resolve_model_path

    base_name = base_model or meta.get("base_model")
    if not base_name:
        raise AdapterError(f"{folder}: the adapter does not record its base model; pass --base")
    try:
        return resolve_model_path(str(base_name))
    except ModelError as exc:
        raise AdapterError(f"{folder}: base model {base_name} not found ({exc}); pass --base with its folder") from None


def has_tokenizer(folder: Path) -> bool:
    """True if ``folder`` holds a saved tokenizer."""
    return (folder / TOKENIZER_CONFIG_FILE).is_file()


def tokenizer_folder(folder: Path, base_folder: Path) -> Path:
    """A run's model folder holds the tokenizer it was trained with; an adapter saved elsewhere may not."""
    return folder if has_tokenizer(folder) else base_folder


def attach_adapter(base: Any, folder: Path, base_folder: Path) -> Any:
    """``PeftModel.from_pretrained(base, folder)``, refusing any adapter that does not fit ``base`` exactly.

    peft only warns when adapter weights are missing from the file (the model then runs with random adapter
    weights) and drops weights the model has no place for. Here both are an :class:`AdapterError` naming the
    keys and the base the adapter was trained on, as is a base whose shape differs from the recorded one.

    Raises:
        AdapterError: a damaged file, a base of another shape, or missing / unexpected adapter weights.
    """
    import warnings

    from peft import PeftModel, get_peft_model_state_dict

    meta = read_metadata(folder) if (folder / METADATA_FILE).is_file() else Metadata()
    expected_base = meta.get("base_model_name") or meta.get("base_model") or "the base it was trained on"
    recorded = meta.get("base_fingerprint")
    if recorded and base_fingerprint(base.config) != recorded:
        given = base_fingerprint(base.config)
        differ = ", ".join(f"{k} {given[k]} (trained on {recorded.get(k)})" for k in given if given[k] != recorded.get(k))
        raise AdapterError(f"adapter {folder} was trained on {expected_base}; {base_folder} has another shape ({differ}). "
                           f"Pass --base {expected_base}")
    saved = _saved_adapter_keys(folder)
    try:
        with warnings.catch_warnings():
            # the missing keys it warns about are checked below, as an error
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            model = PeftModel.from_pretrained(base, str(folder))
    except Exception as exc:  # noqa: BLE001 - torch, safetensors and peft each raise their own types here
        raise AdapterError(f"adapter {folder} does not fit base model {base_folder}: {str(exc)[:400]}. Pass the base "
                           f"it was trained on ({expected_base}) with --base") from None
    if saved is not None:
        wanted = set(get_peft_model_state_dict(model))
        missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
        if missing or unexpected:
            parts = [f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                     for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
            raise AdapterError(f"adapter {folder} does not fit base model {base_folder}: adapter weights "
                               f"{'; '.join(parts)}. It was trained on {expected_base}: pass that with --base")
    return model


def _saved_adapter_keys(folder: Path) -> set[str] | None:
    """The tensor names in the adapter's safetensors file (None for a pickle adapter, which is not inspected)."""
    from safetensors import safe_open

    weights = folder / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        return None
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return set(handle.keys())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for damaged files
        raise AdapterError(f"{weights} is damaged or truncated ({str(exc)[:160]}); copy the folder again from its "
                           f"run, or retrain the method") from None


def save_folder(target: Path, model: Any, tokenizer: Any, metadata: Metadata | dict[str, Any]) -> Path:
    """Save ``model`` (full model or PeftModel), its tokenizer and ``peftlab.json`` to ``target`` in one rename.

    A crash leaves the old folder (or none), never a half-written one.
    """
    with fsutil.atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_metadata(tmp, metadata)
    return target


def saved_size(folder: Path) -> int:
    """Bytes on disk of the model's own files (weights and their configs), tokenizer and metadata excluded."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and (p.name in WEIGHT_FILES or fnmatch.fnmatch(p.name, WEIGHT_SHARDS)))


def result_file(method_dir: Path) -> Path:
    """Where a method's RunResult is saved in its run folder."""
    return method_dir / RESULT_FILE
