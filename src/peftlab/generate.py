"""Causal LMs: load a saved model or adapter and generate; the base model's baseline for the report.

Generation is greedy unless sampling is asked for, and then seeded, so a
report's "before / after" texts can be reproduced with ``peftlab generate``.
Prompts are generated one at a time: no padding at all, so a prompt's output
never depends on which other prompts shared its batch, and a prompt-tuning
adapter (whose virtual tokens are prepended by ``PeftModel.generate``) sees
exactly the input it was trained on. The prompts of a report are few, so the
lost batching costs little.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab import fsutil
from peftlab.errors import AdapterError, ModelError
from peftlab.experiment import is_main_process

logger = logging.getLogger(__name__)

BASELINE_FILE = "base_model.json"


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
        base_model: base model for an adapter (alias or folder); default: ``base_model`` in its peftlab.json
            (or ``base_model_name_or_path`` in adapter_config.json).
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
    from peftlab.predict import find_model_dir, read_metadata, tokenizer_folder

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
    from peftlab.predict import adapter_base_folder, attach_adapter

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


def _config_settings(config: Any) -> dict[str, Any]:
    g = config.generation
    return {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample, "temperature": g.temperature,
            "top_p": g.top_p, "seed": g.seed}


# --------------------------------------------------------------------------- experiment hooks


def generate_for_report(config: Any, base: Any, model_dir: Path) -> dict[str, str]:
    """Generations of one trained method's saved model/adapter for the config's prompts.

    Args:
        config: the experiment config (``generation`` section: prompts and decoding settings).
        base: the experiment's :class:`~peftlab.train.BaseModelSpec` (an adapter is loaded on its folder).
        model_dir: the method's saved ``model`` folder.

    Returns:
        prompt -> generated text; empty when there are no prompts or nothing was saved (non-main process).
    """
    prompts = list(config.generation.prompts)
    if not prompts or not is_main_process() or not Path(model_dir).is_dir():
        return {}
    # Reloaded from disk rather than reused from the Trainer: this is what a user of the saved folder gets.
    generator = load_generator(model_dir, base_model=str(base.folder), dtype=config.model.dtype,
                               allow_pickle=base.allow_pickle)
    try:
        texts = generate(generator, prompts, **_config_settings(config))
    finally:
        del generator
        gc.collect()
    return dict(zip(prompts, texts))


def base_model_baseline(config: Any, base: Any, tokenized: dict[str, Any], run_dir: Path,
                        resume: bool) -> dict[str, Any]:
    """The untrained base model: test loss (as the Trainer measures every method's) and generations.

    The loss uses the same collator, batch size and precision as the methods' test evaluation, so the
    numbers compare directly. The result is saved to ``run_dir/base_model.json`` and reused by --resume.

    Returns:
        ``base_generations`` (prompt -> text), ``base_eval_loss`` (test loss) and ``generation_settings``:
        keyword arguments of :class:`~peftlab.results.ExperimentResult`.
    """
    settings = generation_settings(**_config_settings(config))
    cache = run_dir / BASELINE_FILE
    if resume and cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("generation_settings") == settings and list(saved.get("base_generations", {})) == list(
                config.generation.prompts):
            logger.info("base model: baseline from an earlier run; kept")
            return {k: saved[k] for k in ("base_generations", "base_eval_loss", "generation_settings")}

    import torch

    from peftlab.evaluate import perplexity
    from peftlab.models import load_base_model

    logger.info("base model: evaluating before training (test loss, %d prompts)", len(config.generation.prompts))
    model = load_base_model(base.folder, "causal-lm", dtype=torch.float32, trust_remote_code=base.trust_remote_code,
                            allow_pickle=base.allow_pickle)
    try:
        splits = {"test": tokenized["test"]}
        if tokenized["validation"] is not tokenized["test"]:  # data.split.test 0 reuses validation as test
            splits["validation"] = tokenized["validation"]
        losses = _evaluate_loss(config, base, model, splits)
        losses.setdefault("validation", losses["test"])
        generations: dict[str, str] = {}
        if config.generation.prompts and is_main_process():  # only the main process writes the report
            model.to(base.dtype)  # generate in the dtype a loaded method uses (load_generator: model.dtype)
            texts = generate(Generator(model=model, tokenizer=base.tokenizer), list(config.generation.prompts),
                             **_config_settings(config))
            generations = dict(zip(config.generation.prompts, texts))
    finally:
        del model
        gc.collect()
    logger.info("base model: test loss %.4f (perplexity %.2f), validation loss %.4f", losses["test"],
                perplexity(losses["test"]) or float("nan"), losses["validation"])
    result = {"base_generations": generations, "base_eval_loss": losses["test"], "generation_settings": settings}
    if is_main_process():
        fsutil.write_json(cache, {**result, "base_validation_loss": losses["validation"]})
    return result


def _evaluate_loss(config: Any, base: Any, model: Any, splits: dict[str, Any]) -> dict[str, float]:
    """Mean loss of ``model`` on each split, computed by a Trainer set up as ``train_method`` sets up its own."""
    import torch
    from transformers import Trainer, TrainingArguments

    from peftlab.train import causal_lm_collator

    on_gpu = torch.cuda.is_available()
    losses = {}
    with tempfile.TemporaryDirectory(prefix="peftlab-base-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=config.training.eval_batch_size,
            bf16=on_gpu and base.dtype == torch.bfloat16, use_cpu=not on_gpu, report_to="none",
            average_tokens_across_devices=False, remove_unused_columns=False, label_names=["labels"],
            dataloader_num_workers=config.training.dataloader_num_workers, disable_tqdm=False)
        trainer = Trainer(model=model, args=args, data_collator=causal_lm_collator(base.tokenizer),
                          processing_class=base.tokenizer)
        for name, dataset in splits.items():
            metrics = trainer.evaluate(dataset, metric_key_prefix=name)
            losses[name] = float(metrics[f"{name}_loss"])
    return losses
