"""Every named method on a tiny random BERT and Llama: train a few steps, save through peftlab, reload with plain
peft/transformers, same logits; each method's declared capabilities (merge, mixed batches) measured against peft.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from peftlab import artifacts
from peftlab.config import METHOD_CONFIGS, MethodName, load_config
from peftlab.errors import ConfigError, MethodError
from peftlab.methods import METHODS, MethodContext, apply_method, build_peft_config, describe_methods
from peftlab.models import load_base_model

LABELS = ["negative", "neutral", "positive"]
# Sizes scaled to hidden 32 (the tiny models): every block size divides 32 and 16 (the Llama's k/v width).
TINY_OPTIONS: dict[str, dict] = {
    "full": {}, "bitfit": {}, "lora": {"r": 4}, "rslora": {"r": 4, "alpha": 4}, "dora": {"r": 4}, "loha": {"r": 4},
    "lokr": {"r": 4}, "adalora": {"r": 2, "init_r": 4}, "ia3": {}, "vera": {"r": 8}, "fourierft": {"n_frequency": 64},
    "c3a": {"block_size": 8}, "oft": {"block_size": 8}, "boft": {"block_size": 4}, "hra": {"r": 4}, "ln_tuning": {},
    "prompt_tuning": {"num_virtual_tokens": 4}, "prefix_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
}
NAMED = [m.value for m in MethodName if m is not MethodName.PEFT]
# Pairings that cannot work, and the error that says so: a Llama has no bias terms for BitFit to train.
UNSUPPORTED = {("bitfit", "llama"): "no bias terms"}
# The head peft trains and saves with a classifier adapter (modules_to_save), not the adapter itself.
HEAD = re.compile(r"(^|\.)(classifier|score)\.")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One intra-op thread: these models are tiny, and on a busy 2-core machine a second thread's sync made each
    step ~10x slower (a case took 6-9 s with 2 threads, 0.5-0.7 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.test_generate import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("catalog_llama"))


def _setup(kind: str, tiny_bert: Path, tiny_llama: Path) -> tuple[Path, str, dict[str, torch.Tensor]]:
    """The base folder, the task and one batch (padded rows included) for a model kind."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (4, 8), generator=generator)
    mask = torch.ones_like(ids)
    if kind == "bert":
        mask[1, 6:] = 0
        ids[1, 6:] = 0  # [PAD]
        return tiny_bert, "classification", {"input_ids": ids, "attention_mask": mask,
                                              "labels": torch.tensor([0, 1, 2, 0])}
    return tiny_llama, "causal-lm", {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def _method_config(method: str, **extra: object) -> object:
    tree = {"data": {"path": "x.csv"}, "methods": [{"method": method, **TINY_OPTIONS.get(method, {}), **extra}]}
    if method != "full" and "learning_rate" not in extra:
        tree["methods"][0]["learning_rate"] = 1e-2
    return load_config(data=tree).methods[0]


def _load(folder: Path, task: str) -> object:
    from transformers import AutoTokenizer

    model = load_base_model(folder, task, LABELS if task == "classification" else None, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(str(folder))


def _context(model: object, task: str, folder: Path, tokenizer: object) -> MethodContext:
    return MethodContext(task=task, model_type=model.config.model_type, tokenizer_path=str(folder), total_steps=3,
                         tokenizer=tokenizer)


def _train(model: object, batch: dict[str, torch.Tensor], steps: int = 3, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """A few AdamW steps; returns the trainable weights as they were before."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr)
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return before


def _logits(model: object, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _reload(target: Path, base_folder: Path, task: str, adapter: bool) -> object:
    """The saved folder loaded as its model card says: plain transformers, plus peft for an adapter."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    if not adapter:
        return auto.from_pretrained(str(target)).eval()
    if task == "classification":
        base = auto.from_pretrained(str(base_folder), config=AutoConfig.from_pretrained(str(target)))
    else:
        base = auto.from_pretrained(str(base_folder))
    return PeftModel.from_pretrained(base, str(target)).eval()


def test_every_named_method_is_in_this_catalog_and_listed() -> None:
    assert set(TINY_OPTIONS) == set(NAMED) and len(NAMED) >= 17
    assert set(METHODS) == set(MethodName) and set(METHOD_CONFIGS) == {m.value for m in MethodName}
    rows = {r["method"]: r for r in describe_methods()}
    for name, spec in METHODS.items():
        row = rows[name.value]
        assert (row["adapter"], row["mergeable"], row["mixed_batch"]) == (spec.adapter, spec.mergeable,
                                                                           spec.mixed_batch)
        assert all(row["option_help"].values()), f"{name.value}: an option without a description"
    assert {n for n, s in METHODS.items() if not s.adapter} == {MethodName.FULL, MethodName.BITFIT}


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method", NAMED)
def test_method_trains_saves_and_reloads_with_the_same_logits(method: str, kind: str, tiny_bert: Path,
                                                              tiny_llama: Path, tmp_path: Path) -> None:
    _round_trip(method, kind, {}, tiny_bert, tiny_llama, tmp_path, atol=1e-6)


@pytest.mark.parametrize(("method", "init", "kind"), [("lora", "pissa", "bert"), ("lora", "pissa", "llama"),
                                                      ("lora", "olora", "bert"), ("rslora", "olora", "llama"),
                                                      ("lora", "gaussian", "bert")])
def test_lora_init_options_save_a_plain_lora_on_the_unchanged_base(method: str, init: str, kind: str,
                                                                   tiny_bert: Path, tiny_llama: Path,
                                                                   tmp_path: Path) -> None:
    """PiSSA/OLoRA change the base weights in memory; the saved adapter is converted (rank 2r) so that it gives
    the trained model's logits on the base as shipped. Not bitwise: dW = AB - A0B0 is a float difference."""
    _round_trip(method, kind, {"init": init}, tiny_bert, tiny_llama, tmp_path, atol=1e-5)
    saved = artifacts.adapter_config(tmp_path / "saved")
    mutating = init in ("pissa", "olora")
    assert saved["r"] == TINY_OPTIONS[method]["r"] * (2 if mutating else 1)
    assert saved["init_lora_weights"] is True if mutating else saved["init_lora_weights"] == init


def _round_trip(method: str, kind: str, extra: dict, tiny_bert: Path, tiny_llama: Path, tmp_path: Path,
                atol: float) -> None:
    """Train 3 steps, save through artifacts.save_folder, reload with plain peft/transformers, compare logits."""
    from peftlab.methods import save_weights

    folder, task, batch = _setup(kind, tiny_bert, tiny_llama)
    model, tokenizer = _load(folder, task)
    method_config = _method_config(method, **extra)
    spec = METHODS[MethodName(method)]
    context = _context(model, task, folder, tokenizer)
    if (method, kind) in UNSUPPORTED:
        with pytest.raises(MethodError, match=UNSUPPORTED[method, kind]):
            apply_method(model, method_config, context)
        return
    torch.manual_seed(0)
    model = apply_method(model, method_config, context)
    before = _train(model, batch)
    moved = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert any(not HEAD.search(n) for n in moved), f"{method}: no weight but the head moved in training"
    expected = _logits(model, batch)

    target = tmp_path / "saved"
    meta = artifacts.new_metadata(task=task, method=method, name=method, labels=LABELS if task == "classification"
                                  else [], base_model=folder, base_model_name=str(folder), max_length=8,
                                  clean="none", trust_remote_code=False)
    artifacts.save_folder(target, model, tokenizer, meta, save_weights=save_weights)  # as train.train_method does
    assert artifacts.is_adapter(target) == spec.adapter == meta["is_adapter"]

    reloaded = _reload(target, folder, task, spec.adapter)
    torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=atol)
    if spec.mergeable:
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(_logits(merged, batch), expected, rtol=1e-4, atol=1e-4)
    elif spec.adapter:
        with pytest.raises(Exception):  # noqa: B017 - peft raises its own kinds; what matters is that it refuses
            reloaded.merge_and_unload()


def _perturbed_pair(method: str, folder: Path, tokenizer: object) -> object:
    """A PeftModel with two adapters of ``method`` ("default" and "b") whose weights differ from each other."""
    model, _ = _load(folder, "classification")
    method_config = _method_config(method)
    context = _context(model, "classification", folder, tokenizer)
    torch.manual_seed(0)
    model = apply_method(model, method_config, context)
    second = build_peft_config(method_config, context)
    second.inference_mode = True  # AdaLoRA allows one trainable adapter; here nothing trains
    model.add_adapter("b", second)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if re.search(r"\.(default|b)(\.|$)", name) and parameter.is_floating_point():
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("method", [m.value for m, s in METHODS.items() if s.adapter and m is not MethodName.PEFT])
def test_declared_mixed_batch_capability_is_what_peft_does(method: str, tiny_bert: Path) -> None:
    """Rows of two adapters in one batch (peft's ``adapter_names``) against each adapter alone (atol 1e-5)."""
    from transformers import AutoTokenizer

    _, _, batch = _setup("bert", tiny_bert, tiny_bert)
    model = _perturbed_pair(method, tiny_bert, AutoTokenizer.from_pretrained(str(tiny_bert)))
    alone = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        alone[name] = _logits(model, batch)
    assert not torch.allclose(alone["default"], alone["b"], atol=1e-3)  # else the comparison could not tell
    names = ["default", "b", "b", "default"]
    want = torch.stack([alone[n][i] for i, n in enumerate(names)])
    try:
        with torch.no_grad():
            mixed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          adapter_names=names).logits
        measured = torch.allclose(mixed, want, atol=1e-5)
    except (ValueError, TypeError):  # DoRA refuses adapter_names outright
        measured = False
    assert measured == METHODS[MethodName(method)].mixed_batch


@pytest.mark.parametrize("method", [m.value for m, s in METHODS.items() if s.adapter and m is not MethodName.PEFT])
def test_declared_gathered_pass_is_what_the_server_does(method: str, tiny_bert: Path) -> None:
    """``gathered`` (the `peftlab methods` "mixed" column) against what serve.mixed decides for two adapters."""
    from transformers import AutoTokenizer

    from peftlab.serve import mixed

    model = _perturbed_pair(method, tiny_bert, AutoTokenizer.from_pretrained(str(tiny_bert)))
    for config in model.peft_config.values():
        config.inference_mode = True  # as the server loads them: saved adapters come back in inference mode
    assert all(mixed._gatherable(model, name) for name in ("default", "b")) == METHODS[MethodName(method)].gathered


def test_all_methods_config_runs_every_named_method_once() -> None:
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "all_methods.yaml")
    assert sorted(m.method for m in config.methods) == sorted(NAMED)
    assert len({m.run_name for m in config.methods}) == len(NAMED)


# --------------------------------------------------------------------------- any tuner by name


def test_peft_method_builds_peft_own_config_class_with_the_options() -> None:
    from peft import LoKrConfig, ShiraConfig

    config = load_config(data={"data": {"path": "x.csv"}, "methods": [
        {"method": "peft", "peft_type": "lokr", "options": {"r": 4, "decompose_factor": 4}},
        {"method": "peft", "peft_type": "SHIRA", "name": "shira_r8", "options": {"r": 8}}]})
    context = MethodContext(task="classification", model_type="bert", tokenizer_path="", total_steps=10)
    lokr, shira = (build_peft_config(m, context) for m in config.methods)
    assert isinstance(lokr, LoKrConfig) and (lokr.r, lokr.decompose_factor, lokr.task_type) == (4, 4, "SEQ_CLS")
    assert isinstance(shira, ShiraConfig) and shira.r == 8
    assert [m.run_name for m in config.methods] == ["peft_lokr", "shira_r8"]


@pytest.mark.parametrize(("method", "expected"), [
    ({"peft_type": "LOKR", "options": {"r": 4, "rank": 8}},
     r"methods\.0\.peft: options\.rank: LoKrConfig has no option 'rank'.*valid: .*\br\b.*decompose_factor"),
    ({"peft_type": "LOKR", "options": {"task_type": "CAUSAL_LM"}}, r"options\.task_type: peftlab sets task_type"),
    ({"peft_type": "LORRA"}, r"peft_type 'LORRA' is not a peft tuner; did you mean 'LORA'\?.*VERA"),
    ({"peft_type": "LORA", "options": {"use_dora": True, "lora_bias": True}},
     r"options: peft's LoraConfig rejects them: .*DoRA"),
])
def test_peft_method_options_peft_rejects_are_config_errors_naming_the_option(method: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(data={"data": {"path": "x.csv"}, "methods": [{"method": "peft", **method}]})


# --------------------------------------------------------------------------- through the experiment


def test_in_a_run_a_failing_tuner_fails_alone_bitfit_saves_a_whole_model_and_pissa_a_plain_lora(
        tiny_bert: Path, reviews_csv: Path, tmp_path: Path) -> None:
    """The real path (run_experiment, HF Trainer): ADAPTION_PROMPT is Llama-only, so it fails on a BERT and the
    methods after it go on; BitFit trains only biases and the head and saves a folder plain transformers loads;
    a PiSSA LoRA is saved converted and predicts on the shipped base as the run did."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftlab.experiment import run_experiment
    from peftlab.predict import load_predictor

    config = load_config(data={
        "data": {"path": str(reviews_csv), "max_length": 16, "max_train_samples": 32},
        "model": {"path": str(tiny_bert)},
        "methods": [{"method": "peft", "peft_type": "ADAPTION_PROMPT", "options": {"adapter_len": 4, "adapter_layers": 1}},
                    {"method": "bitfit", "learning_rate": 1e-2},
                    {"name": "pissa", "method": "lora", "init": "pissa", "learning_rate": 1e-2}],
        "training": {"epochs": 2, "batch_size": 16, "method_process": False, "warmup_ratio": 0.0}})
    result = run_experiment(config, tmp_path / "out")
    status = {r.name: (r.status, r.error) for r in result.runs}
    assert [r.name for r in result.runs] == ["peft_adaption_prompt", "bitfit", "pissa"]
    assert status["peft_adaption_prompt"][0] == "failed" and status["bitfit"] == status["pissa"] == ("ok", None)
    assert re.search(r"peft_adaption_prompt.*cannot be applied to this bert model.*adaption prompt",
                     status["peft_adaption_prompt"][1])

    bitfit = next(r for r in result.runs if r.name == "bitfit")
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3)
    biases_and_head = sum(p.numel() for n, p in model.named_parameters()
                          if n.endswith(".bias") or n.startswith("classifier."))
    assert bitfit.trainable_params == biases_and_head < bitfit.total_params
    folder = tmp_path / "out" / "bitfit" / "model"
    assert not artifacts.is_adapter(folder) and artifacts.read_metadata(folder)["is_adapter"] is False
    saved = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    texts = ["the movie was great", "awful and boring plot"]
    with torch.inference_mode():
        expected = saved(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1).numpy()
    np.testing.assert_allclose(load_predictor(folder).predict_proba(texts), expected, atol=1e-5)
    frozen = {n: p for n, p in saved.named_parameters() if not n.endswith(".bias") and not n.startswith("classifier.")}
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in frozen.items())  # only biases moved

    # PiSSA through the Trainer (2 epochs: the best epoch's checkpoint is restored into the residual base): the
    # converted adapter on the shipped base predicts the test rows as the run did.
    from peftlab.data import prepare_data
    from peftlab.results import load_predictions

    pissa = next(r for r in result.runs if r.name == "pissa")
    data = prepare_data(load_config(tmp_path / "out" / "config.yaml").data)
    reported = load_predictions(tmp_path / "out" / pissa.predictions_file).probabilities
    np.testing.assert_allclose(load_predictor(tmp_path / "out" / "pissa").predict_proba(data.test.texts), reported,
                               atol=1e-5)


# --------------------------------------------------------------------------- peftlab methods


def test_peftlab_methods_lists_every_method_with_its_capabilities_in_100_columns() -> None:
    from typer.testing import CliRunner

    from peftlab.cli import app

    result = CliRunner().invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
            for line in result.output.splitlines() if line.startswith("│") and line.split("│")[1].strip()}
    for name, spec in METHODS.items():
        merge, mixed = rows[name.value][-2:]
        assert merge == ("yes" if spec.mergeable else "no" if spec.adapter else "-"), name
        assert mixed == ("one pass" if spec.gathered else "per adapter" if spec.adapter else "-"), name
    assert len([n for n in rows if n in NAMED]) == len(NAMED) >= 17

    one = CliRunner().invoke(app, ["methods", "c3a"])
    assert one.exit_code == 0 and "block_size" in one.output and "must divide" in one.output
    assert "learning_rate 0.01..0.3 (log)" in one.output
    unknown = CliRunner().invoke(app, ["methods", "lorra"])
    assert unknown.exit_code != 0


def test_every_search_space_value_is_a_valid_config_that_builds() -> None:
    """What `peftlab tune` may set (each range's ends, each choice) validates and builds a peft config."""
    from peftlab.methods.space import LogFloat
    from peftlab.tune import apply_params

    context = MethodContext(task="classification", model_type="bert", tokenizer_path="", total_steps=100)
    for name, spec in METHODS.items():
        extra = {"peft_type": "LOKR"} if name is MethodName.PEFT else {}
        method_config = load_config(data={"data": {"path": "x.csv"}, "methods": [{"method": name.value, **extra}]}
                                    ).methods[0]
        assert spec.search_space[0].name == "learning_rate" and isinstance(spec.search_space[0], LogFloat)
        assert spec.search_space[0].low <= method_config.learning_rate <= spec.search_space[0].high, name
        for parameter in spec.search_space:
            values = (parameter.low, parameter.high) if isinstance(parameter, LogFloat) else parameter.choices
            for value in values:
                trial = apply_params(method_config, {parameter.name: value}, spec.search_space)
                built = build_peft_config(trial, context)
                assert (built is None) == (not spec.adapter), name
