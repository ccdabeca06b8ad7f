"""The causal-LM path on a tiny random Llama: run, baseline, generations, reload with plain transformers/peft."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch

from peftlab.config import load_config
from peftlab.errors import AdapterError
from peftlab.experiment import run_experiment
from peftlab.generate import generate, generation_settings, load_generator

WORDS = ["the", "secret", "of", "getting", "ahead", "is", "started", "two", "things", "are", "infinite", "universe",
         "and", "human", "stupidity", "life", "what", "happens", "when", "you", "busy", "making", "other", "plans",
         "be", "yourself", "everyone", "else", "already", "taken", "write", "a", "wise", "quote", "simple", "love"]
AUTHORS = ["einstein", "twain", "wilde", "lennon"]
PUNCTUATION = ['"', "-", ":", ",", "."]
PROMPTS = ["the secret of", "two things are"]
INIT_TEXT = "write a wise quote :"
METHODS = [
    {"name": "prompt_tuning_random", "method": "prompt_tuning", "init": "RANDOM", "num_virtual_tokens": 4,
     "learning_rate": 3e-2},
    {"name": "prompt_tuning_text", "method": "prompt_tuning", "init": "TEXT", "init_text": INIT_TEXT,
     "learning_rate": 3e-2},
    {"method": "lora", "learning_rate": 1e-2},
    {"method": "full", "learning_rate": 1e-3},
]
MAX_NEW = 6

# Plain PeftModel.generate (the reference here) warns on every prompt-tuning step that it ignores position ids.
pytestmark = pytest.mark.filterwarnings("ignore:Position ids are not supported:UserWarning")


def make_llama_tokenizer(folder: Path) -> None:
    """A word-level tokenizer that, like Llama's, prepends BOS and has no pad token (peftlab pads with EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS + AUTHORS + PUNCTUATION)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(str(folder))


def make_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 random Llama with its tokenizer: a stand-in for a local causal-LM folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    make_llama_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=3 + len(WORDS) + len(AUTHORS) + len(PUNCTUATION), hidden_size=32,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def quote_rows(n: int = 60, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"quote": " ".join(rng.sample(WORDS, 6)) + f" {WORDS[i % len(WORDS)]}", "author": AUTHORS[i % 4],
             "source": "test"} for i in range(n)]


def causal_config(model: Path, data: Path, methods: list[dict]) -> object:
    return load_config(data={
        "name": "tiny-quotes",
        "task": "causal-lm",
        "data": {"path": str(data), "template": '"{quote}" - {author}', "max_length": 24,
                 "split": {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 1}},
        "model": {"path": str(model)},
        "methods": methods,
        "training": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "warmup_ratio": 0.0},
        "generation": {"prompts": PROMPTS, "max_new_tokens": MAX_NEW},
    })


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def causal_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("causal")
    data = folder / "quotes.csv"
    with data.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["quote", "author", "source"])
        writer.writeheader()
        writer.writerows(quote_rows())
    result = run_experiment(causal_config(tiny_llama, data, METHODS), folder / "out")
    return folder / "out", result


def test_every_method_trains_and_reports_loss_and_generations(causal_run: tuple[Path, object]) -> None:
    run_dir, result = causal_run
    assert [r.name for r in result.runs] == ["prompt_tuning_random", "prompt_tuning_text", "lora", "full"]
    assert {r.name: r.error for r in result.runs if r.status != "ok"} == {}
    for run in result.runs:
        assert math.isfinite(run.test_metrics["loss"]) and math.isfinite(run.test_metrics["perplexity"])
        assert run.test_metrics["perplexity"] == pytest.approx(math.exp(run.test_metrics["loss"]))
        assert list(run.generations) == PROMPTS and all(isinstance(t, str) for t in run.generations.values())
        assert (run_dir / run.name / "result.json").is_file()
    assert math.isfinite(result.base_eval_loss)
    assert list(result.base_generations) == PROMPTS
    assert result.generation_settings == {"decoding": "greedy", "max_new_tokens": MAX_NEW}
    saved = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert saved["base_eval_loss"] == pytest.approx(result.base_eval_loss)
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "## Generations" in report and "base (no training)" in report and "**the secret of**" in report
    assert "base (no training)" in (run_dir / "report.html").read_text(encoding="utf-8")


def test_prompt_tuning_trains_only_the_virtual_tokens(causal_run: tuple[Path, object], tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    _, result = causal_run
    runs = {r.name: r for r in result.runs}
    hidden = 32
    # TEXT init: one virtual token per init-text token, counted as peft tokenises it (BOS included).
    text_tokens = len(AutoTokenizer.from_pretrained(str(tiny_llama))(INIT_TEXT)["input_ids"])
    assert text_tokens == len(INIT_TEXT.split()) + 1
    assert runs["prompt_tuning_text"].trainable_params == text_tokens * hidden
    assert runs["prompt_tuning_random"].trainable_params == 4 * hidden
    assert runs["full"].trainable_params == runs["full"].total_params


def test_text_init_copies_every_init_text_token_embedding(tiny_llama: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peftlab.config import PromptTuningConfig
    from peftlab.methods import MethodContext, build_peft_config
    from peftlab.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    method = PromptTuningConfig(init="TEXT", init_text=INIT_TEXT)
    context = MethodContext(task="causal-lm", model_type="llama", tokenizer_path=str(tiny_llama), total_steps=1,
                            tokenizer=tokenizer)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), build_peft_config(method, context))
    ids = torch.tensor(tokenizer(INIT_TEXT)["input_ids"])
    prompt = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(prompt, model.get_input_embeddings()(ids).float())


@pytest.mark.parametrize("name", ["prompt_tuning_random", "prompt_tuning_text", "lora"])
def test_adapter_reloaded_with_plain_peft_generates_the_same_tokens(causal_run: tuple[Path, object],
                                                                    tiny_llama: Path, name: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, result = causal_run
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / name / "model"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
                                      str(run_dir / name / "model")).eval()
    generator = load_generator(run_dir / name)
    ours = generate(generator, PROMPTS, max_new_tokens=MAX_NEW)
    for prompt, text in zip(PROMPTS, ours):
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=2)
        plain = out[0, encoded["input_ids"].shape[1]:]
        assert text == tokenizer.decode(plain, skip_special_tokens=True)
    run = next(r for r in result.runs if r.name == name)
    assert list(run.generations.values()) == ours  # the report shows what `peftlab generate` gives


def test_full_model_reloaded_with_plain_transformers_generates_the_same(causal_run: tuple[Path, object]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, result = causal_run
    folder = run_dir / "full" / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    encoded = tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=2)
    expected = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generate(load_generator(folder), PROMPTS[:1], max_new_tokens=MAX_NEW) == [expected]
    assert result.runs[-1].generations[PROMPTS[0]] == expected


def test_sampling_is_reproducible_with_its_seed(causal_run: tuple[Path, object]) -> None:
    run_dir, _ = causal_run
    generator = load_generator(run_dir / "prompt_tuning_random")
    first = generate(generator, PROMPTS, max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5, seed=3)
    again = generate(generator, PROMPTS, max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5, seed=3)
    assert first == again
    assert generation_settings(MAX_NEW, True, 1.5, 0.9, 3) == {
        "decoding": "sampling", "max_new_tokens": MAX_NEW, "temperature": 1.5, "top_p": 0.9, "top_k": "off",
        "seed": 3}


def test_cli_generate_prints_the_report_generation(causal_run: tuple[Path, object]) -> None:
    from typer.testing import CliRunner

    from peftlab.cli import app

    run_dir, result = causal_run
    outcome = CliRunner().invoke(app, ["generate", str(run_dir / "prompt_tuning_text"), PROMPTS[1],
                                       "--max-new-tokens", str(MAX_NEW), "--json"])
    assert outcome.exit_code == 0, outcome.output
    row = json.loads(outcome.stdout.strip().splitlines()[-1])
    expected = next(r for r in result.runs if r.name == "prompt_tuning_text").generations[PROMPTS[1]]
    assert row == {"prompt": PROMPTS[1], "generation": expected,
                   "settings": {"decoding": "greedy", "max_new_tokens": MAX_NEW}}


def test_resume_keeps_the_base_model_baseline(causal_run: tuple[Path, object], tiny_llama: Path) -> None:
    run_dir, result = causal_run
    resumed = run_experiment(causal_config(tiny_llama, run_dir.parent / "quotes.csv", METHODS), run_dir, resume=True)
    assert resumed.base_eval_loss == result.base_eval_loss
    assert resumed.base_generations == result.base_generations


def test_generate_refuses_a_classifier(tiny_bert: Path) -> None:
    with pytest.raises(AdapterError, match="peftlab predict"):
        load_generator(tiny_bert)
