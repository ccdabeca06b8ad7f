"""Config validation: typed, unknown keys rejected with suggestions, all problems reported together."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftlab.config import ExperimentConfig, load_config
from peftlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def minimal(**extra: object) -> dict:
    tree = {"data": {"path": "shipped:vader-movie-snippets"}, "methods": ["full", "lora"]}
    tree.update(extra)
    return tree


def test_minimal_config_gets_documented_defaults() -> None:
    config = load_config(data=minimal())
    assert config.task == "classification"
    assert config.model.path == "minilm-l6"
    assert [m.run_name for m in config.methods] == ["full", "lora"]
    lora = config.method("lora")
    assert (lora.r, lora.alpha, lora.target_modules) == (8, 32, None)
    assert config.training.metric_for_best_model == "f1_macro"


def test_unknown_key_suggests_the_nearest_valid_key() -> None:
    tree = minimal()
    tree["data"]["txt_column"] = "review"
    with pytest.raises(ConfigError) as err:
        load_config(data=tree)
    assert "data.txt_column" in str(err.value)
    assert "did you mean 'text_column'" in str(err.value)


def test_unknown_key_inside_a_method_is_named_with_the_methods_own_keys() -> None:
    tree = minimal(methods=[{"method": "lora", "rank": 16}])
    with pytest.raises(ConfigError) as err:
        load_config(data=tree)
    message = str(err.value)
    assert "rank" in message and "alpha" in message  # lists lora's allowed keys


def test_all_problems_are_reported_together() -> None:
    tree = minimal(methods=[{"method": "lora", "r": 0, "learning_rate": -1}],
                   training={"epochs": "three", "batch_size": 0})
    tree["data"]["split"] = {"train": 0.8, "validation": 0.3, "test": 0.1}
    with pytest.raises(ConfigError) as err:
        load_config(data=tree)
    message = str(err.value)
    for key in ("methods.0.lora.r", "methods.0.lora.learning_rate", "training.epochs", "training.batch_size",
                "data.split"):
        assert key in message, key
    assert "sum to 1" in message
    assert "6 problem(s)" in message or "problem(s)" in message


def test_unknown_method_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*lora"):
        load_config(data=minimal(methods=[{"method": "lorra"}]))


def test_prompt_tuning_text_init_needs_text() -> None:
    with pytest.raises(ConfigError, match="init_text"):
        load_config(data=minimal(methods=[{"method": "prompt_tuning", "init": "text"}]))


def test_duplicate_method_names_are_rejected() -> None:
    with pytest.raises(ConfigError, match="distinct `name:`"):
        load_config(data=minimal(methods=["lora", {"method": "lora", "r": 16}]))
    config = load_config(data=minimal(methods=["lora", {"method": "lora", "r": 16, "name": "lora_r16"}]))
    assert [m.run_name for m in config.methods] == ["lora", "lora_r16"]


def test_label_map_keys_accept_ints_and_strings() -> None:
    tree = minimal()
    tree["data"]["label_map"] = {-1: "부정", 0: "중립", "1": "긍정"}
    config = load_config(data=tree)
    assert config.data.label_map == {"-1": "부정", "0": "중립", "1": "긍정"}


def test_overrides_edit_nested_keys_and_methods_by_name() -> None:
    config = load_config(data=minimal(), overrides=["training.epochs=1", "methods.lora.r=16",
                                                    "data.max_length=64", "methods.0.learning_rate=1e-4"])
    assert config.training.epochs == 1
    assert config.method("lora").r == 16
    assert config.data.max_length == 64
    assert config.method("full").learning_rate == pytest.approx(1e-4)


def test_bad_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(data=minimal(), overrides=["training.epochs"])
    with pytest.raises(ConfigError, match="no list item named 'dora'"):
        load_config(data=minimal(), overrides=["methods.dora.r=4"])
    with pytest.raises(ConfigError, match="training.epochs"):
        load_config(data=minimal(), overrides=["training.epochs=-2"])


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  path: x.csv\nmethods: [full\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_config(path)


def test_empty_and_missing_config_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("text,label\na,b\n", encoding="utf-8")
    path = tmp_path / "exp.yaml"
    path.write_text("data: {path: data.csv}\nmethods: [lora]\n", encoding="utf-8")
    config = load_config(path)
    assert Path(config.data.path) == tmp_path / "data.csv"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    assert config.methods


def _config_models() -> list[type]:
    """ExperimentConfig, every method's config and every model nested in them."""
    import typing

    import pydantic

    from peftlab.config import METHOD_CONFIGS

    found: list[type] = []

    def annotations(annotation: object) -> typing.Iterator[object]:
        yield annotation
        for argument in typing.get_args(annotation):
            yield from annotations(argument)

    def walk(model: type) -> None:
        if model in found:
            return
        found.append(model)
        for field in model.model_fields.values():
            for kind in annotations(field.annotation):
                if isinstance(kind, type) and issubclass(kind, pydantic.BaseModel):
                    walk(kind)

    for model in [ExperimentConfig, *dict(METHOD_CONFIGS).values()]:
        walk(model)
    return found


def test_every_config_field_is_read_somewhere() -> None:
    """A field that no module reads is an option that silently does nothing (as training.logging_steps did)."""
    import re

    source = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "src" / "peftlab").rglob("*.py")
                       if p.name != "config.py")
    # Read as an attribute (config.training.seed) or by name (model_dump keys, getattr, dict access).
    unread = [f"{model.__name__}.{name}" for model in _config_models() for name in model.model_fields
              if not re.search(rf"\.{name}\b|[\"']{name}[\"']", source)]
    assert len(_config_models()) > 5  # the walk reached the nested sections and the methods
    assert not unread, f"config fields nothing outside config.py reads: {unread}"
