"""Any peft tuner by its PeftType name: ``{method: peft, peft_type: LOKR, options: {...}}``.

peftlab builds that type's own config class with the options given (validated when the config is loaded,
``config.peft_options_problem``) and the task type; every other setting is peft's default.
"""

from __future__ import annotations

from typing import Any

from peftlab.errors import MethodError
from peftlab.methods.space import LogFloat, Parameter

# Nothing is known about an arbitrary tuner: only the learning rate, over the adapters' wide range.
SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 1e-5, 1e-2, "Peak learning rate (log scale)."),
)


def config_class(peft_type: str) -> Any:
    """peft's config class for a PeftType name (``LOKR`` -> ``LoKrConfig``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for kind, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        if str(getattr(kind, "value", kind)) == peft_type:
            return cls
    raise MethodError(f"peft_type {peft_type!r} is not a tuner of the installed peft")


def build(method_config: Any, context: Any) -> Any:
    """peft's own config for ``method_config.peft_type`` with its options.

    Default learning rate 1e-4: peft's method comparison default (method_comparison/MetaMathQA,
    default_training_params.json).
    """
    cls = config_class(method_config.peft_type)
    try:
        return cls(task_type=context.task_type, **method_config.options)
    except (TypeError, ValueError) as exc:
        raise MethodError(f"method {method_config.run_name!r} (peft {method_config.peft_type}): peft's "
                          f"{cls.__name__} rejects its options: {exc}") from None
