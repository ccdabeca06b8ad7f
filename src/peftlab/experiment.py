"""Run an experiment: every method on the same data and split, then the report.

Run directory layout::

    RUN_DIR/
      config.yaml            resolved config (what actually ran)
      environment.json       library versions, device, seed, threads
      data_report.json
      <method>/model/        FFT model folder, or PEFT adapter (+ head) in the standard format
      <method>/              that method's saved folder and RunResult (the format: peftlab.artifacts)
      results.json results.csv report.md report.html plots/
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from peftlab import fsutil
from peftlab.config import ExperimentConfig, dump_config
from peftlab.dist import is_main_process
from peftlab.errors import ConfigError, MethodError, RunDirError
from peftlab.results import ExperimentResult, RunResult

logger = logging.getLogger(__name__)


def default_run_dir(config: ExperimentConfig, config_path: Path | None) -> Path:
    if config.output.dir:
        return Path(config.output.dir)
    stem = config.name or (config_path.stem if config_path else "experiment")
    return Path("runs") / stem


def _refuse_existing(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing run unless the user said --overwrite or --resume."""
    exists = run_dir.exists() and any(run_dir.iterdir())
    if exists and not (overwrite or resume):
        raise RunDirError(f"run directory {run_dir} already exists. Use --resume to continue it, --overwrite to "
                          f"replace it, or --output to write elsewhere")
    if exists and resume and not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir} is not a peftlab run (no config.yaml); cannot --resume it")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory; with --overwrite, replace an existing one (already allowed by the caller)."""
    if overwrite and run_dir.exists() and any(run_dir.iterdir()):
        # Replaced by an empty folder in one rename: a crash in between leaves the old run recoverable.
        with fsutil.atomic_dir(run_dir):
            pass
    run_dir.mkdir(parents=True, exist_ok=True)


def environment(config: ExperimentConfig) -> dict[str, Any]:
    """Library versions, device and threads: what a reader needs to reproduce the numbers."""
    import accelerate
    import peft
    import torch
    import transformers

    import peftlab

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "peftlab": peftlab.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "device": device, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "seed": config.training.seed,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def run_experiment(config: ExperimentConfig, run_dir: Path, *, overwrite: bool = False, resume: bool = False,
                   methods: list[str] | None = None) -> ExperimentResult:
    """Train and evaluate every selected method, then write results and the report.

    Args:
        config: the validated experiment config.
        run_dir: where everything is written.
        overwrite: replace an existing run directory.
        resume: continue an existing run: finished methods are kept, an interrupted one resumes
            from its last checkpoint.
        methods: run only these method names (default: all in the config).

    Returns:
        The :class:`ExperimentResult` that was written to ``run_dir/results.json``.
    """
    from peftlab.artifacts import result_file
    from peftlab.cpu import configure_threads
    from peftlab.data import prepare_data
    from peftlab.models import check_model_folder, load_tokenizer, resolve_dtype, resolve_model_path
    from peftlab.report import render_data_report_console, write_report
    from peftlab.train import BaseModelSpec, tokenize_splits, train_method

    configure_threads()
    selected = _select(config, methods)
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other: choose one")
    _refuse_existing(run_dir, overwrite, resume)
    if resume and (run_dir / "config.yaml").is_file():
        _check_same_config(run_dir, config)

    # Model and data are checked before anything is written: a typo costs nothing and leaves no half run.
    folder = resolve_model_path(config.model.path)
    check_model_folder(folder, config.model.trust_remote_code, config.model.allow_pickle)
    tokenizer = load_tokenizer(folder, config.model.trust_remote_code)
    data = prepare_data(config.data, config.task, tokenizer)

    env = environment(config)
    if is_main_process():
        prepare_run_dir(run_dir, overwrite)
        fsutil.write_text(run_dir / "config.yaml", dump_config(config))
        fsutil.write_json(run_dir / "environment.json", env)
        fsutil.write_json(run_dir / "data_report.json", dataclasses.asdict(data.report))
        render_data_report_console(data.report)
    base = BaseModelSpec(folder=folder, name=config.model.path, tokenizer=tokenizer,
                         dtype=resolve_dtype(config.model.dtype), trust_remote_code=config.model.trust_remote_code,
                         allow_pickle=config.model.allow_pickle)
    tokenized = tokenize_splits(data, tokenizer, config.data.max_length, config.task)

    extra: dict[str, Any] = {}
    if config.task == "causal-lm":
        from peftlab.causal_stages import base_model_baseline

        extra = base_model_baseline(config, base, tokenized, run_dir, resume)

    runs: list[RunResult] = []
    for method_config in selected:
        name = method_config.run_name
        method_dir = run_dir / name
        done = result_file(method_dir)
        if resume and done.is_file():
            logger.info("%s: finished in an earlier run; kept", name)
            runs.append(RunResult.from_dict(json.loads(done.read_text(encoding="utf-8"))))
            continue
        logger.info("== %s (%s) ==", name, method_config.method)
        try:
            result = train_method(config, method_config, data, base, tokenized, method_dir, resume=resume)
        except MethodError as exc:
            # One method that cannot apply to this model must not cost the user the others.
            logger.error("%s failed: %s", name, exc)
            result = RunResult(name=name, method=method_config.method, task=config.task, status="failed",
                               error=str(exc), learning_rate=method_config.learning_rate)
        if config.task == "causal-lm" and result.status == "ok":
            from peftlab.causal_stages import generate_for_report

            result.generations = generate_for_report(config, base, run_dir / result.output_dir)
        if is_main_process():
            fsutil.write_json(done, dataclasses.asdict(result))
        runs.append(result)

    experiment = ExperimentResult(
        name=config.name or run_dir.name, task=config.task, config=config.model_dump(mode="json"),
        data_report=dataclasses.asdict(data.report), runs=runs,
        environment=env, **extra)
    if is_main_process():
        write_report(experiment, run_dir)
    return experiment


def _select(config: ExperimentConfig, methods: list[str] | None) -> list[Any]:
    if not methods:
        return list(config.methods)
    names = [m.run_name for m in config.methods]
    unknown = [m for m in methods if m not in names]
    if unknown:
        raise ConfigError(f"--methods {','.join(unknown)}: not in this config; its methods are {', '.join(names)}")
    return [m for m in config.methods if m.run_name in methods]


def _check_same_config(run_dir: Path, config: ExperimentConfig) -> None:
    """Resuming with a different data/model/training section would mix incomparable results."""
    import yaml

    old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    new = config.model_dump(mode="json")
    changed = [key for key in ("task", "data", "model", "training") if old.get(key) != new.get(key)]
    if changed:
        raise RunDirError(f"--resume: the config's {', '.join(changed)} section(s) differ from the run in {run_dir}; "
                          f"results would not be comparable. Use --overwrite or a new --output")
