"""Build random PEFT adapters in peftlab's saved layout (adapter + tokenizer + peftlab.json), no training.

Shared by the export and serve tests (unit: tiny random BERT; integration: the shipped MiniLM).
Trainable weights are perturbed with a seed so that every adapter gives different predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS = ["negative", "neutral", "positive"]


def peft_config(method: str, task_type: str = "SEQ_CLS") -> Any:
    """A small peft config for ``method`` (peftlab's method names)."""
    import peft

    configs = {
        "lora": lambda: peft.LoraConfig(task_type=task_type, r=4, lora_alpha=8),
        "dora": lambda: peft.LoraConfig(task_type=task_type, r=4, lora_alpha=8, use_dora=True),
        "loha": lambda: peft.LoHaConfig(task_type=task_type, r=4, alpha=8, target_modules=["query", "value"]),
        "ia3": lambda: peft.IA3Config(task_type=task_type),
        "prompt_tuning": lambda: peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=4),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=4),
        "p_tuning": lambda: peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=4,
                                                     encoder_hidden_size=16),
    }
    return configs[method]()


def expected_predictions(adapters_dir: Path, names: Any, texts: list[str]) -> dict[str, dict[str, Any]]:
    """Each adapter's own labels and probabilities, from peftlab's predictor (base + that adapter alone)."""
    from peftlab.predict import load_predictor

    out = {}
    for name in names:
        predictor = load_predictor(adapters_dir / name)
        out[name] = {"labels": predictor.labels, "proba": predictor.predict_proba(texts)}
    return out


def make_adapter(base: Path, folder: Path, method: str, *, labels: list[str] | None = None, seed: int = 0,
                 scale: float = 0.3, max_length: int = 48) -> Path:
    """Save a random ``method`` adapter for sequence classification on ``base`` into ``folder``."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = labels or LABELS
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)})
    model = get_peft_model(model, peft_config(method))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # adapter weights and the head copy: make them differ per adapter
                parameter.add_(torch.randn_like(parameter) * scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(folder))
    meta = {"task": "classification", "method": method, "name": method, "labels": labels,
            "base_model": str(base), "max_length": max_length, "clean": "none", "is_adapter": True}
    (folder / "peftlab.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder


def make_full_model(base: Path, folder: Path, labels: list[str] | None = None) -> Path:
    """A full (FFT) classifier folder in peftlab's layout: the server must skip it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = labels or LABELS
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=len(labels))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(folder))
    meta = {"task": "classification", "method": "full", "labels": labels, "base_model": str(base),
            "max_length": 48, "clean": "none", "is_adapter": False}
    (folder / "peftlab.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer:
    """A real uvicorn server for ``app`` on 127.0.0.1 in a background thread; a context manager.

    ``config``: more ``uvicorn.Config`` settings (e.g. ``http=`` a protocol class).
    """

    def __init__(self, app: Any, ready_timeout: float = 300.0, **config: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    **config))
        self.ready_timeout = ready_timeout
        self._thread: Any = None

    def __enter__(self) -> "RunningServer":
        import threading
        import time

        import httpx

        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while True:  # /health is 503 while the base model loads, then 200
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.__exit__()
                raise RuntimeError(f"server on {self.url} did not become ready")
            time.sleep(0.1)

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
