"""Run an experiment: every method on the same data and split, then the report.

Run directory layout::

    RUN_DIR/
      config.yaml            resolved config (what actually ran)
      environment.json       library versions, device, seed, threads
      data_report.json
      <method>/model/        FFT model folder, or PEFT adapter (+ head) in the standard format
      <method>/              that method's saved folder and RunResult (the format: peftlab.artifacts)
      results.json results.csv report.md report.html plots/

Who writes it (``peftlab.rundir``): an invocation holds the run lock for seconds, to create the directory and
claim the methods it trains, and again to write the report; a method's claim is held until then. So several
invocations (``--methods X`` each, on one machine or several over a shared filesystem) write one run directory,
and each report merges whatever has finished and names what is missing.
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
from peftlab.errors import ConfigError, PeftlabError, RunDirError
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
                   methods: list[str] | None = None, lock_held: bool = False, workers: int = 1,
                   claim_timeout_s: float = rundir.CLAIM_TIMEOUT_S) -> ExperimentResult:
    """Train and evaluate every selected method, then write results and the report.

    Several invocations may write one run directory at once (``peftlab run CONFIG --methods X`` on one machine,
    or on several over a shared filesystem): each claims the methods it trains (``rundir.claim``), and each
    writes the report of whatever has finished, saying which methods are missing.

    Args:
        config: the validated experiment config.
        run_dir: where everything is written.
        overwrite: replace an existing run directory.
        resume: continue an existing run: finished methods are kept; failed, killed or interrupted ones are
            trained again (an interrupted one from its last checkpoint).
        methods: run only these method names (default: all in the config).
        lock_held: the caller already holds ``run_dir``'s lock (``peftlab run --tune`` holds it while tuning).
        workers: train up to this many method/seed runs at once, each in a child process (``worker.slots``:
            a device or a group of devices each, or ``cores // workers`` CPU threads each).
        claim_timeout_s: a claim (or lock) not refreshed for this long is stale (its holder is gone).

    Returns:
        The :class:`ExperimentResult` that was written to ``run_dir/results.json``: every method of the config
        that has a result in ``run_dir``, this invocation's and others'.
    """
    from peftlab.cpu import configure_threads
    from peftlab.report import render_data_report_console

    configure_threads()
    selected = _select(config, methods)
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other: choose one")
    _check_workers(config, workers)
    run_dir = rundir.check_target(run_dir)
    # Fail fast, before loading anything; decided again once the lock is held.
    joining = not (overwrite or resume) and rundir.in_progress(run_dir, claim_timeout_s)
    rundir.refuse_existing(run_dir, overwrite=overwrite, resume=resume, join=joining)
    if overwrite:
        rundir.refuse_if_claimed(run_dir, claim_timeout_s)
    if (resume or joining) and (run_dir / rundir.CONFIG).is_file():
        _check_same_config(run_dir, config, joining=joining, timeout_s=claim_timeout_s)

    folder, tokenizer, data = load_inputs(config)

    env = environment(config)
    if not is_main_process():  # the other ranks of a distributed run train with the main one and write nothing
        jobs, _ = _plan(config, selected, run_dir, resume, check_existing=False)  # the main rank decides
        runs = _run_jobs(config, jobs, run_dir, folder, tokenizer, data, resume, workers=1)
        return ExperimentResult(name=config.name or run_dir.name, task=config.task,
                                config=config.model_dump(mode="json"), data_report=dataclasses.asdict(data.report),
                                runs=runs, environment=env)
    with contextlib.ExitStack() as claims:
        with _setup_lock(run_dir, held=lock_held, takeover=resume or overwrite, timeout_s=claim_timeout_s):
            joined = start_run_dir(run_dir, config, env, data, overwrite=overwrite, resume=resume,
                                   timeout_s=claim_timeout_s)
            # Claimed before anything is decided from the folder's content: whatever was finished by the time
            # the claim is held is final (its trainer held the claim until it had written it).
            claims.enter_context(rundir.claim(run_dir, [m.run_name for m in selected], takeover=resume or overwrite,
                                              timeout_s=claim_timeout_s))
            jobs, kept = _plan(config, selected, run_dir, resume)
            used = _cap_workers(workers, len(jobs))
            env.update(workers=used, threads_per_run=_threads_per_run(config, used))
            if not joined:  # the run's environment is its creator's (or the resuming run's)
                fsutil.write_json(run_dir / rundir.ENVIRONMENT, env)
        render_data_report_console(data.report)
        for label in kept:
            logger.info("%s: finished in an earlier run; kept", label)
        _run_jobs(config, jobs, run_dir, folder, tokenizer, data, resume, workers=used)
        with _setup_lock(run_dir, held=lock_held, takeover=False, timeout_s=claim_timeout_s):
            rundir.check_intact(run_dir)
            # The run's environment is the one on disk: a joining invocation's may differ (its --workers, say).
            experiment = collect(run_dir, config, _read_json(run_dir / rundir.ENVIRONMENT) or env,
                                 dataclasses.asdict(data.report), timeout_s=claim_timeout_s,
                                 mine={m.run_name for m in selected})
            from peftlab.report import write_report

            write_report(experiment, run_dir)
            tracking.log_report(config.training.report_to, run_dir, experiment.runs)
    return experiment


def _setup_lock(run_dir: Path, *, held: bool, takeover: bool, timeout_s: float) -> Any:
    """The run lock for seconds (creating the directory and claiming, or writing the report): others wait."""
    if held:
        return contextlib.nullcontext()
    return rundir.hold(run_dir, takeover=takeover, scope=rundir.SETUP, wait_s=rundir.SETUP_WAIT_S,
                       timeout_s=timeout_s)


def _check_workers(config: ExperimentConfig, workers: int) -> None:
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give 1 or more (how many method/seed runs train at once)")
    if workers > 1 and not config.training.method_process:
        raise ConfigError(f"--workers {workers} runs each method in a child process of its own; the config sets "
                          f"training.method_process: false. Remove that (or --set training.method_process=true), "
                          f"or drop --workers")
    if workers > 1 and world_size() > 1:
        raise ConfigError(f"--workers {workers} under torchrun/accelerate launch: the launcher's ranks already train "
                          f"each method together. Drop --workers, or the launcher (a worker on several GPUs runs "
                          f"its methods under DDP by itself)")


def _cap_workers(workers: int, runs: int) -> int:
    if workers > max(runs, 1):
        logger.warning("--workers %d is more than the %d run(s) to do; using %d", workers, runs, max(runs, 1))
        return max(runs, 1)
    return workers


def _threads_per_run(config: ExperimentConfig, workers: int) -> int:
    """CPU threads of each run (recorded in environment.json): what the worker's child will use."""
    from peftlab.cpu import usable_cpus
    from peftlab.worker import threads_per_run

    if workers > 1:
        return threads_per_run(workers)
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS") or not config.training.method_process:
        import torch

        return torch.get_num_threads()
    return usable_cpus()


def start_run_dir(run_dir: Path, config: ExperimentConfig, env: dict[str, Any], data: Any, *, overwrite: bool,
                  resume: bool, timeout_s: float = rundir.CLAIM_TIMEOUT_S) -> bool:
    """Create (or replace, or reopen, or join) the run directory and write what describes the run: config,
    environment, data report. The caller holds the run directory's lock.

    Joining: another process is training methods of this run directory right now (it holds claims) with the
    same config; this one adds its methods without ``--resume`` and leaves the files as they are.

    Returns:
        True when it joined (nothing was written).
    """
    joining = not (overwrite or resume) and bool(rundir.claim_holders(run_dir, timeout_s))
    rundir.refuse_existing(run_dir, overwrite=overwrite, resume=resume, join=joining)  # again, now that it is held
    if overwrite:
        rundir.refuse_if_claimed(run_dir, timeout_s)
        rundir.clear_stale_claims(run_dir, timeout_s)
    if joining and (run_dir / rundir.CONFIG).is_file():
        _check_same_config(run_dir, config, joining=True, timeout_s=timeout_s)
        rundir.check_intact(run_dir)
        return True
    rundir.create(run_dir, overwrite=overwrite)
    fsutil.write_text(run_dir / rundir.CONFIG, dump_config(config))
    fsutil.write_json(run_dir / rundir.ENVIRONMENT, env)
    fsutil.write_json(run_dir / rundir.DATA_REPORT, dataclasses.asdict(data.report))
    return False


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


@dataclasses.dataclass(frozen=True)
class _Job:
    """One method at one seed to train."""

    method_config: Any
    seed: int
    method_dir: Path
    label: str


def method_dir(run_dir: Path, name: str, seed: int, seeds: list[int]) -> Path:
    """The first seed's folder is the method's own (RUN_DIR/lora, what predict and serve use); more seeds go
    below it, RUN_DIR/lora/seeds/43."""
    return run_dir / name if seed == seeds[0] else run_dir / name / "seeds" / str(seed)


def _label(name: str, seed: int, seeds: list[int]) -> str:
    return name if len(seeds) == 1 else f"{name} (seed {seed})"


def _plan(config: ExperimentConfig, selected: list[Any], run_dir: Path, resume: bool,
          check_existing: bool = True) -> tuple[list[_Job], list[str]]:
    """The runs to train, and the labels of those kept from an earlier run (``--resume``: finished and ok).

    Raises:
        RunDirError: joining a run in progress without ``--resume``, a selected method already has a result or
            a folder of an earlier run there.
    """
    from peftlab.artifacts import result_file

    seeds = config.training.run_seeds
    jobs: list[_Job] = []
    kept: list[str] = []
    for method_config in selected:
        name = method_config.run_name
        for seed in seeds:
            folder = method_dir(run_dir, name, seed, seeds)
            label = _label(name, seed, seeds)
            done = result_file(folder)
            if resume and _finished(done):
                kept.append(label)
                continue
            if check_existing and not resume and folder.exists() and any(folder.iterdir()):
                raise RunDirError(f"{label} already has {'results' if done.is_file() else 'a folder'} in {run_dir} "
                                  f"from an earlier run. Use --resume to keep or continue it, or --overwrite")
            jobs.append(_Job(method_config, seed, folder, label))
    return jobs, kept


def _finished(result: Path) -> bool:
    """A result file of a run that ended well (a failed or killed run is trained again by ``--resume``)."""
    try:
        return json.loads(result.read_text(encoding="utf-8")).get("status") == "ok"
    except FileNotFoundError:
        return False
    except (OSError, ValueError, AttributeError):
        return False  # damaged: train it again


def _run_jobs(config: ExperimentConfig, jobs: list[_Job], run_dir: Path, folder: Path, tokenizer: Any, data: Any,
              resume: bool, workers: int) -> list[RunResult]:
    """Train the jobs (one after another, or ``workers`` at once) and write each one's result file."""
    from peftlab.train import BaseModelSpec, tokenize_splits
    from peftlab.worker import slots, train_one

    base = BaseModelSpec.from_config(config, folder, tokenizer)
    tokenized = tokenize_splits(data, tokenizer, config.data.max_length, config.task)
    if config.task == "causal-lm":
        from peftlab.causal_stages import base_model_baseline

        base_model_baseline(config, base, tokenized, run_dir, resume)  # saved in the run directory for the report

    # In a child process per method unless distributed: under torchrun every rank already is its own process,
    # and the ranks must train together.
    isolate = config.training.method_process and world_size() == 1
    if not isolate:
        results = []
        for job in jobs:
            logger.info("== %s (%s) ==", job.label, job.method_config.method)
            if is_main_process():
                rundir.check_intact(run_dir)
            with tracking.environment(config.training.report_to, run_dir, _tracking_name(config, job),
                                      config.name or run_dir.name):
                result = train_one(config, job.method_config, data, base, tokenized, job.method_dir, job.seed,
                                   resume)
            results.append(_record(config, job, result, run_dir))
        return results
    if workers == 1:
        return [_run_child(config, job, run_dir, resume, None, None) for job in jobs]
    return _run_side_by_side(config, jobs, run_dir, resume, slots(workers))


def _run_child(config: ExperimentConfig, job: _Job, run_dir: Path, resume: bool, slot: Any,
               children: set[Any] | None) -> RunResult:
    from peftlab.worker import run_in_child

    rundir.check_intact(run_dir)
    log = job.method_dir / rundir.WORKER_LOG if slot is not None else None
    where = f" on {slot.label}; its output: {log}" if slot is not None else ""
    logger.info("== %s (%s)%s ==", job.label, job.method_config.method, where)

    def started(child: Any) -> None:
        if children is not None:
            children.add(child)

    # The Trainer's trackers read where to log from the environment: the child's own, so side-by-side runs differ.
    tracked = tracking.variables(config.training.report_to, run_dir, _tracking_name(config, job),
                                 config.name or run_dir.name)
    if tracked:
        from peftlab.worker import Slot

        base_slot = slot or Slot()
        slot = dataclasses.replace(base_slot, env={**base_slot.env, **tracked})
    result = run_in_child(config, job.method_config, run_dir, job.method_dir, job.seed, resume, slot=slot, log=log,
                          started=started)
    if slot is not None:
        logger.info("%s: %s", job.label, "done" if result.status == "ok" else f"failed: {result.error}")
    return _record(config, job, result, run_dir)


def _run_side_by_side(config: ExperimentConfig, jobs: list[_Job], run_dir: Path, resume: bool,
                      worker_slots: list[Any]) -> list[RunResult]:
    """Up to ``len(worker_slots)`` runs at once, each in its own child on its own slot; a failed or killed child
    costs only its run. If this process is stopped (Ctrl-C, the run directory deleted), its children are too."""
    import queue
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    free: queue.Queue[Any] = queue.Queue()
    for slot in worker_slots:
        free.put(slot)
    children: set[Any] = set()

    def one(job: _Job) -> RunResult:
        slot = free.get()
        try:
            return _run_child(config, job, run_dir, resume, slot, children)
        finally:
            free.put(slot)

    pool = ThreadPoolExecutor(max_workers=len(worker_slots), thread_name_prefix="peftlab-worker")
    futures = [pool.submit(one, job) for job in jobs]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)  # a run directory deleted under one run stops them all
        return [future.result() for future in futures]  # in the config's order, whatever finished first
    except BaseException:
        for future in futures:
            future.cancel()
        for child in list(children):
            if child.poll() is None:
                child.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _tracking_name(config: ExperimentConfig, job: _Job) -> str:
    return tracking.run_name(job.method_config.run_name, job.seed, config.training.run_seeds)


def _record(config: ExperimentConfig, job: _Job, result: RunResult, run_dir: Path) -> RunResult:
    """Write the run's result file (main process), paths relative to the run directory."""
    from peftlab.artifacts import MODEL_DIR, result_file
    from peftlab.results import PREDICTIONS_FILE

    if result.status == "ok":  # paths relative to the run directory, wherever the seed's folder is
        result.output_dir = str((job.method_dir / MODEL_DIR).relative_to(run_dir))
        if result.predictions_file:
            result.predictions_file = str((job.method_dir / PREDICTIONS_FILE).relative_to(run_dir))
    if is_main_process():
        rundir.check_intact(run_dir)  # never recreate a deleted run directory with half its files
        tracking.log_result(config.training.report_to, run_dir, result)
        fsutil.write_json(result_file(job.method_dir), dataclasses.asdict(result))
    return result


def collect(run_dir: Path, config: ExperimentConfig, env: dict[str, Any], data_report: dict[str, Any], *,
            timeout_s: float = rundir.CLAIM_TIMEOUT_S, mine: set[str] | None = None) -> ExperimentResult:
    """The experiment as the run directory holds it now: every method/seed of ``config`` with a result file, in
    the config's order, and the ones without (``missing``: still training elsewhere, or not run yet).

    Args:
        mine: run names this process just trained (a missing one of them is not "being trained elsewhere").
    """
    from peftlab.artifacts import result_file
    from peftlab.causal_stages import BASELINE_FILE

    seeds = config.training.run_seeds
    runs: list[RunResult] = []
    missing: list[str] = []
    for method_config in config.methods:
        name = method_config.run_name
        for seed in seeds:
            label = _label(name, seed, seeds)
            path = result_file(method_dir(run_dir, name, seed, seeds))
            try:
                runs.append(RunResult.from_dict(json.loads(path.read_text(encoding="utf-8"))))
                continue
            except FileNotFoundError:
                holder = None if name in (mine or set()) else rundir.claim_holder(run_dir, name, timeout_s)
                missing.append(f"{label} (being trained by {holder.describe()})" if holder else f"{label} (not run)")
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
                missing.append(f"{label} (its result file {path} is damaged: {type(exc).__name__}; rerun it with "
                               f"--resume)")
    extra: dict[str, Any] = {}
    baseline = run_dir / BASELINE_FILE
    if config.task == "causal-lm" and baseline.is_file():
        saved = json.loads(baseline.read_text(encoding="utf-8"))
        extra = {k: saved[k] for k in ("base_generations", "base_eval_loss", "generation_settings") if k in saved}
    return ExperimentResult(name=config.name or run_dir.name, task=config.task, config=config.model_dump(mode="json"),
                            data_report=data_report, runs=runs, environment=env, missing=missing, **extra)


def collect_run_dir(run_dir: Path, timeout_s: float = rundir.CLAIM_TIMEOUT_S) -> ExperimentResult:
    """:func:`collect` from the run directory's own files (``config.yaml``, ``environment.json``, the data report):
    what ``peftlab report RUN_DIR`` renders.

    Raises:
        RunDirError: ``config.yaml`` is not a valid config.
    """
    import yaml

    from peftlab.config import load_config

    path = run_dir / rundir.CONFIG
    try:
        config = load_config(data=yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except (ConfigError, yaml.YAMLError) as exc:
        raise RunDirError(f"{path} is damaged or not a peftlab config ({str(exc)[:300]}); the run directory cannot be "
                          f"merged. Rerun `peftlab run ... --resume` to rewrite it") from None

    return collect(run_dir, config, _read_json(run_dir / rundir.ENVIRONMENT), _read_json(run_dir / rundir.DATA_REPORT),
                   timeout_s=timeout_s)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def report_run_dir(run_dir: Path, timeout_s: float = rundir.CLAIM_TIMEOUT_S) -> ExperimentResult:
    """Merge what has finished in ``run_dir`` and write its report, under the run lock (as a run writes it)."""
    from peftlab.report import write_report

    with rundir.hold(run_dir, takeover=True, scope=rundir.SETUP, wait_s=rundir.SETUP_WAIT_S, timeout_s=timeout_s):
        experiment = collect_run_dir(run_dir, timeout_s)
        if not experiment.runs:  # (a tuning directory has a config but no method results: its report is its own)
            raise PeftlabError(f"{run_dir}: no method has a result yet, nothing to report "
                               f"({'; '.join(experiment.missing)})")
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


def _check_same_config(run_dir: Path, config: ExperimentConfig, *, joining: bool = False,
                       timeout_s: float = rundir.CLAIM_TIMEOUT_S) -> None:
    """Resuming with a different data/model/training section would mix incomparable results; joining a run in
    progress needs its methods section too (its report lists them)."""
    import yaml

    old = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    new = config.model_dump(mode="json")
    keys = ("task", "data", "model", "training") + (("methods",) if joining else ())
    changed = [key for key in keys if old.get(key) != new.get(key)]
    if changed and joining:
        holders = rundir.claim_holders(run_dir, timeout_s)
        who = next(iter(holders.values())).describe() if holders else "another process"
        raise rundir.RunLockedError(
            f"{run_dir} is being written by another peftlab run: {who}, with another config (its "
            f"{', '.join(changed)} section(s) differ). Wait for it to finish, or write elsewhere with --output")
    if changed:
        raise RunDirError(f"--resume: the config's {', '.join(changed)} section(s) differ from the run in {run_dir}; "
                          f"results would not be comparable. Use --overwrite or a new --output")
