"""Micro-benchmarks behind peftlab's fast-path defaults (benchmark scenario "fast").

    python benchmarks/fast.py [--texts 1024] [--repeats 3]

Each part times one choice against its alternatives in this one process, on the shipped models and
texts, and prints one JSON line:

  optimizer  AdamW step over every parameter of full fine-tuning: for-loop vs foreach vs fused
             (HF Trainer's default ``adamw_torch_fused``, which peftlab keeps)
  inference  classifying N texts: ``torch.inference_mode`` + longest-first batches padded to their longest
             text (peftlab's predictor and server) against ``no_grad``, autograd left on, batches in the
             given order, and the notebook recipe's padding to 512
  threads    one training step (forward, backward, AdamW) and one inference batch with 1, 2 and 4
             intra-op threads on this machine's cores

Times are medians of ``--repeats`` after one warm-up, so one-time costs (allocator, kernels) are out; the
inference variants run in interleaved rounds, so a drifting machine affects them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable


def median_time(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def load_classifier(alias: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftlab.models import resolve_model_path

    folder = str(resolve_model_path(alias))
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    return model, AutoTokenizer.from_pretrained(folder)


def english_texts(count: int) -> list[str]:
    from peftlab.config import load_config
    from peftlab.data import prepare_data

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    data = prepare_data(config.data)
    texts = data.train.texts + data.validation.texts + data.test.texts
    return texts[:count]


def optimizer_steps(repeats: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for alias in ("minilm-l6", "multilingual-e5-small"):
        model, _ = load_classifier(alias)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        row = {"parameters": sum(p.numel() for p in params)}
        for name, options in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}),
                              ("fused", {"fused": True})):
            optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **options)
            row[name] = median_time(optimizer.step, repeats)
            del optimizer
        out[alias] = row
        del model, params
    return out


def inference(texts: list[str], repeats: int, batch_size: int = 64) -> dict[str, Any]:
    import torch

    model, tokenizer = load_classifier("minilm-l6")
    model.eval()
    longest_first = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    given = list(range(len(texts)))

    def classify(order: list[int], context: Callable[[], Any], padding: Any = True) -> None:
        with context():
            for start in range(0, len(order), batch_size):
                batch = [texts[i] for i in order[start:start + batch_size]]
                encoded = tokenizer(batch, padding=padding, truncation=True, max_length=512 if padding ==
                                    "max_length" else 128, return_tensors="pt")
                model(**encoded).logits.detach().float().numpy()

    variants = {
        "peftlab: inference_mode, longest-first, pad to batch": lambda: classify(longest_first, torch.inference_mode),
        "no_grad instead of inference_mode": lambda: classify(longest_first, torch.no_grad),
        "autograd left on": lambda: classify(longest_first, torch.enable_grad),
        "batches in the given order": lambda: classify(given, torch.inference_mode),
        "recipe: given order, pad to 512": lambda: classify(given, torch.inference_mode, "max_length"),
    }
    # Rounds interleave the variants, so drift of the machine (clock, cache, other load) hits them alike; each
    # variant's time is its median over the rounds. Padding to 512 runs once (minutes).
    fast = {k: v for k, v in variants.items() if "512" not in k}
    for run in fast.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in fast.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    for name, run in variants.items():
        if name not in fast:  # one timed run: the model is warm, and the run is long enough to need no median
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    out = {name: {"seconds": statistics.median(t), "texts_per_s": len(texts) / statistics.median(t)}
           for name, t in times.items()}
    return {"texts": len(texts), "batch_size": batch_size, "rounds": repeats, "variants": out}


def threads(texts: list[str], repeats: int) -> dict[str, Any]:
    import torch

    model, tokenizer = load_classifier("minilm-l6")
    batch = tokenizer(texts[:32], padding=True, truncation=True, max_length=128, return_tensors="pt")
    labels = torch.zeros(32, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def train_step() -> None:
        model.train()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(**batch)

    default = torch.get_num_threads()
    out: dict[str, Any] = {"default": default, "cores": len(os.sched_getaffinity(0)), "rows": {}}
    for count in (1, 2, 4):
        torch.set_num_threads(count)
        out["rows"][count] = {"train_step_s": median_time(train_step, repeats), "inference_batch_s":
                              median_time(infer, repeats)}
    torch.set_num_threads(default)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    texts = english_texts(args.texts)
    print(json.dumps({"optimizer": optimizer_steps(args.repeats), "inference": inference(texts, args.repeats),
                      "threads": threads(texts, args.repeats)}))


if __name__ == "__main__":
    main()
