"""Resident memory of `peftlab serve` with N LoRA adapters on one shared base model.

    python benchmarks/serve_memory.py                      # minilm-l6, N = 1 4 16
    python benchmarks/serve_memory.py --counts 1 4 16 --naive 1 4

Random LoRA adapters (r=8 on query/value, classifier head in modules_to_save;
no training: memory does not depend on the weights' values) are saved once.
Each measurement runs in a fresh Python process, so earlier runs cannot leave
memory behind. In it the registry loads the base model and reads every base
tensor with one forward pass (safetensors are memory-mapped: untouched pages
would not count in RSS; a first pass also allocates its one-time buffers; peft
is imported too), then loads N adapters and classifies one text with each, all
in one request as the server would. RSS (psutil, after gc) is taken with the
base only, and with N adapters.

``--naive`` measures the alternative for comparison: N independent predictors
(``peftlab.predict.load_predictor``), each with its own copy of the base.
The result is a markdown table on stdout (copied into docs/serving.md), or with ``--json``
one JSON line (used by ``benchmarks/run.py``, scenario serve).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MiB = 2**20


def rss() -> int:
    import psutil

    gc.collect()
    return int(psutil.Process().memory_info().rss)


def make_adapters(base: Path, root: Path, count: int, rank: int, method: str = "lora",
                  prefix: str | None = None) -> list[Path]:
    """Save ``count`` random ``method`` adapters (lora r=``rank``, ia3 or prompt_tuning with 8 virtual tokens) in
    peftlab's layout (adapter + tokenizer + peftlab.json); each its own random weights and classifier head."""
    import copy

    import torch
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = ["negative", "neutral", "positive"]
    configs = {"lora": lambda: LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=2 * rank, init_lora_weights=False),
               "ia3": lambda: IA3Config(task_type="SEQ_CLS"),
               "prompt_tuning": lambda: PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8)}
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=len(labels))
    folders = []
    for index in range(count):
        torch.manual_seed(index)
        model = copy.deepcopy(loaded)  # one load of the base for all: a fresh copy per adapter
        torch.nn.init.normal_(model.classifier.weight, std=0.02)
        model = get_peft_model(model, configs[method]())
        folder = root / f"{prefix or method}-{index:02d}"
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        meta = {"task": "classification", "method": method, "labels": labels, "base_model": str(base),
                "max_length": 128, "clean": "none", "is_adapter": True}
        (folder / "peftlab.json").write_text(json.dumps(meta), encoding="utf-8")
        folders.append(folder)
    return folders


def measure_shared(base: str, adapters: Path, count: int) -> dict[str, Any]:
    """In this (fresh) process: RSS before the base, with it, and with ``count`` adapters loaded and used."""
    import peft  # noqa: F401  -- its ~20 MiB of modules are a one-time cost, not an adapter's
    import torch

    from peftlab.serve.registry import AdapterRegistry

    torch.set_num_threads(1)
    before = rss()
    registry = AdapterRegistry(base, adapters, max_loaded=0)
    registry.start(eager=False)
    assert registry.ready, registry.error
    # Internals, for measurement only: one forward pass through the bare base, so that every mmap'd weight
    # page is resident and the one-time costs of a first pass (allocator pools, kernels) are in the baseline.
    warm = registry._skeleton("classification", 3)
    with torch.inference_mode():
        warm(**registry._tokenizer(["a wonderful film"], return_tensors="pt"))
    del warm
    with_base = rss()
    names = sorted(registry.entries)[:count]
    for name in names:
        registry.load(name)
    results = registry.classify([(name, "a wonderful film") for name in names])
    assert all(isinstance(r, dict) for r in results), results
    loaded = rss()
    return {"count": count, "before": before, "base": with_base, "loaded": loaded,
            "forward_passes": registry.forward_passes}


def measure_naive(adapters: Path, count: int) -> dict[str, Any]:
    """In this (fresh) process: RSS with ``count`` independent predictors, each with its own base model."""
    import torch

    from peftlab.predict import load_predictor

    torch.set_num_threads(1)
    before = rss()
    predictors = [load_predictor(folder, device="cpu") for folder in sorted(adapters.iterdir())[:count]]
    for predictor in predictors:
        predictor.predict_proba(["a wonderful film"])
    return {"count": count, "before": before, "loaded": rss()}


def child(kind: str, base: str, adapters: Path, count: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", kind, "--base", base, "--adapters", str(adapters),
               "--counts", str(count)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="minilm-l6", help="base model alias or folder")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16], help="adapters loaded at once")
    parser.add_argument("--naive", type=int, nargs="*", default=[1, 4], help="counts for the one-model-per-adapter "
                                                                             "comparison")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of markdown tables")
    parser.add_argument("--adapters", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["shared", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    if args.child:
        measure = measure_shared if args.child == "shared" else measure_naive
        call = (args.base, args.adapters, args.counts[0]) if args.child == "shared" else (args.adapters,
                                                                                            args.counts[0])
        print(json.dumps(measure(*call)))  # type: ignore[operator]
        return

    from peftlab.models import folder_size, resolve_model_path

    base_folder = resolve_model_path(args.base)
    with tempfile.TemporaryDirectory(prefix="peftlab-serve-memory-") as scratch:
        root = Path(scratch)
        folders = make_adapters(base_folder, root, max(args.counts + args.naive), args.rank)
        adapter_bytes = (folders[0] / "adapter_model.safetensors").stat().st_size
        base_bytes = folder_size(base_folder)
        shared = [child("shared", args.base, root, n) for n in args.counts]
        naive = [child("naive", args.base, root, n) for n in args.naive]

    if args.json:
        print(json.dumps({"base": args.base, "rank": args.rank, "base_disk_bytes": base_bytes,
                          "adapter_disk_bytes": adapter_bytes, "shared": shared, "naive": naive}))
        return
    print(f"base {args.base}: {base_bytes / MiB:.1f} MiB on disk; one LoRA adapter (r={args.rank}): "
          f"{adapter_bytes / MiB:.2f} MiB on disk\n")
    print("| adapters loaded | RSS, base only (MiB) | RSS with adapters (MiB) | growth (MiB) | growth per adapter "
          "(MiB) | adapters on disk (MiB) | forward passes for one text per adapter |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in shared:
        growth = (row["loaded"] - row["base"]) / MiB
        print(f"| {row['count']} | {row['base'] / MiB:.0f} | {row['loaded'] / MiB:.0f} | {growth:.1f} | "
              f"{growth / row['count']:.2f} | {row['count'] * adapter_bytes / MiB:.1f} | {row['forward_passes']} |")
    if naive:
        print("\nFor comparison, one predictor (own base copy) per adapter:\n")
        print("| predictors | RSS before (MiB) | RSS with predictors (MiB) | growth (MiB) | "
              "growth per predictor (MiB) |")
        print("|---:|---:|---:|---:|---:|")
        for row in naive:
            growth = (row["loaded"] - row["before"]) / MiB
            print(f"| {row['count']} | {row['before'] / MiB:.0f} | {row['loaded'] / MiB:.0f} | {growth:.1f} | "
                  f"{growth / row['count']:.1f} |")


if __name__ == "__main__":
    main()
