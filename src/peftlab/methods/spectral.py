"""Few-parameter structured updates: VeRA (shared random projections), FourierFT (spectral), C3A (circulant).

Each trains far fewer values per layer than LoRA at the same targets, and each is mergeable (the update is an
ordinary dense matrix once computed).
"""

from __future__ import annotations

from typing import Any

from peftlab.methods.space import TARGETS, Choice, LogFloat, Parameter

# Upper end raised 3x: docs/benchmarks.md section 3's study chose 4.8e-2, at the top of the former range (2e-3 to 5e-2).
VERA_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 2e-3, 1.5e-1, "Peak learning rate (log scale)."),
    Choice("r", (64, 128, 256), "Rank of the shared frozen projections."), TARGETS)
# Upper end raised 3x: docs/benchmarks.md section 3's study chose 8.4e-2, at the top of the former range (5e-3 to 1e-1).
FOURIERFT_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 5e-3, 3e-1, "Peak learning rate (log scale)."),
    Choice("n_frequency", (500, 1000, 2000), "Learned frequencies per layer."),
    Choice("scaling", (100.0, 150.0, 300.0), "Scale of the update."))
C3A_SEARCH_SPACE: tuple[Parameter, ...] = (
    LogFloat("learning_rate", 1e-2, 3e-1, "Peak learning rate (log scale)."),
    Choice("block_size", (32, 64), "Circulant block size (smaller: more parameters)."))


def build_vera(method_config: Any, context: Any) -> Any:
    """VeRA: frozen random matrices shared across layers, scaled by two learned vectors per layer.

    Default learning rate 4.8e-2 and r 128, tuned (docs/methods.md). The study started from 1e-2 and r 256: peft's
    examples/sequence_classification/VeRA.ipynb (RoBERTa-base, MRPC) trains the VeRA vectors at 2e-2 and the
    classifier head at 1e-2; peftlab has one learning rate for both and takes the head's. (peft's MetaMathQA run,
    vera/llama-3.2-3B-default, used 1e-3.) d_initial 0.1: peft's default.
    """
    from peft import VeraConfig

    return VeraConfig(task_type=context.task_type, r=method_config.r, d_initial=method_config.d_initial,
                      vera_dropout=method_config.dropout, target_modules=method_config.target_modules)


def build_fourierft(method_config: Any, context: Any) -> Any:
    """FourierFT: n learned spectral coefficients per layer at fixed random frequencies.

    Default learning rate 8.4e-2 and scaling 100, tuned (docs/methods.md); n_frequency 1000. The study started from
    6e-2 and scaling 150: peft's examples/sequence_classification/FourierFT.ipynb (RoBERTa-base, MRPC, n_frequency
    1000, scaling 150) trains the coefficients at 6e-2 (the head at 6e-3; peftlab has one learning rate). peft's
    MetaMathQA run at the default 1e-4 scored 0% (fourierft/llama-3.2-3B-default).
    """
    from peft import FourierFTConfig

    return FourierFTConfig(task_type=context.task_type, n_frequency=method_config.n_frequency,
                           scaling=method_config.scaling, target_modules=method_config.target_modules)


def build_c3a(method_config: Any, context: Any) -> Any:
    """C3A: a block-circulant update applied as a circular convolution.

    Default learning rate 1.1e-1 and block size 64, tuned (docs/methods.md). The study started from 1e-1: peft's
    method comparison (method_comparison/MetaMathQA, c3a/llama-3.2-3B-default: lr 3e-1, block size 64) and
    examples/sequence_classification/C3A.ipynb (RoBERTa-base: C3A at 3e-1, the head at 4e-6). peftlab has one
    learning rate for the adapter and the head, so a third of the adapter's.
    """
    from peft import C3AConfig

    return C3AConfig(task_type=context.task_type, block_size=method_config.block_size,
                     target_modules=method_config.target_modules)
