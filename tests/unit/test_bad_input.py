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
    writes_run: bool = False  # a run that trains and fails a method still writes the others' results
    chdir: str | None = None  # run the command from this folder under tmp


CLEANUPS: list[Callable[[], None]] = []  # undone after each case (a mount, say)


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


def good_config(tmp: Path, model: Path, extra: str = "", methods: str = "[lora]") -> Path:
    return config(tmp, model, write_rows(tmp / "d.csv", review_rows(30)), extra, methods)


def fake_run(folder: Path, config_text: str = "name: x\n") -> Path:
    """A folder as an earlier peftlab run leaves it (enough of it for --resume / --overwrite to recognise)."""
    (folder / "lora").mkdir(parents=True)
    (folder / "config.yaml").write_text(config_text, encoding="utf-8")
    (folder / "environment.json").write_text("{}", encoding="utf-8")
    (folder / "results.json").write_text("{}", encoding="utf-8")
    (folder / "lora" / "result.json").write_text("{}", encoding="utf-8")
    return folder


def case_overwrite_foreign(tmp: Path, model: Path) -> list[str]:
    thesis = tmp / "out"
    (thesis / "photos").mkdir(parents=True)
    (thesis / "thesis.txt").write_text("three years of work", encoding="utf-8")
    return [*run_args(tmp, good_config(tmp, model)), "--overwrite"]


def case_overwrite_user_file(tmp: Path, model: Path) -> list[str]:
    (fake_run(tmp / "out") / "notes.txt").write_text("my notes", encoding="utf-8")
    return [*run_args(tmp, good_config(tmp, model)), "--overwrite"]


def case_overwrite_cwd(tmp: Path, model: Path) -> list[str]:
    fake_run(tmp / "out")
    return ["run", str(good_config(tmp, model)), "--output", ".", "--overwrite"]


def case_output_file(tmp: Path, model: Path) -> list[str]:
    (tmp / "out").write_text("not a folder", encoding="utf-8")
    return run_args(tmp, good_config(tmp, model))


def case_output_under_file(tmp: Path, model: Path) -> list[str]:
    (tmp / "file").write_text("not a folder", encoding="utf-8")
    return ["run", str(good_config(tmp, model)), "--output", str(tmp / "file" / "run")]


def case_read_only(tmp: Path, model: Path) -> list[str]:
    import subprocess

    mount = tmp / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    CLEANUPS.append(lambda: subprocess.run(["umount", str(mount)], check=True))
    return ["run", str(good_config(tmp, model)), "--output", str(mount / "run")]


def lock_file(tmp: Path, pid: int) -> None:
    import datetime
    import socket

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    (tmp / ".out.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": started,
                                               "command": "peftlab run exp.yaml"}), encoding="utf-8")


def case_locked(tmp: Path, model: Path) -> list[str]:
    lock_file(tmp, os.getpid())  # a live process (this one) holds it
    return run_args(tmp, good_config(tmp, model))


def case_stale_lock(tmp: Path, model: Path) -> list[str]:
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file(tmp, dead.pid)
    return run_args(tmp, good_config(tmp, model))


def case_overwrite_and_resume(tmp: Path, model: Path) -> list[str]:
    return [*run_args(tmp, good_config(tmp, model)), "--overwrite", "--resume"]


def case_resume_not_run(tmp: Path, model: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.txt").write_text("mine", encoding="utf-8")
    return [*run_args(tmp, good_config(tmp, model)), "--resume"]


def case_resume_changed(tmp: Path, model: Path) -> list[str]:
    from peftlab.config import dump_config, load_config

    cfg = good_config(tmp, model)
    fake_run(tmp / "out", dump_config(load_config(cfg, ["training.epochs=3"])))
    return [*run_args(tmp, cfg), "--resume"]


def case_methods_comma(tmp: Path, model: Path) -> list[str]:
    return [*run_args(tmp, good_config(tmp, model)), "--methods", ","]


def case_methods_unknown(tmp: Path, model: Path) -> list[str]:
    return [*run_args(tmp, good_config(tmp, model)), "--methods", "lora,dora"]


def case_method_fails(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, good_config(tmp, model, methods="[{method: lora, target_modules: [no_such_layer]}]"))


def case_lr_inf(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, good_config(tmp, model, methods="[{method: lora, learning_rate: .inf}]"))


def case_lr_diverges(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, good_config(tmp, model, methods="[{method: full, learning_rate: 1.0e+30}]"))


def case_one_class(tmp: Path, model: Path) -> list[str]:
    rows = [{"text": r["text"], "label": "positive"} for r in review_rows(30)]
    return run_args(tmp, config(tmp, model, write_rows(tmp / "d.csv", rows)))


def case_max_length(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, good_config(tmp, model, "max_length: 1024"))


def case_unknown_method(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, good_config(tmp, model, methods="[{method: lorra}]"))


def case_data_missing(tmp: Path, model: Path) -> list[str]:
    return run_args(tmp, config(tmp, model, tmp / "nowhere.csv"))


def saved_adapter(tmp: Path, model: Path) -> Path:
    """A LoRA adapter with its peftlab.json, saved the way a run saves it (without training: seconds)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=2)
    adapter = tmp / "adapter"
    get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4)).save_pretrained(str(adapter))
    (adapter / "peftlab.json").write_text(json.dumps({"task": "classification", "labels": ["a", "b"],
                                                      "base_model": str(model), "is_adapter": True}))
    return adapter


def case_predict_empty_text(tmp: Path, model: Path) -> list[str]:
    return ["predict", str(saved_adapter(tmp, model)), "fine film", ""]


def case_predict_blank_text(tmp: Path, model: Path) -> list[str]:
    return ["predict", str(saved_adapter(tmp, model)), "   "]


def case_predict_bad_unicode(tmp: Path, model: Path) -> list[str]:
    return ["predict", str(saved_adapter(tmp, model)), "caf\udce9"]  # how Python passes a non-UTF-8 argv byte


def case_predict_empty_file(tmp: Path, model: Path) -> list[str]:
    (tmp / "empty.txt").write_text("\n\n", encoding="utf-8")
    return ["predict", str(saved_adapter(tmp, model)), "--file", str(tmp / "empty.txt")]


def case_predict_file_not_utf8(tmp: Path, model: Path) -> list[str]:
    (tmp / "texts.txt").write_bytes("좋아요\n별로예요\n".encode("cp949"))
    return ["predict", str(saved_adapter(tmp, model)), "--file", str(tmp / "texts.txt")]


def case_predict_file_missing(tmp: Path, model: Path) -> list[str]:
    return ["predict", str(saved_adapter(tmp, model)), "--file", str(tmp / "texts.txt")]


def case_predict_output_exists(tmp: Path, model: Path) -> list[str]:
    (tmp / "pred.jsonl").write_text("earlier predictions\n", encoding="utf-8")
    return ["predict", str(saved_adapter(tmp, model)), "fine", "--output", str(tmp / "pred.jsonl")]


def case_predict_output_dir(tmp: Path, model: Path) -> list[str]:
    (tmp / "preds").mkdir()
    return ["predict", str(saved_adapter(tmp, model)), "fine", "--output", str(tmp / "preds"), "--overwrite"]


def case_predict_run_dir(tmp: Path, model: Path) -> list[str]:
    (tmp / "run" / "lora" / "model").mkdir(parents=True)
    return ["predict", str(tmp / "run"), "fine"]


def case_predict_missing(tmp: Path, model: Path) -> list[str]:
    return ["predict", str(tmp / "runs" / "nothing"), "fine"]


def other_base(tmp: Path, model: Path, layers: int) -> Path:
    """The tiny model's tokenizer on a BERT of the same width but another depth (as e5 against MiniLM)."""
    from transformers import BertConfig, BertModel

    other = shutil.copytree(model, tmp / "other")
    config = BertConfig.from_pretrained(str(model))
    config.num_hidden_layers = layers
    BertModel(config).save_pretrained(str(other))
    return other


def case_predict_deeper_base(tmp: Path, model: Path) -> list[str]:
    return ["predict", str(saved_adapter(tmp, model)), "fine", "--base", str(other_base(tmp, model, 3))]


def case_predict_base_fingerprint(tmp: Path, model: Path) -> list[str]:
    from peftlab.artifacts import base_fingerprint

    adapter = saved_adapter(tmp, model)
    meta = json.loads((adapter / "peftlab.json").read_text())
    meta["base_fingerprint"] = base_fingerprint(json.loads((model / "config.json").read_text()))
    meta["base_model_name"] = "minilm-l6"
    (adapter / "peftlab.json").write_text(json.dumps(meta))
    return ["predict", str(adapter), "fine", "--base", str(other_base(tmp, model, 1))]


def case_predict_corrupt_metadata(tmp: Path, model: Path) -> list[str]:
    adapter = saved_adapter(tmp, model)
    (adapter / "peftlab.json").write_text('{"task": "classification", "lab')
    return ["predict", str(adapter), "fine"]


def case_predict_truncated_weights(tmp: Path, model: Path) -> list[str]:
    adapter = saved_adapter(tmp, model)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return ["predict", str(adapter), "fine"]


def case_report_truncated(tmp: Path, model: Path) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "results.json").write_text('{"name": "x", "task": "classification", "runs": [{"na', encoding="utf-8")
    return ["report", str(tmp / "run")]


def case_report_schema(tmp: Path, model: Path) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / "results.json").write_text('{"experiment": "x", "rows": [1, 2]}', encoding="utf-8")
    return ["report", str(tmp / "run")]


def case_report_no_results(tmp: Path, model: Path) -> list[str]:
    (tmp / "run").mkdir()
    return ["report", str(tmp / "run")]


def case_export_no_merge(tmp: Path, model: Path) -> list[str]:
    return ["export", str(saved_adapter(tmp, model)), "--output", str(tmp / "merged")]


def case_generate_temperature(tmp: Path, model: Path) -> list[str]:
    return ["generate", str(tmp / "nothing"), "Once", "--sample", "--temperature", "0"]


def tune_config(tmp: Path, model: Path, tune: str = "{trials: 2}") -> Path:
    path = tmp / "exp.yaml"
    path.write_text(f"data: {{path: {write_rows(tmp / 'd.csv', review_rows(30))}}}\nmodel: {{path: {model}}}\n"
                    f"methods: [lora]\ntraining: {{epochs: 1, batch_size: 8}}\ntune: {tune}\n", encoding="utf-8")
    return path


def case_seeds_empty(tmp: Path, model: Path) -> list[str]:
    return [*run_args(tmp, good_config(tmp, model)), "--set", "training.seeds=[]"]


def case_seeds_repeated(tmp: Path, model: Path) -> list[str]:
    return [*run_args(tmp, good_config(tmp, model)), "--set", "training.seeds=[42, 43, 42]"]


def case_class_weights_unknown(tmp: Path, model: Path) -> list[str]:
    return [*run_args(tmp, good_config(tmp, model)), "--set", "training.class_weights={neutrl: 2.0}"]


def case_reference_unknown(tmp: Path, model: Path) -> list[str]:
    return [*run_args(tmp, good_config(tmp, model)), "--set", "report.reference=ful"]


def case_tune_budget_zero(tmp: Path, model: Path) -> list[str]:
    return ["tune", str(tune_config(tmp, model)), "--output", str(tmp / "out"), "--trials", "0"]


def case_tune_unknown_storage(tmp: Path, model: Path) -> list[str]:
    return ["tune", str(tune_config(tmp, model)), "--output", str(tmp / "out"), "--storage", "nosuch://host/db"]


def case_tune_range_reversed(tmp: Path, model: Path) -> list[str]:
    cfg = tune_config(tmp, model, "{search: {lora: {learning_rate: {low: 1.0e-2, high: 1.0e-4}}}}")
    return ["tune", str(cfg), "--output", str(tmp / "out")]


def case_tune_resume_changed(tmp: Path, model: Path) -> list[str]:
    from peftlab.config import dump_config, load_config

    cfg = tune_config(tmp, model)
    tuning = tmp / "out-tune"  # `run --tune` tunes beside the run directory
    tuning.mkdir()
    (tuning / ".peftlab-run").write_text("{}", encoding="utf-8")
    (tuning / "config.yaml").write_text(dump_config(load_config(cfg, ["training.epochs=3"])), encoding="utf-8")
    return [*run_args(tmp, cfg), "--tune", "--resume"]


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
    Case("--overwrite on a folder that is not a run", case_overwrite_foreign, 2,
         r"not a peftlab run directory \(found: photos/, thesis.txt\); refusing to replace"),
    Case("--overwrite on a run holding a file of the user's", case_overwrite_user_file, 2,
         r"would delete 1 entry .* that peftlab did not write: notes.txt"),
    Case("--output . --overwrite from inside the run", case_overwrite_cwd, 2, r"holds the current folder",
         chdir="out"),
    Case("--output is a file", case_output_file, 2, r"--output .*out is a file; give a folder path"),
    Case("--output under a file", case_output_under_file, 2, r"is under .*file, which is a file"),
    Case("--output on a read-only filesystem", case_read_only, 1, r"ro.*Read-only file system"),
    Case("run directory held by another run", case_locked, 1, r"being written by another peftlab run: pid \d+ on"),
    Case("lock left by a dead process", case_stale_lock, 1, r"no longer running .*--resume to take it over"),
    Case("--overwrite with --resume", case_overwrite_and_resume, 2, r"contradict each other"),
    Case("--resume on a folder that is not a run", case_resume_not_run, 2,
         r"not a peftlab run directory \(found: thesis.txt\); refusing to resume"),
    Case("--resume with a changed config", case_resume_changed, 2, r"training section\(s\) differ"),
    Case("--methods naming nothing", case_methods_comma, 2, r"names no method"),
    Case("--methods naming a method not in the config", case_methods_unknown, 2, r"--methods dora: not in this config"),
    Case("a method that fails (LoRA targets missing)", case_method_fails, 1,
         r"lora failed: .*No modules were targeted.*1 of 1 method\(s\) failed", writes_run=True),
    Case("infinite learning rate", case_lr_inf, 2, r"learning_rate: Input should be a finite number"),
    Case("a learning rate that diverges", case_lr_diverges, 1,
         r"full failed: .*NaN/inf.*learning_rate 1e\+30 is probably too high", writes_run=True),
    Case("one class left after cleaning", case_one_class, 1, r"only one class \('positive'\).*at least 2"),
    Case("max_length above the model's positions", case_max_length, 2,
         r"max_length 1024 is longer than .* \(128 positions.*at most 128"),
    Case("unknown method", case_unknown_method, 2, r"lorra"),
    Case("data file missing", case_data_missing, 1, r"nowhere.csv"),
    Case("predict: an empty text", case_predict_empty_text, 1, r"text 2 is empty or only whitespace"),
    Case("predict: a whitespace-only text", case_predict_blank_text, 1, r"text 1 is empty or only whitespace"),
    Case("predict: a text that is not valid Unicode", case_predict_bad_unicode, 1, r"text 1 is not valid UTF-8"),
    Case("predict --file with no texts", case_predict_empty_file, 1, r"empty.txt holds no texts"),
    Case("predict --file not UTF-8", case_predict_file_not_utf8, 1, r"texts.txt is not UTF-8 .*line 1.*iconv"),
    Case("predict --file missing", case_predict_file_missing, 1, r"texts.txt does not exist"),
    Case("predict --output exists", case_predict_output_exists, 1, r"pred.jsonl exists; pass --overwrite"),
    Case("predict --output is a folder", case_predict_output_dir, 1, r"preds is a folder; give a file path"),
    Case("predict on a run directory", case_predict_run_dir, 1, r"run directory with methods \['lora'\]: add one"),
    Case("predict on a missing folder", case_predict_missing, 1, r"nothing does not exist"),
    Case("predict with a base of another depth (missing adapter keys)", case_predict_deeper_base, 1,
         r"does not fit base model .*other: adapter weights missing 4 \(.*layer.2"),
    Case("predict with a base of another shape than the recorded one", case_predict_base_fingerprint, 1,
         r"was trained on minilm-l6; .*other has another shape \(num_hidden_layers 1 \(trained on 2\)\).*--base minilm-l6"),
    Case("predict: damaged peftlab.json", case_predict_corrupt_metadata, 1, r"peftlab.json is damaged"),
    Case("predict: truncated adapter weights", case_predict_truncated_weights, 1,
         r"adapter_model.safetensors is damaged or truncated"),
    Case("report: truncated results.json", case_report_truncated, 1, r"damaged or not a peftlab results file"),
    Case("report: results.json of another schema", case_report_schema, 1, r"damaged or not a peftlab results file"),
    Case("report: no results.json", case_report_no_results, 1, r"results.json not found"),
    Case("export without --merge", case_export_no_merge, 2, r"pass --merge"),
    Case("generate --temperature 0", case_generate_temperature, 2, r"must be > 0"),
    Case("seeds: an empty list", case_seeds_empty, 2, r"training.seeds is empty"),
    Case("seeds: a seed listed twice", case_seeds_repeated, 2, r"training.seeds repeats \[42\]"),
    Case("class weights naming a class the data does not have", case_class_weights_unknown, 2,
         r"training.class_weights names 'neutrl', not a class of this data; the classes are negative, neutral, positive"),
    Case("report reference that is not a method", case_reference_unknown, 2, r"report.reference 'ful' is not a method"),
    Case("tune: a budget of 0 trials", case_tune_budget_zero, 2, r"tune.trials: Input should be greater than 0"),
    Case("tune: an unknown storage URL", case_tune_unknown_storage, 2,
         r"--storage 'nosuch://host/db' is not an Optuna storage URL.*journal:PATH"),
    Case("tune: a search range with low above high", case_tune_range_reversed, 2,
         r"tune.search.lora.learning_rate.range: low 0.01 is above high 0.0001: swap them"),
    Case("run --tune --resume on a tuning run whose config changed", case_tune_resume_changed, 2,
         r"training section\(s\) differ from the tuning run .*out-tune"),
]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its content (None for folders): what "nothing written" compares."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
            if not p.is_relative_to(root / "ro")}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["peftlab", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


def first_line(text: str, tmp: Path, model: Path) -> str:
    """The error as the doc shows it: machine-specific parts (paths, pids, clock) replaced by placeholders."""
    cleaned = re.sub(r"\s+", " ", text.replace(str(tmp), "<tmp>").replace(str(model), "<model>")).strip()
    cleaned = re.sub(r"pid \d+ on \S+, started \S+", "pid <pid> on <host>, started <time>", cleaned)
    cleaned = re.sub(r"Usage: .*? for help\. Error: ", "", cleaned)  # click's usage banner names the runner
    match = re.search(r"error: (.*)", cleaned)
    return (match.group(1) if match else cleaned)[:300]


RECORDED: dict[str, tuple[int, str]] = {}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        args = case.build(tmp_path, tiny_bert)
        before = snapshot(tmp_path)
        results = tmp_path / "out" / "results.json"
        kept = results.read_bytes() if results.exists() else None
        if case.chdir:
            monkeypatch.chdir(tmp_path / case.chdir)
        capsys.readouterr()  # what building the case printed is not the CLI's output
        code, output = run_cli(args, capsys, monkeypatch)
        after = snapshot(tmp_path)
    finally:
        while CLEANUPS:
            CLEANUPS.pop()()
    assert code == case.exit_code, output[-2000:]
    assert re.search(case.expect, re.sub(r"\s+", " ", output), re.S), output[-2000:]
    assert "Traceback" not in output
    if code and case.writes_run:
        # The failure is in the report, and the run exits 1: never "success" with a failed method.
        saved = json.loads(results.read_text(encoding="utf-8"))
        assert [r["status"] for r in saved["runs"]] == ["failed"]
    elif code:
        assert after == before  # nothing written, nothing deleted, nothing changed
        if kept is not None:
            assert results.read_bytes() == kept  # nothing overwritten
    flat = re.sub(r"\s+", " ", output.replace(str(tmp_path), "<tmp>").replace("│", " "))
    RECORDED[case.name] = (code, "error: " + first_line(output, tmp_path, tiny_bert) if code else
                           "reported in the data report: " + re.search(case.expect, flat).group(0)[:120])


def render_doc() -> str:
    lines = ["# Reliability: bad input and what each case gets", "",
             "Generated from `tests/unit/test_bad_input.py` (`PEFTLAB_WRITE_DOCS=1 pytest tests/unit/test_bad_input.py`).",
             "Each case runs the real CLI. For every error case, the tests check three things:",
             "", "- The exit code is 1 (bad input) or 2 (bad usage or config).",
             "- No traceback is printed.",
             "- Nothing is written, changed or deleted (every file under the test folder is compared, byte for byte),",
             "  except where a run trains and a method fails: then the run exits 1 and its report records the failure.",
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
              "- **Two runs on one run directory.** Two `peftlab run` processes started at the same instant on one "
              "`--output`: exactly one trains; the other exits 1 naming the holder (host, pid, start time) and "
              "writes nothing. `--overwrite` while a run trains there is refused the same way "
              "(`tests/integration/test_reliability.py`). The lock is `.<run>.lock` beside the run directory, "
              "created in one atomic step; a lock whose process has died is taken over by `--resume` or `--overwrite`.",
              "- **Run directory deleted mid-run.** The run stops with exit 1 before writing another file "
              "instead of recreating the folder without its config and data report.",
              "- **Diverging training.** Non-finite trainable weights or validation loss stop the method as failed, "
              "naming its learning rate; the run exits 1.",
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
