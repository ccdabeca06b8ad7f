"""Export an adapter merged into its base model: a plain transformers folder that needs no peft to load.

Only methods whose update is a change of existing weights can merge (LoRA,
DoRA, LoHa, AdaLoRA, IA3: peft's ``merge_and_unload``). Prompt learning adds
virtual tokens or per-layer prefixes that no weight of the base can hold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from peftlab.artifacts import Metadata, find_model_dir, read_metadata, save_folder
from peftlab.config import MethodName
from peftlab.errors import AdapterError, MethodError, PeftlabError

logger = logging.getLogger(__name__)


def export_merged(model_dir: str | Path, output: str | Path, overwrite: bool = False,
                  base_model: str | None = None) -> Path:
    """Merge an adapter into its base model and save the result as a full model folder.

    The folder holds safetensors weights, the tokenizer and peftlab's metadata with
    ``is_adapter: false``, so ``peftlab predict`` (or plain transformers) loads it
    like a fully fine-tuned model and gets the adapter's predictions.

    Args:
        model_dir: RUN_DIR/method, its ``model`` folder, or any adapter folder saved by peftlab.
        output: the folder to write (atomically: a crash leaves no half folder).
        overwrite: replace ``output`` if it exists.
        base_model: base model alias or folder; default: the one the adapter was trained on.

    Returns:
        ``output``.

    Raises:
        AdapterError: ``model_dir`` is not an adapter (or does not fit its base model).
        MethodError: the method cannot be merged (prompt tuning, prefix tuning, p-tuning).
        PeftlabError: ``output`` exists and ``overwrite`` is false, or it would overwrite the adapter itself.
    """
    folder = find_model_dir(model_dir)
    meta = read_metadata(folder)
    target = Path(output).expanduser()
    _check_mergeable(folder, meta)
    if target.resolve() == folder.resolve() or folder.resolve().is_relative_to(target.resolve()):
        raise PeftlabError(f"--output {target} would replace the adapter {folder} it is made from; choose another "
                           f"folder")
    if target.exists() and not overwrite:
        raise PeftlabError(f"{target} exists; pass --overwrite to replace it")

    model, tokenizer = _load_adapter_model(folder, meta, base_model)
    merged = model.merge_and_unload()
    merged_meta: Metadata = {**meta, "is_adapter": False, "merged_from": str(folder),
                             "merged_method": str(meta.get("method"))}
    save_folder(target, merged, tokenizer, merged_meta)
    logger.info("%s (%s) merged into its base and saved to %s", folder, meta.get("method"), target)
    return target


def _check_mergeable(folder: Path, meta: dict[str, Any]) -> None:
    from peftlab.methods import MERGEABLE, PROMPT_LEARNING

    if not meta.get("is_adapter"):
        raise AdapterError(f"{folder} is a full model (method {meta.get('method', 'full')}), not an adapter: "
                           f"there is nothing to merge; use the folder as it is")
    method = str(meta.get("method", "")).lower()
    try:
        name = MethodName(method)
    except ValueError:
        raise MethodError(f"{folder}: method {method!r} is not one peftlab knows; mergeable methods: "
                          f"{', '.join(sorted(m.value for m in MERGEABLE))}") from None
    if name in PROMPT_LEARNING:
        raise MethodError(f"{folder}: {method} cannot be merged: it adds learned virtual tokens/prefixes, not "
                          f"changes to the base weights. Serve it as an adapter (`peftlab serve`) or predict with "
                          f"it directly; mergeable methods: {', '.join(sorted(m.value for m in MERGEABLE))}")
    if name not in MERGEABLE:
        raise MethodError(f"{folder}: {method} cannot be merged; mergeable methods: "
                          f"{', '.join(sorted(m.value for m in MERGEABLE))}")


def _load_adapter_model(folder: Path, meta: dict[str, Any], base_model: str | None) -> tuple[Any, Any]:
    """The PeftModel (base + adapter), in fp32 on the CPU, and the tokenizer to save beside it."""
    # fp32 for the merge: adding low-rank products into bf16 weights loses the small updates.
    if meta.get("task") == "causal-lm":
        from peftlab.generate import load_generator

        loaded: Any = load_generator(folder, base_model=base_model, dtype="float32", device="cpu")
    else:
        from peftlab.predict import load_predictor

        loaded = load_predictor(folder, base_model=base_model, dtype="float32", device="cpu")
    return loaded.model, loaded.tokenizer
