"""SmolLM2-135M + the shipped quotes, end to end: a few prompt-tuning steps, the report, and a reload.

Kept short for a CPU (~1-2 min on 2 cores): 8 training quotes, 2 optimizer steps, 4 evaluation quotes,
8 new tokens. It checks the wiring on the real model and data (TEXT init from the real tokenizer, base
baseline, generations in the report), and that plain ``PeftModel.from_pretrained`` on the base generates
exactly what ``peftlab generate`` prints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from peftlab.config import load_config
from peftlab.errors import ModelError
from peftlab.experiment import run_experiment

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")]

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Two things are infinite:"
MAX_NEW = 8


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from peftlab.models import resolve_model_path

    try:
        return resolve_model_path("smollm2-135m")  # converted once into the cache (~40 s the first time)
    except ModelError as exc:  # only when the optional weights package is absent
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def quotes_run(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    config = load_config(REPO / "configs" / "quotes_prompt_tuning.yaml", [
        "methods=[{name: prompt_tuning_text, method: prompt_tuning, init: TEXT, "
        "init_text: 'Generate an inspirational quote:', learning_rate: 0.03}]",
        "data.max_train_samples=8", "data.max_eval_samples=4", "data.max_length=32",
        "training.max_steps=2", "training.batch_size=4", "training.eval_batch_size=4",
        f"generation.prompts=['{PROMPT}']", f"generation.max_new_tokens={MAX_NEW}",
    ])
    run_dir = tmp_path_factory.mktemp("quotes") / "run"
    return run_dir, run_experiment(config, run_dir)


def test_prompt_tuning_runs_end_to_end_on_smollm2_and_quotes(quotes_run: tuple[Path, object], smollm2: Path) -> None:
    from transformers import AutoTokenizer

    run_dir, result = quotes_run
    (run,) = result.runs
    assert run.status == "ok", run.error
    text_tokens = len(AutoTokenizer.from_pretrained(str(smollm2))("Generate an inspirational quote:")["input_ids"])
    assert run.trainable_params == text_tokens * 576  # virtual tokens x SmolLM2's hidden size
    assert math.isfinite(run.test_metrics["perplexity"]) and math.isfinite(result.base_eval_loss)
    assert run.generations[PROMPT].strip() and result.base_generations[PROMPT].strip()
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "base (no training)" in report and f"**{PROMPT}**" in report


def test_plain_peft_reload_generates_what_peftlab_generate_prints(quotes_run: tuple[Path, object],
                                                                 smollm2: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from peftlab.cli import app

    run_dir, result = quotes_run
    adapter = run_dir / "prompt_tuning_text" / "model"
    outcome = CliRunner().invoke(app, ["generate", str(run_dir / "prompt_tuning_text"), PROMPT,
                                       "--max-new-tokens", str(MAX_NEW), "--json"])
    assert outcome.exit_code == 0, outcome.output
    printed = json.loads(outcome.stdout.strip().splitlines()[-1])["generation"]

    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(smollm2)), str(adapter)).eval()
    encoded = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    assert printed == tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert printed == result.runs[0].generations[PROMPT]
