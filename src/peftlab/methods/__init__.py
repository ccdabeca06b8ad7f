"""Fine-tuning methods: small builders, keyed by :class:`MethodName`, that return ``peft`` configs.

``full`` and ``bitfit`` return no config: they train the model itself (every weight, or only the bias terms
and the head) and save it whole. The others hand all the tuner work to ``peft``; peftlab only chooses sensible
defaults and wires the task type, so the classifier head is trained and saved with the adapter (peft adds it
to ``modules_to_save`` for sequence classification). ``peft`` builds any tuner by its PeftType name.

Each method declares what it can do once saved (:class:`MethodSpec`): whether ``peftlab export --merge`` can fold
it into its base, and whether rows of several of its adapters can share one forward pass in the server (peft's
``adapter_names``). ``tests/unit/test_methods_catalog.py`` measures both flags against peft.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from peftlab.config import MethodName
from peftlab.errors import ConfigError, MethodError
from peftlab.methods import full, generic, ia3, lora, norms, orthogonal, prompt, spectral
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


@dataclass(frozen=True)
class MethodSpec:
    """One method: its builder, what `peftlab tune` searches, and what its saved folder can do."""

    build: Builder  # method config + context -> peft config (None: the model itself trains)
    search_space: tuple[Parameter, ...]
    mergeable: bool = False  # `peftlab export --merge` folds the adapter into the base (peft merge_and_unload)
    mixed_batch: bool = False  # peft's own ``adapter_names`` gives rows of different adapters their own result
    gathered: bool = False  # `peftlab serve` runs its adapters' rows in one gathered pass (serve.mixed), mixed with
    # the other gathered methods' rows (prompt methods: where the classifier reads the first position, encoders)
    prepare: Callable[[Any, Any, MethodContext], Any] | None = None  # whole-model methods: choose what trains

    @property
    def adapter(self) -> bool:
        """True: saved as an adapter on its base; False: a whole model folder."""
        return self.prepare is None


# In the order `peftlab methods` lists them: whole-model methods, the LoRA family, other additive updates,
# multiplicative (orthogonal) ones, norms, prompt learning, any tuner by name. mixed_batch is True only where
# peft's layer has a mixed-batch forward (LoRA's `_mixed_batch_forward`; DoRA refuses adapter_names); gathered
# where serve.mixed can stack the adapters' weights (plain LoRA, IA3, prompt embeddings). Both are tested.
METHODS: dict[MethodName, MethodSpec] = {
    MethodName.FULL: MethodSpec(full.build, full.SEARCH_SPACE, prepare=full.train_everything),
    MethodName.BITFIT: MethodSpec(full.build, full.BITFIT_SEARCH_SPACE, prepare=full.train_biases),
    MethodName.LORA: MethodSpec(lora.build_lora, lora.SEARCH_SPACE, mergeable=True, mixed_batch=True, gathered=True),
    MethodName.RSLORA: MethodSpec(lora.build_rslora, lora.RSLORA_SEARCH_SPACE, mergeable=True, mixed_batch=True,
                                                gathered=True),
    MethodName.DORA: MethodSpec(lora.build_dora, lora.SEARCH_SPACE, mergeable=True),
    MethodName.LOHA: MethodSpec(lora.build_loha, lora.LOHA_SEARCH_SPACE, mergeable=True),
    MethodName.LOKR: MethodSpec(lora.build_lokr, lora.LOKR_SEARCH_SPACE, mergeable=True),
    MethodName.ADALORA: MethodSpec(lora.build_adalora, lora.ADALORA_SEARCH_SPACE, mergeable=True),
    MethodName.IA3: MethodSpec(ia3.build, ia3.SEARCH_SPACE, mergeable=True, gathered=True),
    MethodName.VERA: MethodSpec(spectral.build_vera, spectral.VERA_SEARCH_SPACE, mergeable=True),
    MethodName.FOURIERFT: MethodSpec(spectral.build_fourierft, spectral.FOURIERFT_SEARCH_SPACE, mergeable=True),
    MethodName.C3A: MethodSpec(spectral.build_c3a, spectral.C3A_SEARCH_SPACE, mergeable=True),
    MethodName.OFT: MethodSpec(orthogonal.build_oft, orthogonal.OFT_SEARCH_SPACE, mergeable=True),
    MethodName.BOFT: MethodSpec(orthogonal.build_boft, orthogonal.BOFT_SEARCH_SPACE, mergeable=True),
    MethodName.HRA: MethodSpec(orthogonal.build_hra, orthogonal.HRA_SEARCH_SPACE, mergeable=True),
    MethodName.LN_TUNING: MethodSpec(norms.build, norms.SEARCH_SPACE, mergeable=True),
    MethodName.PROMPT_TUNING: MethodSpec(prompt.build_prompt_tuning, prompt.PROMPT_TUNING_SEARCH_SPACE,
                                                       gathered=True),
    MethodName.PREFIX_TUNING: MethodSpec(prompt.build_prefix_tuning, prompt.PREFIX_TUNING_SEARCH_SPACE),
    MethodName.P_TUNING: MethodSpec(prompt.build_p_tuning, prompt.P_TUNING_SEARCH_SPACE, gathered=True),
    # Capabilities depend on the tuner chosen; declared none, so export and the server never assume them.
    MethodName.PEFT: MethodSpec(generic.build, generic.SEARCH_SPACE),
}

BUILDERS: dict[MethodName, Builder] = {name: spec.build for name, spec in METHODS.items()}
# What `peftlab tune` searches per method (declared next to each builder).
SEARCH_SPACES: dict[MethodName, tuple[Parameter, ...]] = {name: spec.search_space for name, spec in METHODS.items()}
# Methods whose adapters can be merged into the base weights (peft's merge_and_unload).
MERGEABLE = {name for name, spec in METHODS.items() if spec.mergeable}
MIXED_BATCH = {name for name, spec in METHODS.items() if spec.mixed_batch}
PROMPT_LEARNING = {MethodName.PROMPT_TUNING, MethodName.PREFIX_TUNING, MethodName.P_TUNING}


def build_peft_config(method_config: Any, context: MethodContext) -> Any:
    """The ``peft`` config for a method, or None for the whole-model methods (full, bitfit)."""
    return METHODS[MethodName(method_config.method)].build(method_config, context)


def apply_method(model: Any, method_config: Any, context: MethodContext) -> Any:
    """Wrap ``model`` for the method (``get_peft_model``), or set which of its own weights train (full, bitfit).

    Raises:
        MethodError: the method cannot apply to this model or task (no target modules, sizes that do not divide,
            a tuner for another task, no bias terms for BitFit), naming the method and peft's reason.
    """
    from peft import get_peft_model

    spec = METHODS[MethodName(method_config.method)]
    peft_config = spec.build(method_config, context)
    if peft_config is None:
        return spec.prepare(model, method_config, context)
    # A named tuner fails in the known ways; a tuner chosen by name may fail in any (AttributeError, IndexError ...).
    expected: tuple[type[BaseException], ...] = (
        (Exception,) if method_config.method == MethodName.PEFT.value
        else (ValueError, TypeError, KeyError, NotImplementedError))
    try:
        wrapped = get_peft_model(model, peft_config)
    except expected as exc:
        raise MethodError(f"method {method_config.run_name!r} ({method_config.method}) cannot be applied to this "
                          f"{context.model_type} model: {type(exc).__name__}: {str(exc).rstrip('.')}. Check its "
                          f"options and target_modules (module names of the model), or choose another method") from None
    if getattr(method_config, "init", None) in lora.MUTATING_INITS:
        lora.remember_initial_adapter(wrapped)
    return wrapped


def save_weights(model: Any, folder: Path) -> None:
    """Write the model's weights and config into ``folder`` (``artifacts.save_folder`` calls this).

    ``save_pretrained``, except for a PiSSA/OLoRA LoRA, which is converted to the plain LoRA that gives the same
    outputs on the unchanged base (:func:`peftlab.methods.lora.save_converted`).
    """
    initial = lora.initial_adapter(model)
    if initial is None:
        model.save_pretrained(str(folder), safe_serialization=True)
    else:
        lora.save_converted(model, folder, initial)


# Methods whose default learning rate (and options) are the choice of a recorded tune: `peftlab run
# configs/all_methods.yaml --tune`, an equal trial budget per method on the validation split of minilm-l6
# (benchmarks/results/methods.json, docs/benchmarks.md section 3), rounded to two significant digits.
# tests/unit/test_measured_defaults.py checks each against that record. The other methods' defaults are
# provisional, from the sources named in their builders' docstrings (docs/methods.md).
TUNED_DEFAULTS = frozenset({MethodName.FULL, MethodName.BITFIT, MethodName.LORA, MethodName.RSLORA, MethodName.DORA,
                            MethodName.LOHA, MethodName.LOKR, MethodName.ADALORA, MethodName.IA3, MethodName.VERA,
                            MethodName.C3A, MethodName.FOURIERFT, MethodName.OFT, MethodName.BOFT, MethodName.HRA,
                            MethodName.LN_TUNING, MethodName.PROMPT_TUNING, MethodName.PREFIX_TUNING})
TUNED_SOURCE = "tuned (docs/benchmarks.md section 3)"
PROVISIONAL_SOURCE = "provisional (peft's own experiments or the paper; see docs/methods.md)"


def default_source(method: str) -> str:
    """Where a method's default learning rate comes from, as `peftlab methods` shows it."""
    return TUNED_SOURCE if method in {m.value for m in TUNED_DEFAULTS} else PROVISIONAL_SOURCE


def describe_methods() -> list[dict[str, Any]]:
    """Each method with its options, their defaults and descriptions, and its capabilities, for `peftlab methods`."""
    from peftlab.config import METHOD_CONFIGS

    rows = []
    for name, spec in METHODS.items():
        cls = METHOD_CONFIGS[name.value]
        fields = {key: field for key, field in cls.model_fields.items() if key not in ("method", "name")}
        defaults = {key: "required" if field.is_required() else field.get_default(call_default_factory=True)
                    for key, field in fields.items()}
        rows.append({"method": name.value, "description": (cls.__doc__ or "").strip().splitlines()[0],
                     "options": defaults,
                     "option_help": {key: field.description or "" for key, field in fields.items()},
                     "adapter": spec.adapter, "mergeable": spec.mergeable, "mixed_batch": spec.mixed_batch,
                     "gathered": spec.gathered,
                     "default_source": default_source(name.value)})
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
