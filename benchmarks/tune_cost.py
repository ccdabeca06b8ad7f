"""What tuning costs (benchmark scenario "tune_cost"): the tuner's wall time per method as a multiple of one
untuned run, with pruning on and off, and the validation metric each reaches.

    python benchmarks/tune_cost.py [--methods full,lora,prompt_tuning] [--trials 8] [--epochs 2]
                                   [--train-rows 1000] [--eval-rows 200]

On the shipped default experiment (configs/default.yaml, minilm-l6), for each method, in this one process:

  untuned      `run_experiment` of the method with its config settings (training, validation per epoch and
               the test split), the unit every multiple is counted in
  pruning off  `peftlab tune` with ``tune.pruner: none``: every trial trains every epoch
  pruning on   `peftlab tune` with the median pruner (the default): bad trials stop after an epoch

Each tuning run has a fresh study (its own journal), the same seed and budget, and reports its best
validation metric next to the untuned run's. Writes benchmarks/results/tune_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def untuned(config: Any, folder: Path) -> tuple[float, float | None]:
    """Seconds of one untuned run of the config's single method, and its best validation metric."""
    from peftlab.experiment import run_experiment

    started = time.perf_counter()
    experiment = run_experiment(config, folder)
    run = experiment.runs[0]
    if run.status != "ok":
        raise RuntimeError(f"{run.name} failed: {run.error}")
    return time.perf_counter() - started, run.best_metric


def tuned(config: Any, folder: Path, pruner: str) -> dict[str, Any]:
    from peftlab.config import load_config
    from peftlab.tune import tune

    tree = config.model_dump(mode="json")
    tree["tune"] = {**tree["tune"], "pruner": pruner}
    started = time.perf_counter()
    study = tune(load_config(data=tree), folder, name="tune_cost").methods[0]
    wall = time.perf_counter() - started
    states = [t.state for t in study.trials]
    return {"wall_s": wall, "best_validation": study.best_value, "chosen": study.chosen,
            "trials": len(states), "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
            "epochs_trained": sum(len(t.intermediate) for t in study.trials)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    parser.add_argument("--methods", default="full,lora,prompt_tuning")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "tune_cost.json")
    args = parser.parse_args()

    import torch
    import transformers

    from peftlab.config import load_config
    from peftlab.cpu import configure_threads

    transformers.utils.logging.set_verbosity_error()
    configure_threads()
    overrides = [f"training.epochs={args.epochs}", f"data.max_train_samples={args.train_rows}",
                 f"data.max_eval_samples={args.eval_rows}", "training.method_process=false",
                 f"tune.trials={args.trials}"]
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tune_cost-") as scratch:
        for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
            full = load_config(args.config, overrides)
            config = full.model_copy(update={"methods": [full.method(name)]})
            base_s, base_metric = untuned(config, Path(scratch) / f"{name}-untuned")
            row: dict[str, Any] = {"untuned_s": base_s, "untuned_validation": base_metric}
            for label, pruner in (("pruning_off", "none"), ("pruning_on", "median")):
                result = tuned(config, Path(scratch) / f"{name}-{label}", pruner)
                result["multiple_of_untuned"] = result["wall_s"] / base_s
                row[label] = result
            rows[name] = row
            print(json.dumps({name: row}))
    metric = load_config(args.config).training.metric_for_best_model
    out = {"scenario": "tune_cost", "metric": f"validation {metric}", "trials_per_method": args.trials,
           "epochs": args.epochs, "train_rows": args.train_rows, "eval_rows": args.eval_rows,
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
           "methods": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
