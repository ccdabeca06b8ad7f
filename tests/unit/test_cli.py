"""The CLI: --help of every command, --version, and user mistakes as messages with exit codes (no tracebacks)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftlab import __version__
from peftlab.cli import app

runner = CliRunner()
COMMANDS = [[], ["run"], ["data", "check"], ["report"], ["methods"], ["models", "list"], ["models", "prepare"],
            ["predict"], ["export"], ["serve"], ["generate"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "peftlab")
def test_help(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"peftlab {__version__}"


def test_methods_lists_every_method_with_options() -> None:
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("full", "lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "adalora", "loha"):
        assert name in result.output
    assert "num_virtual_tokens" in result.output


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftlab.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_config_error_exits_2_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("data: {path: x.csv, txt_column: t}\nmethods: [lora]\n", encoding="utf-8")
    result = cli("run", str(config), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "did you mean 'text_column'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_data_error_exits_1_and_names_the_columns(tmp_path: Path, reviews_csv: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(f"data: {{path: {reviews_csv}, text_column: review}}\nmodel: {{path: minilm-l6}}\n"
                      f"methods: [lora]\n", encoding="utf-8")
    result = cli("data", "check", str(config), "--no-tokens")
    assert result.returncode == 1
    assert "columns found: ['text', 'label']" in result.stderr and "Traceback" not in result.stderr


def test_data_check_prints_the_report(tmp_path: Path, reviews_csv: Path) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text(f"data: {{path: {reviews_csv}}}\nmethods: [lora]\n", encoding="utf-8")
    result = cli("data", "check", str(config), "--no-tokens")
    assert result.returncode == 0, result.stderr
    assert "raw rows" in result.stdout and "90" in result.stdout


def test_predict_on_a_missing_folder_exits_1(tmp_path: Path) -> None:
    result = cli("predict", str(tmp_path / "nope"), "hello")
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_bad_flag_exits_2() -> None:
    result = cli("run", "--no-such-flag")
    assert result.returncode == 2
