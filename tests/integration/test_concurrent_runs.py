"""Several `peftlab run --methods X` processes on one run directory at the same instant: one merged report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftlab import rundir
from tests.conftest import make_tiny_bert, review_rows

pytestmark = pytest.mark.integration


def write_experiment(folder: Path, model: Path) -> Path:
    data = folder / "reviews.csv"
    with data.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(review_rows(150))
    config = folder / "exp.yaml"
    # One process per invocation (method_process: false): the claims are per invocation, and the test stays short.
    config.write_text(
        f"data: {{path: {data}, max_length: 32}}\n"
        f"model: {{path: {model}}}\n"
        f"methods: [{{method: lora, learning_rate: 0.01}}, {{method: full, learning_rate: 0.001}}, "
        f"{{method: ia3, learning_rate: 0.01}}]\n"
        f"training: {{epochs: 2, batch_size: 8, eval_batch_size: 64, warmup_ratio: 0.0, method_process: false}}\n",
        encoding="utf-8")
    return config


def peftlab(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "peftlab.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_two_invocations_on_one_run_directory_give_one_merged_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from peftlab.cli import app
    from peftlab.config import load_config
    from peftlab.experiment import run_experiment

    config = write_experiment(tmp_path, make_tiny_bert(tmp_path / "model"))
    out = tmp_path / "out"
    lora = peftlab("run", str(config), "--output", str(out), "--methods", "lora")
    full = peftlab("run", str(config), "--output", str(out), "--methods", "full")

    # While they train, a third invocation claiming lora is refused and names the holder.
    deadline = time.time() + 300
    while rundir.claim_holder(out, "lora") is None:
        assert lora.poll() is None and time.time() < deadline, lora.stderr.read()[-3000:]
        time.sleep(0.02)
    with pytest.raises(rundir.RunLockedError, match=rf"method lora of .* is being trained by another peftlab run: "
                                                    rf"pid {lora.pid} on "):
        run_experiment(load_config(config), out, methods=["lora"])

    codes = [lora.wait(timeout=600), full.wait(timeout=600)]
    errors = lora.stderr.read() + full.stderr.read()
    assert codes == [0, 0], errors[-4000:]
    assert "Traceback" not in errors
    # No lost file: both methods' folders and results, one config; no lock or claim left behind.
    for method in ("lora", "full"):
        assert json.loads((out / method / "result.json").read_text())["status"] == "ok"
        assert (out / method / "model").is_dir()
    assert not rundir.lock_path(out).exists() and not rundir.claims_dir(out).exists()
    # The report written last holds both, and says ia3 was not run; `peftlab report` merges the same.
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["lora", "full"]
    assert results["missing"] == ["ia3 (not run)"]
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    assert "| lora |" in markdown and "| full |" in markdown and "Not in this report yet: ia3 (not run)" in markdown
