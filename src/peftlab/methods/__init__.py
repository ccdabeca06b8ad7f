"""Fine-tuning methods: small builders, keyed by :class:`MethodName`, that return ``peft`` configs.

``full`` returns no config (every weight trains). The others hand all the
tuner work to ``peft``; peftlab only chooses sensible defaults and wires the
task type, so the classifier head is trained and saved with the adapter
(peft adds it to ``modules_to_save`` for sequence classification).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from peftlab.config import MethodName
from peftlab.errors import ConfigError, MethodError
from peftlab.methods import full, ia3, lora, prompt
from peftlab.methods.space import Choice, LogFloat, Parameter


@dataclass(frozen=True)
class MethodContext:
    """What a builder may need beyond its own options."""

    task: str  # "classification" or "causal-lm"
    model_type: str  # config.model_type of the base model, e.g. "bert"
    tokenizer_path: str  # for TEXT-initialised prompts
    total_steps: int  # optimizer steps the run will take (AdaLoRA's schedule)
    tokenizer: Any = None

    @property
    def task_type(self) -> str:
        return "CAUSAL_LM" if self.task == "causal-lm" else "SEQ_CLS"


Builder = Callable[[Any, MethodContext], Any]

BUILDERS: dict[MethodName, Builder] = {
    MethodName.FULL: full.build,
    MethodName.LORA: lora.build_lora,
    MethodName.DORA: lora.build_dora,
    MethodName.LOHA: lora.build_loha,
    MethodName.ADALORA: lora.build_adalora,
    MethodName.IA3: ia3.build,
    MethodName.PROMPT_TUNING: prompt.build_prompt_tuning,
    MethodName.PREFIX_TUNING: prompt.build_prefix_tuning,
    MethodName.P_TUNING: prompt.build_p_tuning,
}

# What `peftlab tune` searches per method (declared next to each builder).
SEARCH_SPACES: dict[MethodName, tuple[Parameter, ...]] = {
    MethodName.FULL: full.SEARCH_SPACE,
    MethodName.LORA: lora.SEARCH_SPACE,
    MethodName.DORA: lora.SEARCH_SPACE,
    MethodName.LOHA: lora.LOHA_SEARCH_SPACE,
    MethodName.ADALORA: lora.ADALORA_SEARCH_SPACE,
    MethodName.IA3: ia3.SEARCH_SPACE,
    MethodName.PROMPT_TUNING: prompt.PROMPT_TUNING_SEARCH_SPACE,
    MethodName.PREFIX_TUNING: prompt.PREFIX_TUNING_SEARCH_SPACE,
    MethodName.P_TUNING: prompt.P_TUNING_SEARCH_SPACE,
}

# Methods whose adapters can be merged into the base weights (peft's merge_and_unload).
MERGEABLE = {MethodName.LORA, MethodName.DORA, MethodName.LOHA, MethodName.ADALORA, MethodName.IA3}
PROMPT_LEARNING = {MethodName.PROMPT_TUNING, MethodName.PREFIX_TUNING, MethodName.P_TUNING}


def build_peft_config(method_config: Any, context: MethodContext) -> Any:
    """The ``peft`` config for a method, or None for full fine-tuning."""
    return BUILDERS[MethodName(method_config.method)](method_config, context)


def apply_method(model: Any, method_config: Any, context: MethodContext) -> Any:
    """Wrap ``model`` for the method (``get_peft_model``) or leave it whole for full fine-tuning."""
    from peft import get_peft_model

    peft_config = build_peft_config(method_config, context)
    if peft_config is None:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    try:
        return get_peft_model(model, peft_config)
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
        raise MethodError(f"method {method_config.run_name!r} ({method_config.method}) cannot be applied to this "
                          f"{context.model_type} model: {exc}. Check its target_modules (module names of the model) "
                          f"or choose another method") from None


def describe_methods() -> list[dict[str, Any]]:
    """Each method with its options, defaults and one-line description, for `peftlab methods`."""
    from peftlab.config import METHOD_CONFIGS

    rows = []
    for name, cls in METHOD_CONFIGS.items():
        options = {key: field.default for key, field in cls.model_fields.items() if key not in ("method", "name")}
        rows.append({"method": name, "description": (cls.__doc__ or "").strip().splitlines()[0],
                     "options": options, "mergeable": MethodName(name) in MERGEABLE})
    return rows


def search_space(method: str, overrides: dict[str, Any] | None = None, where: str = "tune.search") -> tuple[Parameter, ...]:
    """The method's search space with the config's overrides applied.

    Args:
        method: the method (``lora``, ``full``, ...).
        overrides: parameter name -> ``{low, high}`` (a range) or a list (the choices), already validated for
            ``low <= high`` by the config.
        where: the config key of the overrides, for messages.

    Raises:
        ConfigError: an override names a parameter the method does not search, or gives a range for a choice
            (or choices for a range).
    """
    space = {p.name: p for p in SEARCH_SPACES[MethodName(method)]}
    for name, override in (overrides or {}).items():
        parameter = space.get(name)
        if parameter is None:
            raise ConfigError(f"{where}.{name}: {method} does not search {name!r}; it searches "
                              f"{', '.join(space)}")
        if isinstance(parameter, LogFloat):
            low, high = getattr(override, "low", None), getattr(override, "high", None)
            if low is None:
                raise ConfigError(f"{where}.{name}: {name} is a range; give {{low: ..., high: ...}}, e.g. "
                                  f"{{low: {parameter.low:g}, high: {parameter.high:g}}}")
            space[name] = LogFloat(name, float(low), float(high), parameter.description)
        else:
            if not isinstance(override, (list, tuple)):
                raise ConfigError(f"{where}.{name}: {name} is a choice; give a list, e.g. "
                                  f"{list(parameter.choices)}")
            space[name] = Choice(name, tuple(override), parameter.description, parameter.config_values)
    return tuple(space.values())
