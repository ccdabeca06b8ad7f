"""`accelerate launch` with two CPU processes: DDP (gloo), results written once, eval loss as one process's.

accelerate 1.15 starts several CPU processes only through its multi-GPU launcher (torch.distributed.run): its
``--cpu`` flag and a config file with ``distributed_type: MULTI_CPU`` both start one process unless an MPI
``mpirun_hostfile`` is given. configs/accelerate/multi_cpu.yaml is therefore ``distributed_type: MULTI_GPU`` with
``use_cpu: true``; on a machine without GPUs each process then sets up MULTI_CPU with the gloo backend.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tiny_bert, review_rows

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not ACCELERATE.exists() and shutil.which("accelerate") is None, reason="accelerate CLI missing")
def test_accelerate_launch_two_cpu_processes_matches_a_single_process_run(tmp_path: Path) -> None:
    from peftlab.config import load_config
    from peftlab.experiment import run_experiment

    model = make_tiny_bert(tmp_path / "model")
    data = tmp_path / "reviews.csv"
    with data.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(review_rows(120))
    config = tmp_path / "exp.yaml"
    config.write_text(f"data: {{path: {data}, max_length: 32}}\nmodel: {{path: {model}}}\n"
                      f"methods: [{{method: lora, learning_rate: 0.01}}]\n"
                      f"training: {{epochs: 1, batch_size: 8, eval_batch_size: 64, warmup_ratio: 0.0}}\n",
                      encoding="utf-8")
    single = run_experiment(load_config(config, ["training.method_process=false"]), tmp_path / "single")

    launcher = str(ACCELERATE) if ACCELERATE.exists() else "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([launcher, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "multi_cpu.yaml"),
                          "--main_process_port", str(free_port()), "-m", "peftlab.cli", "run", str(config),
                          "--output", str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    environment = json.loads((tmp_path / "ddp" / "environment.json").read_text())
    assert environment["world_size"] == 2  # two processes really trained together
    runs = json.loads((tmp_path / "ddp" / "results.json").read_text())["runs"]
    # written once, by the main process: one result, one adapter, no temporary files beside the marker
    assert len(runs) == 1 and runs[0]["status"] == "ok"
    assert (tmp_path / "ddp" / "lora" / "model" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.name.startswith(".")) == [".peftlab-run"]
    # The global batch is 2 x 8 under DDP, so the weights differ a little; the eval loss must be the same
    # quantity (not multiplied by the world size, not of half the rows).
    assert runs[0]["history"][0]["eval_loss"] == pytest.approx(single.runs[0].history[0].eval_loss, rel=0.05)
    assert runs[0]["test_metrics"]["loss"] == pytest.approx(single.runs[0].test_metrics["loss"], rel=0.05)
