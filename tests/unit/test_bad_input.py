"""Bad input never crashes or loses work: one message naming what and where, an exit code, nothing written.

Each case runs the real CLI entry point in-process. The table in docs/reliability.md is generated from
these cases (`PEFTLAB_WRITE_DOCS=1 pytest tests/unit/test_bad_input.py`) and a test keeps it in sync.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from peftlab.cli import main
from tests.conftest import review_rows, write_rows

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"


@dataclass
class Case:
    name: str
    build: Callable[[Path, Path], list[str]]  # (tmp folder, tiny model) -> CLI arguments
    exit_code: int
    expect: str  # regex the message must match


def config(tmp: Path, model: Path, data: Path | str, extra: str = "", methods: str = "[lora]") -> Path:
    path = tmp / "exp.yaml"
    path.write_text(f"data: {{path: {data}{', ' + extra if extra else ''}}}\nmodel: {{path: {model}}}\n"
                    f"methods: {methods}\ntraining: {{epochs: 1, batch_size: 8}}\n", encoding="utf-8")
    return path


def run_args(tmp: Path, cfg: Path) -> list[str]:
    return ["run", str(cfg), "--output", str(tmp / "out")]


def data_file(tmp: Path, content: bytes, name: str = "d.csv") -> Path:
    path = tmp / name
    path.write_bytes(content)
    return path


def case_empty(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, config(tmp, model, data_file(tmp, b"")))


def case_not_utf8(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, config(tmp, model, data_file(tmp, "text,label\n좋아요,긍정\n".encode("cp949"))))


def case_delimiter(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, config(tmp, model, write_rows(tmp / "d.csv", review_rows(30), "\t")))


def case_missing_text(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, config(tmp, model, write_rows(tmp / "d.csv", review_rows(30)), "text_column: review"))


def case_missing_label(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, config(tmp, model, write_rows(tmp / "d.csv", review_rows(30)), "label_column: y"))


def case_labels_outside(tmp: Path, model: Path) -> list[str]:
    rows = review_rows(30) + [{"text": "odd one", "label": "mixed"}]
    extra = "label_map: {negative: neg, neutral: neu, positive: pos}"
    return ["data", "check", str(config(tmp, model, write_rows(tmp / "d.csv", rows), extra)), "--no-tokens"]


def case_all_invalid(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, config(tmp, model, write_rows(tmp / "d.csv", review_rows(30)), "label_map: {-1: 부정, 1: 긍정}"))


def case_nan(tmp: Path, model: Path) -> list[str]:
    rows = review_rows(30) + [{"text": "NaN", "label": "positive"}, {"text": "fine", "label": "None"}]
    return ["data", "check", str(config(tmp, model, write_rows(tmp / "d.csv", rows))), "--no-tokens"]


def case_duplicates(tmp: Path, model: Path) -> list[str]:
    rows = review_rows(30)
    return ["data", "check", str(config(tmp, model, write_rows(tmp / "d.csv", rows + rows[:5]))), "--no-tokens"]


def case_too_long(tmp: Path, model: Path) -> list[str]:
    rows = [{"text": " ".join([r["text"]] * 20), "label": r["label"]} for r in review_rows(30)]
    return ["data", "check", str(config(tmp, model, write_rows(tmp / "d.csv", rows), "max_length: 16"))]


def case_class_missing(tmp: Path, model: Path) -> list[str]:
    rows = review_rows(30) + [{"text": "rare", "label": "rare"}, {"text": "rare two", "label": "rare"}]
    return run_args(tmp, config(tmp, model, write_rows(tmp / "d.csv", rows)))


def case_bad_yaml(tmp: Path, model: Path) -> list[str]:
    path = tmp / "exp.yaml"
    path.write_text("data:\n  path: d.csv\n methods: [lora]\n", encoding="utf-8")
    return run_args(tmp, path)


def case_unknown_key(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, config(tmp, model, "d.csv", "txt_column: text"))


def case_wrong_type(tmp: Path, model: Path) -> list[str]:
    path = config(tmp, model, "d.csv")
    return [*run_args(tmp, path), "--set", "training.batch_size=big"]


def case_impossible(tmp: Path, model: Path) -> list[str]:
    cfg = config(tmp, model, "d.csv", "split: {train: 0.7, validation: 0.2, test: 0.2}",
                 methods="[{method: lora, r: 0, learning_rate: -0.1}]")
    return run_args(tmp, cfg)


def case_model_missing(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, config(tmp, tmp / "no_model", write_rows(tmp / "d.csv", review_rows(30))))


def case_model_incomplete(tmp: Path, model: Path) -> list[str]:
    broken = shutil.copytree(model, tmp / "broken")
    (broken / "model.safetensors").unlink()
    return run_args(tmp, config(tmp, broken, write_rows(tmp / "d.csv", review_rows(30))))


def case_remote_code(tmp: Path, model: Path) -> list[str]:
    remote = shutil.copytree(model, tmp / "remote")
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "m.KoBert"}}))
    return run_args(tmp, config(tmp, remote, write_rows(tmp / "d.csv", review_rows(30))))


def case_pickle(tmp: Path, model: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    pickled = shutil.copytree(model, tmp / "pickled")
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return run_args(tmp, config(tmp, pickled, write_rows(tmp / "d.csv", review_rows(30))))


def case_adapter_base(tmp: Path, model: Path) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

    base = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=2)
    adapter = tmp / "adapter"
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4)).save_pretrained(str(adapter))
    (adapter / "peftlab.json").write_text(json.dumps({"task": "classification", "labels": ["a", "b"],
                                                      "base_model": str(model), "is_adapter": True}))
    other = shutil.copytree(model, tmp / "other")
    BertModel(BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(str(other))
    return ["predict", str(adapter), "hello", "--base", str(other)]


def case_existing_run(tmp: Path, model: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "results.json").write_text("{}")
    return run_args(tmp, config(tmp, model, write_rows(tmp / "d.csv", review_rows(30))))


CASES = [
    Case("empty file", case_empty, 1, r"is empty"),
    Case("not UTF-8", case_not_utf8, 1, r"not UTF-8 .*line 2.*iconv"),
    Case("wrong delimiter", case_delimiter, 1, r"tab-separated: set data.format to tsv"),
    Case("missing text column", case_missing_text, 1, r"\['review'\] not found; columns found: \['text', 'label'\]"),
    Case("missing label column", case_missing_label, 1, r"\['y'\] not found; columns found"),
    Case("labels outside the map (some rows)", case_labels_outside, 0, r"label_not_in_map.*1.*'mixed'"),
    Case("every row invalid", case_all_invalid, 1, r"all 30 rows were dropped.*'negative' \(10\).*expects"),
    Case("NaN / None values", case_nan, 0, r"empty_text.*1.*missing_label.*1"),
    Case("duplicated rows", case_duplicates, 0, r"duplicate_text.*5"),
    Case("texts longer than max_length", case_too_long, 0, r"truncated at 16.*train 24"),
    Case("class too small for a stratified split", case_class_missing, 1, r"class 'rare' has only 2 row"),
    Case("invalid YAML", case_bad_yaml, 2, r"exp.yaml line 3, column 2: invalid YAML"),
    Case("unknown key", case_unknown_key, 2, r"data.txt_column: unknown key.*did you mean 'text_column'"),
    Case("wrong type", case_wrong_type, 2, r"training.batch_size: Input should be a valid integer"),
    Case("impossible values (r=0, lr<0, ratios)", case_impossible, 2,
         r"3 problem\(s\).*sum to 1.*learning_rate: Input should be greater than 0.*lora.r: Input should be greater than 0"),
    Case("model folder missing", case_model_missing, 1, r"neither a shipped alias .* nor an existing folder"),
    Case("model folder incomplete", case_model_incomplete, 1, r"no weights"),
    Case("remote code without opt-in", case_remote_code, 1, r"model.trust_remote_code: true"),
    Case("pickle weights without opt-in", case_pickle, 1, r"pickle.*model.allow_pickle: true"),
    Case("adapter on the wrong base", case_adapter_base, 1, r"does not fit base model"),
    Case("run directory exists", case_existing_run, 2, r"already exists.*--resume.*--overwrite"),
]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["peftlab", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def first_line(text: str, tmp: Path) -> str:
    cleaned = re.sub(r"\s+", " ", text.replace(str(tmp), "<tmp>")).strip()
    match = re.search(r"error: (.*)", cleaned)
    return (match.group(1) if match else cleaned)[:300]


RECORDED: dict[str, tuple[int, str]] = {}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    args = case.build(tmp_path, tiny_bert)
    before = sorted(p.name for p in tmp_path.iterdir())
    results = tmp_path / "out" / "results.json"
    kept = results.read_bytes() if results.exists() else None
    code, output = run_cli(args, capsys, monkeypatch)
    assert code == case.exit_code, output[-2000:]
    assert re.search(case.expect, re.sub(r"\s+", " ", output), re.S), output[-2000:]
    assert "Traceback" not in output
    if code:
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
        if kept is not None:
            assert results.read_bytes() == kept  # nothing overwritten
    flat = re.sub(r"\s+", " ", output.replace(str(tmp_path), "<tmp>").replace("│", " "))
    RECORDED[case.name] = (code, "error: " + first_line(output, tmp_path) if code else
                           "reported in the data report: " + re.search(case.expect, flat).group(0)[:120])


def render_doc() -> str:
    lines = ["# Reliability: bad input and what each case gets", "",
             "Generated from `tests/unit/test_bad_input.py` (`PEFTLAB_WRITE_DOCS=1 pytest tests/unit/test_bad_input.py`).",
             "Each case runs the real CLI. For every error case, the tests check three things:",
             "", "- The exit code is 1 (bad input) or 2 (bad usage or config).",
             "- No traceback is printed.",
             "- Nothing is written and no earlier result is overwritten.",
             "", "| case | exit | what the user sees |", "|---|---|---|"]
    for case in CASES:
        code, message = RECORDED.get(case.name, (case.exit_code, "(not run)"))
        lines.append(f"| {case.name} | {code} | {message.replace('|', '/')} |")
    lines += ["", "## Faults", "",
              "- **Kill -9, then resume.** `tests/integration/test_reliability.py` kills a run with `kill -9` "
              "after the second method's first epoch checkpoint. `peftlab run --resume` keeps the finished method "
              "and resumes the interrupted one from its checkpoint. The final metrics equal an uninterrupted run's "
              "(tolerance 1e-5).",
              "- **Incomplete checkpoints.** A checkpoint without `trainer_state.json`, which the Trainer writes last, "
              "was interrupted while saving. It is ignored and removed.",
              "- **Atomic writes.** Results, reports, saved models and adapters, and prepared models are written "
              "to a temporary path and renamed into place.",
              "- **Distributed training.** Under `torchrun --nproc_per_node 2` (gloo on CPU), results and "
              "adapters are written once, by the main process. The eval loss matches a single-process run "
              "instead of being doubled.", ""]
    return "\n".join(lines)


def test_reliability_doc_is_in_sync() -> None:
    if len(RECORDED) != len(CASES):
        pytest.skip("run the whole module to regenerate the table")
    text = render_doc()
    if os.environ.get("PEFTLAB_WRITE_DOCS") == "1":
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text, encoding="utf-8")
    assert DOC.read_text(encoding="utf-8") == text, "docs/reliability.md is stale: PEFTLAB_WRITE_DOCS=1 pytest " \
                                                    "tests/unit/test_bad_input.py"
