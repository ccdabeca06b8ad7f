"""`peftlab serve` over real HTTP: uvicorn on 127.0.0.1, the shipped MiniLM base, adapters of three methods."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serve_helpers import RunningServer, expected_predictions, make_adapter

pytestmark = pytest.mark.integration

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

TEXTS = ["A wonderful, moving film with brilliant acting.", "Dull, messy and far too long.",
         "It was fine, nothing special.", "I would watch it again tomorrow!", "The plot made no sense at all.",
         "Average popcorn entertainment."]
METHODS = {"lora": "lora", "ia3": "ia3", "prompt": "prompt_tuning", "lora-b": "lora"}
REQUESTS, THREADS, WARMUP = 2000, 16, 300


@pytest.fixture(scope="module")
def base() -> Path:
    from peftlab.errors import ModelError
    from peftlab.models import resolve_model_path

    try:
        return resolve_model_path("minilm-l6")
    except ModelError as exc:
        pytest.skip(f"shipped model minilm-l6 is not installed: {exc}")


@pytest.fixture(scope="module")
def adapters_dir(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served")
    for seed, (name, method) in enumerate(METHODS.items()):
        folder = root / name / "model" if name == "lora" else root / name  # both layouts
        make_adapter(base, folder, method, seed=seed, scale=0.05, max_length=64)
    return root


@pytest.fixture(scope="module")
def expected(adapters_dir: Path) -> dict[str, Any]:
    return expected_predictions(adapters_dir, METHODS, TEXTS)


@pytest.fixture(scope="module")
def server(base: Path, adapters_dir: Path) -> Any:
    from peftlab.serve.app import ServeLimits, create_app

    app = create_app(str(base), adapters_dir, eager=True, max_loaded=8, batch_window_ms=5,
                     limits=ServeLimits(max_texts=16, max_chars=1000, max_body_bytes=20_000))
    with RunningServer(app) as running:
        yield running


def check(result: dict[str, Any], expected: dict[str, Any], adapter: str, text: str) -> None:
    labels = expected[adapter]["labels"]
    assert result["adapter"] == adapter and result["text"] == text
    got = [result["probabilities"][n] for n in labels]
    np.testing.assert_allclose(got, expected[adapter]["proba"][TEXTS.index(text)], atol=1e-5, rtol=0)


def test_concurrent_load_each_response_matches_its_request(server: RunningServer, expected: dict[str, Any]) -> None:
    """2,000 requests from 16 clients across four adapters: no errors, no mixed-up rows, memory stable."""
    import psutil

    process = psutil.Process()  # the server runs in this process, on a thread
    failures = send_load(server, expected, range(WARMUP))
    rss_after_warmup = process.memory_info().rss
    failures += send_load(server, expected, range(WARMUP, REQUESTS))
    growth = process.memory_info().rss - rss_after_warmup
    assert not failures, failures[:3]
    assert growth < 64 * 2**20, f"resident memory grew {growth / 2**20:.1f} MiB over {REQUESTS - WARMUP} requests"
    health = httpx.get(server.url + "/health").json()
    assert health["loaded"] == len(METHODS) and health["failed"] == 0
    # Concurrent requests shared batches (and within a batch, lora + lora-b share one forward pass).
    assert health["batches"] < REQUESTS, health


def send_load(server: RunningServer, expected: dict[str, Any], numbers: range, threads: int = THREADS) -> list[str]:
    failures: list[str] = []
    counter = iter(numbers)
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while True:
                with lock:
                    number = next(counter, None)
                if number is None:
                    return
                rng = random.Random(number)
                if rng.random() < 0.3:  # the single-adapter form
                    adapter = rng.choice(list(METHODS))
                    items = [{"adapter": adapter, "text": t} for t in rng.sample(TEXTS, rng.randint(1, 3))]
                    body: dict[str, Any] = {"adapter": adapter, "texts": [i["text"] for i in items]}
                else:
                    items = [{"adapter": rng.choice(list(METHODS)), "text": rng.choice(TEXTS)}
                             for _ in range(rng.randint(1, 4))]
                    body = {"items": items}
                try:
                    response = client.post("/v1/classify", json=body)
                    assert response.status_code == 200, response.text
                    results = response.json()["results"]
                    assert len(results) == len(items)
                    for item, result in zip(items, results):
                        check(result, expected, item["adapter"], item["text"])
                except AssertionError as exc:
                    failures.append(f"request {number}: {exc}")

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return failures


def raw_http(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server: RunningServer, expected: dict[str, Any]) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        headers = {"content-type": "application/json"}
        response = client.post("/v1/classify", content=b'{"adapter": "lora", "texts": [', headers=headers)
        assert response.status_code == 400 and response.json()["error"]["code"] == "malformed_json"
        response = client.post("/v1/classify", content=b"\xff\xfe not json", headers=headers)
        assert response.status_code == 400
        big = b'{"adapter": "lora", "texts": ["' + b"a" * 30_000 + b'"]}'
        response = client.post("/v1/classify", content=big, headers=headers)
        assert response.status_code == 413
        for name in ("../../etc/passwd", "/etc/passwd", ".secret", "lora/../ia3", "..\\lora"):
            response = client.post("/v1/classify", json={"items": [{"adapter": name, "text": "hi"}]})
            assert response.status_code == 400, (name, response.text)
        for path in ("/v1/adapters/..%2F..%2Fetc/load", "/v1/adapters/.hidden/load", "/v1/adapters/%2e%2e/unload"):
            response = client.post(path)
            assert 400 <= response.status_code < 500, (path, response.status_code)
        response = client.post("/v1/classify", json={"adapter": "missing", "texts": ["hi"]})
        assert response.status_code == 404 and "lora-b" in response.json()["error"]["message"]
        response = client.post("/v1/classify", json={"adapter": "lora", "texts": ["x"] * 17})
        assert response.status_code == 413
        response = client.post("/v1/generate", json={"adapter": "lora", "prompts": ["hi"]})
        assert response.status_code == 400

    # A chunked body (no Content-Length) over the limit, straight on the socket.
    chunk = b"a" * 8000
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(4)) + b"0\r\n\r\n"
    reply = raw_http(server.url, b"POST /v1/classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    # Garbage that is not HTTP at all.
    reply = raw_http(server.url, b"\x00\x01garbage\r\n\r\n")
    assert not reply or reply.startswith(b"HTTP/1.1 4"), reply[:200]

    response = httpx.post(server.url + "/v1/classify", json={"adapter": "ia3", "texts": TEXTS[:2]}, timeout=60)
    assert response.status_code == 200
    for text, result in zip(TEXTS, response.json()["results"]):
        check(result, expected, "ia3", text)
    assert httpx.get(server.url + "/health").status_code == 200


def test_poisoning_client_fails_no_valid_request(server: RunningServer, expected: dict[str, Any]) -> None:
    """16 clients x 20 valid requests over HTTP while a 17th sends lone surrogates, empty and blank texts."""
    import json

    poisons = ["ab\ud800c", "\udfff", "", " ", "\t\n", "\u3000"]
    done = threading.Event()
    poison_statuses: list[int] = []

    def poisoner() -> None:
        rng = random.Random(-1)
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not done.is_set():
                body = {"items": [{"adapter": rng.choice(list(METHODS)), "text": rng.choice(poisons)},
                                  {"adapter": "lora", "text": TEXTS[0]}]}
                # json.dumps escapes the surrogate as \ud800, as a browser's JSON.stringify does
                response = client.post("/v1/classify", content=json.dumps(body),
                                       headers={"content-type": "application/json"})
                poison_statuses.append(response.status_code)

    bad = threading.Thread(target=poisoner)
    bad.start()
    try:
        failures = send_load(server, expected, range(320), threads=16)
    finally:
        done.set()
        bad.join()
    assert not failures, (len(failures), failures[:3])
    assert poison_statuses and set(poison_statuses) == {422}, sorted(set(poison_statuses))


def test_host_and_origin_checks_over_the_socket(server: RunningServer) -> None:
    # A DNS-rebinding page reaches 127.0.0.1 but its requests carry its own name as the Host.
    reply = raw_http(server.url, b"GET /v1/adapters HTTP/1.1\r\nHost: rebind.example:8000\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b"--allowed-host" in reply, reply[:300]
    response = httpx.post(server.url + "/v1/adapters/lora/unload", headers={"origin": "http://evil.example"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
    listed = {a["name"]: a for a in httpx.get(server.url + "/v1/adapters").json()["adapters"]}
    assert listed["lora"]["loaded"]  # the refused unload did not run
