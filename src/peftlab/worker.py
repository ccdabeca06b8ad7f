"""One method (at one seed) trained in a process of its own.

Why a process per method: in one process, a method's peak memory depends on what ran before it (allocator
caches, fragmentation, modules kept alive), so the comparison's memory column would depend on the order of the
methods; and a crash (out of memory, a segfault in a kernel) would cost every method after it. In a child
process each method starts from the same state, its peak RSS is its own, and a dying child costs only itself.

The parent hands the child a JSON spec on its standard input (the resolved config, the method, the seed, the
folder): nothing of the hand-over lives in the run directory, which the user may delete at any moment. The child
prepares the same data and split (deterministic: same config, same seed), trains, and writes its
:class:`RunResult` to the path in the spec. The parent alone writes the method's result file and the report.

Several runs side by side (``peftlab run --workers N``): each worker is a :class:`Slot`, the environment its
children get. On a machine with GPUs each slot is its own device, or its own group of devices, and a run on a
group is started under ``torchrun`` (DDP over the group); on CPU each slot gets ``cores // N`` threads. A child
dies with its parent (Linux: ``PR_SET_PDEATHSIG``): a killed ``peftlab run`` leaves no orphan training on, which
a ``--resume`` would otherwise race.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, IO

from peftlab import fsutil, rundir
from peftlab.artifacts import MODEL_DIR
from peftlab.config import ExperimentConfig, load_config
from peftlab.console import quiet_third_party
from peftlab.dist import is_main_process
from peftlab.errors import FilesystemError, MethodError
from peftlab.results import RunResult

logger = logging.getLogger(__name__)


def with_seed(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The config with ``training.seed`` set to ``seed`` (the data split keeps its own ``data.split.seed``)."""
    return config.model_copy(update={"training": config.training.model_copy(update={"seed": seed})})


def train_one(config: ExperimentConfig, method_config: Any, data: Any, base: Any, tokenized: dict[str, Any],
              method_dir: Path, seed: int, resume: bool) -> RunResult:
    """Train one method at one seed in this process; any failure becomes a failed :class:`RunResult`."""
    from peftlab.train import train_method

    name = method_config.run_name
    try:
        result = train_method(with_seed(config, seed), method_config, data, base, tokenized, method_dir,
                              resume=resume)
        if config.task == "causal-lm":
            from peftlab.causal_stages import generate_for_report

            result.generations = generate_for_report(config, base, method_dir / MODEL_DIR)
    except FilesystemError:
        raise  # the run directory itself is gone or unwritable: no later method could be saved either
    except Exception as exc:  # noqa: BLE001 - one method's failure must not cost the user the others
        error = str(exc) if isinstance(exc, MethodError) else f"{type(exc).__name__}: {exc}"
        logger.error("%s failed: %s", name, error)
        logger.debug("%s failed", name, exc_info=True)
        result = RunResult(name=name, method=method_config.method, task=config.task, status="failed",
                           error=error[:2000], learning_rate=method_config.learning_rate)
    result.seed = seed
    return result


@dataclasses.dataclass(frozen=True)
class Slot:
    """One worker of ``--workers N``: what its children add to their environment, and how many processes a run
    on it is (more than 1: a DDP group started under ``torchrun``)."""

    env: dict[str, str] = dataclasses.field(default_factory=dict)
    processes: int = 1
    label: str = "this machine"


def threads_per_run(workers: int) -> int:
    """CPU threads each of ``workers`` side-by-side runs gets: the user's ``OMP_NUM_THREADS`` if set, else
    the usable cores divided among the workers (at least 1)."""
    from peftlab.cpu import usable_cpus

    chosen = os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")
    if chosen and chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    return max(1, usable_cpus() // max(1, workers))


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()][:torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def slots(workers: int, gpus: list[str] | None = None, *, groups: bool = True) -> list[Slot]:
    """Split this machine among ``workers`` side-by-side runs.

    GPUs: each worker gets ``len(gpus) // workers`` devices of its own (``CUDA_VISIBLE_DEVICES``); with more than
    one, its runs are DDP over them (``groups=False``: one device each, the rest idle). More workers than GPUs
    share the GPUs round-robin (with a warning). CPU: each worker gets :func:`threads_per_run` threads
    (``OMP_NUM_THREADS``). One worker: the child's environment is left as it is (every device and core, as
    without ``--workers``).
    """
    gpus = visible_gpus() if gpus is None else gpus
    if workers == 1:
        return [Slot(label=f"GPUs {','.join(gpus)}" if gpus else "this machine")]
    threads = str(threads_per_run(workers))
    cpu_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    if not gpus:
        return [Slot(env=dict(cpu_env), label=f"{threads} CPU thread(s)") for _ in range(workers)]
    if workers > len(gpus):
        logger.warning("--workers %d on %d GPU(s): workers share GPUs (each runs on one, round-robin); their memory "
                       "adds up on a shared GPU", workers, len(gpus))
        return [Slot(env={**cpu_env, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}, label=f"GPU {gpus[i % len(gpus)]}")
                for i in range(workers)]
    size = len(gpus) // workers if groups else 1
    parts = [gpus[i * size:(i + 1) * size] for i in range(workers)]
    return [Slot(env={**cpu_env, "CUDA_VISIBLE_DEVICES": ",".join(g)}, processes=len(g), label=f"GPUs {','.join(g)}")
            for g in parts]


def start_child(args: list[str], spec: dict[str, Any], *, slot: Slot, log: Path) -> subprocess.Popen:
    """Start ``python ARGS`` on ``slot`` with ``spec`` (JSON) on its standard input and its output in ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:  # the child keeps its own copy of the descriptor
        child = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=handle,
                                 stderr=subprocess.STDOUT, text=True, env={**os.environ, **slot.env})
    assert child.stdin is not None
    child.stdin.write(json.dumps(spec))
    child.stdin.close()
    return child


def child_setup(spec: dict[str, Any]) -> None:
    """What every child does first: die with its parent, log at the parent's level, stay offline."""
    _die_with_parent(spec.get("parent_pid"))
    logging.basicConfig(level=spec["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("peftlab").setLevel(spec["log_level"])
    quiet_third_party(verbose=spec["log_level"] <= logging.DEBUG)  # as the parent: same warnings, bars and logs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def child_command(slot: Slot, spec_file: Path | None) -> list[str]:
    """The command line of one run's child: ``python -m peftlab.worker`` (spec on stdin), or under ``torchrun``
    for a DDP group (every rank reads the spec from ``spec_file``)."""
    if slot.processes == 1:
        return [sys.executable, "-m", "peftlab.worker"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(slot.processes),
            "-m", "peftlab.worker", "--spec", str(spec_file)]


def run_in_child(config: ExperimentConfig, method_config: Any, run_dir: Path, method_dir: Path, seed: int,
                 resume: bool, *, slot: Slot | None = None, log: Path | None = None,
                 started: Callable[[subprocess.Popen], None] | None = None) -> RunResult:
    """Train one method in a child process and return its result (a failed one if the child died).

    Args:
        slot: the worker's devices or threads (default: this machine, as without ``--workers``).
        log: send the child's output to this file (appended) instead of this terminal.
        started: called with the child's ``Popen`` once it runs (the caller may kill it).
    """
    slot = slot or Slot()
    with tempfile.TemporaryDirectory(prefix="peftlab-worker-") as scratch:
        output = Path(scratch) / "run.json"
        spec = {"config": config.model_dump(mode="json"), "method": method_config.run_name, "seed": seed,
                "run_dir": str(run_dir), "method_dir": str(method_dir), "resume": resume, "output": str(output),
                "log_level": logging.getLogger("peftlab").getEffectiveLevel(),
                "parent_pid": os.getpid() if slot.processes == 1 else None}
        spec_file = Path(scratch) / "spec.json"
        direct = slot.processes == 1  # a torchrun group reads the spec from a file: its ranks share no stdin
        if not direct:
            spec_file.write_text(json.dumps(spec), encoding="utf-8")
        env = {**os.environ, **slot.env, "PEFTLAB_WORKER": f"{method_config.run_name}:{seed}"}
        # The child re-imports torch/transformers (~5 s): small next to a method's training, and the price of a
        # clean process. Its output goes to this terminal (progress bars, logs), or to ``log`` with --workers.
        handle: IO[str] | None = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = log.open("a", encoding="utf-8")
        try:
            child = subprocess.Popen(child_command(slot, spec_file), stdin=subprocess.PIPE if direct else
                                     subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT if handle else None,
                                     text=True, env=env)
            if started is not None:
                started(child)
            try:
                child.communicate(json.dumps(spec) if direct else None)
            except BaseException:  # Ctrl-C, or the parent stopping the run: as subprocess.run, never leave it running
                child.kill()
                child.wait()
                raise
        finally:
            if handle is not None:
                handle.close()
        if output.is_file():
            return RunResult.from_dict(json.loads(output.read_text(encoding="utf-8")))
    code = child.returncode
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    hint = " (signal 9 is often the out-of-memory killer: lower training.batch_size)" if code == -9 else ""
    where = f"; its output is in {log}" if log is not None else ""
    error = f"the method's process died ({how}){hint}{where}; rerun with --resume to retry it"
    logger.error("%s failed: %s", method_config.run_name, error)
    return RunResult(name=method_config.run_name, method=method_config.method, task=config.task, status="failed",
                     error=error, learning_rate=method_config.learning_rate, seed=seed)


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: be killed when the parent process dies, so that no orphan trains on after a killed run."""
    if not parent_pid or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _child_main(spec: dict[str, Any]) -> int:
    child_setup(spec)

    from peftlab.cpu import configure_threads
    from peftlab.data import prepare_data
    from peftlab.models import load_tokenizer, resolve_model_path
    from peftlab.train import BaseModelSpec, tokenize_splits

    rundir.check_intact(Path(spec["run_dir"]))  # it may have been deleted while this process started (~5 s)
    configure_threads()
    config = load_config(data=spec["config"])
    method_config = next(m for m in config.methods if m.run_name == spec["method"])
    folder = resolve_model_path(config.model.path)
    tokenizer = load_tokenizer(folder, config.model.trust_remote_code)
    data_logger = logging.getLogger("peftlab.data")
    data_logger.setLevel(max(logging.ERROR, spec["log_level"]))  # the parent already reported the data and its warnings
    data = prepare_data(config.data, config.task, tokenizer)
    base = BaseModelSpec.from_config(config, folder, tokenizer)
    tokenized = tokenize_splits(data, tokenizer, config.data.max_length, config.task)
    result = train_one(config, method_config, data, base, tokenized, Path(spec["method_dir"]), spec["seed"],
                       spec["resume"])
    if is_main_process():  # a DDP group: every rank trained, the main one reports
        fsutil.write_json(Path(spec["output"]), dataclasses.asdict(result))
    return 0


def _read_spec(argv: list[str]) -> dict[str, Any]:
    """The spec from ``--spec FILE`` (under torchrun, whose ranks share no stdin) or from standard input."""
    if len(argv) == 2 and argv[0] == "--spec":
        return json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    return json.loads(sys.stdin.read())


if __name__ == "__main__":
    from peftlab.errors import PeftlabError

    try:
        sys.exit(_child_main(_read_spec(sys.argv[1:])))
    except PeftlabError as exc:  # the parent reports the method as failed; the reason goes to the terminal
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # the run directory vanished under the child, say: the parent says what happened
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)
