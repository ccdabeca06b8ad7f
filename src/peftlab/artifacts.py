"""The saved-folder format: the one module that knows what peftlab writes beside a model or adapter.

A method's saved folder is a standard Hugging Face folder that plain ``transformers`` (full fine-tuning)
or ``peft`` (adapters) load without peftlab, plus one ``peftlab.json`` with what ``predict``, ``generate``,
``export`` and ``serve`` need that those formats do not hold (class names, cleaning, the base model)::

    <method>/model/   config.json + model.safetensors (FFT), or adapter_config.json + adapter_model.safetensors
                      (+ head) and, for a classifier, the base's config.json with its id2label / label2id;
                      tokenizer files, peftlab.json, README.md (the model card)
    <method>/result.json   that method's RunResult, written last (its presence means "finished")

A shipped base is recorded by its hub id (``adapter_config.json``'s ``base_model_name_or_path``), not by the
folder it happened to be installed in, so the folder means the same on another machine or on the Hub;
``models.resolve_model_path`` maps the id back to the local copy offline.

Folders saved by other tools (no ``peftlab.json``) are read too: :func:`read_metadata` derives what it can
from their own config files. Every other module goes through these functions and never spells a file name.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path
from typing import Any, Callable, TypedDict

from peftlab import fsutil
from peftlab.errors import AdapterError, ModelError
from peftlab.results import RunResult

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
MODEL_CARD_FILE = "README.md"  # huggingface_hub's card name; peft's save_pretrained writes an empty template here
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
    base_model_id: str | None  # the base's hub id (shipped aliases), as recorded in adapter_config.json; else None
    data_source: str  # the data the model was trained on (data.path or data.splits as configured)
    split_sizes: dict[str, int]  # rows per split (train / validation / test) after cleaning and de-duplication
    max_length: int  # tokens per text at training time; predict truncates to the same
    clean: str  # the text cleaning applied at training time (data.clean); predict applies the same
    trust_remote_code: bool  # the base needs its own Python code to load
    is_adapter: bool  # True: a PEFT adapter on ``base_model``; False: a full model folder
    base_fingerprint: dict[str, Any]  # the base's shape (model_type, sizes, vocabulary): a wrong --base is refused
    merged_from: str  # export only: the adapter folder this full model was merged from
    merged_method: str  # export only: that adapter's method


def new_metadata(*, task: str, method: str, name: str, labels: list[str], base_model: Path, base_model_name: str,
                 max_length: int, clean: str, trust_remote_code: bool, data_source: str = "",
                 split_sizes: dict[str, int] | None = None) -> Metadata:
    """The metadata of a folder peftlab trains: every field of :class:`Metadata` but the export ones."""
    import peftlab
    from peftlab.config import WHOLE_MODEL_METHODS
    from peftlab.models import hub_id_of

    return Metadata(peftlab_version=peftlab.__version__, task=task, method=method, name=name, labels=list(labels),
                    base_model=str(base_model), base_model_name=base_model_name,
                    base_model_id=hub_id_of(base_model_name, base_model), data_source=data_source,
                    split_sizes=dict(split_sizes or {}), max_length=max_length, clean=clean,
                    trust_remote_code=trust_remote_code, is_adapter=method not in WHOLE_MODEL_METHODS,
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
        labels = _config_labels(model_dir)  # the head's config, saved beside a classifier adapter
        if labels:
            meta["labels"] = labels
    else:
        config = json.loads((model_dir / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))
        archs = " ".join(config.get("architectures") or [])
        meta["task"] = "causal-lm" if "CausalLM" in archs else "classification"
        meta["method"] = "full"
        labels = _config_labels(model_dir)
        if labels:
            meta["labels"] = labels
    return meta


def _config_labels(folder: Path) -> list[str] | None:
    """Class names in head order from ``config.json``'s ``id2label``, if the folder has one."""
    config_file = folder / MODEL_CONFIG_FILE
    if not config_file.is_file():
        return None
    id2label = json.loads(config_file.read_text(encoding="utf-8")).get("id2label") or {}
    return [id2label[str(i)] for i in range(len(id2label))] if id2label else None


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

    The recorded folder is tried first, then the base as the user named it and its hub id: a run copied to
    another machine (or a folder from the Hub) records a folder that is not there, but an alias or hub id
    resolves to this machine's own copy.

    Raises:
        AdapterError: no base recorded and none given, or the base cannot be found.
    """
    from peftlab.models import resolve_model_path

    if base_model:
        candidates = [base_model]
    else:
        recorded = [meta.get("base_model"), meta.get("base_model_name"), meta.get("base_model_id")]
        candidates = list(dict.fromkeys(str(c) for c in recorded if c))
    if not candidates:
        raise AdapterError(f"{folder}: the adapter does not record its base model; pass --base")
    problems = []
    for candidate in candidates:
        try:
            return resolve_model_path(candidate)
        except ModelError as exc:
            problems.append(f"{candidate} ({exc})")
    raise AdapterError(f"{folder}: base model not found, tried {'; '.join(problems)}; pass --base with its folder")


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
        wanted = _expected_adapter_keys(model, get_peft_model_state_dict, base_folder)
        missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
        if missing or unexpected:
            parts = [f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                     for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
            raise AdapterError(f"adapter {folder} does not fit base model {base_folder}: adapter weights "
                               f"{'; '.join(parts)}. It was trained on {expected_base}: pass that with --base")
    return model


def _expected_adapter_keys(model: Any, state_dict_of: Any, base_folder: Path) -> set[str]:
    """The keys peft's ``save_pretrained`` would write for ``model``, with the base as loaded here.

    peft decides whether embeddings belong in the file by comparing the vocabulary with the base's config
    at ``base_model_name_or_path``; saved folders record a hub id there, which peft would look up on the Hub
    (a network call, or a warning offline). The local base folder answers the same question.
    """
    config = model.peft_config[model.active_adapter]
    recorded = config.base_model_name_or_path
    config.base_model_name_or_path = str(base_folder)
    try:
        return set(state_dict_of(model))
    finally:
        config.base_model_name_or_path = recorded


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


def save_folder(target: Path, model: Any, tokenizer: Any, metadata: Metadata | dict[str, Any],
                result: RunResult | None = None, save_weights: Callable[[Any, Path], None] | None = None) -> Path:
    """Save ``model`` (full model or PeftModel), its tokenizer, ``peftlab.json`` and its model card to ``target``.

    One rename puts the folder in place: a crash leaves the old folder (or none), never a half-written one.
    An adapter records a shipped base by its hub id, and a classifier adapter gets the base's ``config.json``
    with its ``id2label`` / ``label2id`` beside it, so plain transformers + peft find the class names.

    Args:
        target: the folder to write.
        model: a transformers model or a ``PeftModel``.
        tokenizer: the tokenizer it was trained with.
        metadata: from :func:`new_metadata` (or an export's copy of it).
        result: the method's measurements so far (test metrics, costs) for the model card; None for none.
        save_weights: ``(model, folder) -> None`` writing the weights and their config (training passes
            ``methods.save_weights``, which converts PiSSA/OLoRA adapters); default ``model.save_pretrained``.
    """
    with fsutil.atomic_dir(target) as tmp:
        if save_weights is not None:
            save_weights(model, tmp)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if is_adapter(tmp):
            _record_base_id(tmp, metadata.get("base_model_id"))
            if metadata.get("task") == "classification" and metadata.get("labels"):
                _save_head_config(tmp, model, list(metadata["labels"]))
        write_metadata(tmp, metadata)
        # Not write_model_card's default lookup: beside tmp lies the target's parent, where an older run's
        # result.json (or an unrelated one, for an export) may be.
        card_result = result if result is not None else _result_of(metadata, beside=None)
        fsutil.write_text(tmp / MODEL_CARD_FILE, model_card(tmp, metadata, card_result))
    return target


def _record_base_id(folder: Path, hub_id: str | None) -> None:
    """``base_model_name_or_path`` = the hub id, instead of peft's default, the folder the base was loaded from.

    peft copies ``model.config._name_or_path``: for a shipped base, a path inside the virtualenv or the cache,
    wrong once the run is copied and meaningless on the Hub. A user's own folder is kept: only they know its origin.
    """
    if not hub_id:
        return
    config = adapter_config(folder)
    config["base_model_name_or_path"] = hub_id
    fsutil.write_json(folder / ADAPTER_CONFIG_FILE, config)


def _save_head_config(folder: Path, model: Any, labels: list[str]) -> None:
    """The base's config with this head's labels, as ``config.json`` beside the adapter.

    peft's adapter_config.json has no place for labels (unknown keys make every load warn), and a client
    building the base needs ``num_labels`` and the label names: ``AutoConfig.from_pretrained(folder)`` gives both.
    The cost: ``AutoModelForSequenceClassification.from_pretrained(folder)`` then takes the folder for a full
    model and finds no weights; the model card shows the loading that works.
    """
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    id2label = {i: name for i, name in enumerate(labels)}
    if dict(config.id2label) != id2label:  # the head was built from these labels; a mismatch is a bug upstream
        raise AdapterError(f"the model's head has labels {dict(config.id2label)}, the metadata {labels}")
    config.save_pretrained(str(folder))


def saved_size(folder: Path) -> int:
    """Bytes on disk of the model's own files (weights and their configs), tokenizer and metadata excluded.

    An adapter's ``config.json`` is the base's config with the head's labels, not part of the adapter: not counted.
    """
    if not folder.is_dir():
        return 0
    adapter = is_adapter(folder)
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and (p.name in WEIGHT_FILES or fnmatch.fnmatch(p.name, WEIGHT_SHARDS))
               and not (adapter and p.name == MODEL_CONFIG_FILE))


# --------------------------------------------------------------------------- model card


def write_model_card(folder: Path, result: RunResult | None = None, intervals: Any = None,
                     confidence: float | None = None) -> Path:
    """Write (or rewrite) the folder's ``README.md`` model card from its ``peftlab.json`` and its results.

    Training writes the card with the point test metrics; the report step, which computes the bootstrap
    intervals (``stats.run_statistics``), calls this again to add them::

        ms = stats.method(run.name)
        artifacts.write_model_card(run_dir / run.output_dir, result=run, intervals=ms.metrics,
                                   confidence=stats.confidence)

    Args:
        folder: a saved model or adapter folder (with ``peftlab.json``).
        result: the method's RunResult; default: the ``result.json`` beside the folder, if there is one.
        intervals: metric name -> interval: an object with ``low`` / ``high`` (``stats.Interval``), a
            ``{"low": .., "high": ..}`` dict or a ``(low, high)`` pair. Metrics without one show "-".
        confidence: the intervals' coverage (e.g. 0.95), shown in the table's header.

    Returns:
        The card's path.
    """
    meta = read_metadata(folder)
    if result is None:
        result = _result_of(meta, beside=folder)
    card = model_card(folder, meta, result, _interval_pairs(intervals), confidence)
    path = folder / MODEL_CARD_FILE
    fsutil.write_text(path, card)
    return path


def _result_of(meta: Metadata | dict[str, Any], beside: Path | None) -> RunResult | None:
    """The RunResult of the run folder ``beside`` was saved in, or, for a merged export, of its adapter's run."""
    places = [beside.parent / RESULT_FILE] if beside is not None else []
    if meta.get("merged_from"):
        places.append(Path(str(meta["merged_from"])).parent / RESULT_FILE)
    for place in places:
        if place.is_file():
            try:
                return RunResult.from_dict(json.loads(place.read_text(encoding="utf-8")))
            except (ValueError, TypeError):
                logger.warning("%s is not a readable RunResult; the model card has no results", place)
    return None


def _interval_pairs(intervals: Any) -> dict[str, tuple[float, float]]:
    pairs: dict[str, tuple[float, float]] = {}
    for name, value in (intervals or {}).items():
        if hasattr(value, "low") and hasattr(value, "high"):
            pairs[name] = (float(value.low), float(value.high))
        elif isinstance(value, dict):
            pairs[name] = (float(value["low"]), float(value["high"]))
        else:
            low, high = value
            pairs[name] = (float(low), float(high))
    return pairs


_METRIC_NAMES = {"accuracy": "accuracy", "f1_macro": "macro F1", "precision_macro": "macro precision",
                 "recall_macro": "macro recall", "loss": "loss (cross-entropy)", "perplexity": "perplexity"}


def model_card(folder: Path, meta: Metadata | dict[str, Any], result: RunResult | None = None,
               intervals: dict[str, tuple[float, float]] | None = None, confidence: float | None = None) -> str:
    """The text of a saved folder's ``README.md``: what it is, what it was trained on, how well, how to load it."""
    from peftlab.models import ALIASES, alias_of

    classify = meta.get("task", "classification") == "classification"
    adapter = bool(meta.get("is_adapter"))
    method = str(meta.get("merged_method") or meta.get("method") or "unknown")
    base_id = meta.get("base_model_id")
    base_shown = base_id or meta.get("base_model_name") or meta.get("base_model") or "unknown"
    labels = list(meta.get("labels") or [])
    alias = alias_of(str(meta.get("base_model_name") or "")) or (alias_of(str(base_id)) if base_id else None)
    task_words = "text classification" if classify else "causal language modelling"
    kind = ("a PEFT adapter" if adapter else "a merged model (adapter folded into its base)"
            if meta.get("merged_from") else "a fully fine-tuned model")

    front = ["---", f"library_name: {'peft' if adapter else 'transformers'}"]
    if base_id:
        front.append(f"base_model: {base_id}")
    front.append(f"pipeline_tag: {'text-classification' if classify else 'text-generation'}")
    front += ["tags:", "- peftlab", f"- {method}", "---", ""]

    lines = [f"# {meta.get('name') or method}: {task_words}, {method} on {base_shown}", "",
             f"This folder is {kind}, trained with peftlab {meta.get('peftlab_version', '')} "
             f"(method `{method}`" + (f", seed {result.seed}" if result and result.seed is not None else "") + ").",
             ""]
    if meta.get("merged_from"):
        lines += [f"Merged from the adapter `{meta['merged_from']}`; it loads with plain transformers, no peft.", ""]
    if classify and labels:
        lines += ["## Labels", "", "| id | label |", "|---|---|"] + [f"| {i} | {n} |" for i, n in enumerate(labels)]
        lines += ["", "The same order is in `config.json` (`id2label` / `label2id`)"
                  + (" beside the adapter." if adapter else "."), ""]

    lines += ["## Base model", "", f"- `{base_shown}`" + (f" (peftlab alias `{alias}`)" if alias else "")]
    if alias and ALIASES[alias].convert is not None:
        lines.append(f"- peftlab's copy of this base is converted: {ALIASES[alias].description}. The "
                     f"{'adapter' if adapter else 'model'} was trained on that copy; the Hub's weights differ "
                     f"slightly, so load the base from peftlab's copy to reproduce the results below.")
    if meta.get("base_fingerprint"):
        shape = ", ".join(f"{k} {v}" for k, v in meta["base_fingerprint"].items() if v is not None)
        lines.append(f"- shape: {shape}")
    lines.append("")

    lines += ["## Data", ""]
    if meta.get("data_source"):
        lines.append(f"- source: `{meta['data_source']}`")
    if meta.get("split_sizes"):
        lines.append("- rows per split: " + ", ".join(f"{k} {v}" for k, v in meta["split_sizes"].items()))
    lines.append(f"- text cleaning: `{meta.get('clean', 'none')}` (peftlab predict applies it again); "
                 f"at most {meta.get('max_length', '?')} tokens per text")
    lines.append("")

    lines += _results_lines(result, intervals or {}, confidence, folder)
    lines += _usage_lines(meta, classify, adapter, str(base_id or meta.get("base_model_name") or "BASE_MODEL"), alias)
    return "\n".join(front + lines).rstrip() + "\n"


def _results_lines(result: RunResult | None, intervals: dict[str, tuple[float, float]], confidence: float | None,
                   folder: Path) -> list[str]:
    if result is None or not result.test_metrics:
        return ["## Test results", "", "Not measured when this card was written.", ""]
    level = f"{100 * confidence:.0f}% interval" if confidence else "interval"
    lines = ["## Test results", "", f"| metric | test | {level} |", "|---|---|---|"]
    for name, value in result.test_metrics.items():
        low_high = intervals.get(name)
        shown = f"{low_high[0]:.4f} – {low_high[1]:.4f}" if low_high else "-"
        lines.append(f"| {_METRIC_NAMES.get(name, name)} | {value:.4f} | {shown} |")
    lines.append("")
    if intervals:
        lines.append("Intervals: percentile bootstrap over the test rows (peftlab report).")
    else:
        lines.append("Intervals are computed by `peftlab report`, which rewrites this card with them.")
    if result.best_epoch is not None:
        lines.append(f"Best epoch {result.best_epoch:g} of {result.epochs_run:g} by validation "
                     f"{result.best_metric_name}; the test split chose nothing.")
    size = saved_size(folder) or result.model_size_bytes  # a merged export: its own size, not the adapter's
    lines += ["", "## Costs", "", "| | |", "|---|---|",
              f"| trainable parameters | {result.trainable_params:,} of {result.total_params:,} "
              f"({result.trainable_pct:.3f}%) |",
              f"| training time | {result.wall_time_s:.1f} s ({result.train_steps} steps, "
              f"{result.train_samples_per_s:.1f} samples/s) |",
              f"| peak memory | RSS {_mib(result.peak_rss_bytes)}"
              + (f", accelerator {_mib(result.peak_accelerator_bytes)}" if result.peak_accelerator_bytes else "")
              + " |",
              f"| size on disk (weights and their configs) | {_mib(size)} |", ""]
    return lines


def _mib(n: int | None) -> str:
    n = n or 0
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"  # adapters are often under 1 MiB


def _usage_lines(meta: Metadata | dict[str, Any], classify: bool, adapter: bool, base: str,
                 alias: str | None) -> list[str]:
    clean = meta.get("clean", "none")
    offline = (f"  # offline: str(peftlab.models.resolve_model_path({base!r})), peftlab's local copy"
               if alias else "")
    lines = ["## How to load", "", "With peftlab (applies the training-time cleaning and length):", "", "```python"]
    if classify:
        lines += ["import peftlab", "", 'predictor = peftlab.load("path/to/this/folder")',
                  'predictor.predict(["a text"])        # class names',
                  'predictor.predict_proba(["a text"])  # probabilities, columns in label order']
    else:
        lines += ["from peftlab.generate import generate, load_generator", "",
                  'generator = load_generator("path/to/this/folder")', 'print(generate(generator, ["a prompt"]))']
    lines += ["```", "", "With plain transformers" + (" + peft:" if adapter else ":"), "", "```python"]
    if classify and adapter:
        lines += ["import torch",
                  "from peft import PeftModel",
                  "from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer", "",
                  'folder = "path/to/this/folder"',
                  f"base_path = {base!r}{offline}",
                  "config = AutoConfig.from_pretrained(folder)  # the base's config with this head's id2label",
                  "base = AutoModelForSequenceClassification.from_pretrained(base_path, config=config)",
                  "model = PeftModel.from_pretrained(base, folder).eval()"]
    elif classify:
        lines += ["import torch", "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                  'folder = "path/to/this/folder"',
                  "model = AutoModelForSequenceClassification.from_pretrained(folder).eval()"]
    elif adapter:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'folder = "path/to/this/folder"', f"base_path = {base!r}{offline}",
                  "model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), folder).eval()"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "", 'folder = "path/to/this/folder"',
                  "model = AutoModelForCausalLM.from_pretrained(folder).eval()"]
    lines.append("tokenizer = AutoTokenizer.from_pretrained(folder)")
    if classify:
        lines += ["with torch.inference_mode():",
                  f'    batch = tokenizer(["a text"], padding=True, truncation=True, max_length={meta.get("max_length", 512)}, '
                  'return_tensors="pt")',
                  "    probabilities = model(**batch).logits.softmax(-1)",
                  "labels = [model.config.id2label[i] for i in probabilities.argmax(-1).tolist()]"]
    lines.append("```")
    if clean != "none":
        lines += ["", f"peftlab cleaned the training texts with `{clean}`: apply "
                      f"`peftlab.data.clean_text(text, {clean!r})` first to get the same predictions."]
    if adapter and classify:
        lines += ["", "`AutoModelForSequenceClassification.from_pretrained(folder)` does not work on this folder: "
                      "its `config.json` (there for the labels) makes transformers take it for a full model."]
    lines.append("")
    return lines


def result_file(method_dir: Path) -> Path:
    """Where a method's RunResult is saved in its run folder."""
    return method_dir / RESULT_FILE
