"""Tune every method within the same budget, on the validation split only: one Optuna study per method.

Why: a comparison is only fair when no method loses because of its settings. Each method searches the
space declared next to its builder (``peftlab.methods.SEARCH_SPACES``: a log-scale learning rate in a
method-specific range, ranks and target layers for the LoRA family, virtual tokens for prompt methods),
with the same number of trials, through the same training path as the final run (``train_method``), and
the study's objective is the best-epoch validation metric that run would pick its epoch by. The test split
is sealed: trials run with ``evaluate_test=False`` and get a data object whose test split raises when read.

Tune directory layout (``peftlab tune``; ``peftlab run --tune`` puts it beside the run, ``RUN_DIR-tune``)::

    TUNE_DIR/
      config.yaml  environment.json  data_report.json   as a run directory has them
      study.journal        the studies (Optuna JournalStorage), unless --storage names another storage
      tuned.yaml           the config with each tuned method's chosen settings: `peftlab run tuned.yaml`
      study.json           the StudyResult; report.md, report.html, plots/ render it
      trials/              a running trial's checkpoints, removed when the trial ends

Budget: ``tune.trials`` per method counts every trial of the method's study, whichever worker ran it and
whenever (a resumed or shared study counts the trials it holds): complete, pruned and failed ones, and
running ones of live workers. A trial interrupted by a kill does not count (it is recorded as FAIL,
"interrupted") and its slot is run again. Workers sharing a file storage (journal or SQLite) take trials
under a file lock beside it, so the budget is never exceeded; with a database server it may be by at most
one trial per extra worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from peftlab import fsutil, rundir
from peftlab.dist import world_size
from peftlab.config import ExperimentConfig, load_config
from peftlab.errors import ConfigError, FilesystemError, PeftlabError, RunDirError
from peftlab.methods import search_space
from peftlab.methods.space import Choice, LogFloat, Parameter
from peftlab.results import ExperimentResult, MethodStudy, StudyResult, TrialRecord

logger = logging.getLogger(__name__)

TUNED = "tuned.yaml"
JOURNAL = "study.journal"
TRIALS = "trials"
TUNE_SUFFIX = "-tune"
INTERRUPTED = "interrupted"
# Sections whose change makes earlier trials incomparable (tune.trials may grow on --resume).
_TUNING_KEYS = ("task", "data", "model", "training", "methods", "tune")


def tune_dir_for(run_dir: Path) -> Path:
    """Where ``peftlab run --tune`` tunes: a sibling of the run directory, ``RUN_DIR-tune``."""
    return run_dir.with_name(run_dir.name + TUNE_SUFFIX)


def default_tune_dir(config: ExperimentConfig, config_path: Path | None) -> Path:
    """``peftlab tune``'s default directory: the run's default directory with ``-tune`` appended."""
    from peftlab.experiment import default_run_dir

    return tune_dir_for(default_run_dir(config, config_path))


# --------------------------------------------------------------------------- the test split, sealed


class TestSplitSealed(PeftlabError):
    """Something tried to read the test split while tuning (a bug: tuning chooses, so it must never see it)."""


class _Sealed:
    """Stands in for the test split during tuning: any use raises :class:`TestSplitSealed`."""

    def __init__(self, what: str) -> None:
        object.__setattr__(self, "_what", what)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TestSplitSealed(f"{object.__getattribute__(self, '_what')} was read while tuning; the test split is "
                              f"never read while choosing settings")

    def __getattr__(self, name: str) -> Any:
        return self._refuse()

    __getitem__ = __len__ = __iter__ = __contains__ = _refuse


# --------------------------------------------------------------------------- storage


@dataclasses.dataclass(frozen=True)
class _StorageSpec:
    kind: str  # "journal" or "rdb"
    target: str  # the journal file, or the database URL
    shown: str  # for reports and logs: password masked
    lock_file: Path | None  # where workers take trials one at a time (file storages)


def _storage_spec(url: str | None, tune_dir: Path) -> _StorageSpec:
    """Parse ``--storage`` without touching anything on disk: a bad URL costs nothing and writes nothing.

    Accepted: none (a journal file in the tune directory), ``journal:PATH`` (an Optuna journal file, good for
    several processes on one machine or a shared file system), or any Optuna RDB URL (``sqlite:///file.db``,
    ``postgresql://user:pw@host/db``, ``mysql+pymysql://...``).

    Raises:
        ConfigError: an unknown scheme, an unparsable URL, or a file storage in a folder that does not exist.
    """
    if url is None:
        path = tune_dir / JOURNAL
        return _StorageSpec("journal", str(path), str(path), Path(f"{path}.peftlab-lock"))
    hint = ("give journal:PATH (an Optuna journal file), sqlite:///PATH.db or a database URL such as "
            "postgresql://user@host/db")
    if url.startswith("journal:"):
        raw = url.removeprefix("journal:")
        raw = raw[2:] if raw.startswith("///") else raw  # journal:///abs/path as well as journal:/abs or journal:rel
        if not raw:
            raise ConfigError(f"--storage {url!r} names no file; {hint}")
        path = Path(raw).expanduser().resolve()
        _check_storage_folder(url, path)
        return _StorageSpec("journal", str(path), str(path), Path(f"{path}.peftlab-lock"))
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        parsed.get_dialect()  # loads the driver: an unknown scheme fails here, before anything is written
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(f"--storage {url!r} is not an Optuna storage URL ({type(exc).__name__}: {exc}); "
                          f"{hint}") from None
    except ImportError as exc:
        raise ConfigError(f"--storage {url!r}: its database driver is not installed ({exc}); install it or "
                          f"{hint}") from None
    lock = None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise ConfigError(f"--storage {url!r}: an in-memory SQLite database is lost when the process ends; "
                              f"give a file, e.g. sqlite:///study.db")
        path = Path(parsed.database).expanduser().resolve()
        _check_storage_folder(url, path)
        lock = Path(f"{path}.peftlab-lock")
    return _StorageSpec("rdb", url, parsed.render_as_string(hide_password=True), lock)


def _check_storage_folder(url: str, path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"--storage {url!r}: {path} is a folder; give a file path in it, e.g. {path / 'study.db'}")
    if not path.parent.is_dir():
        raise ConfigError(f"--storage {url!r}: the folder {path.parent} does not exist; create it or give a path "
                          f"in an existing folder")


def _open_storage(spec: _StorageSpec) -> Any:
    import optuna

    try:
        if spec.kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(spec.target))
        return optuna.storages.RDBStorage(spec.target)
    except OSError as exc:
        raise FilesystemError(f"cannot open the tuning storage {spec.shown}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's connection errors have no common public base here
        raise PeftlabError(f"cannot open the tuning storage {spec.shown} ({type(exc).__name__}: {str(exc)[:300]}); "
                           f"check the URL, that the database is reachable and its user may write") from None


def _slot_lock(spec: _StorageSpec) -> Any:
    """Workers on one file storage count and take trials one at a time (an OS lock: a killed worker frees it)."""
    if spec.lock_file is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(str(spec.lock_file))


# --------------------------------------------------------------------------- the study of one method


def _fingerprint(config: ExperimentConfig, method_config: Any, space: tuple[Parameter, ...]) -> str:
    """What makes two trials comparable: data, model, recipe, the method, its space, the sampler (not the budget)."""
    tune = config.tune.model_dump(mode="json", exclude={"trials", "search"})
    payload = {"task": config.task, "data": config.data.model_dump(mode="json"),
               "model": config.model.model_dump(mode="json"), "training": config.training.model_dump(mode="json"),
               "method": method_config.model_dump(mode="json"), "space": [dataclasses.asdict(p) for p in space],
               "tune": tune}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def study_name(config: ExperimentConfig, method_config: Any) -> str:
    """The Optuna study name of a method: its run name and a digest of everything its trials depend on.

    Workers and resumed runs with the same config find the same study; a changed config gets a new one, so
    trials of different settings never mix in one storage.
    """
    space = _space(config, method_config)
    return f"{method_config.run_name}-{_fingerprint(config, method_config, space)[:12]}"


def _space(config: ExperimentConfig, method_config: Any) -> tuple[Parameter, ...]:
    name = method_config.run_name
    space = search_space(method_config.method, config.tune.search.get(name), f"tune.search.{name}")
    return _with_config_values(space, method_config) if config.tune.include_defaults else space


def _with_config_values(space: tuple[Parameter, ...], method_config: Any) -> tuple[Parameter, ...]:
    """The space widened to hold the config's own settings, so that trial 0 is exactly the untuned run.

    Without this a configured value outside the space (`target_modules: [query, value]`, a learning rate
    beyond the range) would be sampled in trial 0, and the tuned result could lose to the run it replaces.
    """
    widened: list[Parameter] = []
    for p in space:
        value = getattr(method_config, p.name, None)
        if isinstance(p, LogFloat):
            if value is not None and not p.low <= value <= p.high:
                p = LogFloat(p.name, min(p.low, float(value)), max(p.high, float(value)), p.description)
        elif value is not None and p.from_config(value) is None:
            # Optuna's choices must be plain scalars: a list value gets a readable name that maps back to it.
            label = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            p = Choice(p.name, (*p.choices, label), p.description, {**p.config_values, label: value})
        widened.append(p)
    return tuple(widened)


def _distributions(space: tuple[Parameter, ...]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {p.name: FloatDistribution(p.low, p.high, log=True) if isinstance(p, LogFloat)
            else CategoricalDistribution(list(p.choices)) for p in space}


def _default_params(method_config: Any, space: tuple[Parameter, ...]) -> dict[str, Any]:
    """The config's own settings as trial parameters, those inside the space (the rest are sampled)."""
    params: dict[str, Any] = {}
    for p in space:
        value = getattr(method_config, p.name)
        if isinstance(p, LogFloat):
            if value is not None and p.low <= value <= p.high:
                params[p.name] = float(value)
        else:
            choice = p.from_config(value)
            if choice is not None:
                params[p.name] = choice
    return params


def apply_params(method_config: Any, params: dict[str, Any], space: tuple[Parameter, ...]) -> Any:
    """The method config with a trial's parameters set (validated, as if written in the YAML)."""
    by_name = {p.name: p for p in space}
    update = {k: (by_name[k].to_config(v) if isinstance(by_name.get(k), Choice) else v) for k, v in params.items()}
    return type(method_config).model_validate({**method_config.model_dump(), **update})


def _counts(trial: Any) -> bool:
    """Does the trial use up budget? Every finished or running trial but an interrupted one."""
    from optuna.trial import TrialState

    if trial.state == TrialState.WAITING:
        return False
    if trial.state == TrialState.FAIL:
        return "error" in trial.user_attrs and not trial.user_attrs.get(INTERRUPTED)
    return True


def _fail_interrupted(study: Any) -> None:
    """Running trials whose worker (on this host) is dead were interrupted: record them as FAIL, uncounted."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not worker:
            continue
        holder = rundir.LockHolder(host=worker["host"], pid=int(worker["pid"]), started=worker["started"])
        if holder.is_stale():
            logger.warning("%s: trial %d was interrupted (its process %d is gone); its slot is run again",
                           study.study_name, trial.number, holder.pid)
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)


def _pruning_callback(trial: Any, metric: str) -> Any:
    from transformers import TrainerCallback

    class ReportToStudy(TrainerCallback):
        """Report each epoch's validation metric to the trial; stop training when the pruner says so (never at
        the last evaluation: the trial is then complete)."""

        def __init__(self) -> None:
            self.pruned = False
            self.values: list[float] = []

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
            value = (metrics or {}).get(f"eval_{metric}")
            if value is None or not math.isfinite(value):
                return  # the finite guard fails a diverged trial; nothing to compare
            self.values.append(float(value))
            trial.report(float(value), len(self.values) - 1)  # step = evaluation index, the same for every trial
            # After the last evaluation pruning saves nothing and would throw the finished trial's value away.
            if state.global_step < state.max_steps and trial.should_prune():
                self.pruned = True
                control.should_training_stop = True

    return ReportToStudy()


@dataclasses.dataclass
class _Inputs:
    """What every trial of a tuning run shares: the data with its test split sealed, the tokenised splits."""

    data: Any
    base: Any
    tokenized: dict[str, Any]
    metric: str
    direction: str


def startup_trials(tune: Any) -> int:
    """Random trials before TPE models the results: ``tune.startup_trials``, by default a third of the budget left
    after the configured trial 0 (at least 1, at most 10). Trial 0 is never one of them (see :func:`_sampler`)."""
    if tune.startup_trials:
        return int(tune.startup_trials)
    return max(1, min(10, (tune.trials - int(tune.include_defaults)) // 3))


def _sampler(tune: Any, seed: int) -> Any:
    """The TPE sampler of one trial. Its start-up trials are random draws besides the configured trial 0: TPE that
    models from trial 0 alone samples right beside it. Counting trial 0 as a start-up trial, every 4-trial study
    of docs/benchmarks.md section 3 spent trial 1 on trial 0's choices with a learning rate within 2.2x of its own
    (median 1.3x, in ranges 100x wide): a quarter of the budget."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(tune) + int(tune.include_defaults))


def _run_study(config: ExperimentConfig, method_config: Any, inputs: _Inputs, spec: _StorageSpec, storage: Any,
               tune_dir: Path, pruner: Any) -> Any:
    import optuna
    from optuna.trial import TrialState

    tune = config.tune
    space = _space(config, method_config)
    name = study_name(config, method_config)
    seed = tune.seed if tune.seed is not None else config.training.seed
    if pruner is None:
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=tune.prune_after_trials,
                                              n_warmup_steps=tune.prune_warmup_epochs)
                  if tune.pruner == "median" else optuna.pruners.NopPruner())
    distributions = _distributions(space)
    lock = _slot_lock(spec)
    with lock:
        study = optuna.create_study(storage=storage, study_name=name, direction=inputs.direction,
                                    load_if_exists=True, pruner=pruner)
        if not study.get_trials(deepcopy=False):
            study.set_user_attr("method", method_config.run_name)
            study.set_user_attr("metric", inputs.metric)
            if tune.include_defaults:
                study.enqueue_trial(_default_params(method_config, space), user_attrs={"defaults": True})
    while True:
        with lock:
            _fail_interrupted(study)
            trials = study.get_trials(deepcopy=False)
            used = sum(_counts(t) for t in trials)
            if used >= tune.trials:
                break
            # A fresh sampler per trial, seeded by the trial's number: the random start-up trials are then the
            # same whichever worker runs them and in whatever order, so results are reproducible.
            number = len([t for t in trials if t.state != TrialState.WAITING])
            study.sampler = _sampler(tune, seed + number)
            trial = study.ask(distributions)
            trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid(), "started": _dt.datetime.now(
                _dt.timezone.utc).isoformat(timespec="seconds")})
        _run_trial(config, method_config, space, study, trial, inputs, tune_dir, used + 1)
    return study


def _run_trial(config: ExperimentConfig, method_config: Any, space: tuple[Parameter, ...], study: Any, trial: Any,
               inputs: _Inputs, tune_dir: Path, slot: int) -> None:
    from optuna.trial import TrialState

    from peftlab.train import train_method

    name = method_config.run_name
    params = dict(trial.params)
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    logger.info("== %s trial %d (%d of %d): %s ==", name, trial.number, slot, config.tune.trials, shown)
    trial_dir = tune_dir / TRIALS / name / str(trial.number)
    callback = _pruning_callback(trial, inputs.metric)
    try:
        trial_config = apply_params(method_config, params, space)
        result = train_method(config, trial_config, inputs.data, inputs.base, inputs.tokenized, trial_dir,
                              evaluate_test=False, callbacks=(callback,))
    except (FilesystemError, TestSplitSealed):
        _tell_failed(study, trial, "the tuning run stopped here", interrupted=True)
        raise  # the run directory is gone, or a bug: no later trial could be trusted either
    except Exception as exc:  # noqa: BLE001 - one trial's failure (NaN, a method that cannot apply) is its result
        error = str(exc) if isinstance(exc, PeftlabError) else f"{type(exc).__name__}: {exc}"
        logger.warning("%s trial %d failed: %s", name, trial.number, error)
        _tell_failed(study, trial, error)
        return
    except BaseException:  # Ctrl-C, SIGTERM: the slot is run again by --resume
        _tell_failed(study, trial, "interrupted", interrupted=True)
        raise
    finally:
        shutil.rmtree(trial_dir, ignore_errors=True)
    if callback.pruned:
        logger.info("%s trial %d pruned after %d epoch(s)", name, trial.number, len(callback.values))
        study.tell(trial, state=TrialState.PRUNED)
        return
    value = result.best_metric
    if value is None or not math.isfinite(value):
        _tell_failed(study, trial, f"no finite validation {inputs.metric} (got {value})")
        return
    logger.info("%s trial %d: validation %s %.4f", name, trial.number, inputs.metric, value)
    study.tell(trial, float(value))


def _tell_failed(study: Any, trial: Any, error: str, interrupted: bool = False) -> None:
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):  # the storage itself may be what failed
        trial.set_user_attr("error", error[:2000])
        if interrupted:
            trial.set_user_attr(INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def _method_study(config: ExperimentConfig, method_config: Any, study: Any) -> MethodStudy:
    from optuna.trial import TrialState

    space = _space(config, method_config)
    records = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        error = t.user_attrs.get("error")
        if t.state == TrialState.FAIL and (t.user_attrs.get(INTERRUPTED) or error is None):
            error = INTERRUPTED if error in (None, INTERRUPTED) else f"{INTERRUPTED}: {error}"
        records.append(TrialRecord(number=t.number, state=t.state.name, params=dict(t.params),
                                   value=t.value if t.state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
                                   intermediate=[t.intermediate_values[s] for s in sorted(t.intermediate_values)],
                                   error=error))
    space_rows = [{"name": p.name, "kind": "log-uniform", "low": p.low, "high": p.high, "description": p.description}
                  if isinstance(p, LogFloat) else
                  {"name": p.name, "kind": "choice", "choices": list(p.choices), "description": p.description}
                  for p in space]
    result = MethodStudy(name=method_config.run_name, method=method_config.method, study_name=study.study_name,
                         direction=study.direction.name.lower(), space=space_rows, trials=records)
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if complete:
        best = study.best_trial  # ties: the earliest trial
        result.best_trial, result.best_value, result.best_params = best.number, best.value, dict(best.params)
        chosen = apply_params(method_config, best.params, space)
        result.chosen = {p.name: getattr(chosen, p.name) for p in space}
    return result


# --------------------------------------------------------------------------- the whole tuning run


def tune(config: ExperimentConfig, tune_dir: Path, *, methods: list[str] | None = None, storage: str | None = None,
         resume: bool = False, name: str | None = None, pruner: Any = None, workers: int = 1) -> StudyResult:
    """Tune each selected method on the validation split and write ``tuned.yaml``, the study and its report.

    Args:
        config: the validated experiment config (its ``tune`` section sets the budget, sampler and pruner).
        tune_dir: the tune directory (created; an existing one only with ``resume``).
        methods: tune only these run names (default: all); the others keep their settings in ``tuned.yaml``.
        storage: an Optuna storage URL (``journal:PATH``, ``sqlite:///PATH``, a database URL); default a journal
            file in ``tune_dir``. Several workers may share one: the budget is the study's, not the worker's.
        resume: continue the studies of an existing tune directory; finished trials count toward the budget.
        name: the experiment's name (``tuned.yaml`` is named ``<name>-tuned`` unless the config has a name).
        pruner: an Optuna pruner to use instead of the one ``tune.pruner`` describes (for the Python API).
        workers: run up to this many trials at once, each worker a child process on its own GPU (or with
            ``cores // workers`` CPU threads), all on the one storage and budget. The trials then see each other's
            results in another order than one after another, so the sampled settings (not the budget) differ from
            ``workers=1``.

    Returns:
        The :class:`StudyResult` written to ``tune_dir/study.json``.

    Raises:
        ConfigError: a bad storage URL or search override; RunDirError: the directory exists (without
            ``resume``) or holds a tuning run of another config.
    """
    import optuna

    from peftlab.cpu import configure_threads
    from peftlab.experiment import _select, environment, start_run_dir
    from peftlab.report import render_data_report_console, write_study_report

    configure_threads()
    if world_size() > 1:
        raise ConfigError("peftlab tune runs in one process per worker, not under torchrun/accelerate launch; start "
                          "several `peftlab tune --storage URL` processes to tune in parallel")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give 1 or more (how many trials run at once)")
    if workers > 1 and pruner is not None:
        raise ConfigError("a pruner object cannot be handed to worker processes: set tune.pruner in the config, or "
                          "use workers=1")
    if workers > config.tune.trials:
        logger.warning("--workers %d is more than the %d trial(s) per method; using %d", workers, config.tune.trials,
                       config.tune.trials)
        workers = config.tune.trials
    selected = _select(config, methods)
    for method_config in selected:
        _space(config, method_config)  # an override naming an unknown parameter fails here, before any write
    tune_dir = rundir.check_target(tune_dir)
    spec = _storage_spec(storage, tune_dir)
    rundir.refuse_existing(tune_dir, overwrite=False, resume=resume)
    if resume and (tune_dir / rundir.CONFIG).is_file():
        check_same_tuning(tune_dir, config)

    inputs, data = _tuning_inputs(config)
    env = {**environment(config), "workers": workers}

    with rundir.hold(tune_dir, takeover=resume):
        start_run_dir(tune_dir, config, env, data, overwrite=False, resume=resume)
        render_data_report_console(data.report)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # peftlab logs each trial itself
        opened = _open_storage(spec)
        if workers > 1:
            _run_trial_workers(config, selected, storage, tune_dir, workers)
        studies = []
        for method_config in selected:
            rundir.check_intact(tune_dir)
            # After workers: the budget is spent and this only loads the study, unless a killed worker left a slot.
            study = _run_study(config, method_config, inputs, spec, opened, tune_dir, pruner)
            studies.append(_method_study(config, method_config, study))
        shutil.rmtree(tune_dir / TRIALS, ignore_errors=True)
        rundir.check_intact(tune_dir)
        running = sum(t.state == "RUNNING" for s in studies for t in s.trials)
        if running:
            logger.warning("%d trial(s) still run in other workers; rerun with --resume when they finish to include "
                           "them in tuned.yaml", running)
        fsutil.write_text(tune_dir / TUNED, tuned_yaml(config, studies, name))
        seed = config.tune.seed if config.tune.seed is not None else config.training.seed
        after = " after the configured trial 0" if config.tune.include_defaults else ""
        result = StudyResult(
            name=config.name or name or tune_dir.name, metric=inputs.metric, budget=config.tune.trials,
            storage=spec.shown,
            sampler=f"TPE (seed {seed}, {startup_trials(config.tune)} random start-up trial(s){after}, sampler "
                    "reseeded per trial number)",
            pruner=_describe_pruner(config, pruner), methods=studies, tuned_config=TUNED, environment=env)
        write_study_report(result, tune_dir)
    return result


def _tuning_inputs(config: ExperimentConfig) -> tuple[_Inputs, Any]:
    """What every trial shares (the test split sealed), and the prepared data."""
    from peftlab.evaluate import GREATER_IS_BETTER
    from peftlab.experiment import load_inputs
    from peftlab.train import BaseModelSpec, tokenize_splits

    folder, tokenizer, data = load_inputs(config)
    classify = config.task == "classification"
    metric = config.training.metric_for_best_model if classify else "loss"
    # Only train and validation are tokenised; the trials get a test split that raises when touched.
    tokenized = {**tokenize_splits(dataclasses.replace(data, test=data.validation), tokenizer,
                                   config.data.max_length, config.task),
                 "test": _Sealed("the tokenised test split")}
    base = BaseModelSpec.from_config(config, folder, tokenizer)
    inputs = _Inputs(data=dataclasses.replace(data, test=_Sealed("data.test")), base=base, tokenized=tokenized,
                     metric=metric, direction="maximize" if GREATER_IS_BETTER[metric] else "minimize")
    return inputs, data


def _run_trial_workers(config: ExperimentConfig, selected: list[Any], storage: str | None, tune_dir: Path,
                       workers: int) -> None:
    """``workers`` child processes take trials of each method in turn from the one storage, until its budget is
    spent; each writes its output to ``TUNE_DIR/worker-<i>.log``. A worker that dies costs its running trial
    (recorded as interrupted, its slot run again)."""
    from peftlab.worker import slots, start_child

    spec = {"config": config.model_dump(mode="json"), "methods": [m.run_name for m in selected], "storage": storage,
            "tune_dir": str(tune_dir), "log_level": logging.getLogger("peftlab").getEffectiveLevel(),
            "parent_pid": os.getpid()}
    code = "import sys; from peftlab.tune import trial_worker_main; sys.exit(trial_worker_main())"
    children = []
    try:
        for index, slot in enumerate(slots(workers, groups=False)):
            log = tune_dir / f"worker-{index}.log"
            logger.info("tuning worker %d on %s; its output: %s", index, slot.label, log)
            children.append((index, log, start_child(["-c", code], spec, slot=slot, log=log)))
        for index, log, child in children:
            if child.wait() != 0:
                logger.warning("tuning worker %d exited with code %s (see %s); its unfinished trial is run again",
                               index, child.returncode, log)
    except BaseException:
        for _, _, child in children:
            if child.poll() is None:
                child.kill()
        raise


def trial_worker_main() -> int:
    """A tuning worker's child process: the spec on stdin; trials of each method until its budget is spent."""
    import optuna

    from peftlab.cpu import configure_threads
    from peftlab.worker import child_setup

    spec = json.loads(sys.stdin.read())
    child_setup(spec)
    try:
        configure_threads()
        config = load_config(data=spec["config"])
        tune_dir = Path(spec["tune_dir"])
        storage = _storage_spec(spec["storage"], tune_dir)
        inputs, _ = _tuning_inputs(config)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        opened = _open_storage(storage)
        for name in spec["methods"]:
            rundir.check_intact(tune_dir)
            _run_study(config, config.method(name), inputs, storage, opened, tune_dir, None)
    except PeftlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _describe_pruner(config: ExperimentConfig, pruner: Any) -> str:
    if pruner is not None:
        return type(pruner).__name__
    if config.tune.pruner == "none":
        return "none (every trial trains to the end)"
    return (f"median (per-epoch validation metric below the median of earlier trials at that epoch; from trial "
            f"{config.tune.prune_after_trials + 1}, after {config.tune.prune_warmup_epochs} warm-up epoch(s))")


def tuned_yaml(config: ExperimentConfig, studies: list[MethodStudy], name: str | None = None) -> str:
    """The config with each tuned method's chosen settings: valid as it is for ``peftlab run``."""
    import yaml

    import peftlab

    tree = config.model_dump(mode="json")
    chosen = {s.name: s for s in studies if s.chosen}
    for index, method_config in enumerate(config.methods):
        study = chosen.get(method_config.run_name)
        if study is not None:
            tree["methods"][index] = {**tree["methods"][index], **study.chosen}
    if not config.name and name:
        tree["name"] = f"{name}-tuned"
    load_config(data=tree)  # what is written must load: a tuned value the config rejects is a bug here
    tuned = ", ".join(f"{s.name} (trial {s.best_trial})" for s in studies if s.chosen) or "none"
    header = (f"# Tuned by peftlab {peftlab.__version__} on the validation split; methods tuned: {tuned}.\n"
              f"# The study and its report are beside this file. Run it: peftlab run {TUNED}\n")
    return header + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def check_same_tuning(tune_dir: Path, config: ExperimentConfig) -> None:
    """Resuming a tuning run with other data, model, recipe, methods or search would mix incomparable trials.

    Raises:
        RunDirError: naming the sections that differ (``tune.trials`` may change: it is the budget).
    """
    import yaml

    old = yaml.safe_load((tune_dir / rundir.CONFIG).read_text(encoding="utf-8")) or {}
    new = config.model_dump(mode="json")
    for tree in (old, new):
        if isinstance(tree.get("tune"), dict):
            tree["tune"] = {k: v for k, v in tree["tune"].items() if k != "trials"}
    changed = [key for key in _TUNING_KEYS if old.get(key) != new.get(key)]
    if changed:
        raise RunDirError(f"--resume: the config's {', '.join(changed)} section(s) differ from the tuning run in "
                          f"{tune_dir}; its trials would not be comparable. Give a new --output (only tune.trials "
                          f"may change on --resume)")


def tune_and_run(config: ExperimentConfig, run_dir: Path, *, methods: list[str] | None = None,
                 storage: str | None = None, overwrite: bool = False, resume: bool = False,
                 name: str | None = None, workers: int = 1) -> tuple[StudyResult, ExperimentResult]:
    """``peftlab run --tune``: tune in ``RUN_DIR-tune``, then run ``tuned.yaml`` in ``run_dir``.

    The run directory's lock is held from the first trial to the report, so no other run can start in it
    meanwhile. ``--resume`` resumes both the studies and the run; ``--overwrite`` replaces the run but keeps a
    tuning run of the same config (its trials are the expensive part) and refuses one of another config.

    Raises:
        RunDirError: the run was started with other tuned settings (resume) or the tuning run's config changed.
    """
    from peftlab.experiment import run_experiment

    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other: choose one")
    run_dir = rundir.check_target(run_dir)
    rundir.refuse_existing(run_dir, overwrite=overwrite, resume=resume)  # fail fast, before tuning for hours
    with rundir.hold(run_dir, takeover=resume or overwrite):
        study = tune(config, tune_dir_for(run_dir), methods=methods, storage=storage, resume=resume or overwrite,
                     name=name, workers=workers)
        tuned = load_config(tune_dir_for(run_dir) / TUNED)
        if resume and (run_dir / rundir.CONFIG).is_file():
            _check_same_methods(run_dir, tuned)
        experiment = run_experiment(tuned, run_dir, overwrite=overwrite, resume=resume, methods=methods,
                                    lock_held=True, workers=workers)
    return study, experiment


def _check_same_methods(run_dir: Path, tuned: ExperimentConfig) -> None:
    import yaml

    old = yaml.safe_load((run_dir / rundir.CONFIG).read_text(encoding="utf-8")) or {}
    new = tuned.model_dump(mode="json")
    if old.get("methods") != new.get("methods"):
        raise RunDirError(f"--resume: the tuned settings differ from those the run in {run_dir} started with (the "
                          f"studies got more trials?); its finished methods were trained with other settings. Use "
                          f"--overwrite to rerun them")
