"""One method (at one seed) trained in a process of its own.

Why a process per method: in one process, a method's peak memory depends on what ran before it (allocator
caches, fragmentation, modules kept alive), so the comparison's memory column would depend on the order of the
methods; and a crash (out of memory, a segfault in a kernel) would cost every method after it. In a child
process each method starts from the same state, its peak RSS is its own, and a dying child costs only itself.

The parent hands the child a JSON spec on its standard input (the resolved config, the method, the seed, the
folder): nothing of the hand-over lives in the run directory, which the user may delete at any moment. The child
prepares the same data and split (deterministic: same config, same seed), trains, and writes its
:class:`RunResult` to the path in the spec. The parent alone writes the method's result file and the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from peftlab import fsutil, rundir
from peftlab.artifacts import MODEL_DIR
from peftlab.config import ExperimentConfig, load_config
from peftlab.console import quiet_third_party
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


def run_in_child(config: ExperimentConfig, method_config: Any, run_dir: Path, method_dir: Path, seed: int,
                 resume: bool) -> RunResult:
    """Train one method in a child process and return its result (a failed one if the child died)."""
    with tempfile.TemporaryDirectory(prefix="peftlab-worker-") as scratch:
        output = Path(scratch) / "run.json"
        spec = {"config": config.model_dump(mode="json"), "method": method_config.run_name, "seed": seed,
                "run_dir": str(run_dir), "method_dir": str(method_dir), "resume": resume, "output": str(output),
                "log_level": logging.getLogger("peftlab").getEffectiveLevel()}
        # The child re-imports torch/transformers (~5 s): small next to a method's training, and the price of a
        # clean process. Its output goes straight to this terminal (its live display, logs).
        done = subprocess.run([sys.executable, "-m", "peftlab.worker"], input=json.dumps(spec), text=True,
                              check=False, env={**os.environ, "PEFTLAB_WORKER": "1"})
        if output.is_file():
            return RunResult.from_dict(json.loads(output.read_text(encoding="utf-8")))
    how = f"killed by signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
    hint = " (signal 9 is often the out-of-memory killer: lower training.batch_size)" if done.returncode == -9 else ""
    error = f"the method's process died ({how}){hint}; rerun with --resume to retry it"
    logger.error("%s failed: %s", method_config.run_name, error)
    return RunResult(name=method_config.run_name, method=method_config.method, task=config.task, status="failed",
                     error=error, learning_rate=method_config.learning_rate, seed=seed)


def _child_main(spec: dict[str, Any]) -> int:
    logging.basicConfig(level=spec["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("peftlab").setLevel(spec["log_level"])
    quiet_third_party(verbose=spec["log_level"] <= logging.DEBUG)  # as the parent: same warnings, bars and logs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    fsutil.write_json(Path(spec["output"]), dataclasses.asdict(result))
    return 0


if __name__ == "__main__":
    from peftlab.errors import PeftlabError

    try:
        sys.exit(_child_main(json.loads(sys.stdin.read())))
    except PeftlabError as exc:  # the parent reports the method as failed; the reason goes to the terminal
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # the run directory vanished under the child, say: the parent says what happened
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(1)
