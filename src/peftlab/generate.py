"""Causal LMs: load a saved model or adapter and generate (inference only; experiment stages: causal_stages).

Generation is greedy unless sampling is asked for, and then seeded, so a
report's "before / after" texts can be reproduced with ``peftlab generate``.
Prompts are generated one at a time: no padding at all, so a prompt's output
never depends on which other prompts shared its batch, and a prompt-tuning
adapter (whose virtual tokens are prepended by ``PeftModel.generate``) sees
exactly the input it was trained on. The prompts of a report are few, so the
lost batching costs little.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.artifacts import adapter_base_folder, attach_adapter, find_model_dir, read_metadata, tokenizer_folder
from peftlab.errors import AdapterError, ModelError

logger = logging.getLogger(__name__)


@dataclass
class Generator:
    """A loaded causal LM (full model, or base + adapter) and its tokenizer."""

    model: Any
    tokenizer: Any
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


# --------------------------------------------------------------------------- loading


def load_generator(model_dir: str | Path, base_model: str | None = None, dtype: str = "auto",
                   device: str | None = None, allow_pickle: bool = False) -> Generator:
    """Load a saved causal LM for generation.

    Args:
        model_dir: RUN_DIR/method, its ``model`` folder, any saved model/adapter folder, or a shipped
            model alias (the base model itself, e.g. ``smollm2-135m``).
        base_model: base model for an adapter (alias or folder); default: the base its saved metadata records
            (``artifacts.read_metadata``).
        dtype: auto (bf16 on GPUs that support it, else fp32), float32, bfloat16 or float16.
        device: torch device; default CUDA when available.
        allow_pickle: allow pickle weights in a user-supplied base folder.

    Returns:
        A :class:`Generator` in eval mode on ``device``.

    Raises:
        AdapterError: the folder is not a causal LM, or the adapter does not fit its base model.
    """
    import torch

    from peftlab.cpu import configure_threads
    from peftlab.models import ALIASES, load_tokenizer, resolve_dtype, resolve_model_path

    configure_threads()
    folder = resolve_model_path(str(model_dir)) if str(model_dir) in ALIASES else find_model_dir(model_dir)
    meta = read_metadata(folder)
    if meta.get("task") != "causal-lm":
        raise AdapterError(f"{folder} is a {meta.get('task', 'classification')} model; use `peftlab predict` "
                           f"for classifiers (generate needs a causal LM)")
    torch_dtype = resolve_dtype(dtype)
    trust = bool(meta.get("trust_remote_code", False))
    model, base_folder = _load_causal_lm(folder, meta, base_model, torch_dtype, trust, allow_pickle)
    tokenizer = load_tokenizer(tokenizer_folder(folder, base_folder), trust)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(target).eval()
    return Generator(model=model, tokenizer=tokenizer, metadata=meta)


def _load_causal_lm(folder: Path, meta: dict[str, Any], base_model: str | None, dtype: Any, trust: bool,
                    allow_pickle: bool) -> tuple[Any, Path]:
    """The model (FFT folder, or base + adapter via ``PeftModel.from_pretrained``) and the base folder."""
    from peftlab.models import load_base_model

    if not meta.get("is_adapter"):
        return load_base_model(folder, "causal-lm", dtype=dtype, trust_remote_code=trust,
                               allow_pickle=allow_pickle), folder

    base_folder = adapter_base_folder(folder, meta, base_model)
    try:
        base = load_base_model(base_folder, "causal-lm", dtype=dtype, trust_remote_code=trust,
                               allow_pickle=allow_pickle)
    except ModelError as exc:
        raise AdapterError(f"{folder}: base model {base_folder} cannot be loaded ({exc}); pass --base with its "
                           f"folder") from None
    return attach_adapter(base, folder, base_folder), base_folder


# --------------------------------------------------------------------------- generation


def generation_settings(max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 0.7,
                        top_p: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The decoding settings as stated in reports: only those that affect the output."""
    if not do_sample:
        return {"decoding": "greedy", "max_new_tokens": max_new_tokens}
    return {"decoding": "sampling", "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "top_k": "off", "seed": seed}


def generate(generator: Generator, prompts: list[str], max_new_tokens: int = 40, do_sample: bool = False,
             temperature: float = 0.7, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Continue each prompt; returns only the newly generated text, one string per prompt.

    Args:
        generator: from :func:`load_generator`.
        prompts: texts to continue; each is generated on its own (no padding).
        max_new_tokens: tokens to generate at most (generation also stops at EOS).
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature (sampling only).
        top_p: nucleus sampling mass (sampling only; 1.0 keeps the whole distribution).
        seed: sampling seed, set before every prompt so each prompt's text is reproducible on its own.

    Returns:
        The generated continuations, special tokens removed, in prompt order.
    """
    import torch
    from transformers import set_seed

    model, tokenizer = generator.model, generator.tokenizer
    # Every knob is set here: values left unset would be filled from the model folder's generation_config,
    # and the report would then show settings that are not the ones used.
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": 1,
                               "repetition_penalty": 1.0, "pad_token_id": tokenizer.pad_token_id,
                               "eos_token_id": tokenizer.eos_token_id}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p, top_k=0)  # top_k 0: off, only temperature and top_p
    outputs = []
    with torch.inference_mode(), warnings.catch_warnings():
        # peft warns on every prompt-tuning step that it ignores position ids; without padding the
        # positions it uses instead (virtual tokens first, then the prompt) are the right ones.
        warnings.filterwarnings("ignore", message="Position ids are not supported", category=UserWarning)
        for prompt in prompts:
            if do_sample:
                set_seed(seed)
            encoded = tokenizer(prompt, return_tensors="pt").to(generator.device)
            generated = model.generate(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                                       **options)
            # PeftModel.generate returns the prompt's ids (not its virtual tokens) ahead of the new ones.
            new_ids = generated[0, encoded["input_ids"].shape[1]:]
            outputs.append(tokenizer.decode(new_ids, skip_special_tokens=True))
    return outputs
