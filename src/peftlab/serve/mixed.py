"""One forward pass for rows of different adapters -- of LoRA, IA3 and prompt tuning, of one or several PeftModels.

peft's own mixed batches (``adapter_names``) run each LoRA layer and head once per adapter present, on that
adapter's rows, so a mix of 16 adapters costs 16 small passes through every adapted layer; IA3 and prompt
tuning accept the argument and ignore it (every row would get the active adapter), and adapters of different
methods cannot live in one PeftModel at all. The server's PeftModels (one per method and head size) are
skeletons over the same base tensors, so one of them can run every row: for the length of one pass, each of its
modules that some row's adapter adapts (in whichever PeftModel that adapter lives) gets a forward that applies,
to each row, that row's own adapter, gathered from a stack of the adapters present (``index_select``) into
batched matmuls (``torch.bmm``), as S-LoRA / Punica's BGMV do on GPUs:

- LoRA (``lora.Linear``, no variant such as DoRA): ``base(x) + B_row(A_row(x)) * scaling_row``, ranks padded
  with zeros to the largest, zeros for rows whose adapter does not adapt the layer;
- IA3 (``ia3.Linear``): each row's scaling vector, on the layer's input (feed-forward) or output;
- heads (``modules_to_save`` copies, e.g. the classifier): ``nn.Linear`` copies gathered the same way; other
  heads run once per adapter on its rows;
- prompt tuning (and p-tuning, whose saved prompt is its encoder's output): each row's own virtual tokens ahead
  of its text, as peft puts them; rows of the other methods are padded at the end instead (masked positions
  change nothing, and their positions stay those of their own pass).

A row's result therefore equals its own single-adapter pass (to float rounding). peft's module trees and loaded
weights are untouched: the forwards are instance attributes, removed when the pass ends. What cannot be gathered
(DoRA, LoHa, prefix tuning, quantised layers, ...) is left to :func:`plan`'s other answers: peft's
``adapter_names`` where the caller says peft mixes the method, else one pass per adapter.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

__all__ = ["ALONE", "GATHERED", "MODES", "PEFT", "Pass", "forward", "plan"]

GATHERED = "gathered"  # this module's batched forwards: one pass for every row
PEFT = "peft"  # peft's adapter_names: one pass, each layer looping over the adapters present
ALONE = "alone"  # set_adapter and a plain pass: the rows of one adapter

# How far gathering reaches: "one" pass for every gatherable row; one per "method" (PeftModel, and number of
# virtual tokens); one per "adapter" (no gathering: the baseline it is measured against).
MODES = ("one", "method", "adapter")


@dataclass(frozen=True)
class Pass:
    """Adapters (peft names) whose rows share one forward pass, and how it runs (GATHERED, PEFT or ALONE)."""

    adapters: tuple[str, ...]
    how: str


def plan(models: Mapping[str, Any], peft_mixes: Callable[[Any], bool] = lambda model: False,
         mode: str = "one", known: dict[str, bool] | None = None) -> list[Pass]:
    """How the rows of some adapters share forward passes.

    Args:
        models: each adapter's peft name -> the PeftModel holding it; all over the same base, for one task and
            one head shape (classification with as many classes).
        peft_mixes: whether peft's own ``adapter_names`` is right for a PeftModel's adapters (the fallback for
            adapters this module cannot gather).
        mode: one of :data:`MODES`.
        known: the caller's cache of whether each adapter can be gathered (what its layers are does not change
            while it is loaded; the caller forgets an adapter it unloads).

    Returns:
        The passes, together covering every adapter once.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose from {', '.join(MODES)}")
    names = list(models)
    if mode == "adapter" or len(names) == 1:
        return [Pass((name,), ALONE) for name in names]
    by_model: dict[int, list[str]] = {}
    for name in names:
        by_model.setdefault(id(models[name]), []).append(name)
    known = {} if known is None else known
    for name in names:
        if name not in known:
            known[name] = _gatherable(models[name], name)
    gatherable: list[str] = []
    passes = []
    for members in by_model.values():
        gatherable += [name for name in members if known[name]]
        rest = [name for name in members if not known[name]]
        if len(rest) > 1 and peft_mixes(models[rest[0]]):
            passes.append(Pass(tuple(rest), PEFT))
        else:
            passes += [Pass((name,), ALONE) for name in rest]
    # Rows with virtual tokens share a pass only with as many virtual tokens: the most common count joins
    # the rows without, each other count has its own pass.
    tokens = {name: _virtual_tokens(models[name], name) for name in gatherable}
    counts = Counter(n for n in tokens.values() if n)
    if mode == "one":
        joined = counts.most_common(1)[0][0] if counts else None
        parts = [[n for n in gatherable if tokens[n] in (0, joined)]]
        parts += [[n for n in gatherable if tokens[n] == count] for count in counts if count != joined]
    else:
        parts = [[n for n in gatherable if id(models[n]) == key and tokens[n] == count]
                 for key in by_model for count in dict.fromkeys(tokens[n] for n in by_model[key] if n in tokens)]
    parts = [part for part in parts if part]
    return [Pass(tuple(part), GATHERED if len(part) > 1 else ALONE) for part in parts] + passes


def forward(models: Mapping[str, Any], inputs: dict[str, Any], row_adapters: Sequence[str], how: str) -> Any:
    """The output for ``inputs``, row i computed with adapter ``row_adapters[i]`` (in ``models[row_adapters[i]]``).

    Call under ``torch.inference_mode()``; ``how`` is the row's :class:`Pass`'s.
    """
    names = list(row_adapters)
    model = models[names[0]]
    if how == GATHERED and len(set(names)) > 1:
        return _gathered_forward(models, inputs, names)
    # The active adapter is one of the batch's: a layer holding none of them then runs its base alone (peft
    # skips an active adapter a layer lacks), as each row's own single-adapter pass would.
    if model.active_adapter != names[0]:
        model.set_adapter(names[0])
    if how == PEFT and len(set(names)) > 1:
        return model(**inputs, adapter_names=names)
    return model(**inputs)


# -- what can be gathered

def _virtual_tokens(model: Any, name: str) -> int:
    config = model.peft_config[name]
    return int(config.num_virtual_tokens) if config.is_prompt_learning else 0


def _gatherable(model: Any, name: str) -> bool:
    config = model.peft_config[name]
    if config.is_prompt_learning:
        from peft.utils import PeftType

        # In inference mode peft's prompt is the prompt embedding itself (p-tuning saves its encoder's output
        # there). Prefix tuning feeds key/value caches instead; two submodules are encoder-decoder models.
        if not (config.peft_type in (PeftType.PROMPT_TUNING, PeftType.P_TUNING) and config.inference_mode
                and getattr(config, "num_transformer_submodules", 1) == 1):
            return False
    return _layers_reason(model, {name}) is None


def _layers_reason(model: Any, names: set[str]) -> str | None:
    """Why some module holding one of ``names`` cannot run gathered (None: every one can)."""
    from peft.tuners.ia3.layer import Linear as IA3Linear
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    for module_name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            if not names & set(module.modules_to_save):
                continue
        elif isinstance(module, AuxiliaryTrainingWrapper):  # trainable tokens and the like
            if names & module._get_available_adapters():
                return f"{module_name}: {type(module).__name__}"
            continue
        elif isinstance(module, BaseTunerLayer):
            if not _holds_any(module, names):
                continue
            # Exact types: quantised LoRA layers and other tuners are subclasses with forwards of their own.
            if type(module) not in (LoraLinear, IA3Linear):
                return f"{module_name}: {type(module).__name__}"
            if module.merged or names & set(getattr(module, "lora_variant", {})):
                return f"{module_name}: merged, or a LoRA variant (DoRA, ...)"
        else:
            continue
        if "forward" in module.__dict__:  # accelerate's hooks replace forward: leave such a model alone
            return f"{module_name}: its forward is already replaced"
    return None


def _holds_any(layer: Any, names: set[str]) -> bool:
    for attribute in getattr(layer, "adapter_layer_names", ()):
        holder = getattr(layer, attribute, None)
        if holder is not None and names & set(holder.keys()):
            return True
    return False


# -- the gathered pass

class _Rows:
    """Each row's slot among the adapters of a module that are present in the batch, as an index tensor."""

    def __init__(self, row_adapters: list[str], device: Any) -> None:
        self.names = row_adapters
        self.device = device
        self._cache: dict[tuple[str, ...], tuple[list[str], Any, bool]] = {}

    def slots(self, held: Any) -> tuple[list[str], Any, bool]:
        """The batch's adapters among ``held``, each row's slot (one past them, the last slot, for rows whose
        adapter is not held), and whether such rows exist."""
        import torch

        present = tuple(name for name in dict.fromkeys(self.names) if name in held)
        if present not in self._cache:
            position = {name: i for i, name in enumerate(present)}
            index = [position.get(name, len(present)) for name in self.names]
            self._cache[present] = (list(present), torch.tensor(index, device=self.device), len(present) in index)
        return self._cache[present]


def _gathered_forward(models: Mapping[str, Any], inputs: dict[str, Any], row_adapters: list[str]) -> Any:
    host = models[row_adapters[0]]
    tree = host.get_base_model()  # the skeleton with its peft layers: every tree shares the base tensors
    rows = _Rows(row_adapters, next(tree.parameters()).device)
    owners = {name: models[name].get_base_model() for name in dict.fromkeys(row_adapters)}
    with _patched(tree, owners, rows):
        # The host's active adapter is a row's: its layers holding no row's adapter then run their base alone.
        if host.active_adapter != row_adapters[0]:
            host.set_adapter(row_adapters[0])
        prompts = {name: _prompt(models[name], name) for name in owners if models[name].peft_config[name]
                   .is_prompt_learning}
        if not prompts:
            return tree(**inputs)
        return tree(**_with_virtual_tokens(tree, inputs, prompts, rows))


@contextlib.contextmanager
def _patched(tree: Any, owners: dict[str, Any], rows: _Rows) -> Iterator[None]:
    """Within: every module of ``tree`` that some row's adapter adapts (in that adapter's own tree) runs each row
    with its own adapter."""
    from peft.tuners.ia3.layer import Linear as IA3Linear
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    others = {id(t): t for t in owners.values()}
    replaced = []
    wrapped: list[str] = []  # paths of peft wrappers in the host: their insides are not the model's modules
    for path, module in tree.named_modules():
        if any(path.startswith(prefix + ".") for prefix in wrapped):
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            wrapped.append(path)
        lora: list[tuple[Any, str]] = []
        ia3: list[tuple[Any, str]] = []
        heads: dict[str, Any] = {}
        for other in others.values():
            there = other.get_submodule(path) if path else other
            if type(there) is LoraLinear:
                lora += [(there, name) for name in owners if owners[name] is other and name in there.lora_A]
            elif type(there) is IA3Linear:
                ia3 += [(there, name) for name in owners if owners[name] is other and name in there.ia3_l]
            elif isinstance(there, ModulesToSaveWrapper):
                heads.update({name: there.modules_to_save[name] for name in owners
                              if owners[name] is other and name in there.modules_to_save})
        if not (lora or ia3 or heads):
            continue
        if heads:
            original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            module.forward = functools.partial(_head_forward, original, heads, rows)
        else:
            base = module.base_layer if isinstance(module, BaseTunerLayer) else module
            module.forward = functools.partial(_layer_forward, base, lora, ia3, rows)
        replaced.append(module)
    try:
        yield
    finally:
        for module in replaced:
            module.__dict__.pop("forward", None)


def _as_rows(x: Any, batch: int) -> Any:
    """``x`` as (batch, tokens, features): a layer's input is (batch, ..., features)."""
    return x.reshape(batch, -1, x.shape[-1])


def _call_base(base: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    # The class's own forward: the instance's may be the one patched here (a host module peft did not wrap).
    return type(base).forward(base, x, *args, **kwargs)


def _layer_forward(base: Any, lora: list[tuple[Any, str]], ia3: list[tuple[Any, str]], rows: _Rows, x: Any,
                   *args: Any, **kwargs: Any) -> Any:
    """Each row's own adapter on a base layer: IA3 scaling of the input (feed-forward) or output, or a LoRA update
    (a row has one adapter: the others multiply it by exact ones and add exact zeros)."""
    import torch

    scale_in = [(layer, name) for layer, name in ia3 if layer.is_feedforward]
    scale_out = [(layer, name) for layer, name in ia3 if not layer.is_feedforward]
    layer_input = x
    if scale_in:
        vectors = _rows_of(rows, [layer.ia3_l[name].flatten() for layer, name in scale_in],
                           [name for _, name in scale_in], "ones")
        layer_input = (x.to(vectors.dtype) * vectors.view(_broadcast(x, vectors))).to(x.dtype)
    result = _call_base(base, layer_input, *args, **kwargs)
    if scale_out:
        vectors = _rows_of(rows, [layer.ia3_l[name].flatten() for layer, name in scale_out],
                           [name for _, name in scale_out], "ones")
        result = (result * vectors.view(_broadcast(result, vectors))).to(result.dtype)
    if lora:
        result = (result + _lora_delta(lora, rows, x).reshape(result.shape)).to(result.dtype)
    return result


def _broadcast(x: Any, rows: Any) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.dim() - 2) + (rows.shape[-1],)


def _rows_of(rows: _Rows, tensors: list[Any], names: list[str], fill: str) -> Any:
    """Row i's tensor (of ``tensors``, one per adapter of ``names``), or zeros/ones for a row whose adapter has
    none here: stacked, then gathered by row."""
    import torch

    present, index, absent = rows.slots(names)
    by_name = dict(zip(names, tensors))
    stack = [by_name[name] for name in present]
    if absent:
        stack.append(torch.ones_like(stack[0]) if fill == "ones" else torch.zeros_like(stack[0]))
    return torch.stack(stack).index_select(0, index)


def _lora_delta(lora: list[tuple[Any, str]], rows: _Rows, x: Any) -> Any:
    """``lora_B(lora_A(x)) * scaling`` with each row's own adapter (zeros for rows without one here)."""
    import torch
    from torch.nn.functional import pad

    names = [name for _, name in lora]
    rank = max(layer.lora_A[name].weight.shape[0] for layer, name in lora)
    # Zeros add exact zeros: a smaller rank is padded to the largest.
    a_weights = [pad(layer.lora_A[name].weight, (0, 0, 0, rank - layer.lora_A[name].weight.shape[0]))
                 for layer, name in lora]  # (rank, in) each
    b_weights = [pad(layer.lora_B[name].weight, (0, rank - layer.lora_B[name].weight.shape[1]))
                 for layer, name in lora]  # (out, rank) each
    a_rows = _rows_of(rows, a_weights, names, "zeros")  # (batch, rank, in)
    b_rows = _rows_of(rows, b_weights, names, "zeros")  # (batch, out, rank)
    # Dropout is the identity in eval mode; the input is cast to the adapter's dtype, as peft does.
    delta = torch.bmm(torch.bmm(_as_rows(x, x.shape[0]).to(a_rows.dtype), a_rows.transpose(1, 2)),
                      b_rows.transpose(1, 2))
    biases = [layer.lora_B[name].bias for layer, name in lora]  # lora_bias=True gives lora_B a bias
    if any(bias is not None for bias in biases):
        zero = b_rows.new_zeros(b_rows.shape[1])
        delta = delta + _rows_of(rows, [zero if b is None else b for b in biases], names, "zeros")[:, None, :]
    scaling = _rows_of(rows, [torch.tensor(float(layer.scaling[name]), dtype=delta.dtype, device=delta.device)
                              for layer, name in lora], names, "zeros")
    return delta * scaling[:, None, None]  # after B, as peft's lora_B(lora_A(x)) * scaling


def _head_forward(original: Any, heads: dict[str, Any], rows: _Rows, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Each row's own head copy (the original module for a row whose adapter has none)."""
    import torch

    present, index, absent = rows.slots(list(heads))
    modules = [heads[name] for name in present] + [original] * absent
    linear = (not args and not kwargs and all(type(m) is torch.nn.Linear for m in modules)
              and len({m.weight.shape for m in modules}) == 1 and len({m.bias is None for m in modules}) == 1)
    if not linear:  # a composite head (e.g. RoBERTa's dense + out_proj): once per adapter, on its rows
        return _head_per_adapter(original, heads, rows.names, x, *args, **kwargs)
    weights = torch.stack([m.weight for m in modules]).index_select(0, index)  # (batch, out, in)
    out = torch.bmm(_as_rows(x, x.shape[0]), weights.transpose(1, 2))
    if modules[0].bias is not None:
        out = out + torch.stack([m.bias for m in modules]).index_select(0, index)[:, None, :]
    return out.reshape(*x.shape[:-1], weights.shape[1])


def _head_per_adapter(original: Any, heads: dict[str, Any], row_adapters: list[str], x: Any, *args: Any,
                      **kwargs: Any) -> Any:
    import torch

    out = None
    for name in dict.fromkeys(row_adapters):
        rows = torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=x.device)
        part = heads.get(name, original)(x.index_select(0, rows), *args, **kwargs)
        if out is None:
            out = part.new_empty((len(row_adapters), *part.shape[1:]))
        out.index_copy_(0, rows, part)
    return out


def _prompt(model: Any, name: str) -> Any:
    """The virtual tokens' embeddings of prompt adapter ``name`` (num_virtual_tokens, hidden): in inference mode
    peft's ``get_prompt`` is this embedding, repeated over the batch."""
    return model.prompt_encoder[name].embedding.weight


def _with_virtual_tokens(tree: Any, inputs: dict[str, Any], prompts: dict[str, Any], rows: _Rows) -> dict[str, Any]:
    """The model's inputs with each prompt row's virtual tokens ahead of its text (as peft's forward puts them:
    inputs_embeds, attention mask and token type ids extended) and the other rows padded as long at the end."""
    import torch

    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    embeds = tree.get_input_embeddings()(input_ids)
    count = next(iter(prompts.values())).shape[0]
    batch = input_ids.shape[0]
    prompt_rows = _rows_of(rows, [p.to(embeds.dtype) for p in prompts.values()], list(prompts), "zeros")
    is_prompt = torch.tensor([name in prompts for name in rows.names], device=embeds.device)
    # A prompt row: [virtual tokens | text]; any other row: [text | padding], its positions unchanged.
    ahead = torch.cat([prompt_rows, embeds], dim=1)
    behind = torch.cat([embeds, embeds.new_zeros(batch, count, embeds.shape[-1])], dim=1)
    out = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask",
                                                                        "token_type_ids")}
    out["inputs_embeds"] = torch.where(is_prompt[:, None, None], ahead, behind)
    ones, zeros = mask.new_ones(batch, count), mask.new_zeros(batch, count)
    out["attention_mask"] = torch.where(is_prompt[:, None], torch.cat([ones, mask], 1), torch.cat([mask, zeros], 1))
    token_types = inputs.get("token_type_ids")
    if token_types is not None:
        pad_types = token_types.new_zeros(batch, count)
        out["token_type_ids"] = torch.where(is_prompt[:, None], torch.cat([pad_types, token_types], 1),
                                            torch.cat([token_types, pad_types], 1))
    return out
