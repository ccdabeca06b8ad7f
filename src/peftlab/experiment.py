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
import contextlib
import os
import platform
from pathlib import Path
from typing import Any

from peftlab import fsutil, rundir, tracking
from peftlab.config import ExperimentConfig, dump_config
from peftlab.dist import is_main_process, world_size
from peftlab.errors import ConfigError, RunDirError
from peftlab.results import ExperimentResult, RunResult

logger = logging.getLogger(__name__)


def default_run_dir(config: ExperimentConfig, config_path: Path | None) -> Path:
    if config.output.dir:
        return Path(config.output.dir)
    stem = config.name or (config_path.stem if config_path else "experiment")
    return Path("runs") / stem


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
        "world_size": world_size(),
    }


def run_experiment(config: ExperimentConfig, run_dir: Path, *, overwrite: bool = False, resume: bool = False,
                   methods: list[str] | None = None, lock_held: bool = False) -> ExperimentResult:
    """Train and evaluate every selected method, then write results and the report.

    Args:
        config: the validated experiment config.
        run_dir: where everything is written.
        overwrite: replace an existing run directory.
        resume: continue an existing run: finished methods are kept, an interrupted one resumes
            from its last checkpoint.
        methods: run only these method names (default: all in the config).
        lock_held: the caller already holds ``run_dir``'s lock (``peftlab run --tune`` holds it while tuning).

    Returns:
        The :class:`ExperimentResult` that was written to ``run_dir/results.json``.
    """
    from peftlab.cpu import configure_threads
    from peftlab.report import render_data_report_console

    configure_threads()
    selected = _select(config, methods)
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other: choose one")
    run_dir = rundir.check_target(run_dir)
    rundir.refuse_existing(run_dir, overwrite=overwrite, resume=resume)  # fail fast, before loading anything
    if resume and (run_dir / rundir.CONFIG).is_file():
        _check_same_config(run_dir, config)

    folder, tokenizer, data = load_inputs(config)

    env = environment(config)
    main = is_main_process()
    # One writer per run directory; the other ranks of a distributed run write nothing.
    lock = rundir.hold(run_dir, takeover=resume or overwrite) if main and not lock_held else contextlib.nullcontext()
    with lock:
        if main:
            start_run_dir(run_dir, config, env, data, overwrite=overwrite, resume=resume)
            render_data_report_console(data.report)
        return _run_methods(config, selected, run_dir, folder, tokenizer, data, env, resume)


def start_run_dir(run_dir: Path, config: ExperimentConfig, env: dict[str, Any], data: Any, *, overwrite: bool,
                  resume: bool) -> None:
    """Create (or replace, or reopen) the run directory and write what describes the run: config, environment,
    data report. The caller holds the run directory's lock."""
    rundir.refuse_existing(run_dir, overwrite=overwrite, resume=resume)  # again, now that the lock is held
    rundir.create(run_dir, overwrite=overwrite)
    fsutil.write_text(run_dir / rundir.CONFIG, dump_config(config))
    fsutil.write_json(run_dir / rundir.ENVIRONMENT, env)
    fsutil.write_json(run_dir / rundir.DATA_REPORT, dataclasses.asdict(data.report))


def load_inputs(config: ExperimentConfig) -> tuple[Path, Any, Any]:
    """The base model's folder, its tokenizer and the prepared data, every check done before anything is written.

    A typo in the model path, a model that needs an opt-in, a ``max_length`` beyond its positions, bad data or a
    misspelt class in ``training.class_weights`` costs nothing and leaves no half run.
    """
    from peftlab.data import prepare_data
    from peftlab.models import check_max_length, check_model_folder, load_tokenizer, resolve_model_path
    from peftlab.train import class_weights

    folder = resolve_model_path(config.model.path)
    model_config = check_model_folder(folder, config.model.trust_remote_code, config.model.allow_pickle)
    check_max_length(model_config, config.data.max_length, folder)
    tokenizer = load_tokenizer(folder, config.model.trust_remote_code)
    data = prepare_data(config.data, config.task, tokenizer)
    class_weights(config, data)
    tracking.check_installed(config.training.report_to)
    return folder, tokenizer, data


def _run_methods(config: ExperimentConfig, selected: list[Any], run_dir: Path, folder: Path, tokenizer: Any,
                 data: Any, env: dict[str, Any], resume: bool) -> ExperimentResult:
    from peftlab.report import write_report
    from peftlab.artifacts import MODEL_DIR, result_file
    from peftlab.results import PREDICTIONS_FILE
    from peftlab.train import BaseModelSpec, tokenize_splits
    from peftlab.worker import run_in_child, train_one

    base = BaseModelSpec.from_config(config, folder, tokenizer)
    tokenized = tokenize_splits(data, tokenizer, config.data.max_length, config.task)

    extra: dict[str, Any] = {}
    if config.task == "causal-lm":
        from peftlab.causal_stages import base_model_baseline

        extra = base_model_baseline(config, base, tokenized, run_dir, resume)

    seeds = config.training.run_seeds
    # In a child process per method unless distributed: under torchrun every rank already is its own process,
    # and the ranks must train together.
    isolate = config.training.method_process and world_size() == 1
    runs: list[RunResult] = []
    for method_config in selected:
        name = method_config.run_name
        for seed in seeds:
            # The first seed's folder is the method's own (RUN_DIR/lora, what predict and serve use); more seeds
            # go below it, RUN_DIR/lora/seeds/43.
            method_dir = run_dir / name if seed == seeds[0] else run_dir / name / "seeds" / str(seed)
            label = name if len(seeds) == 1 else f"{name} (seed {seed})"
            done = result_file(method_dir)
            if resume and done.is_file():
                logger.info("%s: finished in an earlier run; kept", label)
                runs.append(RunResult.from_dict(json.loads(done.read_text(encoding="utf-8"))))
                continue
            logger.info("== %s (%s) ==", label, method_config.method)
            if is_main_process():
                rundir.check_intact(run_dir)
            # The Trainer's trackers read where to log from the environment, which a child process inherits.
            with tracking.environment(config.training.report_to, run_dir, tracking.run_name(name, seed, seeds),
                                      config.name or run_dir.name):
                if isolate:
                    result = run_in_child(config, method_config, run_dir, method_dir, seed, resume)
                else:
                    result = train_one(config, method_config, data, base, tokenized, method_dir, seed, resume)
            if result.status == "ok":  # paths relative to the run directory, wherever the seed's folder is
                result.output_dir = str((method_dir / MODEL_DIR).relative_to(run_dir))
                if result.predictions_file:
                    result.predictions_file = str((method_dir / PREDICTIONS_FILE).relative_to(run_dir))
            if is_main_process():
                rundir.check_intact(run_dir)  # never recreate a deleted run directory with half its files
                tracking.log_result(config.training.report_to, run_dir, result)
                fsutil.write_json(done, dataclasses.asdict(result))
            runs.append(result)

    experiment = ExperimentResult(
        name=config.name or run_dir.name, task=config.task, config=config.model_dump(mode="json"),
        data_report=dataclasses.asdict(data.report), runs=runs,
        environment=env, **extra)
    if is_main_process():
        rundir.check_intact(run_dir)
        write_report(experiment, run_dir)
        tracking.log_report(config.training.report_to, run_dir, runs)
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
