"""The README's examples are real: its config block validates, its commands exist, its make targets exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from typer.testing import CliRunner

from peftlab.cli import app
from peftlab.config import load_config

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
MAKEFILE = (Path(__file__).resolve().parents[2] / "Makefile").read_text(encoding="utf-8")


def test_readme_config_block_validates() -> None:
    block = re.search(r"```yaml\n(.*?)```", README, re.S).group(1)
    config = load_config(data=yaml.safe_load(block))
    assert [m.method for m in config.methods] == ["full", "lora", "prompt_tuning", "ia3"]


def test_every_command_in_the_readme_exists() -> None:
    commands = set(re.findall(r"`peftlab ((?:data |models )?[a-z]+)", README))
    assert {"run", "data check", "report", "methods", "predict"} <= commands
    for command in commands:
        result = CliRunner().invoke(app, [*command.split(), "--help"])
        assert result.exit_code == 0, (command, result.output)


def test_the_two_readme_commands_are_make_targets() -> None:
    for target in ("demo", "test"):
        assert f"make {target}" in README
        assert re.search(rf"^{target}:", MAKEFILE, re.M)
    assert "make test" in (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
