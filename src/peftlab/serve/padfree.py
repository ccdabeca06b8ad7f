"""Padding-free linear layers for one forward pass: each of the model's own ``nn.Linear`` layers multiplies only
the batch's real tokens.

A batch of texts of different lengths is padded to its longest, and a prompt-tuning row shares a pass with other
rows only if they are padded as long as its virtual tokens make it. On CPU a transformer's time is in its linear
layers, and they spend it on the padding too. A linear layer is token-wise: a real token's result does not depend
on the other positions. So, for the length of one pass, each of the model's own linear layers gathers the real
positions of its input (those the attention mask the model is called with marks), multiplies only them, and puts
the results back, with zeros at the padding. Attention, the only layer that mixes positions, masks the padding as
before; a real row's output is its padded pass's (every real position is computed from the same inputs).

This is the "remove padding" of BERT inference servers (ByteDance's Effective Transformer, ByteTransformer),
kept to the layers where the time goes here.

Only the model's own layers are made padding-free (a tuner layer's base layer included); an adapter's small
matrices (LoRA's A and B, ...) are not worth the gathering. The forwards are instance attributes for the length of
the pass (like :mod:`~peftlab.serve.mixed`'s), removed when it ends.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["Tokens", "padding_free"]


class Tokens:
    """The real positions of one pass's batch, set from the attention mask its model is called with."""

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None  # (batch, positions) of the mask; None: nothing to leave out
        self.real: Any = None  # flat indices of the real positions
        self.spread: Any = None  # flat position -> its row among the real ones (their count for a padded one)

    def set(self, mask: Any) -> None:
        """Take the real positions from a (batch, positions) attention mask of ones and zeros (of any dtype: peft's
        prompt learning makes it float); a mask of another shape, or none, turns this off."""
        import torch

        self.shape = None
        if mask is None or mask.dim() != 2:
            return
        flat = mask.reshape(-1) != 0
        real = flat.nonzero().squeeze(1)
        if real.numel() == flat.numel():
            return  # no padding: a plain pass
        self.shape = (int(mask.shape[0]), int(mask.shape[1]))
        self.real = real
        self.spread = torch.full(flat.shape, real.numel(), dtype=torch.long, device=real.device)
        self.spread[real] = torch.arange(real.numel(), device=real.device)

    def linear(self, x: Any, weight: Any, bias: Any) -> Any:
        """``torch.nn.functional.linear(x, weight, bias)``, computing only the real positions when ``x`` is laid out
        as the mask is (batch, positions, features). Called for every linear layer of a pass: kept lean."""
        import torch

        shape = self.shape
        if shape is None or x.dim() != 3 or x.shape[0] != shape[0] or x.shape[1] != shape[1]:
            return torch.nn.functional.linear(x, weight, bias)
        rows = x.reshape(-1, x.shape[2]).index_select(0, self.real)
        count, features = rows.shape[0], weight.shape[0]
        # The real rows' results and one row of zeros, spread back in one gather (3.5x faster than filling the
        # padding and copying the rows in, measured).
        if torch.is_grad_enabled():  # autograd cannot write into out=; the server's passes are inference
            y = torch.nn.functional.linear(rows, weight, bias)
            out = torch.cat([y, y.new_zeros(1, features)])
        else:
            out = rows.new_empty(count + 1, features)
            if bias is None:
                torch.mm(rows, weight.t(), out=out.narrow(0, 0, count))
            else:
                torch.addmm(bias, rows, weight.t(), out=out.narrow(0, 0, count))
            out.narrow(0, count, 1).zero_()
        return out.index_select(0, self.spread).view(shape[0], shape[1], features)


@contextmanager
def padding_free(tree: Any, cache: dict[Any, Any] | None = None, enabled: bool = True) -> Iterator[Tokens]:
    """For the length of a ``with`` block, run the model's own linear layers of ``tree`` (a transformers model,
    with or without peft's tuner layers in it) padding-free, taking the real positions from the 2-D
    ``attention_mask`` keyword it is called with (none, or any other mask: the pass runs as it would without this).

    ``cache``: the caller's memo of where a tree's linear layers are, emptied whenever the tree changes (an adapter
    loaded or unloaded). Yields the pass's :class:`Tokens` (for forwards of the caller's own that wrap a layer);
    ``enabled=False`` yields one that leaves every position in (and changes nothing).
    """
    tokens = Tokens()
    if not enabled:
        yield tokens
        return
    cache = {} if cache is None else cache
    key = ("linears", id(tree))
    if key not in cache:
        cache[key] = [_Forward(module) for module in _own_linears(tree)]
    forwards = cache[key]

    def take_mask(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        tokens.set(kwargs.get("attention_mask"))

    hook = tree.register_forward_pre_hook(take_mask, with_kwargs=True)
    replaced = []
    try:
        for forward in forwards:
            state = forward.module.__dict__
            if "forward" not in state:  # a forward of someone else's (a hook, a mixed pass's): leave it
                forward.tokens = tokens
                state["forward"] = forward  # what nn.Module.__setattr__ does for a plain value, without its checks
                replaced.append(state)
        yield tokens
    finally:
        hook.remove()
        for state in replaced:
            state.pop("forward", None)


class _Forward:
    """A linear layer's forward in a pass (a small class, not a closure: it shows what it is in a traceback). Made
    once per layer and kept in the caller's cache with the layer's weight and bias; each pass sets its tokens."""

    __slots__ = ("module", "weight", "bias", "tokens")

    def __init__(self, module: Any) -> None:
        self.module = module
        self.weight = module.weight
        self.bias = module.bias
        self.tokens = Tokens()

    def __call__(self, x: Any) -> Any:
        return self.tokens.linear(x, self.weight, self.bias)


def _own_linears(tree: Any) -> list[Any]:
    """The model's own ``nn.Linear`` layers in ``tree``: plain ones, and the base layers of peft's tuner layers;
    not an adapter's own (LoRA's A and B, a head's trainable copy, ...)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    found = []
    inside: tuple[str, ...] = ()  # peft wrappers met so far: what is inside them is the adapters' own
    for path, module in tree.named_modules():
        if path and path.startswith(inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside += (path + ".",)
            base = module.get_base_layer()
            if type(base) is torch.nn.Linear:
                found.append(base)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            inside += (path + ".",)
        elif type(module) is torch.nn.Linear:
            found.append(module)
    return found
