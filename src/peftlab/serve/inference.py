"""Classify and generate with the adapters of an :class:`~peftlab.serve.store.AdapterStore`.

Rows for different adapters share forward passes (:mod:`~peftlab.serve.mixed`): rows of LoRA, IA3 and
prompt-tuning adapters with as many classes run in one gathered pass, each with its own adapter's weights,
virtual tokens and head, whichever PeftModel (group) the adapter lives in. Adapters it cannot gather run one
pass per adapter, on that adapter's rows, in the same scheduling step (peft's own ``adapter_names`` where
:mod:`peftlab.methods` says peft mixes the method). Classification and generation take the store's lock of
their own task, so a long generation never holds up a classify batch.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from peftlab.errors import AdapterError
from peftlab.serve import mixed
from peftlab.serve.discovery import AdapterEntry
from peftlab.serve.errors import TextError, WrongTaskError
from peftlab.serve.store import AdapterStore

logger = logging.getLogger(__name__)


def classify(store: AdapterStore, rows: Sequence[tuple[str, str]]) -> list[dict[str, Any] | Exception]:
    """Classify ``(adapter, text)`` rows with ``store``'s adapters; rows of different adapters share forward
    passes (see the module's docstring).

    Returns:
        Per row, a dict (adapter, label, score, probabilities) or the exception that row failed with: an
        :class:`AdapterError`, or a :class:`TextError` for a text the tokenizer or model failed on alone.
    """
    store.require_ready()
    results: list[dict[str, Any] | Exception | None] = [None] * len(rows)
    by_name: dict[str, list[int]] = {}
    for index, (name, _) in enumerate(rows):
        by_name.setdefault(name, []).append(index)
    names = list(by_name)
    # More distinct adapters than may be held: take them in chunks, each fully loaded while it runs.
    step = store.max_loaded or len(names) or 1  # no rows: nothing to run
    with store.lock_for("classification"), store.classifying():
        for start in range(0, len(names), step):
            chunk = names[start:start + step]
            runnable = []
            for name in chunk:
                try:
                    entry = store.classifier(name)
                    store.ensure_loaded(entry, keep=set(chunk))
                    runnable.append(entry)
                except AdapterError as exc:
                    for index in by_name[name]:
                        results[index] = exc
            # Adapters of every method with as many classes share passes (their PeftModels share the base).
            by_heads: dict[int, list[AdapterEntry]] = {}
            for entry in runnable:
                by_heads.setdefault(len(entry.labels), []).append(entry)
            for entries in by_heads.values():
                models = {entry.peft_name: store.group(entry).model for entry in entries}
                mixes = {id(models[e.peft_name]): _peft_mixes(e) for e in entries}
                by_peft_name = {entry.peft_name: entry for entry in entries}
                for step_pass in mixed.plan(models, peft_mixes=lambda m, mixes=mixes: mixes[id(m)], mode=store.mixing,
                                            cache=store.mixing_cache):
                    indices = [i for peft_name in step_pass.adapters for i in by_name[by_peft_name[peft_name].name]]
                    _run_rows(store, models, indices, rows, results, step_pass.how)
    return results  # type: ignore[return-value]


def _peft_mixes(entry: AdapterEntry) -> bool:
    """Whether peft's own ``adapter_names`` gives each row its adapter's result for ``entry``'s method.

    :data:`peftlab.methods.MIXED_BATCH` declares it per method where it exists; without it, plain LoRA (peft
    0.21 refuses ``adapter_names`` with DoRA and silently ignores it for IA3 and prompt learning).
    """
    import peftlab.methods as methods

    plain_lora = entry.peft_type == "LORA" and not entry.use_dora
    declared = getattr(methods, "MIXED_BATCH", None)
    if declared is None:
        return plain_lora
    return plain_lora and entry.method in {str(getattr(m, "value", m)) for m in declared}


def _run_rows(store: AdapterStore, models: dict[str, Any], indices: list[int], rows: Sequence[tuple[str, str]],
              results: list[Any], how: str) -> None:
    from peftlab.data import clean_text

    runnable = []
    for index in indices:
        entry = store.entries[rows[index][0]]
        if clean_text(rows[index][1], entry.clean):
            runnable.append(index)
        else:  # training drops such rows: no adapter has learnt a label for them
            results[index] = TextError(f"the text is empty after cleaning (adapter {entry.name!r} cleans with "
                                       f"{entry.clean!r}): remove it", index)
    # Longest first, as the predictor does: similar lengths share a pass (less padding).
    order = sorted(runnable, key=lambda i: -len(rows[i][1]))
    for start in range(0, len(order), store.max_batch_rows):
        batch = order[start:start + store.max_batch_rows]
        try:
            _forward(store, models, batch, rows, results, how)
        except Exception as exc:  # one bad text must not fail its batch mates: each row again, alone
            if len(batch) == 1:
                logger.warning("classifying one text failed: %s", exc, exc_info=True)
                results[batch[0]] = TextError(f"the tokenizer or model failed on this text ({type(exc).__name__}: "
                                              f"{str(exc)[:200]})", batch[0])
                continue
            logger.info("a shared forward pass of %d rows failed (%s); running each row alone", len(batch), exc)
            for index in batch:
                _run_rows(store, models, [index], rows, results, how)


def _forward(store: AdapterStore, models: dict[str, Any], batch: list[int], rows: Sequence[tuple[str, str]],
             results: list[Any], how: str) -> None:
    import torch

    from peftlab.evaluate import softmax

    inputs = _encode(store, [(store.entries[rows[i][0]], rows[i][1]) for i in batch])
    with torch.inference_mode():
        logits = mixed.forward(models, dict(inputs), [store.entries[rows[i][0]].peft_name for i in batch], how,
                               store.mixing_cache, skip_padding=store.skip_padding).logits
    store.count_passes(1)
    probabilities = softmax(logits.float().cpu().numpy())  # fp32 first: bf16 has no numpy dtype
    for index, row in zip(batch, probabilities):
        entry = store.entries[rows[index][0]]
        entry.last_used = time.monotonic()
        best = int(row.argmax())
        results[index] = {"adapter": entry.name, "label": entry.labels[best], "score": float(row[best]),
                          "probabilities": {n: float(p) for n, p in zip(entry.labels, row)}}


def _encode(store: AdapterStore, items: list[tuple[AdapterEntry, str]]) -> Any:
    """Tokenise texts, each cleaned and truncated as its adapter was trained, padded together."""
    from peftlab.data import clean_text

    texts = [clean_text(text, entry.clean) for entry, text in items]
    lengths = {entry.max_length for entry, _ in items}
    if len(lengths) == 1:  # the usual case: one tokenizer call, as the predictor makes
        encoded = store.tokenizer(texts, padding=True, truncation=True, max_length=lengths.pop(),
                                  return_tensors="pt")
    else:
        features = [dict(store.tokenizer(text, truncation=True, max_length=entry.max_length))
                    for (entry, _), text in zip(items, texts)]
        encoded = store.tokenizer.pad(features, padding=True, return_tensors="pt")
    return encoded.to(store.device)


def generate(store: AdapterStore, name: str, prompts: Sequence[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of ``prompts`` with ``store``'s causal-LM adapter ``name`` (via :mod:`peftlab.generate`).

    Raises:
        WrongTaskError: ``name`` is not a causal-LM adapter.
    """
    from peftlab.generate import Generator
    from peftlab.generate import generate as generate_texts

    entry = store.entry(name)
    if entry.task != "causal-lm":
        raise WrongTaskError(f"adapter {name!r} is not a causal LM adapter (task {entry.task}); use /v1/classify")
    store.require_ready()
    # The causal-LM lock: classify batches (the classification lock) run while this generates.
    with store.lock_for("causal-lm"):
        store.ensure_loaded(entry, keep={name})
        model = store.group(entry).model
        model.set_adapter(entry.peft_name)
        # Before each module of each token's forward pass, let a running classify call finish: the two share
        # the cores (and the GIL), and a classify request then waits for one module of one token at most.
        hooks = [module.register_forward_pre_hook(lambda module, args: store.yield_to_classify())
                 for module in model.get_base_model().modules()]
        try:
            # One prompt at a time, unpadded (peftlab.generate's choice): output never depends on batch mates.
            texts = generate_texts(Generator(model=model, tokenizer=store.tokenizer), list(prompts),
                                   max_new_tokens=max_new_tokens)
        finally:
            for hook in hooks:
                hook.remove()
        store.count_passes(len(prompts))
    return texts
