"""One forward pass for rows of different adapters -- of LoRA, IA3 and prompt tuning, of one or several PeftModels.

peft's own mixed batches (``adapter_names``) run each LoRA layer and head once per adapter present, on that
adapter's rows, so a mix of 16 adapters costs 16 small passes through every adapted layer; IA3 and prompt
tuning accept the argument and ignore it (every row would get the active adapter), and adapters of different
methods cannot live in one PeftModel at all. The server's PeftModels (one per method and head size) are
skeletons over the same base tensors, so one of them can run every row: for the length of one pass, each of its
modules that some row's adapter adapts (in whichever PeftModel that adapter lives) gets a forward that applies,
to each row, that row's own adapter, gathered (``index_select``) from a stack of the adapters held there into
batched matmuls (``torch.bmm``), as S-LoRA / Punica's BGMV do on GPUs. The stacks are built on a layer's first
mixed pass and kept until an adapter is loaded or unloaded: a copy of the adapters' small tensors, so that a pass
gathers rows instead of stacking adapters in every layer (stacking per pass made the LoRA part of an 8-row,
8-adapter pass 2.4x slower, profiled):

- LoRA (``lora.Linear``, no variant such as DoRA): ``base(x) + B_row(A_row(x)) * scaling_row``, ranks padded
  with zeros to the largest, zeros for rows whose adapter does not adapt the layer;
- IA3 (``ia3.Linear``): each row's scaling vector, on the layer's input (feed-forward) or output;
- heads (``modules_to_save`` copies, e.g. the classifier): ``nn.Linear`` copies gathered the same way; other
  heads run once per adapter on its rows;
- prompt tuning (and p-tuning, whose saved prompt is its encoder's output): each row's own virtual tokens ahead
  of its text, as peft puts them; rows of the other methods are padded at the end instead, up to the longest
  row (masked positions change nothing, and their positions stay those of their own pass).

Every pass, gathered or not, runs the model's own linear layers on the real tokens only
(:mod:`~peftlab.serve.padfree`), so the positions prompt rows add to the others cost little: one pass for every
gatherable row (``mixing="one"``) was measured faster than prompt rows apart at the load test's batches.

A row's result therefore equals its own single-adapter pass (to float rounding). peft's module trees and loaded
weights are untouched: the forwards are instance attributes, removed when the pass ends. What cannot be gathered
(DoRA, LoHa, prefix tuning, quantised layers, ...) is left to :func:`plan`'s other answers: peft's
``adapter_names`` where the caller says peft mixes the method, else one pass per adapter.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from peftlab.serve.padfree import Tokens, padding_free

__all__ = ["ALONE", "DEFAULT_MODE", "GATHERED", "MODES", "PEFT", "Pass", "forward", "plan"]

GATHERED = "gathered"  # this module's batched forwards: one pass for every row
PEFT = "peft"  # peft's adapter_names: one pass, each layer looping over the adapters present
ALONE = "alone"  # set_adapter and a plain pass: the rows of one adapter

# How far gathering reaches: "one" pass for every gatherable row; one per number of virtual "tokens" (rows of
# prompt adapters apart from the others, whose pass they would lengthen); one per "method" (PeftModel, and number
# of virtual tokens); one per "adapter" (no gathering: the baseline it is measured against).
MODES = ("one", "tokens", "method", "adapter")
DEFAULT_MODE = "one"  # the measured fastest at the load test's batches (docs/benchmarks.md, section 4)


@dataclass(frozen=True)
class Pass:
    """Adapters (peft names) whose rows share one forward pass, and how it runs (GATHERED, PEFT or ALONE)."""

    adapters: tuple[str, ...]
    how: str


def plan(models: Mapping[str, Any], peft_mixes: Callable[[Any], bool] = lambda model: False,
         mode: str = DEFAULT_MODE, cache: dict[Any, Any] | None = None) -> list[Pass]:
    """How the rows of some adapters share forward passes.

    Args:
        models: each adapter's peft name -> the PeftModel holding it; all over the same base, for one task and
            one head shape (classification with as many classes).
        peft_mixes: whether peft's own ``adapter_names`` is right for a PeftModel's adapters (the fallback for
            adapters this module cannot gather).
        mode: one of :data:`MODES`.
        cache: the caller's memo for :func:`plan` and :func:`forward` (which adapters can be gathered, where their
            layers are); the caller empties it whenever an adapter is loaded or unloaded.

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
    cache = {} if cache is None else cache
    for name in names:
        if ("gatherable", name) not in cache:
            cache["gatherable", name] = _gatherable(models[name], name)
    known = {name: cache["gatherable", name] for name in names}
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
    if mode == "one" and not all(_pools_first_token(models[n]) for n in gatherable):
        mode = "tokens"  # a decoder's classifier reads its last text token through input_ids: prompts apart
    if mode == "one":
        joined = counts.most_common(1)[0][0] if counts else None
        parts = [[n for n in gatherable if tokens[n] in (0, joined)]]
        parts += [[n for n in gatherable if tokens[n] == count] for count in counts if count != joined]
    elif mode == "tokens":
        parts = [[n for n in gatherable if tokens[n] == count] for count in dict.fromkeys(tokens.values())]
    else:
        parts = [[n for n in gatherable if id(models[n]) == key and tokens[n] == count]
                 for key in by_model for count in dict.fromkeys(tokens[n] for n in by_model[key] if n in tokens)]
    parts = [part for part in parts if part]
    return [Pass(tuple(part), GATHERED if len(part) > 1 else ALONE) for part in parts] + passes


def forward(models: Mapping[str, Any], inputs: dict[str, Any], row_adapters: Sequence[str], how: str,
            cache: dict[Any, Any] | None = None, skip_padding: bool = True) -> Any:
    """The output for ``inputs``, row i computed with adapter ``row_adapters[i]`` (in ``models[row_adapters[i]]``).

    Call under ``torch.inference_mode()``; ``how`` is the rows' :class:`Pass`'s; ``cache`` as :func:`plan`'s.
    ``skip_padding``: the model's own linear layers compute the real tokens only (:mod:`~peftlab.serve.padfree`;
    False: every position, to measure what that is worth).
    """
    names = list(row_adapters)
    model = models[names[0]]
    cache = {} if cache is None else cache
    with padding_free(model.get_base_model(), cache, enabled=skip_padding) as tokens:
        if how == GATHERED and len(set(names)) > 1:
            return _gathered_forward(models, inputs, names, cache, tokens)
        # The active adapter is one of the batch's: a layer holding none of them then runs its base alone (peft
        # skips an active adapter a layer lacks), as each row's own single-adapter pass would.
        if model.active_adapter != names[0]:
            model.set_adapter(names[0])
        if how == PEFT and len(set(names)) > 1:
            return model(**inputs, adapter_names=names)
        return model(**inputs)


# -- what can be gathered

def _pools_first_token(model: Any) -> bool:
    """Whether the classifier reads the first position (encoders: BERT, RoBERTa, ... ``classifier``), so that rows
    padded at the end beside prompt rows are unchanged. Decoders' classifiers (``score``: Llama, GPT-2, ...) find
    each row's last text token from ``input_ids``, which a pass with virtual tokens cannot give them."""
    tree = model.get_base_model()
    return hasattr(tree, "classifier") and not hasattr(tree, "score")


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

class _Stack:
    """Every adapter's tensors at one site, stacked once, with a last slot for rows whose adapter has none there
    (zeros for LoRA, ones for IA3, the original module's weights for a head): a pass only gathers each row's
    slot (``index_select``). Built on a site's first gathered pass; the caller's cache, emptied whenever an
    adapter is loaded or unloaded, holds them (one copy of the adapters' small tensors)."""

    def __init__(self, names: tuple[str, ...], tensors: dict[str, Any]) -> None:
        self.names = names
        self.slot = {name: i for i, name in enumerate(names)}
        self.tensors = tensors


class _Rows:
    """The adapter of each row of one pass, and each row's slot in a :class:`_Stack` (an index tensor, made once
    per pass for every stack of the same adapters)."""

    def __init__(self, row_adapters: list[str], device: Any, tokens: Tokens) -> None:
        self.names = row_adapters
        self.device = device
        self.tokens = tokens  # the pass's real positions: base linear layers run on them only
        self.present = set(row_adapters)
        self._index: dict[tuple[str, ...], Any] = {}

    def any_in(self, stack: _Stack | None) -> bool:
        return stack is not None and not self.present.isdisjoint(stack.slot)

    def gather(self, stack: _Stack, key: str) -> Any:
        """Row i's ``key`` tensor in ``stack``: shape (batch, *the tensor's)."""
        import torch

        if stack.names not in self._index:
            fill = len(stack.names)
            self._index[stack.names] = torch.tensor([stack.slot.get(name, fill) for name in self.names],
                                                    device=self.device)
        return stack.tensors[key].index_select(0, self._index[stack.names])


def _gathered_forward(models: Mapping[str, Any], inputs: dict[str, Any], row_adapters: list[str],
                     cache: dict[Any, Any], tokens: Tokens) -> Any:
    host = models[row_adapters[0]]
    tree = host.get_base_model()  # the skeleton with its peft layers: every tree shares the base tensors
    peft_models = {id(m): m for m in models.values()}
    key = ("layout", id(host), tuple(sorted((id(m), tuple(m.peft_config)) for m in peft_models.values())))
    if key not in cache:
        cache[key] = _layout(tree, [m.get_base_model() for m in peft_models.values()])
    rows = _Rows(row_adapters, next(tree.parameters()).device, tokens)
    replaced = []
    try:
        # Every site is replaced, those where no row's adapter is run their base alone: the host's active adapter
        # then never matters (set_adapter walks every layer and adapter: its cost grows with the adapters held).
        for site in cache[key].sites:
            site.module.forward = functools.partial(_site_forward, site, rows)
            replaced.append(site.module)
        if cache[key].others and host.active_adapter != row_adapters[0]:
            # Layers of other kinds (an embedding's LoRA, ...) run peft's forward: a row's adapter is the active
            # one, so they run their base alone unless it is theirs (it is not: the row is in a gathered pass).
            host.set_adapter(row_adapters[0])
        prompts = {name: _prompt(models[name], name) for name in dict.fromkeys(row_adapters)
                   if models[name].peft_config[name].is_prompt_learning}
        if not prompts:
            return tree(**inputs)
        return tree(**_with_virtual_tokens(tree, inputs, prompts, rows))
    finally:
        for module in replaced:
            module.__dict__.pop("forward", None)


@dataclass
class _Site:
    """A module of the host tree that adapters adapt, and what each adapter has there (in its own tree)."""

    module: Any  # the host's module whose forward is replaced for a pass
    base: Any  # what computes its base output: the host's base layer (or original head, or the module itself)
    lora: dict[str, Any] = field(default_factory=dict)  # adapter -> its lora.Linear at this path
    ia3: dict[str, Any] = field(default_factory=dict)  # adapter -> its ia3.Linear at this path
    heads: dict[str, Any] = field(default_factory=dict)  # adapter -> its head copy (modules_to_save) here
    stacks: dict[str, _Stack | None] = field(default_factory=dict)  # built on first use: see stack()

    def stack(self, kind: str) -> _Stack | None:
        """This site's stack of ``kind`` ("lora", "ia3_in", "ia3_out" or "head"); None where no adapter has one
        (or, for "head", where the heads are not plain ``nn.Linear`` of one shape)."""
        if kind not in self.stacks:
            self.stacks[kind] = _build_stack(self, kind)
        return self.stacks[kind]


def _build_stack(site: _Site, kind: str) -> _Stack | None:
    import torch
    from torch.nn.functional import pad

    if kind == "lora":
        if not site.lora:
            return None
        names = tuple(site.lora)
        a = [site.lora[n].lora_A[n].weight for n in names]  # (rank, in) each
        b = [site.lora[n].lora_B[n].weight for n in names]  # (out, rank) each
        rank = max(w.shape[0] for w in a)  # zeros add exact zeros: every rank padded to the largest
        a = [pad(w, (0, 0, 0, rank - w.shape[0])) for w in a]
        b = [pad(w, (0, rank - w.shape[1])) for w in b]
        # B and its bias are kept multiplied by the adapter's scaling: B(A(x)) * s = (s B)(A(x)), one product less
        # in every pass (to float rounding).
        scaling = [float(site.lora[n].scaling[n]) for n in names]
        b = [w * s for w, s in zip(b, scaling)]
        tensors = {"a": torch.stack([*a, torch.zeros_like(a[0])]), "b": torch.stack([*b, torch.zeros_like(b[0])])}
        biases = [site.lora[n].lora_B[n].bias for n in names]  # lora_bias=True: lora_B has a bias
        if any(bias is not None for bias in biases):
            zero = b[0].new_zeros(b[0].shape[0])
            tensors["bias"] = torch.stack([zero if bias is None else bias * s for bias, s in zip(biases, scaling)]
                                          + [zero])
        return _Stack(names, tensors)
    if kind in ("ia3_in", "ia3_out"):
        layers = {n: layer for n, layer in site.ia3.items() if layer.is_feedforward == (kind == "ia3_in")}
        if not layers:
            return None
        vectors = [layer.ia3_l[n].flatten() for n, layer in layers.items()]
        return _Stack(tuple(layers), {"v": torch.stack([*vectors, torch.ones_like(vectors[0])])})
    modules = [*site.heads.values(), site.base]
    if not (all(type(m) is torch.nn.Linear for m in modules) and len({m.weight.shape for m in modules}) == 1
            and len({m.bias is None for m in modules}) == 1):
        return None  # a composite head (e.g. RoBERTa's dense + out_proj): run once per adapter, on its rows
    tensors = {"w": torch.stack([m.weight for m in modules])}
    if modules[0].bias is not None:
        tensors["bias"] = torch.stack([m.bias for m in modules])
    return _Stack(tuple(site.heads), tensors)


@dataclass
class _Layout:
    sites: list[_Site]
    others: bool  # the host has peft layers that are no site (their forward follows the active adapter)


def _layout(tree: Any, trees: list[Any]) -> _Layout:
    """Every module of ``tree`` (the host) that an adapter of ``trees`` adapts, found by module path: peft wraps a
    module in place, so the same path names the same base module in every tree."""
    from peft.tuners.ia3.layer import Linear as IA3Linear
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    sites, others = [], False
    wrapped: tuple[str, ...] = ()  # peft wrappers in the host: what is inside them is not the model's own module
    for path, module in tree.named_modules():
        if not path or path.startswith(wrapped):
            continue
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            wrapped += (path + ".",)
        if isinstance(module, ModulesToSaveWrapper):
            site = _Site(module, module.original_module)
        else:
            site = _Site(module, module.base_layer if isinstance(module, BaseTunerLayer) else module)
        for other in trees:
            there = other.get_submodule(path)
            if type(there) is LoraLinear:
                site.lora.update({name: there for name in there.lora_A})
            elif type(there) is IA3Linear:
                site.ia3.update({name: there for name in there.ia3_l})
            elif isinstance(there, ModulesToSaveWrapper):
                site.heads.update(there.modules_to_save)
        if site.lora or site.ia3 or site.heads:
            sites.append(site)
        elif isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            others = True
    return _Layout(sites, others)


def _as_rows(x: Any, batch: int) -> Any:
    """``x`` as (batch, tokens, features): a layer's input is (batch, ..., features)."""
    return x.reshape(batch, -1, x.shape[-1])


def _call_base(rows: _Rows, base: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch

    if type(base) is torch.nn.Linear and not (args or kwargs):
        return rows.tokens.linear(x, base.weight, base.bias)  # padding-free, as the model's other linear layers
    # The class's own forward: the instance's may be the one patched here (a host module peft did not wrap).
    return type(base).forward(base, x, *args, **kwargs)


def _site_forward(site: _Site, rows: _Rows, x: Any, *args: Any, **kwargs: Any) -> Any:
    if site.heads and (not rows.present.isdisjoint(site.heads) or not (site.lora or site.ia3)):
        return _head_forward(site, rows, x, *args, **kwargs)
    return _layer_forward(site, rows, x, *args, **kwargs)


def _layer_forward(site: _Site, rows: _Rows, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Each row's own adapter on a base layer: IA3 scaling of the input (feed-forward) or output, or a LoRA update
    (a row has one adapter: the others multiply it by exact ones and add exact zeros)."""
    lora, scale_in, scale_out = (s if rows.any_in(s) else None for s in map(site.stack, ("lora", "ia3_in", "ia3_out")))
    layer_input = x
    if scale_in:
        vectors = rows.gather(scale_in, "v")
        layer_input = (x.to(vectors.dtype) * vectors.view(_broadcast(x, vectors))).to(x.dtype)
    result = _call_base(rows, site.base, layer_input, *args, **kwargs)
    if scale_out:
        vectors = rows.gather(scale_out, "v")
        result = (result * vectors.view(_broadcast(result, vectors))).to(result.dtype)
    if lora:
        result = _add_lora(lora, rows, x, result)
    return result


def _broadcast(x: Any, rows: Any) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.dim() - 2) + (rows.shape[-1],)


def _add_lora(lora: _Stack, rows: _Rows, x: Any, result: Any) -> Any:
    """``result + lora_B(lora_A(x)) * scaling`` with each row's own adapter (zeros for rows without one here)."""
    import torch

    a_rows = rows.gather(lora, "a")  # (batch, rank, in)
    b_rows = rows.gather(lora, "b")  # (batch, out, rank), times the scaling
    # Dropout is the identity in eval mode; the input is cast to the adapter's dtype, as peft does.
    hidden = torch.bmm(_as_rows(x, x.shape[0]).to(a_rows.dtype), a_rows.transpose(1, 2))
    base = _as_rows(result, result.shape[0])
    if base.dtype == b_rows.dtype:  # the sum in one batched product: result + hidden B^T
        out = torch.baddbmm(base, hidden, b_rows.transpose(1, 2))
    else:
        out = base + torch.bmm(hidden, b_rows.transpose(1, 2))
    if "bias" in lora.tensors:
        out = out + rows.gather(lora, "bias")[:, None, :]
    return out.reshape(result.shape).to(result.dtype)


def _head_forward(site: _Site, rows: _Rows, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Each row's own head copy (the original module for a row whose adapter has none)."""
    import torch

    if rows.present.isdisjoint(site.heads):
        return _call_base(rows, site.base, x, *args, **kwargs)
    heads = site.stack("head")
    if heads is None or args or kwargs:
        return _head_per_adapter(site.base, site.heads, rows.names, x, *args, **kwargs)
    weights = rows.gather(heads, "w")  # (batch, out, in)
    out = torch.bmm(_as_rows(x, x.shape[0]), weights.transpose(1, 2))
    if "bias" in heads.tensors:
        out = out + rows.gather(heads, "bias")[:, None, :]
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
    inputs_embeds, attention mask and token type ids extended) and the other rows padded at the end, to the longest
    row's length (a prompt row with a short text may fit in a longer text's padding)."""
    import torch

    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    embeds = tree.get_input_embeddings()(input_ids)
    count = next(iter(prompts.values())).shape[0]
    batch = input_ids.shape[0]
    vectors = [p.to(embeds.dtype) for p in prompts.values()]
    prompt_rows = rows.gather(_Stack(tuple(prompts), {"p": torch.stack([*vectors, torch.zeros_like(vectors[0])])}), "p")
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
    # As long as the longest row, virtual tokens counted: columns of padding alone are left out.
    width = int(out["attention_mask"].any(0).nonzero().max()) + 1
    if width < out["attention_mask"].shape[1]:
        for key in ("inputs_embeds", "attention_mask", "token_type_ids"):
            if key in out:
                out[key] = out[key][:, :width]
    return out
