"""Multiplicative methods: the adapted layer's weight is multiplied by a learned orthogonal matrix (OFT, BOFT, HRA).

An orthogonal factor keeps the angles between the pretrained weight's neurons, the property their papers argue
preserves pretrained knowledge; each is mergeable (the product is a new weight).
"""

from __future__ import annotations

from typing import Any

from peftlab.methods.space import TARGETS, Choice, LogFloat, Parameter

# In docs/benchmarks.md section 3, OFT, BOFT and HRA each chose the top of their first range (3e-5 to 3e-3). Second
# studies over 3e-4 to 3e-2: OFT chose 3.5e-3 again and diverged at 2.8e-2 (so 1e-4 to 1e-2); BOFT chose 2.1e-2;
# HRA chose 2.8e-2, at the top again (so up to 1e-1).
_LR = LogFloat("learning_rate", 1e-4, 1e-2, "Peak learning rate (log scale).")
_BOFT_LR = LogFloat("learning_rate", 3e-4, 3e-2, "Peak learning rate (log scale).")
_HRA_LR = LogFloat("learning_rate", 1e-3, 1e-1, "Peak learning rate (log scale).")

OFT_SEARCH_SPACE: tuple[Parameter, ...] = (
    _LR, Choice("block_size", (16, 32, 64), "Size of each orthogonal block (smaller: fewer parameters)."), TARGETS)
# No all-linear choice for BOFT and HRA: on MiniLM (batch 16 x 64 tokens, one thread) an all-linear step took 5-7x
# a LoRA attention-only step (BOFT 15.6 s, HRA 14.0 s against LoRA's 2.2 s on a loaded 2-core machine), where OFT's
# took 1.4x; a trial would cost the budget of several. target_modules: all-linear still works when set by hand.
BOFT_SEARCH_SPACE: tuple[Parameter, ...] = (
    _BOFT_LR, Choice("block_size", (4, 8, 16), "Size of each butterfly block (larger: more parameters)."),
    Choice("butterfly_factor", (1, 2), "Butterfly factors (2: blocks twice as wide, half as many)."))
HRA_SEARCH_SPACE: tuple[Parameter, ...] = (
    _HRA_LR, Choice("r", (8, 16, 32), "Householder reflections per layer."))


def build_oft(method_config: Any, context: Any) -> Any:
    """OFT: a block-diagonal orthogonal matrix (Cayley-parameterised) multiplies each adapted weight.

    Default learning rate 2.8e-3, tuned (docs/methods.md); block size 32 (peft's default), attention layers. The
    study started from 1e-4: peft's method comparison (method_comparison/MetaMathQA, oft/llama-3.2-3B-rank32, the
    default training parameters' 1e-4), which stayed near the majority-class floor here (validation macro F1 0.25).
    """
    from peft import OFTConfig

    # peft takes either r (the number of blocks) or the block size; r=0 means "derive it from the size".
    return OFTConfig(task_type=context.task_type, r=0, oft_block_size=method_config.block_size,
                     module_dropout=method_config.dropout, target_modules=method_config.target_modules)


def build_boft(method_config: Any, context: Any) -> Any:
    """BOFT: the orthogonal matrix is a product of butterfly factors (fewer parameters than OFT for one size).

    Default learning rate 2.1e-2, tuned (docs/methods.md: a second study, the first's best 2.2e-3 being at the top
    of its range); block size 4, one butterfly factor. The studies started from 1e-4: peft's method comparison
    (method_comparison/MetaMathQA, boft/llama-3.2-3B-default, lr 1e-4, block size 4, one butterfly factor), which
    stayed near the majority-class floor here (validation macro F1 0.25).
    """
    from peft import BOFTConfig

    return BOFTConfig(task_type=context.task_type, boft_block_size=method_config.block_size,
                      boft_n_butterfly_factor=method_config.butterfly_factor, boft_dropout=method_config.dropout,
                      target_modules=method_config.target_modules)


def build_hra(method_config: Any, context: Any) -> Any:
    """HRA: a chain of r Householder reflections multiplies each adapted weight.

    Default learning rate 2.8e-2, tuned (docs/methods.md: a second study, the first's best 2.9e-3 being at the top
    of its range; 2.8e-2 is at the top of the second's, so the search range now reaches 1e-1); r 8 (peft's default).
    The studies started from 1e-4: peft's method comparison (method_comparison/MetaMathQA, hra/llama-3.2-3B-rank32,
    the default training parameters' 1e-4), which stayed near the majority-class floor here (validation macro F1
    0.24).
    """
    from peft import HRAConfig

    return HRAConfig(task_type=context.task_type, r=method_config.r, apply_GS=method_config.apply_gs,
                     target_modules=method_config.target_modules)
