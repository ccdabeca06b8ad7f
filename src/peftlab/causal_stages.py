"""The experiment's causal-LM stages: the untrained base model's baseline, and each method's generations.

These run inside an experiment (they read its config, write into its run directory, and only the main
process generates and writes); inference itself is :mod:`peftlab.generate`.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from peftlab import fsutil
from peftlab.dist import is_main_process
from peftlab.generate import Generator, generate, generation_settings, load_generator

logger = logging.getLogger(__name__)

BASELINE_FILE = "base_model.json"


def _config_settings(config: Any) -> dict[str, Any]:
    g = config.generation
    return {"max_new_tokens": g.max_new_tokens, "do_sample": g.do_sample, "temperature": g.temperature,
            "top_p": g.top_p, "seed": g.seed}


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
    from transformers import Trainer

    from peftlab.train import causal_lm_collator, quiet_trainer, training_arguments

    losses = {}
    with tempfile.TemporaryDirectory(prefix="peftlab-base-") as scratch:
        # The same arguments as a method's Trainer (batch size, precision, loss averaging): the baseline's
        # loss then compares directly with each method's test loss. No step is taken (learning rate 0).
        args = training_arguments(config, base, Path(scratch))
        # eval_dataset only because the arguments evaluate every epoch, which needs one; each split is
        # passed to evaluate() explicitly below.
        trainer = Trainer(model=model, args=args, eval_dataset=next(iter(splits.values())),
                          data_collator=causal_lm_collator(base.tokenizer), processing_class=base.tokenizer)
        quiet_trainer(trainer)
        for name, dataset in splits.items():
            metrics = trainer.evaluate(dataset, metric_key_prefix=name)
            losses[name] = float(metrics[f"{name}_loss"])
    return losses
