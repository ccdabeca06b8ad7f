"""Generation off the classify path: a long /v1/generate does not hold up /v1/classify (tiny Llama, offline)."""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import make_adapter

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from peftlab.serve.app import ServeLimits, create_app  # noqa: E402

REQUESTS = 24  # classify requests timed alone, and again during the generation


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama base (tied embeddings: its classifier and causal-LM skeletons share every weight), one
    causal-LM LoRA adapter and two classifier LoRA adapters on it."""
    import torch
    from conftest import WORDS, make_tokenizer
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    base = root / "base"
    base.mkdir()
    make_tokenizer(base)  # no EOS token: every generation runs its max_new_tokens
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS) + 31, hidden_size=32, intermediate_size=37,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=256, pad_token_id=0, tie_word_embeddings=True)
                     ).save_pretrained(str(base))
    adapters = root / "adapters"
    model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base)), LoraConfig(task_type="CAUSAL_LM", r=4))
    model.save_pretrained(str(adapters / "writer"))
    (adapters / "writer" / "peftlab.json").write_text(json.dumps(
        {"task": "causal-lm", "method": "lora", "base_model": str(base), "max_length": 32, "is_adapter": True}))
    for seed, name in enumerate(("cls-a", "cls-b")):
        make_adapter(base, adapters / name, "lora", seed=seed)
    return base, adapters


def classify_latencies(client: TestClient, count: int, keep_going: Any = lambda: True, threads: int = 2) -> list[float]:
    """Latencies (s) of ``count`` mixed two-adapter classify requests from ``threads`` clients."""
    latencies: list[float] = []
    lock = threading.Lock()
    body = {"items": [{"adapter": "cls-a", "text": "the movie was great"},
                      {"adapter": "cls-b", "text": "awful plot and dull acting"}]}

    def client_loop() -> None:
        while keep_going():
            with lock:
                if len(latencies) >= count:
                    return
            started = time.perf_counter()
            response = client.post("/v1/classify", json=body)
            assert response.status_code == 200, response.text
            with lock:
                latencies.append(time.perf_counter() - started)

    workers = [threading.Thread(target=client_loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return latencies


def generate(client: TestClient, prompts: int, tokens: int) -> Any:
    return client.post("/v1/generate", json={"adapter": "writer", "prompts": ["the movie was"] * prompts,
                                             "max_new_tokens": tokens})


def p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


@pytest.fixture
def one_thread() -> Any:
    """torch on one thread for the test: it measures who waits for whom, and on the busy shared 2-core machine two
    intra-op threads made each of the tiny model's many small ops wait for a descheduled worker (a 2-row
    classify took 500-1000 ms alone, 50 ms while another thread kept the workers awake)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_long_generation_does_not_hold_up_classify_requests(llama_adapters: tuple[Path, Path],
                                                             one_thread: None) -> None:
    """p95 classify latency with one long generation in flight stays near the p95 without it.

    Measured on the shared 2-core machine (load average 6-8 from other jobs), in four runs: p95 43-59 ms without
    a generation and 43-63 ms during one, 1.0x to 1.3x. Before this, generation held the lock classification
    needs, and every classify request waited for the whole generation (two requests took 51 s each). With only
    separate locks, not yet yielding, the two shared the cores and the p95 was 3.1-3.5x. The bound is generous
    (3x) so that a noisy machine does not fail it.
    """
    base, adapters = llama_adapters
    app = create_app(str(base), adapters, eager=True, max_loaded=0, batch_window_ms=2,
                     limits=ServeLimits(max_new_tokens=128))
    with TestClient(app, base_url="http://localhost") as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        registry = app.state.registry
        classify_latencies(client, 6)  # warm-up
        alone = classify_latencies(client, REQUESTS)
        # A generation long enough to outlast the classify requests at three times their time alone, sized on
        # this machine's speed now (it is shared and noisy): seconds per token from a short generation first.
        started = time.perf_counter()
        assert generate(client, 2, 16).status_code == 200
        per_token = (time.perf_counter() - started) / 32
        phase = REQUESTS / 2 * statistics.median(alone)  # two client threads
        prompts = max(2, min(48, math.ceil(3 * phase / per_token / 128)))

        generated: dict[str, Any] = {}
        generation = threading.Thread(target=lambda: generated.update(response=generate(client, prompts, 128)))
        generation.start()
        causal = registry.lock_for("causal-lm")
        while causal.acquire(blocking=False):  # wait until the generation holds its lock
            causal.release()
            assert generation.is_alive(), generated
            time.sleep(0.005)
        during = classify_latencies(client, REQUESTS, keep_going=generation.is_alive)
        still_generating = generation.is_alive()
        generation.join()
        assert generated["response"].status_code == 200, generated["response"].text
        assert len(generated["response"].json()["results"]) == prompts
    # Every classify request was answered while the generation was still running ...
    assert len(during) >= REQUESTS and still_generating, (
        f"only {len(during)} classify requests finished during the generation: it blocked them, or was too short")
    # ... and about as fast as without it.
    assert p95(during) < 3 * p95(alone), (p95(during), p95(alone))
    print(f"classify p95 alone {1000 * p95(alone):.0f} ms, during a generation of {prompts} x 128 tokens "
          f"{1000 * p95(during):.0f} ms")
