"""One forward pass for rows of different adapters of one PeftModel: LoRA, IA3 and prompt tuning.

peft's own mixed batches (``adapter_names``) run each LoRA layer and head once per adapter present, on that
adapter's rows, so a mix of 16 adapters costs 16 small passes through every adapted layer; IA3 and prompt
tuning accept the argument and ignore it (every row would get the active adapter). Here, for the length of one
forward pass, each adapted layer gathers each row's own weights from a stack of the adapters present
(``index_select``) and runs batched matmuls (``torch.bmm``), as S-LoRA / Punica's BGMV do on GPUs:

- LoRA (``lora.Linear``, no variant such as DoRA): ``base(x) + B_row(A_row(x)) * scaling_row``, ranks padded
  with zeros to the largest;
- IA3 (``ia3.Linear``): each row's scaling vector, on the layer's input (feed-forward) or output;
- prompt tuning: each row's own virtual tokens, for adapters with as many virtual tokens;
- heads (``modules_to_save`` copies, e.g. the classifier): ``nn.Linear`` copies gathered the same way; other
  heads run once per adapter on its rows.

peft's module tree and loaded weights are untouched: the replaced forwards are instance attributes, removed
when the pass ends. Whatever this module cannot batch is left to :func:`plan`'s other answers: peft's
``adapter_names`` where the caller says peft mixes the method, else one pass per adapter.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

__all__ = ["ALONE", "GATHERED", "PEFT", "Pass", "forward", "plan"]

GATHERED = "gathered"  # this module's batched forwards: one pass for every row
PEFT = "peft"  # peft's adapter_names: one pass, each layer looping over the adapters present
ALONE = "alone"  # set_adapter and a plain pass: the rows of one adapter


@dataclass(frozen=True)
class Pass:
    """Adapters (peft names) whose rows share one forward pass, and how it runs (GATHERED, PEFT or ALONE)."""

    adapters: tuple[str, ...]
    how: str


def plan(model: Any, adapters: Sequence[str], peft_mixes: bool = False, gather: bool = True) -> list[Pass]:
    """How rows of ``adapters`` (peft names of adapters loaded in ``model``) share forward passes.

    Args:
        model: a PeftModel holding every adapter of ``adapters``.
        adapters: the adapters whose rows are to be run.
        peft_mixes: peft's ``adapter_names`` is right for these adapters' method (the fallback for LoRA layers
            this module does not batch).
        gather: False turns the gathered passes off (one pass per adapter), for measurement.

    Returns:
        The passes, together covering ``adapters`` once each.
    """
    names = list(dict.fromkeys(adapters))
    if len(names) == 1 or not gather:
        return [Pass((name,), ALONE) for name in names]
    configs = model.peft_config
    if any(configs[name].is_prompt_learning for name in names):
        passes = []
        for part in _by_virtual_tokens(configs, names):
            if len(part) > 1 and all(_prompt_gatherable(configs[name]) for name in part) \
                    and _layers_reason(model, part) is None:
                passes.append(Pass(tuple(part), GATHERED))
            else:
                passes += [Pass((name,), ALONE) for name in part]
        return passes
    if _layers_reason(model, names) is None:
        return [Pass(tuple(names), GATHERED)]
    if peft_mixes:
        return [Pass(tuple(names), PEFT)]
    return [Pass((name,), ALONE) for name in names]


def forward(model: Any, inputs: dict[str, Any], row_adapters: Sequence[str], how: str) -> Any:
    """``model``'s output for ``inputs``, row i computed with adapter ``row_adapters[i]`` (a :class:`Pass`'s way).

    Call under ``torch.inference_mode()``; the model's active adapter is left at ``row_adapters[0]``.
    """
    names = list(row_adapters)
    # The active adapter is one of the batch's: a layer holding none of them then runs its base alone (peft
    # skips an active adapter a layer lacks), as each row's own single-adapter pass would.
    model.set_adapter(names[0])
    if how == ALONE or len(set(names)) == 1:
        return model(**inputs)
    if how == PEFT:
        return model(**inputs, adapter_names=names)
    with _gathered(model, names):
        return model(**inputs)


# -- what can be gathered

def _by_virtual_tokens(configs: Any, names: list[str]) -> list[list[str]]:
    parts: dict[Any, list[str]] = {}
    for name in names:
        config = configs[name]
        parts.setdefault((config.peft_type, getattr(config, "num_virtual_tokens", None)), []).append(name)
    return list(parts.values())


def _prompt_gatherable(config: Any) -> bool:
    from peft.utils import PeftType

    # In inference mode peft's get_prompt is the prompt embedding itself (p-tuning saves its encoder's output
    # there), repeated over the batch: one per row is then a gather. Prefix tuning feeds key/value caches instead.
    return (config.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING) and config.inference_mode
            and getattr(config, "num_transformer_submodules", 1) == 1)


def _layers_reason(model: Any, names: list[str]) -> str | None:
    """Why some module holding one of ``names`` cannot run gathered (None: every one can)."""
    from peft.tuners.ia3.layer import Linear as IA3Linear
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    wanted = set(names)
    for module_name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            if not wanted & set(module.modules_to_save):
                continue
        elif isinstance(module, AuxiliaryTrainingWrapper):  # trainable tokens and the like
            if wanted & module._get_available_adapters():
                return f"{module_name}: {type(module).__name__}"
            continue
        elif isinstance(module, BaseTunerLayer):
            if not _holds_any(module, wanted):
                continue
            # Exact types: quantised LoRA layers and other tuners are subclasses with forwards of their own.
            if type(module) not in (LoraLinear, IA3Linear):
                return f"{module_name}: {type(module).__name__}"
            if module.merged or wanted & set(getattr(module, "lora_variant", {})):
                return f"{module_name}: merged, or a LoRA variant (DoRA, ...)"
        else:
            continue
        if "forward" in module.__dict__:  # accelerate's hooks replace forward: leave such a model alone
            return f"{module_name}: its forward is already replaced"
    return None


def _holds_any(layer: Any, wanted: set[str]) -> bool:
    for attribute in getattr(layer, "adapter_layer_names", ()):
        holder = getattr(layer, attribute, None)
        if holder is not None and wanted & set(holder.keys()):
            return True
    return False


# -- the gathered pass

@contextlib.contextmanager
def _gathered(model: Any, row_adapters: list[str]) -> Iterator[None]:
    """Within: every layer holding one of ``row_adapters`` runs each row with its own adapter."""
    import torch
    from peft.tuners.ia3.layer import Linear as IA3Linear
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.utils.other import ModulesToSaveWrapper

    device = _device(model)
    index_cache: dict[tuple[str, ...], tuple[list[str], Any, bool]] = {}

    def slots(held: Any) -> tuple[list[str], Any, bool]:
        """The adapters of this module present in the batch, each row's slot among them, and whether some row's
        adapter is absent here (its slot is the last, one past them: zeros, ones or the original module)."""
        present = tuple(name for name in dict.fromkeys(row_adapters) if name in held)
        if present not in index_cache:
            position = {name: i for i, name in enumerate(present)}
            index = [position.get(name, len(present)) for name in row_adapters]
            index_cache[present] = (list(present), torch.tensor(index, device=device),
                                    len(present) in index)
        return index_cache[present]

    replaced = []
    for module in model.modules():
        if type(module) is LoraLinear:
            held = module.lora_A.keys()
            patch = functools.partial(_lora_forward, module, *slots(held))
        elif type(module) is IA3Linear:
            held = module.ia3_l.keys()
            patch = functools.partial(_ia3_forward, module, *slots(held))
        elif isinstance(module, ModulesToSaveWrapper):
            held = module.modules_to_save.keys()
            patch = functools.partial(_head_forward, module, row_adapters, *slots(held))
        else:
            continue
        if any(name in held for name in row_adapters):
            module.forward = patch
            replaced.append(module)
    if model.peft_config[row_adapters[0]].is_prompt_learning:
        model.get_prompt = functools.partial(_row_prompts, model, *slots(model.prompt_encoder.keys()))
        replaced.append(model)
    try:
        yield
    finally:
        for module in replaced:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("get_prompt", None)


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _as_rows(x: Any, batch: int) -> Any:
    """``x`` as (batch, tokens, features): a layer's input is (batch, ..., features)."""
    return x.reshape(batch, -1, x.shape[-1])


def _lora_forward(layer: Any, present: list[str], index: Any, absent: bool, x: Any, *args: Any,
                  **kwargs: Any) -> Any:
    import torch
    from torch.nn.functional import pad

    result = layer.base_layer(x, *args, **kwargs)
    a_weights = [layer.lora_A[name].weight for name in present]  # (rank, in) each
    b_weights = [layer.lora_B[name].weight for name in present]  # (out, rank) each
    rank = max(w.shape[0] for w in a_weights)
    # Zeros add exact zeros: a smaller rank is padded to the largest, and rows whose adapter does not adapt this
    # layer get a zero slot (their result is the base layer's alone, as in their own pass).
    if any(w.shape[0] != rank for w in a_weights):
        a_weights = [pad(w, (0, 0, 0, rank - w.shape[0])) for w in a_weights]
        b_weights = [pad(w, (0, rank - w.shape[1])) for w in b_weights]
    if absent:
        a_weights.append(a_weights[0].new_zeros(a_weights[0].shape))
        b_weights.append(b_weights[0].new_zeros(b_weights[0].shape))
    a_rows = torch.stack(a_weights).index_select(0, index)  # (batch, rank, in)
    b_rows = torch.stack(b_weights).index_select(0, index)  # (batch, out, rank)
    # Dropout is the identity in eval mode; the input is cast to the adapter's dtype, as peft does.
    delta = torch.bmm(torch.bmm(_as_rows(x, x.shape[0]).to(a_rows.dtype), a_rows.transpose(1, 2)),
                      b_rows.transpose(1, 2))
    biases = [layer.lora_B[name].bias for name in present]  # lora_bias=True gives lora_B a bias
    if any(bias is not None for bias in biases):
        zero = b_rows.new_zeros(b_rows.shape[1])
        stacked = torch.stack([zero if b is None else b for b in biases] + [zero] * absent)
        delta = delta + stacked.index_select(0, index)[:, None, :]
    scaling = torch.tensor([float(layer.scaling[name]) for name in present] + [0.0] * absent,
                           dtype=delta.dtype, device=delta.device).index_select(0, index)
    delta = delta * scaling[:, None, None]  # after B, as peft's lora_B(lora_A(x)) * scaling
    # peft adds the adapter's output to the base result in the wider dtype, then casts back.
    return (result + delta.reshape(result.shape)).to(result.dtype)


def _ia3_forward(layer: Any, present: list[str], index: Any, absent: bool, x: Any, *args: Any,
                 **kwargs: Any) -> Any:
    import torch

    vectors = [layer.ia3_l[name].flatten() for name in present]
    if absent:
        vectors.append(torch.ones_like(vectors[0]))  # a row without this layer's vector: scaling 1
    rows = torch.stack(vectors).index_select(0, index)  # (batch, features)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (rows.shape[-1],)
    if layer.is_feedforward:  # scales the layer's input
        return layer.base_layer((x.to(rows.dtype) * rows.view(shape)).to(x.dtype), *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    return (result * rows.view(shape)).to(result.dtype)


def _head_forward(wrapper: Any, row_adapters: list[str], present: list[str], index: Any, absent: bool, x: Any,
                  *args: Any, **kwargs: Any) -> Any:
    import torch

    modules = [wrapper.modules_to_save[name] for name in present] + [wrapper.original_module] * absent
    linear = (not args and not kwargs and all(type(m) is torch.nn.Linear for m in modules)
              and len({m.weight.shape for m in modules}) == 1 and len({m.bias is None for m in modules}) == 1)
    if not linear:  # a composite head (e.g. RoBERTa's dense + out_proj): once per adapter, on its rows
        return _head_per_adapter(wrapper, row_adapters, x, *args, **kwargs)
    weights = torch.stack([m.weight for m in modules]).index_select(0, index)  # (batch, out, in)
    out = torch.bmm(_as_rows(x, x.shape[0]), weights.transpose(1, 2))
    if modules[0].bias is not None:
        out = out + torch.stack([m.bias for m in modules]).index_select(0, index)[:, None, :]
    return out.reshape(*x.shape[:-1], weights.shape[1])


def _head_per_adapter(wrapper: Any, row_adapters: list[str], x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch

    out = None
    for name in dict.fromkeys(row_adapters):
        rows = torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=x.device)
        module = wrapper.modules_to_save[name] if name in wrapper.modules_to_save else wrapper.original_module
        part = module(x.index_select(0, rows), *args, **kwargs)
        if out is None:
            out = part.new_empty((len(row_adapters), *part.shape[1:]))
        out.index_copy_(0, rows, part)
    return out


def _row_prompts(model: Any, present: list[str], index: Any, absent: bool, batch_size: int, *args: Any,
                 **kwargs: Any) -> Any:
    """peft's ``get_prompt`` for a batch whose rows have their own adapters: each row's virtual tokens."""
    import torch

    if absent or batch_size != index.shape[0]:
        raise RuntimeError(f"a gathered prompt pass needs a prompt adapter for each of its {batch_size} rows")
    return torch.stack([model.prompt_encoder[name].embedding.weight for name in present]).index_select(0, index)
