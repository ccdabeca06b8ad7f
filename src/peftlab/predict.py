"""Load a saved FFT model or a PEFT adapter (on its base) and predict labels with probabilities.

The users' vocabulary (setfit's): ``predict(texts) -> labels`` and
``predict_proba(texts) -> (n, classes) array``. Texts are batched by length so
padding stays small, and the original order is restored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from peftlab.artifacts import (
    METADATA_FILE,
    adapter_base_folder,
    attach_adapter,
    find_model_dir,
    read_metadata,
    tokenizer_folder,
)
from peftlab.errors import AdapterError

logger = logging.getLogger(__name__)

@dataclass
class Predictor:
    """A loaded classifier: tokenizer, model and class names."""

    model: Any
    tokenizer: Any
    labels: list[str]
    max_length: int = 512
    clean: str = "none"
    metadata: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def predict_proba(self, texts: Iterable[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Class probabilities, shape (len(texts), len(labels)), rows in input order."""
        import torch

        from peftlab.data import clean_text
        from peftlab.evaluate import softmax

        items = [clean_text(str(t), self.clean) for t in texts]
        if not items:
            return np.zeros((0, len(self.labels)))
        size = batch_size or self.batch_size
        # Longest first: similar lengths share a batch (less padding), and memory peaks early.
        order = sorted(range(len(items)), key=lambda i: -len(items[i]))
        out = np.zeros((len(items), len(self.labels)))
        batches = range(0, len(order), size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="predict", unit="batch")
        with torch.inference_mode():
            for start in batches:
                index = order[start:start + size]
                encoded = self.tokenizer([items[i] for i in index], padding=True, truncation=True,
                                         max_length=self.max_length, return_tensors="pt").to(self.device)
                logits = self.model(**encoded).logits
                out[index] = softmax(logits.float().cpu().numpy())  # fp32 before numpy: bf16 has no numpy dtype
        return out

    def predict(self, texts: Iterable[str], batch_size: int | None = None) -> list[str]:
        """The most probable class name of each text."""
        proba = self.predict_proba(texts, batch_size)
        return [self.labels[i] for i in proba.argmax(axis=-1)]

    def predict_detailed(self, texts: list[str], batch_size: int | None = None,
                         progress: bool = False) -> list[dict[str, Any]]:
        """Label, its probability and every class's probability, per text."""
        proba = self.predict_proba(texts, batch_size, progress)
        return [{"text": text, "label": self.labels[int(row.argmax())], "score": float(row.max()),
                 "probabilities": {name: float(p) for name, p in zip(self.labels, row)}}
                for text, row in zip(texts, proba)]


def load_predictor(model_dir: str | Path, *, base_model: str | None = None, dtype: str = "auto",
                   device: str | None = None, batch_size: int = 32, allow_pickle: bool = False) -> Predictor:
    """Load an FFT folder or an adapter (on its base model) for classification.

    Args:
        model_dir: RUN_DIR/method, its ``model`` folder, or any saved model/adapter folder.
        base_model: base model for an adapter (alias or folder); default: the one it was trained on.
        dtype: auto (bf16 on GPUs that support it, else fp32), float32, bfloat16 or float16.
        device: torch device; default CUDA when available.
        batch_size: texts per forward pass.
        allow_pickle: allow pickle weights in a user-supplied base folder.
    """
    import torch

    from peftlab.cpu import configure_threads
    from peftlab.models import load_tokenizer, resolve_dtype

    configure_threads()
    folder = find_model_dir(model_dir)
    meta = read_metadata(folder)
    if meta.get("task") == "causal-lm":
        raise AdapterError(f"{folder} is a causal LM; use `peftlab generate` instead of predict")
    torch_dtype = resolve_dtype(dtype)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trust = bool(meta.get("trust_remote_code", False))
    base_folder = adapter_base_folder(folder, meta, base_model) if meta.get("is_adapter") else folder
    tokenizer = load_tokenizer(tokenizer_folder(folder, base_folder), trust)
    model, labels = load_classifier(folder, meta, base_folder, torch_dtype, trust, allow_pickle,
                                    pad_token_id=tokenizer.pad_token_id)
    model.to(target).eval()
    return Predictor(model=model, tokenizer=tokenizer, labels=labels, max_length=int(meta.get("max_length", 512)),
                     clean=meta.get("clean", "none"), metadata=meta, batch_size=batch_size)


def load_classifier(folder: Path, meta: dict[str, Any], base_folder: Path, dtype: Any, trust: bool,
                    allow_pickle: bool = False, pad_token_id: int | None = None) -> tuple[Any, list[str]]:
    """Model (FFT, or base + adapter via ``PeftModel.from_pretrained``) and its class names."""
    from transformers import AutoModelForSequenceClassification

    from peftlab.models import check_model_folder, load_base_model

    if not meta.get("is_adapter"):
        check_model_folder(folder, trust, allow_pickle)
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust)
        labels = meta.get("labels") or [model.config.id2label[i] for i in range(model.config.num_labels)]
        return model, list(labels)

    labels = meta.get("labels")
    if not labels:
        raise AdapterError(f"{folder}: no class names recorded ({METADATA_FILE} missing); it was not saved by peftlab")
    base = load_base_model(base_folder, "classification", list(labels), dtype=dtype, trust_remote_code=trust,
                           allow_pickle=allow_pickle, pad_token_id=pad_token_id)
    return attach_adapter(base, folder, base_folder), list(labels)
