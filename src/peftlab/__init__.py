"""peftlab: compare full fine-tuning with PEFT methods from one config.

Nothing heavy is imported here: ``import peftlab`` loads no model and no torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def load(model_dir: str, **kwargs: Any) -> Any:
    """Load a saved FFT model or adapter folder as a predictor with ``predict`` / ``predict_proba``.

    See :func:`peftlab.predict.load_predictor` for the options.
    """
    from peftlab.predict import load_predictor

    return load_predictor(model_dir, **kwargs)
