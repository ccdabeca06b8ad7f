"""GPU check: what peftlab's CPU test suite cannot show, measured on the GPUs of this machine in under 10 minutes.

    scripts/gpu_check.sh            (or `make gpu-check`)
    scripts/gpu_check.py [--rows N] [--requests N] [--doc PATH] [--allow-cpu]

Steps, each a real `peftlab` command in its own process and under its own time limit:

1. train   full fine-tuning and LoRA, one epoch of ``--rows`` training rows, on both shipped encoders (minilm-l6 on
           configs/default.yaml, multilingual-e5-small on configs/ko_reviews.yaml), in bf16 mixed precision where
           the GPU supports it, with ``--workers`` = min(2, GPUs); the peak accelerator memory of each run is
           peftlab's own measurement (``torch.cuda.max_memory_allocated``).
2. ddp     LoRA on minilm-l6 under ``torchrun --nproc_per_node <GPUs>``: written once, world size, eval loss and
           time against the single-GPU run of step 1 (skipped, with the reason, on one GPU).
3. serve   benchmarks/serve_load.py: requests/s and latency of ``peftlab serve`` with 1, 4 and 16 adapters.

The ratios go to docs/benchmarks_cuda.md (``--doc``); the raw numbers to benchmarks/results/cuda/gpu_check.json.
Without CUDA the check prints why it is skipped and exits 0, writing nothing. ``--allow-cpu`` runs the same steps
on the CPU to check the script itself; it then needs ``--doc`` elsewhere than docs/benchmarks_cuda.md and writes
no JSON (its numbers are not GPU numbers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks_cuda.md"
RAW = REPO / "benchmarks" / "results" / "cuda" / "gpu_check.json"
TOTAL_S = 570  # the whole check stays under 10 minutes; a step that would start past it is skipped
ENCODERS = (("minilm-l6", "configs/default.yaml"), ("multilingual-e5-small", "configs/ko_reviews.yaml"))


def say(message: str) -> None:
    print(f"gpu-check: {message}", flush=True)


def cuda_state() -> tuple[bool, str]:
    """Whether CUDA is usable here, and why not (without importing torch when no GPU can be there)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return False, f"no CUDA device (CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU)"
    if not any(Path("/dev").glob("nvidia*")) and not Path("/dev/kfd").exists() and sys.platform.startswith("linux"):
        return False, "no CUDA device (no /dev/nvidia* or /dev/kfd: no GPU driver on this machine)"
    try:
        import torch
    except ImportError:
        return False, f"torch is not installed for {sys.executable}"
    if not torch.cuda.is_available():
        where = f"; CUDA_VISIBLE_DEVICES={hidden!r}" if hidden is not None else ""
        build = "a CPU-only build: install a CUDA build of torch" if torch.version.cuda is None else "CUDA build"
        return False, (f"no CUDA device (torch {torch.__version__}, {build}; torch.cuda.is_available() is "
                       f"False{where})")
    return True, f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


class Clock:
    def __init__(self, total_s: float, step_s: float) -> None:
        self.end = time.monotonic() + total_s
        self.step_s = step_s  # the most one training step may take

    def left(self) -> float:
        return self.end - time.monotonic()


def execute(command: list[str], limit_s: float) -> subprocess.CompletedProcess:
    """Run ``command`` in the repository; a step past its time limit fails (exit code 124), it does not hang."""
    say("$ " + " ".join(command))
    limit_s = max(1.0, limit_s)
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=limit_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", f"timed out after {limit_s:.0f} s")


def peftlab(args: list[str], limit_s: float, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    return execute([*(launcher or [sys.executable]), "-m", "peftlab.cli", "-q", *args], limit_s)


def runs_of(out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {r["name"]: r for r in results["runs"]}, results["environment"]


def train_step(scratch: Path, rows: int, gpus: int, clock: Clock) -> dict[str, Any]:
    workers = max(1, min(2, gpus))
    found: dict[str, Any] = {"workers": workers}
    for alias, config in ENCODERS:
        if clock.left() < 60:
            found[alias] = {"skipped": "the 10-minute budget was spent"}
            continue
        out = scratch / f"train-{alias}"
        done = peftlab(["run", config, "--methods", "full,lora", "--output", str(out), "--workers", str(workers),
                        "--set", f"data.max_train_samples={rows}", "--set", "training.epochs=1"],
                       min(clock.step_s, clock.left() - 30))
        if done.returncode != 0:
            found[alias] = {"failed": (done.stderr or done.stdout)[-1500:]}
            continue
        runs, env = runs_of(out)
        found[alias] = {"device": env.get("device"), "runs": {
            name: {k: r.get(k) for k in ("status", "wall_time_s", "train_samples_per_s", "peak_accelerator_bytes",
                                         "peak_rss_bytes", "trainable_params", "model_size_bytes")}
            | {"f1_macro": r.get("test_metrics", {}).get("f1_macro"),
               "eval_loss": (r.get("history") or [{}])[-1].get("eval_loss")}
            for name, r in runs.items()}}
    return found


def ddp_step(scratch: Path, rows: int, gpus: int, clock: Clock, single: dict[str, Any] | None) -> dict[str, Any]:
    if gpus < 2:
        return {"skipped": f"{gpus} GPU visible: DDP needs 2 or more"}
    if clock.left() < 90:
        return {"skipped": "the 10-minute budget was spent"}
    out = scratch / "ddp"
    done = peftlab(["run", "configs/default.yaml", "--methods", "lora", "--output", str(out),
                    "--set", f"data.max_train_samples={rows}", "--set", "training.epochs=1"],
                   min(clock.step_s, clock.left() - 30),
                   launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(gpus)])
    if done.returncode != 0:
        return {"failed": (done.stderr or done.stdout)[-1500:]}
    runs, env = runs_of(out)
    lora = runs["lora"]
    found = {"world_size": env.get("world_size"), "results": len(runs), "wall_time_s": lora["wall_time_s"],
             "eval_loss": lora["history"][-1]["eval_loss"], "peak_accelerator_bytes": lora["peak_accelerator_bytes"]}
    if single and single.get("status") == "ok":
        found["single_wall_time_s"] = single["wall_time_s"]
        found["single_eval_loss"] = single["eval_loss"]
    return found


def serve_step(requests: int, clock: Clock) -> dict[str, Any]:
    if clock.left() < 60:
        return {"skipped": "the 10-minute budget was spent"}
    done = execute([sys.executable, str(REPO / "benchmarks" / "serve_load.py"), "--requests", str(requests)],
                   clock.left() - 10)
    if done.returncode != 0:
        return {"failed": (done.stderr or done.stdout)[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "/").split())[-300:]


def _mib(value: float | None) -> str:
    return f"{value / 2**20:.0f} MiB" if value else "n/a"


def render(found: dict[str, Any], smoke: bool) -> str:
    lines = ["# Benchmarks on CUDA", "",
             f"Generated by `scripts/gpu_check.sh` (`make gpu-check`) on {found['device']}, {found['date']}, "
             f"in {found['seconds']:.0f} s; raw numbers in `benchmarks/results/cuda/gpu_check.json`. Each number "
             f"is one run: one epoch of {found['rows']} training rows per encoder; bf16 mixed precision: "
             f"{'yes' if found['bf16'] else 'no (this GPU does not support bf16: fp32)'}.", ""]
    if smoke:
        lines += ["**CPU smoke run of the script (`--allow-cpu`): these are not GPU numbers.**", ""]
    train = found["train"]
    lines += ["## Full fine-tuning and LoRA", "",
              f"`peftlab run --methods full,lora --workers {train['workers']}` (each method in its own process, on "
              f"its own GPU when there are two).", "",
              "| encoder | method | time | samples/s | peak accelerator memory | test macro F1 |", "|---|---|---|---|---|---|"]
    ratios = []
    for alias, _ in ENCODERS:
        entry = train.get(alias, {})
        if "runs" not in entry:
            lines.append(f"| {alias} | - | {_cell(entry.get('skipped') or 'failed: ' + entry.get('failed', '?'))} "
                         f"| | | |")
            continue
        runs = entry["runs"]
        for name in ("full", "lora"):
            r = runs.get(name, {})
            f1 = r.get("f1_macro")
            lines.append(f"| {alias} | {name} | {r.get('wall_time_s') or 0:.1f} s | {r.get('train_samples_per_s') or 0:.0f} "
                         f"| {_mib(r.get('peak_accelerator_bytes'))} | {f1 if f1 is None else round(f1, 4)} |")
        full, lora = runs.get("full", {}), runs.get("lora", {})
        ratios.append(f"- {alias}: LoRA takes {_ratio(lora.get('wall_time_s'), full.get('wall_time_s'))} the "
                      f"time and {_ratio(lora.get('peak_accelerator_bytes'), full.get('peak_accelerator_bytes'))} "
                      f"the peak accelerator memory of full fine-tuning.")
    lines += ["", *ratios, "", "## DDP over the visible GPUs", ""]
    ddp = found["ddp"]
    if "world_size" in ddp:
        lines += [f"LoRA on minilm-l6 under `torchrun --nproc_per_node {ddp['world_size']}`: {ddp['results']} result "
                  f"written; {ddp['wall_time_s']:.1f} s ({_ratio(ddp['wall_time_s'], ddp.get('single_wall_time_s'))} "
                  f"the single-GPU time); final eval loss {ddp['eval_loss']:.4f} against "
                  f"{ddp.get('single_eval_loss') or float('nan'):.4f} on one GPU (the global batch is "
                  f"{ddp['world_size']}x larger, so it differs a little, but is not multiplied by the world size)."]
    else:
        lines.append(f"Not measured: {_cell(ddp.get('skipped') or 'failed: ' + ddp.get('failed', '?'))}.")
    lines += ["", "## Serving", ""]
    serve = found["serve"]
    if "cases" in serve:
        lines += ["| adapters | batch window | requests/s | p50 | p95 |", "|---|---|---|---|---|"]
        for c in serve["cases"]:
            lines.append(f"| {c['adapters']} | {c['batch_window_ms']:g} ms | {c['requests_per_s']:.1f} | "
                         f"{c['p50_ms']:.1f} ms | {c['p95_ms']:.1f} ms |")
        by = {(c["adapters"], c["batch_window_ms"]): c["requests_per_s"] for c in serve["cases"]}
        lines += ["", f"- 16 adapters against 1: {_ratio(by.get((16, 5.0)), by.get((1, 5.0)))} the requests/s.",
                  f"- 16 adapters, batching window 5 ms against 0 ms: {_ratio(by.get((16, 5.0)), by.get((16, 0.0)))}."]
    else:
        lines.append(f"Not measured: {_cell(serve.get('skipped') or 'failed: ' + serve.get('failed', '?'))}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="training rows per encoder (data.max_train_samples)")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per serving case")
    parser.add_argument("--doc", type=Path, default=DOC, help="where the markdown goes")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU to check this script (not GPU numbers)")
    parser.add_argument("--budget", type=float, default=TOTAL_S, help="seconds for the whole check")
    parser.add_argument("--step-limit", type=float, default=240, help="seconds one training step may take")
    args = parser.parse_args()

    usable, why = cuda_state()
    if not usable and not args.allow_cpu:
        say(f"skipped: {why}")
        return 0
    if args.allow_cpu and args.doc.resolve() == DOC.resolve():
        parser.error("--allow-cpu needs --doc elsewhere than docs/benchmarks_cuda.md (CPU numbers are no GPU numbers)")
    import torch

    gpus = torch.cuda.device_count() if usable else 0
    started = time.monotonic()
    clock = Clock(args.budget, args.step_limit)
    found: dict[str, Any] = {"device": why if usable else "CPU (smoke run)", "rows": args.rows,
                             "date": datetime.date.today().isoformat(),
                             "bf16": bool(usable and torch.cuda.is_bf16_supported())}
    with tempfile.TemporaryDirectory(prefix="peftlab-gpu-check-") as scratch:
        found["train"] = train_step(Path(scratch), args.rows, gpus, clock)
        single = found["train"].get("minilm-l6", {}).get("runs", {}).get("lora")
        found["ddp"] = ddp_step(Path(scratch), args.rows, gpus, clock, single)
        found["serve"] = serve_step(args.requests, clock)
    found["seconds"] = time.monotonic() - started
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(render(found, smoke=not usable), encoding="utf-8")
    if usable:
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps(found, indent=2) + "\n", encoding="utf-8")
    say(f"wrote {args.doc} in {found['seconds']:.0f} s")
    failed = [step for step in ("ddp", "serve") if "failed" in found[step]]
    failed += [alias for alias, _ in ENCODERS if "failed" in found["train"].get(alias, {})]
    if failed:
        say(f"failed: {', '.join(failed)} (details in {args.doc})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
