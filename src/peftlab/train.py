"""One training path for every method: HF ``Trainer`` with measurement around it.

Reads top to bottom: seed -> model -> method -> tokenised splits -> Trainer
-> train (resuming if asked) -> best epoch -> test evaluation -> save what
must be kept -> measure sizes. Works unchanged under ``accelerate launch`` /
``torchrun``: the Trainer does the distribution, and only the main process
writes files.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftlab import artifacts, tracking
from peftlab.config import ExperimentConfig, MethodName
from peftlab.console import training_display, wants_hf_logs, wants_progress
from peftlab.data import PreparedData
from peftlab.dist import is_main_process
from peftlab.errors import ConfigError, MethodError
from peftlab.evaluate import (
    GREATER_IS_BETTER,
    classification_metrics,
    confusion,
    make_compute_metrics,
    per_class_report,
    perplexity,
    softmax,
)
from peftlab.fsutil import write_json
from peftlab.methods import MethodContext, apply_method, save_weights
from peftlab.models import load_base_model, resolve_dtype
from peftlab.params import parameter_parts
from peftlab.results import PREDICTIONS_FILE, EpochRecord, RunResult, SavedPredictions, save_predictions

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


@dataclass
class BaseModelSpec:
    """The base model every method of an experiment starts from."""

    folder: Path
    name: str  # alias or path as the user wrote it
    tokenizer: Any
    dtype: Any
    trust_remote_code: bool
    allow_pickle: bool

    @classmethod
    def from_config(cls, config: ExperimentConfig, folder: Path, tokenizer: Any) -> "BaseModelSpec":
        """The base of ``config.model``, resolved to ``folder`` with its loaded ``tokenizer``."""
        model = config.model
        return cls(folder=folder, name=model.path, tokenizer=tokenizer, dtype=resolve_dtype(model.dtype),
                   trust_remote_code=model.trust_remote_code, allow_pickle=model.allow_pickle)


def tokenize_splits(data: PreparedData, tokenizer: Any, max_length: int, task: str) -> dict[str, Any]:
    """Tokenise each split once (no padding: the collator pads each batch to its longest text)."""
    import datasets

    def encode(split_name: str) -> Any:
        split = data.split(split_name)
        texts = split.texts
        if task == "causal-lm" and tokenizer.eos_token:
            texts = [t + tokenizer.eos_token for t in texts]  # teach the model where a text ends
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        columns = {k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
        if task != "causal-lm":
            columns["labels"] = split.labels
        return datasets.Dataset.from_dict(columns)

    tokenized = {"train": encode("train"), "validation": encode("validation")}
    tokenized["test"] = tokenized["validation"] if data.test is data.validation else encode("test")
    return tokenized


def causal_lm_collator(tokenizer: Any) -> Any:
    """Right-pad a causal-LM batch; labels are the input ids with padding (by attention mask) set to -100.

    Causal LMs often reuse EOS as the pad token (SmolLM2 does). DataCollatorForLanguageModeling masks
    every token equal to pad_token_id, which would also hide the EOS appended to each text: the model
    would never learn where a text ends. Masking by attention mask keeps the EOS in the loss.
    """
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, feature in enumerate(features):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = torch.as_tensor(feature["attention_mask"], dtype=torch.long)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


class PeakMemory:
    """Peak resident memory of this process, sampled every 50 ms on a daemon thread (cheap: one syscall)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def class_weights(config: ExperimentConfig, data: PreparedData) -> list[float] | None:
    """Per-class loss weights from ``training.class_weights`` (index = label id), or None for plain cross-entropy.

    ``balanced`` is scikit-learn's ``n_rows / (n_classes * class_rows)`` on the train split; a mapping
    gives named classes their weight and the others 1. Call it before the run directory is created to
    catch a misspelt class name early.

    Raises:
        ConfigError: the mapping names a class the data does not have (the message lists the classes).
    """
    spec = config.training.class_weights
    if config.task != "classification" or spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(np.asarray(data.train.labels), minlength=len(data.labels))
        # prepare_data refuses a class without training rows, so no count is 0 here.
        return (len(data.train.labels) / (len(data.labels) * counts)).tolist()
    unknown = [name for name in spec if name not in data.labels]
    if unknown:
        raise ConfigError(f"training.class_weights names {', '.join(repr(u) for u in unknown)}, not a class of this "
                          f"data; the classes are {', '.join(data.labels)}")
    return [float(spec.get(name, 1.0)) for name in data.labels]


def _weighted_cross_entropy(weights: list[float]) -> Any:
    """A Trainer ``compute_loss_func``: class-weighted cross-entropy, summed and divided by the row count.

    Divided by ``num_items_in_batch`` (rows in the whole accumulated batch) rather than by the sum of the
    weights, as torch's ``reduction="mean"`` would: then the Trainer's gradient-accumulation scaling stays
    exact, and with ``balanced`` weights (mean weight 1 over the train split) the loss keeps the unweighted scale.
    """
    import torch

    weight = torch.tensor(weights, dtype=torch.float32)

    def compute_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        total = torch.nn.functional.cross_entropy(logits.float(), labels, weight=weight.to(logits.device),
                                                  reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else labels.numel())

    return compute_loss


def _step_timer() -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Seconds spent inside optimizer steps only (forward, backward, update), excluding evaluation."""

        def __init__(self) -> None:
            self.total = 0.0
            self.steps = 0
            self._started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.total += time.perf_counter() - self._started
            self.steps += 1

    return StepTimer()


ELAPSED_FILE = "peftlab_elapsed.json"  # in each checkpoint: training seconds up to that save


def _elapsed_clock(before: float) -> Any:
    """Training wall time that survives a resume: each checkpoint records the seconds spent up to it (the
    earlier sessions' included), and a resumed run starts its clock from its checkpoint's record."""
    from transformers import TrainerCallback

    class ElapsedClock(TrainerCallback):
        def __init__(self) -> None:
            self.before = before
            self.started = time.perf_counter()

        @property
        def seconds(self) -> float:
            return self.before + time.perf_counter() - self.started

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir() and is_main_process():
                write_json(folder / ELAPSED_FILE, {"train_seconds": self.seconds})

    return ElapsedClock()


def _seconds_before(checkpoint: str | None) -> float:
    """Training seconds recorded in the checkpoint a run resumes from (0 without one, or for a checkpoint
    written before peftlab recorded them)."""
    if checkpoint is None:
        return 0.0
    try:
        return float(json.loads((Path(checkpoint) / ELAPSED_FILE).read_text())["train_seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _adalora_callback() -> Any:
    from transformers import TrainerCallback

    class AdaLoraRankAllocation(TrainerCallback):
        # AdaLoRA needs its budget step after each optimizer step, while gradients still exist.
        def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if model is not None:
                model.base_model.update_and_allocate(state.global_step)

    return AdaLoraRankAllocation()


def _finite_guard(learning_rate: float, method: str) -> Any:
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        """Stop a method whose weights or losses stop being finite: its numbers would be garbage reported as results.

        The Trainer's logged loss hides non-finite steps (``logging_nan_inf_filter``), so the trainable weights are
        checked instead: every step for the first few (a too-high learning rate blows up at once), then every
        ``EVERY`` steps (an isfinite pass over the trainable weights costs ~1% of a step), and every eval loss.
        """

        EVERY = 10

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            import torch

            step = state.global_step
            if model is None or (step > 3 and step % self.EVERY):
                return
            with torch.no_grad():
                if all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad):
                    return
            self._fail(f"trainable weights became NaN/inf at step {step}")

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
            loss = (metrics or {}).get("eval_loss")
            if loss is not None and not math.isfinite(loss):
                self._fail(f"validation loss is {loss} after step {state.global_step}")

        def _fail(self, what: str) -> None:
            raise MethodError(f"{what}: training diverged. learning_rate {learning_rate:g} is probably too high for "
                              f"{method}; lower it (e.g. --set methods.{method}.learning_rate={learning_rate / 10:g})")

    return FiniteGuard()


def training_arguments(config: ExperimentConfig, base: BaseModelSpec, output_dir: Path, learning_rate: float = 0.0,
                       metric: str = "loss", restore_best: bool = False, report_to: tuple[str, ...] | list[str] = (),
                       run_name: str | None = None) -> Any:
    """The ``TrainingArguments`` of every Trainer peftlab builds, so their losses are measured alike.

    Args:
        config: the experiment config (its ``training`` section).
        base: the base model (its dtype decides bf16 on GPUs).
        output_dir: where the Trainer writes checkpoints.
        learning_rate: the method's; 0 for a Trainer that only evaluates (the base model's baseline).
        metric: the validation metric that picks the best epoch.
        restore_best: reload the best epoch's checkpoint when training ends.
        report_to: the trackers to log to (``training.report_to`` for a method's run; none for tuning trials).
        run_name: the tracking run's name.
    """
    import torch
    from transformers import TrainingArguments

    training = config.training
    on_gpu = torch.cuda.is_available()
    use_bf16 = on_gpu and base.dtype == torch.bfloat16
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=training.epochs,
        max_steps=training.max_steps or -1,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.eval_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=learning_rate,
        weight_decay=training.weight_decay,
        # One fused AdamW kernel over the trainable parameters: 5x faster per step than foreach AdamW on CPU here
        # (docs/benchmarks.md, section 5). Frozen weights are never handed to the optimizer (no state for them).
        optim="adamw_torch_fused",
        warmup_steps=training.warmup_ratio,
        max_grad_norm=training.max_grad_norm,
        lr_scheduler_type=training.lr_scheduler,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",  # the logged loss is then exactly the epoch's mean training loss
        load_best_model_at_end=restore_best,
        metric_for_best_model=metric,
        greater_is_better=GREATER_IS_BETTER[metric],
        save_total_limit=2,  # the best and the newest epoch: enough to resume and to restore the best
        seed=training.seed,
        data_seed=training.seed,
        train_sampling_strategy="group_by_length" if training.group_by_length else "random",
        activation_checkpointing=training.gradient_checkpointing,
        dataloader_num_workers=training.dataloader_num_workers,
        bf16=use_bf16,  # mixed precision on GPUs that support bf16; fp32 on CPU (bf16 is ~3x slower there)
        use_cpu=not on_gpu,
        report_to=list(report_to) or "none",
        run_name=run_name,
        # Under DDP the default averages token counts across processes and reported a world-size-times
        # too large eval loss for sequence classification (transformers 5.23); per-process means are right.
        average_tokens_across_devices=False,
        remove_unused_columns=False,
        label_names=["labels"],
        # No tqdm: the Trainer's bars nest (one per evaluation) under each other; peftlab.console shows one line.
        disable_tqdm=True,
    )


def quiet_trainer(trainer: Any) -> None:
    """Drop the Trainer's dict logs (``{'eval_loss': ...}``, its PrinterCallback) unless ``--verbose``."""
    from transformers import PrinterCallback

    if not wants_hf_logs():
        trainer.remove_callback(PrinterCallback)


def train_method(config: ExperimentConfig, method_config: Any, data: PreparedData, base: BaseModelSpec,
                 tokenized: dict[str, Any], method_dir: Path, resume: bool = False, *, evaluate_test: bool = True,
                 callbacks: tuple[Any, ...] = ()) -> RunResult:
    """Train and evaluate one method; save its model (or adapter) to ``method_dir/model``.

    Args:
        config: the whole experiment config (training recipe, task, data limits).
        method_config: this method's section of ``config.methods``.
        data: the prepared splits (shared by every method).
        base: the base model folder and tokenizer.
        tokenized: the output of :func:`tokenize_splits`.
        method_dir: this method's folder inside the run directory.
        resume: continue from the newest checkpoint in ``method_dir`` if one exists.
        evaluate_test: evaluate the test split at the end. False for tuning trials, which choose settings and
            so must never see it (``tokenized["test"]`` and ``data.test`` are then not touched).
        callbacks: extra Trainer callbacks, after peftlab's own (the tuner's pruning callback).

    Returns:
        The measured :class:`RunResult`.
    """
    import torch
    from transformers import (
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        Trainer,
        set_seed,
    )

    training = config.training
    task = config.task
    classify = task == "classification"
    name = method_config.run_name
    weights = class_weights(config, data)  # checked before training starts: a typo costs no epoch

    # -- model + method. Seed first: the new head and adapter weights must start the same on every run.
    set_seed(training.seed)
    model = load_base_model(base.folder, task, data.labels if classify else None, dtype=torch.float32,
                            trust_remote_code=base.trust_remote_code, allow_pickle=base.allow_pickle,
                            pad_token_id=base.tokenizer.pad_token_id)
    steps_per_epoch = math.ceil(len(tokenized["train"]) / (training.batch_size * training.gradient_accumulation_steps))
    total_steps = training.max_steps or max(1, math.ceil(steps_per_epoch * training.epochs))
    context = MethodContext(task=task, model_type=model.config.model_type, tokenizer_path=str(base.folder),
                            total_steps=total_steps, tokenizer=base.tokenizer)
    model = apply_method(model, method_config, context)
    trainable, total = _count_parameters(model)
    parts = parameter_parts(model)  # adapter / head / prompt / other, for results.json and the report
    logger.info("%s: %s trainable of %s parameters (%.3f%%)", name, f"{trainable:,}", f"{total:,}",
                100 * trainable / total)

    # -- Trainer. Evaluate and checkpoint every epoch so the best epoch can be restored and a killed run resumed.
    metric = "loss" if not classify else training.metric_for_best_model
    # AdaLoRA changes its ranks (tensor shapes) during training, so an earlier epoch's checkpoint no longer
    # fits the model: it keeps its final epoch instead of the best one.
    restore_best = method_config.method != MethodName.ADALORA.value
    on_gpu = torch.cuda.is_available()
    label = tracking.run_name(name, training.seed, training.run_seeds)
    # Tuning trials choose settings on the validation split: only the final runs are tracked.
    args = training_arguments(config, base, method_dir / CHECKPOINTS, learning_rate=method_config.learning_rate,
                              metric=metric, restore_best=restore_best,
                              report_to=training.report_to if evaluate_test else (), run_name=label)
    collator = causal_lm_collator(base.tokenizer) if not classify else DataCollatorWithPadding(base.tokenizer)
    step_timer = _step_timer()
    recorder = tracking.recorder(args.report_to)
    extra_callbacks = list(callbacks)
    callbacks = [step_timer, _finite_guard(method_config.learning_rate, name), recorder]
    if training.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training.early_stopping_patience))
    if method_config.method == MethodName.ADALORA.value:
        callbacks.append(_adalora_callback())
    callbacks.extend(extra_callbacks)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=collator,
        processing_class=base.tokenizer,
        compute_metrics=make_compute_metrics(len(data.labels)) if classify else None,
        compute_loss_func=_weighted_cross_entropy(weights) if weights is not None else None,
        callbacks=callbacks,
    )
    quiet_trainer(trainer)
    display = training_display(label, metric) if wants_progress() else None
    if display is not None:
        trainer.add_callback(display)

    # -- train, resuming from the newest checkpoint when asked.
    checkpoint = _last_complete_checkpoint(method_dir / CHECKPOINTS) if resume else None
    if checkpoint:
        logger.info("%s: resuming from %s", name, checkpoint)
    clock = _elapsed_clock(_seconds_before(checkpoint))
    trainer.add_callback(clock)
    with PeakMemory() as memory:
        try:
            output = trainer.train(resume_from_checkpoint=checkpoint)
        finally:
            if display is not None:
                display.close()  # after a failure too: the terminal gets its cursor back
            tracking.detach(trainer)
        wall = clock.seconds
    peak_accelerator = int(torch.cuda.max_memory_allocated()) if on_gpu else None
    optimizer_bytes = _optimizer_state_bytes(trainer.optimizer)

    history = _history(trainer.state.log_history, classify)
    if not history:  # fewer steps than one epoch: evaluate once at the end
        final = trainer.evaluate()
        history = [_epoch_record({**final, "epoch": trainer.state.epoch, "step": trainer.state.global_step},
                                 output.training_loss, classify)]
    best = _best_epoch(history, metric) if restore_best else history[-1]

    # -- test split, with the best epoch's weights (load_best_model_at_end restored them).
    result = RunResult(
        name=name, method=method_config.method, task=task, learning_rate=method_config.learning_rate,
        options=method_config.model_dump(exclude={"name", "method", "learning_rate"}),
        wall_time_s=wall, train_samples_per_s=float(output.metrics.get("train_samples_per_second", 0.0)),
        train_steps=int(trainer.state.global_step), epochs_run=float(trainer.state.epoch or 0.0),
        step_time_s=step_timer.total / max(1, step_timer.steps), peak_rss_bytes=memory.peak,
        peak_accelerator_bytes=peak_accelerator, trainable_params=trainable, total_params=total,
        optimizer_state_bytes=optimizer_bytes, best_epoch=best.epoch if best else None,
        best_metric_name=metric, best_metric=_metric_value(best, metric) if best else None, history=history,
        resumed=checkpoint is not None, seed=training.seed, parameter_parts=parts, tracking=dict(recorder.ids),
    )
    if evaluate_test:
        _evaluate_test(trainer, tokenized["test"], data, result, classify, method_dir)

    # -- save what must be kept, atomically, then drop checkpoints (they hold optimizer state: 3x the model).
    if is_main_process():
        model_dir = method_dir / artifacts.MODEL_DIR
        # The test metrics are known here (evaluated above), so the model card carries them; the report step
        # rewrites it with their intervals (artifacts.write_model_card).
        artifacts.save_folder(model_dir, trainer.model, base.tokenizer, _metadata(config, method_config, base, data),
                              result=result, save_weights=save_weights)
        result.model_size_bytes = artifacts.saved_size(model_dir)
        result.output_dir = str(model_dir.relative_to(method_dir.parent))
        shutil.rmtree(method_dir / CHECKPOINTS, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return result


def _last_complete_checkpoint(folder: Path) -> str | None:
    """Newest checkpoint that was fully written; a kill during saving leaves one without trainer_state.json."""
    if not folder.is_dir():
        return None
    complete = []
    for candidate in folder.glob("checkpoint-*"):
        if not candidate.name.removeprefix("checkpoint-").isdigit():
            continue
        if (candidate / "trainer_state.json").is_file():  # the Trainer writes it last
            complete.append(candidate)
        else:
            logger.warning("ignoring incomplete checkpoint %s (interrupted while saving)", candidate)
            shutil.rmtree(candidate, ignore_errors=True)
    if not complete:
        return None
    return str(max(complete, key=lambda c: int(c.name.removeprefix("checkpoint-"))))


def _count_parameters(model: Any) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes held by the optimizer's state tensors (Adam: two moments per trainable weight)."""
    import torch

    if optimizer is None:
        return 0
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    total = 0
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def _history(log_history: list[dict[str, Any]], classify: bool) -> list[EpochRecord]:
    """Per-epoch records from the Trainer's log (which survives a resume, unlike callback state)."""
    train_loss: dict[float, float] = {}
    records = []
    for entry in log_history:
        if "loss" in entry and "epoch" in entry:
            train_loss[round(entry["epoch"], 4)] = float(entry["loss"])
    for entry in log_history:
        if "eval_loss" in entry:
            records.append(_epoch_record(entry, train_loss.get(round(entry.get("epoch", 0.0), 4)), classify))
    return records


def _epoch_record(entry: dict[str, Any], train_loss: float | None, classify: bool) -> EpochRecord:
    metrics = {k.removeprefix("eval_"): float(v) for k, v in entry.items()
               if k.startswith("eval_") and k.removeprefix("eval_") in GREATER_IS_BETTER and k != "eval_loss"}
    if not classify:
        metrics["perplexity"] = perplexity(entry.get("eval_loss")) or float("nan")
    return EpochRecord(epoch=float(entry.get("epoch") or 0.0), step=int(entry.get("step", 0)),
                       train_loss=train_loss, eval_loss=entry.get("eval_loss"), metrics=metrics)


def _metric_value(record: EpochRecord, metric: str) -> float | None:
    return record.eval_loss if metric == "loss" else record.metrics.get(metric)


def _best_epoch(history: list[EpochRecord], metric: str) -> EpochRecord | None:
    scored = [h for h in history if _metric_value(h, metric) is not None]
    if not scored:
        return None
    key = lambda h: _metric_value(h, metric)  # noqa: E731
    # ties go to the earliest epoch, as the Trainer keeps the first best checkpoint
    return max(scored, key=key) if GREATER_IS_BETTER[metric] else min(scored, key=key)


def _evaluate_test(trainer: Any, test_set: Any, data: PreparedData, result: RunResult, classify: bool,
                   method_dir: Path) -> None:
    """Test metrics; for classification also save each row's prediction, in the test split's order."""
    if not classify:
        # evaluate, not predict: predict gathers every logit (rows x tokens x vocab floats, GBs for a
        # 49K vocabulary) only to return the same loss.
        loss = trainer.evaluate(test_set, metric_key_prefix="test").get("test_loss")
        result.test_metrics = {"loss": float(loss), "perplexity": float(perplexity(loss) or float("nan"))}
        return
    output = _predict_in_split_order(trainer, test_set)
    loss = output.metrics.get("test_loss")
    logits = output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
    predicted = np.asarray(logits).argmax(axis=-1)
    labels = np.asarray(output.label_ids)
    if not np.array_equal(labels, np.asarray(data.test.labels)):
        # Saved predictions are paired row by row across methods: a reordering would silently corrupt every interval.
        raise RuntimeError("test predictions came back in a different row order than the test split; "
                           "peftlab's sequential test loader no longer matches this transformers version")
    result.test_metrics = {"loss": float(loss), **classification_metrics(labels, predicted, len(data.labels))}
    result.per_class = per_class_report(labels, predicted, data.labels)
    result.confusion_matrix = confusion(labels, predicted, len(data.labels))
    if is_main_process():
        path = method_dir / PREDICTIONS_FILE
        save_predictions(path, SavedPredictions(labels=list(data.labels), true=labels, predicted=predicted,
                                               probabilities=softmax(logits)))
        result.predictions_file = str(path.relative_to(method_dir.parent))


def _predict_in_split_order(trainer: Any, test_set: Any) -> Any:
    """``trainer.predict`` with a sequential loader, so row ``i`` of the output is test row ``i``.

    ``trainer.predict`` uses the eval sampler, which with ``train_sampling_strategy="group_by_length"`` is a
    seeded ``LengthGroupedSampler`` (transformers 5.23 ``Trainer._get_eval_sampler``): a random permutation
    sorted by length within mega-batches. Rather than re-deriving that permutation from private code, the
    test rows go through ``evaluation_loop`` (the loop ``predict`` itself runs) in order; under DDP accelerate
    shards consecutive batches and ``gather_for_metrics`` restores their order and drops the padding rows.
    """
    from torch.utils.data import DataLoader, SequentialSampler

    args = trainer.args
    loader = DataLoader(test_set, batch_size=args.eval_batch_size, sampler=SequentialSampler(test_set),
                        collate_fn=trainer.data_collator, num_workers=args.dataloader_num_workers,
                        pin_memory=args.dataloader_pin_memory)
    return trainer.evaluation_loop(trainer.accelerator.prepare(loader), description="test",
                                   metric_key_prefix="test")


def _metadata(config: ExperimentConfig, method_config: Any, base: BaseModelSpec,
              data: PreparedData) -> artifacts.Metadata:
    """What `peftlab predict`/`serve` need to use the saved folder without the experiment config."""
    return artifacts.new_metadata(task=config.task, method=method_config.method, name=method_config.run_name,
                                  labels=data.labels, base_model=base.folder, base_model_name=base.name,
                                  max_length=config.data.max_length, clean=config.data.clean,
                                  trust_remote_code=base.trust_remote_code, data_source=_data_source(config),
                                  split_sizes=dict(data.report.split_sizes))


def _data_source(config: ExperimentConfig) -> str:
    """The data as configured (``shipped:NAME``, a file, folder or glob, or the given splits), for the model card."""
    if config.data.splits is not None:
        given = {s: getattr(config.data.splits, s) for s in ("train", "validation", "test")}
        parts = ", ".join(f"{s}: {v}" for s, v in given.items() if v)
        return f"{config.data.path} ({parts})" if config.data.path else parts
    return str(config.data.path)
