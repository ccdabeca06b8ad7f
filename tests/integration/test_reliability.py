"""Reliability: kill -9 mid-training then --resume matches an uninterrupted run; DDP on two CPU processes."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_tiny_bert, review_rows

pytestmark = pytest.mark.integration


def write_experiment(folder: Path, model: Path, rows: int, epochs: int, methods: str) -> Path:
    data = folder / "reviews.csv"
    with data.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(review_rows(rows))
    config = folder / "exp.yaml"
    config.write_text(
        f"data: {{path: {data}, max_length: 32}}\n"
        f"model: {{path: {model}}}\n"
        f"methods: {methods}\n"
        f"training: {{epochs: {epochs}, batch_size: 8, eval_batch_size: 64, warmup_ratio: 0.0}}\n",
        encoding="utf-8")
    return config


def peftlab(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "peftlab.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    config = write_experiment(tmp_path, model, rows=400, epochs=2,
                              methods="[{method: lora, learning_rate: 0.01}, {method: full, learning_rate: 0.001}]")

    reference = peftlab("run", str(config), "--output", str(tmp_path / "reference"))
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]

    # Kill the second method (full) once its first epoch checkpoint is complete on disk (the training
    # seconds up to it are written last).
    run = peftlab("run", str(config), "--output", str(tmp_path / "killed"))
    checkpoints = tmp_path / "killed" / "full" / "checkpoints"
    deadline = time.time() + 600
    while not list(checkpoints.glob("checkpoint-*/peftlab_elapsed.json")):
        assert run.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    recorded = max(json.loads(f.read_text())["train_seconds"] for f in checkpoints.glob("checkpoint-*/peftlab_elapsed.json"))
    assert recorded > 0
    assert (tmp_path / "killed" / "lora" / "result.json").is_file()
    assert not (tmp_path / "killed" / "full" / "result.json").exists()

    refused = peftlab("run", str(config), "--output", str(tmp_path / "killed"))
    assert refused.wait(timeout=120) == 2 and "--resume" in refused.stderr.read()

    resumed = peftlab("run", str(config), "--output", str(tmp_path / "killed"), "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]

    expected = json.loads((tmp_path / "reference" / "results.json").read_text())["runs"]
    got = json.loads((tmp_path / "killed" / "results.json").read_text())["runs"]
    assert got[1]["resumed"] is True and got[0]["resumed"] is False
    assert got[1]["wall_time_s"] > recorded  # the killed session's training time counts, not just the resumed part
    for a, b in zip(expected, got):
        assert a["name"] == b["name"]
        assert b["test_metrics"] == pytest.approx(a["test_metrics"], abs=1e-5)
        assert [h["eval_loss"] for h in b["history"]] == pytest.approx([h["eval_loss"] for h in a["history"]], abs=1e-5)
    assert not (tmp_path / "killed" / "full" / "checkpoints").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_ddp_on_two_cpu_processes_matches_a_single_process_run(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    config = write_experiment(tmp_path, model, rows=240, epochs=2, methods="[{method: lora, learning_rate: 0.01}]")
    single = peftlab("run", str(config), "--output", str(tmp_path / "single"))
    assert single.wait(timeout=600) == 0, single.stderr.read()[-2000:]

    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "peftlab.cli", "run",
                          str(config), "--output", str(tmp_path / "ddp")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single_runs = json.loads((tmp_path / "single" / "results.json").read_text())["runs"]
    ddp_runs = json.loads((tmp_path / "ddp" / "results.json").read_text())["runs"]
    env_json = json.loads((tmp_path / "ddp" / "environment.json").read_text())
    assert env_json["world_size"] == 2
    # written once, by the main process: one adapter, one result per method
    assert len(ddp_runs) == 1 and (tmp_path / "ddp" / "lora" / "model" / "adapter_model.safetensors").is_file()
    # no temporary files left behind; the marker says the folder is a peftlab run
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.name.startswith(".")) == [".peftlab-run"]
    # Same global batch? No: DDP doubles it (2 x 8), so weights differ slightly; the eval loss must not be
    # doubled by world size (the transformers 5.x pitfall) and quality must match within tolerance.
    first_single = single_runs[0]["history"][0]["eval_loss"]
    first_ddp = ddp_runs[0]["history"][0]["eval_loss"]
    assert first_ddp == pytest.approx(first_single, rel=0.15)
    assert ddp_runs[0]["test_metrics"]["loss"] == pytest.approx(single_runs[0]["test_metrics"]["loss"], rel=0.15)


def test_two_runs_on_one_run_directory_one_proceeds(tmp_path: Path) -> None:
    """Started at the same instant, with different settings: exactly one trains, the other names the holder."""
    model = make_tiny_bert(tmp_path / "model")
    config = write_experiment(tmp_path, model, rows=300, epochs=3, methods="[{method: lora, learning_rate: 0.01}]")
    out = tmp_path / "out"
    first = peftlab("run", str(config), "--output", str(out))
    second = peftlab("run", str(config), "--output", str(out), "--set", "training.seed=7")
    codes = sorted([first.wait(timeout=600), second.wait(timeout=600)])
    errors = first.stderr.read() + second.stderr.read()
    assert codes == [0, 1], errors[-3000:]
    assert "being written by another peftlab run: pid" in errors
    assert "Traceback" not in errors
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results["runs"]] == ["ok"]  # the winner's result is whole, not overwritten
    assert (out / "lora" / "model" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / ".out.lock").exists()  # released when the winner finished

    # --overwrite while another run trains there is refused as well, and the training run is not disturbed.
    # (The run lock is held only while a run sets up and writes its report; while it trains, its claim on each
    # of its methods is what stands, .out.claims/<method>.lock.)
    training = peftlab("run", str(config), "--output", str(out), "--overwrite")
    deadline = time.time() + 120
    while not (tmp_path / ".out.claims" / "lora.lock").exists():
        assert training.poll() is None and time.time() < deadline
        time.sleep(0.05)
    intruder = peftlab("run", str(config), "--output", str(out), "--overwrite")
    assert intruder.wait(timeout=600) == 1
    assert "being written by another peftlab run" in intruder.stderr.read()
    assert training.wait(timeout=600) == 0, training.stderr.read()[-2000:]
    assert json.loads((out / "results.json").read_text())["runs"][0]["status"] == "ok"


def test_run_directory_deleted_mid_run_exits_1(tmp_path: Path) -> None:
    model = make_tiny_bert(tmp_path / "model")
    config = write_experiment(tmp_path, model, rows=300, epochs=2,
                              methods="[{method: lora, learning_rate: 0.01}, {method: full, learning_rate: 0.001}]")
    out = tmp_path / "out"
    run = peftlab("run", str(config), "--output", str(out))
    deadline = time.time() + 600
    while not (out / "lora" / "result.json").is_file():
        assert run.poll() is None and time.time() < deadline
        time.sleep(0.05)
    shutil.rmtree(out)
    assert run.wait(timeout=600) == 1
    errors = run.stderr.read()
    assert "was deleted or replaced while this run was writing to it" in errors, errors[-2000:]
    assert "Traceback" not in errors, errors[-4000:]
    assert not (out / "results.json").exists() and not (out / "config.yaml").exists()
