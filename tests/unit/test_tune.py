"""`peftlab tune`: one Optuna study per method on the validation split, the same budget for each, on tiny models.

What is checked: every method declares a typed search space; the budget is the study's (resume, two
workers); pruning stops a bad trial; a diverging trial is FAIL and the study goes on; the chosen settings
land in tuned.yaml, which runs as it is; and the test split is never read.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from peftlab import tune as tune_module
from peftlab.config import MethodName, load_config
from peftlab.errors import ConfigError, RunDirError
from peftlab.methods import SEARCH_SPACES, search_space
from peftlab.methods.space import Choice, LogFloat
from peftlab.results import StudyResult
from tests.conftest import review_rows, write_rows

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp: Path, model: Path, methods: Any = ("full",), tune: dict | None = None,
                 training: dict | None = None, rows: int = 60) -> Path:
    data = write_rows(tmp / "d.csv", review_rows(rows))
    tree = {"data": {"path": str(data)}, "model": {"path": str(model)}, "methods": list(methods),
            "training": {"epochs": 1, "batch_size": 16, "method_process": False, **(training or {})},
            "tune": {"trials": 2, **(tune or {})}}
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(tree), encoding="utf-8")
    return path


def trials_of(study: StudyResult, name: str) -> list[tuple[int, str, dict, float | None]]:
    method = next(m for m in study.methods if m.name == name)
    return [(t.number, t.state, t.params, t.value) for t in method.trials]


def enqueue(config_path: Path, storage: Path, method: str, params: list[dict]) -> None:
    """Fixed trials, put in the method's study before tuning (the study the tuner will find)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    config = load_config(config_path)
    study = optuna.create_study(storage=optuna.storages.JournalStorage(JournalFileBackend(str(storage))),
                                study_name=tune_module.study_name(config, config.method(method)),
                                direction="minimize" if config.training.metric_for_best_model == "loss" else "maximize")
    for p in params:
        study.enqueue_trial(p)


# --------------------------------------------------------------------------- search spaces and config


def test_every_method_declares_a_typed_search_space_with_descriptions() -> None:
    assert set(SEARCH_SPACES) == set(MethodName)
    for method, space in SEARCH_SPACES.items():
        names = {p.name: p for p in space}
        assert isinstance(names["learning_rate"], LogFloat), method
        assert all(p.description for p in space), method
    for method in (MethodName.LORA, MethodName.DORA, MethodName.LOHA, MethodName.ADALORA):
        names = {p.name: p for p in SEARCH_SPACES[method]}
        assert isinstance(names["r"], Choice) and names["target_modules"].choices == ("attention", "all-linear")
        assert names["target_modules"].to_config("attention") is None  # peft's attention-only default
    for method in (MethodName.PROMPT_TUNING, MethodName.PREFIX_TUNING, MethodName.P_TUNING):
        assert "num_virtual_tokens" in {p.name for p in SEARCH_SPACES[method]}
    # Ranges differ by method: full fine-tuning's top is below LoRA's bottom's 10x, prompt tuning's far above.
    lr = {m: next(p for p in s if p.name == "learning_rate") for m, s in SEARCH_SPACES.items()}
    assert lr[MethodName.FULL].high < lr[MethodName.LORA].high < lr[MethodName.PROMPT_TUNING].high


def test_config_overrides_replace_a_range_or_the_choices() -> None:
    config = load_config(data={"data": {"path": "x.csv"}, "methods": ["lora"],
                               "tune": {"search": {"lora": {"learning_rate": {"low": 1e-3, "high": 1e-2},
                                                            "r": [32]}}}})
    space = {p.name: p for p in search_space("lora", config.tune.search["lora"])}
    assert (space["learning_rate"].low, space["learning_rate"].high) == (1e-3, 1e-2)
    assert space["r"].choices == (32,)


@pytest.mark.parametrize("tune, expect", [
    ({"trials": 0}, r"tune.trials: Input should be greater than 0"),
    ({"trials": -3}, r"tune.trials: Input should be greater than 0"),
    ({"search": {"lora": {"learning_rate": {"low": 1e-2, "high": 1e-4}}}},
     r"tune.search.lora.learning_rate.range: low 0.01 is above high 0.0001"),
    ({"search": {"dora": {"r": [4]}}}, r"tune.search names dora, not a method of this config"),
    ({"search": {"lora": {"r": []}}}, r"tune.search.lora.r is an empty list"),
])
def test_bad_tune_settings_are_config_errors_naming_the_key(tune: dict, expect: str) -> None:
    with pytest.raises(ConfigError, match=expect):
        load_config(data={"data": {"path": "x.csv"}, "methods": ["lora"], "tune": tune})


def test_an_override_of_a_parameter_the_method_does_not_search_names_it() -> None:
    with pytest.raises(ConfigError, match=r"tune.search.lora.alpha: lora does not search 'alpha'; it searches "
                                          r"learning_rate, r, target_modules"):
        search_space("lora", {"alpha": [8]}, "tune.search.lora")
    with pytest.raises(ConfigError, match=r"tune.search.full.learning_rate: learning_rate is a range"):
        search_space("full", {"learning_rate": [1e-4]}, "tune.search.full")


@pytest.mark.parametrize("url, expect", [
    ("nosuch://host/db", r"not an Optuna storage URL"),
    ("not a url", r"not an Optuna storage URL"),
    ("journal:", r"names no file"),
    ("sqlite://", r"in-memory SQLite database"),
])
def test_bad_storage_urls_are_config_errors(tmp_path: Path, url: str, expect: str) -> None:
    with pytest.raises(ConfigError, match=expect):
        tune_module._storage_spec(url, tmp_path)


def test_storage_urls_parse_without_writing(tmp_path: Path) -> None:
    journal = tune_module._storage_spec(f"journal:{tmp_path}/s.journal", tmp_path)
    sqlite = tune_module._storage_spec(f"sqlite:///{tmp_path}/s.db", tmp_path)
    server = tune_module._storage_spec("postgresql://me:secret@db.example/optuna", tmp_path)
    assert journal.kind == "journal" and journal.lock_file == tmp_path / "s.journal.peftlab-lock"
    assert sqlite.kind == "rdb" and sqlite.lock_file == tmp_path / "s.db.peftlab-lock"
    assert "secret" not in server.shown and server.lock_file is None
    with pytest.raises(ConfigError, match=r"folder .*nowhere does not exist"):
        tune_module._storage_spec(f"sqlite:///{tmp_path}/nowhere/s.db", tmp_path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- studies on a tiny model


def test_budget_chosen_settings_land_in_tuned_yaml_which_runs(tmp_path: Path, tiny_bert: Path) -> None:
    from peftlab.experiment import run_experiment

    path = write_config(tmp_path, tiny_bert, methods=["full", "lora"], tune={"trials": 2})
    study = tune_module.tune(load_config(path), tmp_path / "tune", name="exp")
    assert study.budget == 2
    for name in ("full", "lora"):
        trials = trials_of(study, name)
        assert [t[0] for t in trials] == [0, 1] and all(t[1] == "COMPLETE" for t in trials)
        assert trials[0][2]["learning_rate"] == load_config(path).method(name).learning_rate  # trial 0: defaults
    tuned = load_config(tmp_path / "tune" / "tuned.yaml")
    lora = next(m for m in study.methods if m.name == "lora")
    best = dict(trials_of(study, "lora")[lora.best_trial][2])
    assert tuned.method("lora").learning_rate == best["learning_rate"] and tuned.method("lora").r == best["r"]
    assert tuned.method("lora").target_modules == (None if best["target_modules"] == "attention" else "all-linear")
    report = (tmp_path / "tune" / "report.md").read_text(encoding="utf-8")
    assert "same budget: 2 trial(s) per method" in report and "| lora | 1 |" in report
    assert (tmp_path / "tune" / "plots" / "tune_learning_rate.png").is_file()
    assert not (tmp_path / "tune" / "trials").exists()  # trial checkpoints are removed
    assert StudyResult.from_dict(json.loads((tmp_path / "tune" / "study.json").read_text())) == study
    experiment = run_experiment(tuned, tmp_path / "run")
    assert [r.status for r in experiment.runs] == ["ok", "ok"]
    assert experiment.runs[1].learning_rate == best["learning_rate"]


def test_trial_0_is_exactly_the_configured_run_even_outside_the_space(tmp_path: Path) -> None:
    """configs/default.yaml's lora: targets [query, value] (no choice of the space) and a rate beyond its range."""
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "d.csv"}, "methods": [
        {"method": "lora", "learning_rate": 2e-2, "r": 8, "target_modules": ["query", "value"]}]}), encoding="utf-8")
    config = load_config(path)
    lora = config.method("lora")
    space = tune_module._space(config, lora)
    params = tune_module._default_params(lora, space)
    assert params == {"learning_rate": 2e-2, "r": 8, "target_modules": "query,value"}
    assert tune_module.apply_params(lora, params, space) == lora  # trial 0 trains the untuned run itself
    # without trial 0 the space is the method's own
    off = load_config(path, ["tune.include_defaults=false"])
    assert tune_module._space(off, off.method("lora")) == search_space("lora")


def test_the_trial_after_the_configured_one_is_a_random_draw() -> None:
    """Trial 0 (the configured settings) is no start-up trial: TPE modelling from it alone samples beside it."""
    import optuna

    from peftlab.config import TuneConfig

    tune = TuneConfig(trials=4)
    assert tune_module.startup_trials(tune) == 1  # a third of the 3 trials after trial 0
    assert tune_module.startup_trials(TuneConfig(trials=4, include_defaults=False)) == 1
    assert tune_module.startup_trials(TuneConfig(trials=31)) == 10
    learning_rate = {"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)}
    draws = []
    for seed in range(8):
        study = optuna.create_study(direction="maximize")
        study.enqueue_trial({"learning_rate": 1e-3})
        study.tell(study.ask(learning_rate), 0.5)
        study.sampler = tune_module._sampler(tune, seed)
        draws.append(study.ask(learning_rate).params["learning_rate"])
    # Random draws over four decades; TPE from trial 0 alone stayed within 2x of 1e-3 for all eight seeds.
    assert max(draws) / min(draws) > 100


def test_the_test_split_is_never_read(tmp_path: Path, tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftlab import train

    seen: list[tuple[Any, Any, bool]] = []
    real = train.train_method

    def spy(config, method_config, data, base, tokenized, method_dir, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append((data.test, tokenized["test"], kwargs.get("evaluate_test", True)))
        return real(config, method_config, data, base, tokenized, method_dir, *args, **kwargs)

    def no_test(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the test split was evaluated while tuning")

    monkeypatch.setattr(train, "train_method", spy)
    monkeypatch.setattr(train, "_evaluate_test", no_test)
    study = tune_module.tune(load_config(write_config(tmp_path, tiny_bert, tune={"trials": 2})), tmp_path / "tune")
    # Had a trial touched the test split (evaluated it, or read its rows), it would have failed.
    assert [t[1] for t in trials_of(study, "full")] == ["COMPLETE", "COMPLETE"]
    assert len(seen) == 2 and all(evaluate is False for _, _, evaluate in seen)
    for data_test, tokenized_test, _ in seen:
        with pytest.raises(tune_module.TestSplitSealed):
            len(data_test)
        with pytest.raises(tune_module.TestSplitSealed):
            data_test.labels
        with pytest.raises(tune_module.TestSplitSealed):
            tokenized_test[0]
    assert not list((tmp_path / "tune").rglob("test_predictions.jsonl"))
    assert "test" not in json.dumps(study.to_dict()["methods"])  # no test metric anywhere in the study


def test_a_bad_trial_is_pruned_and_a_diverging_one_fails(tmp_path: Path, tiny_bert: Path) -> None:
    path = write_config(tmp_path, tiny_bert, tune={"trials": 3, "include_defaults": False, "pruner": "median",
                                                   "prune_after_trials": 1,
                                                   "search": {"full": {"learning_rate": {"low": 1e-9, "high": 1e30}}}},
                        training={"epochs": 3, "metric_for_best_model": "loss"})
    storage = tmp_path / "s.journal"
    # A good trial, one that cannot learn (loss stays where it started: worse than the median), one that diverges.
    enqueue(path, storage, "full", [{"learning_rate": 2e-3}, {"learning_rate": 1e-9}, {"learning_rate": 1e30}])
    study = tune_module.tune(load_config(path), tmp_path / "tune", storage=f"journal:{storage}")
    method = study.methods[0]
    states = [t.state for t in method.trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"], [(t.state, t.intermediate, t.error) for t in method.trials]
    assert len(method.trials[0].intermediate) == 3 and len(method.trials[1].intermediate) == 1  # stopped at epoch 1
    assert "NaN/inf" in method.trials[2].error
    assert method.best_trial == 0 and load_config(tmp_path / "tune" / "tuned.yaml").method("full").learning_rate == 2e-3
    report = (tmp_path / "tune" / "report.md").read_text(encoding="utf-8")
    assert "| pruned |" in report and "| fail (" in report


def test_a_trial_is_never_pruned_at_its_last_evaluation(tmp_path: Path, tiny_bert: Path) -> None:
    """With one epoch the only evaluation is the last: pruning would save nothing and lose the trial's value."""
    path = write_config(tmp_path, tiny_bert, tune={"trials": 2, "include_defaults": False, "pruner": "median",
                                                   "prune_after_trials": 1,
                                                   "search": {"full": {"learning_rate": {"low": 1e-9, "high": 1e-2}}}},
                        training={"epochs": 1, "metric_for_best_model": "loss"})
    storage = tmp_path / "s.journal"
    enqueue(path, storage, "full", [{"learning_rate": 2e-3}, {"learning_rate": 1e-9}])
    study = tune_module.tune(load_config(path), tmp_path / "tune", storage=f"journal:{storage}")
    trials = study.methods[0].trials
    assert [(t.state, len(t.intermediate)) for t in trials] == [("COMPLETE", 1), ("COMPLETE", 1)]
    assert trials[1].value > trials[0].value  # the bad trial is worse (loss): below the median, yet kept


def test_without_a_pruner_the_bad_trial_trains_to_the_end(tmp_path: Path, tiny_bert: Path) -> None:
    path = write_config(tmp_path, tiny_bert, tune={"trials": 2, "include_defaults": False, "pruner": "none",
                                                   "prune_after_trials": 1,
                                                   "search": {"full": {"learning_rate": {"low": 1e-9, "high": 1e-2}}}},
                        training={"epochs": 2, "metric_for_best_model": "loss"})
    storage = tmp_path / "s.journal"
    enqueue(path, storage, "full", [{"learning_rate": 2e-3}, {"learning_rate": 1e-9}])
    study = tune_module.tune(load_config(path), tmp_path / "tune", storage=f"journal:{storage}")
    assert [(t.state, len(t.intermediate)) for t in study.methods[0].trials] == [("COMPLETE", 2), ("COMPLETE", 2)]


def test_resume_counts_finished_trials_toward_the_budget(tmp_path: Path, tiny_bert: Path) -> None:
    path = write_config(tmp_path, tiny_bert, tune={"trials": 2})
    first = tune_module.tune(load_config(path), tmp_path / "tune")
    with pytest.raises(RunDirError, match="already exists"):
        tune_module.tune(load_config(path), tmp_path / "tune")
    with pytest.raises(RunDirError, match=r"training section\(s\) differ from the tuning run"):
        tune_module.tune(load_config(path, ["training.epochs=2"]), tmp_path / "tune", resume=True)
    again = tune_module.tune(load_config(path, ["tune.trials=3"]), tmp_path / "tune", resume=True)
    assert trials_of(again, "full")[:2] == trials_of(first, "full")  # kept, not rerun
    assert [t[0] for t in trials_of(again, "full")] == [0, 1, 2]  # one new trial


def test_an_interrupted_trial_does_not_count_and_its_slot_is_run_again(tmp_path: Path, tiny_bert: Path) -> None:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = write_config(tmp_path, tiny_bert, tune={"trials": 1})
    tune_module.tune(load_config(path), tmp_path / "tune")
    # A worker killed mid-trial leaves it RUNNING, stamped with its (now dead) pid.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    config = load_config(path)
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "tune" / tune_module.JOURNAL)))
    study = optuna.load_study(study_name=tune_module.study_name(config, config.method("full")), storage=storage)
    zombie = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-5, 2e-4, log=True)})
    zombie.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid, "started": "2020-01-01T00:00:00+00:00"})
    resumed = tune_module.tune(load_config(path, ["tune.trials=2"]), tmp_path / "tune", resume=True)
    trials = resumed.methods[0].trials
    assert [(t.number, t.state) for t in trials] == [(0, "COMPLETE"), (1, "FAIL"), (2, "COMPLETE")]
    assert trials[1].error == "interrupted"


def test_two_workers_on_one_storage_equal_one_worker(tmp_path: Path, tiny_bert: Path) -> None:
    """Two `peftlab tune` processes share a journal: 4 trials in all, each once, equal to one worker's 4 (SQLite)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = write_config(tmp_path, tiny_bert, tune={"trials": 4, "startup_trials": 4})
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def worker(storage: str, out: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "peftlab.cli", "-q", "tune", str(path), "--storage", storage,
                                 "--output", str(tmp_path / out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    shared = f"journal:{tmp_path / 'shared.journal'}"
    workers = [worker(shared, "w1"), worker(shared, "w2")]
    for w in workers:
        assert w.wait(timeout=600) == 0, w.stderr.read()[-2000:]
    single = worker(f"sqlite:///{tmp_path / 'single.db'}", "single")
    assert single.wait(timeout=600) == 0, single.stderr.read()[-2000:]

    config = load_config(path)
    name = tune_module.study_name(config, config.method("full"))
    both = optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(tmp_path / "shared.journal")))).get_trials()
    one = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'single.db'}").get_trials()
    assert [t.number for t in both] == [0, 1, 2, 3]  # counted once each, none lost, budget not exceeded
    assert all(t.state.name == "COMPLETE" for t in both + one)
    assert {t.user_attrs["worker"]["pid"] for t in both} <= {w.pid for w in workers}
    assert [t.params for t in both] == [t.params for t in one]
    assert [t.value for t in both] == pytest.approx([t.value for t in one], abs=1e-6)


# --------------------------------------------------------------------------- the CLI


def test_tune_help() -> None:
    from typer.testing import CliRunner

    from peftlab.cli import app

    result = CliRunner().invoke(app, ["tune", "--help"])
    assert result.exit_code == 0 and "--trials" in result.output and "--storage" in result.output


def test_run_tune_tunes_beside_the_run_then_runs_the_tuned_config(tmp_path: Path, tiny_bert: Path) -> None:
    from peftlab.cli import main

    path = write_config(tmp_path, tiny_bert, methods=["lora"], tune={"trials": 1})
    old_argv = sys.argv
    sys.argv = ["peftlab", "run", str(path), "--output", str(tmp_path / "out"), "--tune"]
    try:
        with pytest.raises(SystemExit) as done:
            main()
    finally:
        sys.argv = old_argv
    assert done.value.code == 0
    tuned = load_config(tmp_path / "out-tune" / "tuned.yaml")
    ran = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text(encoding="utf-8"))
    assert ran["methods"] == tuned.model_dump(mode="json")["methods"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]["status"] == "ok"
    assert not (tmp_path / ".out.lock").exists() and not (tmp_path / ".out-tune.lock").exists()


def test_run_tune_on_a_locked_run_is_refused_before_tuning(tmp_path: Path, tiny_bert: Path) -> None:
    import datetime

    from peftlab.rundir import RunLockedError

    path = write_config(tmp_path, tiny_bert, tune={"trials": 1})
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    (tmp_path / ".out.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                    "started": started}), encoding="utf-8")
    with pytest.raises(RunLockedError, match="being written by another peftlab run"):
        tune_module.tune_and_run(load_config(path), tmp_path / "out")
    assert not (tmp_path / "out-tune").exists()
