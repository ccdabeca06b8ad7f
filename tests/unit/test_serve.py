"""peftlab serve on a tiny random BERT: batches, limits, bad input, the door, adapter checks, LRU (offline, seconds)."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serve_helpers import expected_predictions, make_adapter, make_full_model

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from peftlab.errors import ConfigError  # noqa: E402
from peftlab.serve.app import ServeLimits, create_app  # noqa: E402
from peftlab.serve.batching import BatchQueue  # noqa: E402
from peftlab.serve.discovery import check_adapter_name  # noqa: E402
from peftlab.serve.errors import InvalidAdapterNameError, TextError  # noqa: E402

TEXTS = ["the movie was great", "awful plot and dull acting", "a very very fine story it was", "ok",
         "the film was really quite boring"]
TWO_LABELS = ["bad", "good"]
GOOD = ["ia3", "lora", "lora-b", "loha-2", "prompt"]


@pytest.fixture(scope="module")
def adapters_dir(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adapters of several methods on one base, in both layouts, plus folders the server must skip or survive."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_bert, root / "lora" / "model", "lora", seed=1)  # RUN_DIR/<method>/model layout
    make_adapter(tiny_bert, root / "lora-b", "lora", seed=2)  # same class count: shares lora's forward pass
    make_adapter(tiny_bert, root / "ia3", "ia3", seed=3)
    make_adapter(tiny_bert, root / "loha-2", "loha", seed=4, labels=TWO_LABELS)
    make_adapter(tiny_bert, root / "prompt", "prompt_tuning", seed=5)
    make_full_model(tiny_bert, root / "full")  # FFT: not an adapter, skipped
    make_adapter(tiny_bert, root / "bad name", "lora", seed=6)  # not a plain name: skipped
    broken = make_adapter(tiny_bert, root / "broken", "lora", seed=7)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    return root


@pytest.fixture(scope="module")
def expected(adapters_dir: Path) -> dict[str, Any]:
    """Each adapter's own predictions, from peftlab's predictor (base + one adapter, loaded alone)."""
    return expected_predictions(adapters_dir, GOOD, TEXTS)


def local_client(app: Any, **kwargs: Any) -> TestClient:
    """A TestClient that calls the app by a local name (the Host check refuses TestClient's 'testserver')
    and gets unhandled errors as 500 replies, as a real client would."""
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False, **kwargs)


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, client.get("/health").json()
        time.sleep(0.02)


@pytest.fixture(scope="module")
def client(tiny_bert: Path, adapters_dir: Path) -> Any:
    app = create_app(str(tiny_bert), adapters_dir, eager=True, max_loaded=0, batch_window_ms=2,
                     limits=ServeLimits(max_texts=8, max_chars=200, max_body_bytes=4000))
    with local_client(app) as test_client:
        wait_ready(test_client)
        yield test_client


def assert_matches(result: dict[str, Any], expected: dict[str, Any], adapter: str, text: str) -> None:
    labels = expected[adapter]["labels"]
    proba = expected[adapter]["proba"][TEXTS.index(text)]
    assert result["adapter"] == adapter and result["text"] == text
    assert list(result["probabilities"]) == labels
    np.testing.assert_allclose([result["probabilities"][n] for n in labels], proba, atol=1e-5, rtol=0)
    assert result["label"] == labels[int(proba.argmax())]
    assert result["score"] == pytest.approx(float(proba.max()), abs=1e-5)


def error_of(response: Any) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


# -- registration and status

def test_registers_adapters_and_skips_full_models_and_bad_names(client: TestClient) -> None:
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert sorted(listed) == sorted(GOOD + ["broken"])  # not "full" (FFT), not "bad name"
    assert listed["lora"]["method"] == "lora" and listed["prompt"]["method"] == "prompt_tuning"
    assert listed["loha-2"]["labels"] == TWO_LABELS and listed["ia3"]["task"] == "classification"
    assert all(listed[n]["loaded"] and listed[n]["size_bytes"] > 0 for n in GOOD)
    assert not listed["broken"]["loaded"] and listed["broken"]["error"]  # failed at eager load, others serve
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["adapters"] == 6 and health["loaded"] == 5 and health["failed"] == 1


def test_full_model_folder_is_skipped_with_a_note(tiny_bert: Path, adapters_dir: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    from peftlab.serve.discovery import discover_adapters

    with caplog.at_level(logging.INFO, logger="peftlab.serve.discovery"):
        names = [e.name for e in discover_adapters(adapters_dir)]
    assert "full" not in names and "lora" in names
    assert any("full model" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_health_is_503_until_the_base_model_is_loaded(tiny_bert: Path, adapters_dir: Path) -> None:
    app = create_app(str(tiny_bert), adapters_dir)
    raw = local_client(app)  # no `with`: startup (which loads the models) never runs
    response = raw.get("/health")
    assert response.status_code == 503 and error_of(response)["code"] == "not_ready"
    response = raw.post("/v1/classify", json={"adapter": "lora", "texts": ["great"]})
    assert response.status_code == 503


# -- classification

def test_mixed_batch_equals_each_adapter_alone(client: TestClient, expected: dict[str, Any]) -> None:
    items = [{"adapter": a, "text": t} for a in GOOD for t in TEXTS[:1]] + \
            [{"adapter": random.Random(i).choice(GOOD), "text": random.Random(-i).choice(TEXTS)} for i in range(3)]
    random.Random(0).shuffle(items)
    response = client.post("/v1/classify", json={"items": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(items)
    for item, result in zip(items, results):
        assert_matches(result, expected, item["adapter"], item["text"])


def test_single_adapter_form(client: TestClient, expected: dict[str, Any]) -> None:
    response = client.post("/v1/classify", json={"adapter": "prompt", "texts": TEXTS})
    assert response.status_code == 200, response.text
    for text, result in zip(TEXTS, response.json()["results"]):
        assert_matches(result, expected, "prompt", text)


def test_lora_adapters_share_one_forward_pass(client: TestClient) -> None:
    before = client.get("/health").json()["forward_passes"]
    items = [{"adapter": a, "text": t} for t in TEXTS[:3] for a in ("lora", "lora-b")]
    assert client.post("/v1/classify", json={"items": items}).status_code == 200
    assert client.get("/health").json()["forward_passes"] - before == 1


def test_concurrent_requests_share_a_batch() -> None:
    calls: list[list[tuple[str, str]]] = []

    def run(rows: list[tuple[str, str]]) -> list[Any]:
        calls.append(rows)
        return [{"row": r} for r in rows]

    batcher = BatchQueue(run, window_s=0.3, max_rows=100)
    batcher.start()
    try:
        futures = [batcher.submit([("a", f"t{i}"), ("b", f"u{i}")]) for i in range(3)]
        results = [f.result(timeout=5) for f in futures]
    finally:
        batcher.close()
    assert len(calls) == 1 and len(calls[0]) == 6  # three requests, one batch
    assert results[1] == [{"row": ("a", "t1")}, {"row": ("b", "u1")}]  # each request gets its own rows back


# -- errors and limits

def test_unknown_adapter_is_404_naming_the_available_ones(client: TestClient) -> None:
    for body in ({"adapter": "nope", "texts": ["great"]}, {"items": [{"adapter": "lora", "text": "a"},
                                                                     {"adapter": "nope", "text": "b"}]}):
        response = client.post("/v1/classify", json=body)
        assert response.status_code == 404
        error = error_of(response)
        assert error["code"] == "adapter_not_found" and "lora-b" in error["message"] and "prompt" in error["message"]
    assert client.post("/v1/adapters/nope/load").status_code == 404


@pytest.mark.parametrize("name", ["../lora", "a/b", "/etc/passwd", ".hidden", "..", "a b", "lora\\x", "ü", "a..b",
                                  ""])
def test_adapter_names_that_are_not_plain_are_400(client: TestClient, name: str) -> None:
    response = client.post("/v1/classify", json={"items": [{"adapter": name, "text": "great"}]})
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "invalid_adapter_name"
    with pytest.raises(InvalidAdapterNameError):
        check_adapter_name(name)


def test_invalid_names_in_the_url_are_400(client: TestClient) -> None:
    for name in (".hidden", "a..b", "x%20y"):
        response = client.post(f"/v1/adapters/{name}/load")
        assert response.status_code == 400, (name, response.text)


def test_limits(client: TestClient) -> None:
    response = client.post("/v1/classify", json={"adapter": "lora", "texts": ["a"] * 9})
    assert response.status_code == 413 and error_of(response)["code"] == "too_many_texts"
    response = client.post("/v1/classify", json={"adapter": "lora", "texts": ["a" * 201]})
    assert response.status_code == 422 and error_of(response)["code"] == "text_too_long"
    big = '{"adapter": "lora", "texts": ["' + "a" * 5000 + '"]}'
    response = client.post("/v1/classify", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and error_of(response)["code"] == "body_too_large"

    def chunks() -> Any:  # no Content-Length: the limit must still hold
        yield b'{"adapter": "lora", "texts": ["'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"]}'

    response = client.post("/v1/classify", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


@pytest.mark.parametrize("body, status, code", [
    ('{"adapter": "lora", "texts": ["a"', 400, "malformed_json"),
    ('{"texts": ["a"]}', 422, "invalid_request"),
    ('{"adapter": "lora", "texts": []}', 422, "invalid_request"),
    ('{"adapter": "lora", "texts": ["a"], "items": []}', 422, "invalid_request"),
    ('{"adapter": "lora", "texts": ["a"], "colour": "red"}', 422, "invalid_request"),
    ('{"adapter": "lora", "texts": [1]}', 422, "invalid_request"),
])
def test_bad_requests(client: TestClient, body: str, status: int, code: str) -> None:
    response = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert error_of(response)["code"] == code


def test_failed_adapter_is_isolated(client: TestClient, expected: dict[str, Any]) -> None:
    response = client.post("/v1/classify", json={"adapter": "broken", "texts": ["great"]})
    assert response.status_code == 422 and error_of(response)["code"] == "adapter_invalid"
    assert "broken" in error_of(response)["message"] and "deserializing header" in error_of(response)["message"]
    response = client.post("/v1/classify", json={"adapter": "lora", "texts": [TEXTS[0]]})
    assert response.status_code == 200
    assert_matches(response.json()["results"][0], expected, "lora", TEXTS[0])
    response = client.post("/v1/adapters/broken/load")  # an explicit load retries, and fails again
    assert response.status_code == 422 and client.get("/health").status_code == 200
    # It shares the LoRA group with lora and lora-b: no half-loaded copy of it may stay in there.
    registry = client.app.state.registry
    held = {n for group in registry._groups.values() for n in group.model.peft_config}
    assert held == {e.peft_name for e in registry.entries.values() if e.loaded}


def test_generate_on_a_classifier_is_400(client: TestClient) -> None:
    response = client.post("/v1/generate", json={"adapter": "lora", "prompts": ["hello"]})
    assert response.status_code == 400
    assert "not a causal LM adapter" in error_of(response)["message"]


def test_internal_errors_are_500_without_internals(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    registry = client.app.state.registry

    def explode(rows: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(client.app.state.batcher, "_run", explode)
    with caplog.at_level(logging.ERROR):
        response = client.post("/v1/classify", json={"adapter": "lora", "texts": ["great"]})
    assert response.status_code == 500 and error_of(response)["code"] == "internal_error"
    assert "secret" not in response.text
    assert any(r.exc_info for r in caplog.records)  # logged with its traceback
    monkeypatch.undo()
    assert registry.ready and client.post("/v1/classify", json={"adapter": "lora", "texts": ["a"]}).status_code == 200


def test_unknown_route_is_a_json_404(client: TestClient) -> None:
    response = client.get("/v2/nothing")
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


# -- one bad text fails only its own request

def post_json(client: TestClient, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    """POST ``body`` as JSON with ASCII escapes, as browsers and most clients send a lone surrogate: "\\ud800"."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json", **(headers or {})})


@pytest.mark.parametrize("form", ["texts", "items"])
def test_invalid_unicode_is_422_naming_the_item(client: TestClient, form: str) -> None:
    texts = [TEXTS[0], "ab\ud800c"]
    body = ({"adapter": "lora", "texts": texts} if form == "texts"
            else {"items": [{"adapter": "lora", "text": t} for t in texts]})
    response = post_json(client, "/v1/classify", body)
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "invalid_text" and f"{form}[1]" in error["message"] and "U+D800" in error["message"]


@pytest.mark.parametrize("text", ["", " ", "\t\n  ", "\u3000\u00a0"])
def test_empty_or_whitespace_text_is_422(client: TestClient, text: str) -> None:
    response = client.post("/v1/classify", json={"adapter": "lora", "texts": [TEXTS[0], TEXTS[1], text]})
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "empty_text" and "texts[2]" in error_of(response)["message"]
    response = client.post("/v1/generate", json={"adapter": "lora", "prompts": [text]})
    assert response.status_code == 422 and error_of(response)["code"] == "empty_text"


def test_text_empty_after_its_adapters_cleaning_is_422(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client.app.state.registry.entries["lora"], "clean", "basic")  # strips HTML tags
    response = client.post("/v1/classify", json={"adapter": "lora", "texts": [TEXTS[0], "<br> <p></p>"]})
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "text_failed" and "texts[1]" in error_of(response)["message"]
    assert "empty after cleaning" in error_of(response)["message"]


class PoisonTokenizer:
    """The real tokenizer, but it raises on any text containing POISON (texts the door cannot tell apart)."""

    POISON = "poison"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> Any:
        if any(self.POISON in t for t in ([texts] if isinstance(texts, str) else texts)):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return self.tokenizer(texts, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_a_text_the_tokenizer_fails_on_fails_only_its_row(client: TestClient, expected: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    registry = client.app.state.registry
    monkeypatch.setattr(registry, "_tokenizer", PoisonTokenizer(registry._tokenizer))
    rows = [("lora", TEXTS[0]), ("lora-b", "a poison text"), ("ia3", TEXTS[1]), ("lora", TEXTS[2])]
    results = registry.classify(rows)
    assert isinstance(results[1], TextError) and "TypeError" in str(results[1])
    for (name, text), result in zip(rows, results):
        if result is not results[1]:
            assert isinstance(result, dict), result
            assert_matches({**result, "text": text}, expected, name, text)
    items = [{"adapter": a, "text": t} for a, t in rows]
    response = client.post("/v1/classify", json={"items": items})
    assert response.status_code == 422 and error_of(response)["code"] == "text_failed"
    assert "items[1]" in error_of(response)["message"]


def test_a_failing_request_does_not_fail_its_batch_mates() -> None:
    def run(rows: list[tuple[str, str]]) -> list[Any]:
        if any(text == "bad" for _, text in rows):
            raise RuntimeError("one request broke the whole pass")
        return [{"row": r} for r in rows]

    batcher = BatchQueue(run, window_s=0.3, max_rows=100)
    batcher.start()
    try:
        futures = [batcher.submit([("a", f"t{i}")]) for i in range(2)] + [batcher.submit([("a", "bad")])]
        futures.append(batcher.submit([("a", "t9")]))
        good = [futures[i].result(timeout=5) for i in (0, 1, 3)]
        with pytest.raises(RuntimeError, match="broke"):
            futures[2].result(timeout=5)
    finally:
        batcher.close()
    assert good == [[{"row": ("a", "t0")}], [{"row": ("a", "t1")}], [{"row": ("a", "t9")}]]


def random_requests(client: TestClient, expected: dict[str, Any], seed: int, requests: int,
                    most_items: int) -> list[str]:
    """One client's requests of 1..most_items random (adapter, text) rows; what went wrong in each, if anything."""
    rng = random.Random(seed)
    failures = []
    for number in range(requests):
        items = [{"adapter": rng.choice(GOOD), "text": rng.choice(TEXTS)} for _ in range(rng.randint(1, most_items))]
        response = client.post("/v1/classify", json={"items": items})
        try:
            assert response.status_code == 200, response.text
            for item, result in zip(items, response.json()["results"]):
                assert_matches(result, expected, item["adapter"], item["text"])
        except AssertionError as exc:
            failures.append(f"client {seed} request {number}: {exc}")
    return failures


def test_poisoning_client_fails_no_valid_request(client: TestClient, expected: dict[str, Any],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """8 clients x 20 valid requests while one client keeps sending texts that must fail alone."""
    registry, batcher = client.app.state.registry, client.app.state.batcher
    monkeypatch.setattr(registry, "_tokenizer", PoisonTokenizer(registry._tokenizer))
    monkeypatch.setattr(batcher, "window_s", 0.02)  # a wider window: poison and valid rows share batches
    poisons = ["ab\ud800c", "", "   ", "\n\t", "\udfff", "a poison text that passes the door"]
    failures: list[str] = []
    poison_statuses: list[int] = []
    done = threading.Event()

    def valid(seed: int) -> None:
        failures.extend(random_requests(client, expected, seed, requests=20, most_items=3))

    def poisoner() -> None:
        rng = random.Random(-1)
        while not done.is_set():
            items = [{"adapter": rng.choice(GOOD), "text": rng.choice(poisons)}]
            poison_statuses.append(post_json(client, "/v1/classify", {"items": items}).status_code)

    threads = [threading.Thread(target=valid, args=(i,)) for i in range(8)]
    bad = threading.Thread(target=poisoner)
    bad.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    bad.join()
    assert not failures, (len(failures), failures[:3])
    assert poison_statuses and set(poison_statuses) == {422}, sorted(set(poison_statuses))


# -- loading

def test_load_and_unload(client: TestClient, expected: dict[str, Any]) -> None:
    response = client.post("/v1/adapters/ia3/unload")
    assert response.status_code == 200 and response.json()["loaded"] is False
    listed = {a["name"]: a["loaded"] for a in client.get("/v1/adapters").json()["adapters"]}
    assert listed["ia3"] is False
    response = client.post("/v1/classify", json={"adapter": "ia3", "texts": TEXTS[:2]})  # loads again on use
    assert response.status_code == 200
    for text, result in zip(TEXTS, response.json()["results"]):
        assert_matches(result, expected, "ia3", text)
    assert client.post("/v1/adapters/ia3/unload").json()["loaded"] is False
    assert client.post("/v1/adapters/ia3/load").json()["loaded"] is True


def test_lru_keeps_at_most_max_loaded(tiny_bert: Path, adapters_dir: Path, expected: dict[str, Any]) -> None:
    app = create_app(str(tiny_bert), adapters_dir, eager=False, max_loaded=2, batch_window_ms=0)
    with local_client(app) as lru:
        wait_ready(lru)

        def loaded() -> set[str]:
            return {a["name"] for a in lru.get("/v1/adapters").json()["adapters"] if a["loaded"]}

        assert loaded() == set()  # lazy
        for name in ("lora", "prompt"):
            assert lru.post("/v1/classify", json={"adapter": name, "texts": [TEXTS[0]]}).status_code == 200
        assert loaded() == {"lora", "prompt"}
        lru.post("/v1/classify", json={"adapter": "lora", "texts": [TEXTS[0]]})  # lora is now the most recent
        lru.post("/v1/classify", json={"adapter": "ia3", "texts": [TEXTS[0]]})
        assert loaded() == {"lora", "ia3"}  # prompt was least recently used
        # More adapters in one request than may be held: served in turns, all correct.
        items = [{"adapter": a, "text": t} for a in GOOD for t in TEXTS[:2]]
        response = lru.post("/v1/classify", json={"items": items})
        assert response.status_code == 200, response.text
        for item, result in zip(items, response.json()["results"]):
            assert_matches(result, expected, item["adapter"], item["text"])
        assert len(loaded()) <= 2


def test_requests_from_threads_each_get_their_own_results(client: TestClient, expected: dict[str, Any]) -> None:
    failures: list[str] = []

    def worker(seed: int) -> None:
        failures.extend(random_requests(client, expected, seed, requests=4, most_items=4))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]


# -- page and docs

def test_page_and_docs(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "peftlab serve" in page.text and "/v1/classify" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text  # FastAPI's default loads from a CDN
    urls = re.findall(r'(?:href|src)="([^"]+)"', docs.text)
    assert {u.rsplit("/", 1)[-1] for u in urls} >= {"swagger-ui-bundle.js", "swagger-ui.css"}
    for url in urls:  # every file /docs names is served here, without the API key too (see test_api_key)
        response = client.get(url)
        assert response.status_code == 200 and len(response.content) > 500, url
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc page would load from a CDN
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/generate", "/v1/adapters", "/health"} <= set(paths)


# -- every method, and causal LMs

def test_every_method_on_one_registry_equals_its_predictor(tiny_bert: Path, tmp_path: Path) -> None:
    from peftlab.predict import load_predictor
    from peftlab.serve.registry import AdapterRegistry

    methods = ["lora", "dora", "loha", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"]
    gathered = {"lora", "ia3", "prompt_tuning", "p_tuning"}  # two adapters each: their rows share one pass
    names = {f"{m}-{k}": m for m in methods for k in range(2 if m in gathered else 1)}
    for seed, (name, method) in enumerate(names.items()):
        make_adapter(tiny_bert, tmp_path / name, method, seed=seed)
    registry = AdapterRegistry(str(tiny_bert), tmp_path, max_loaded=0)
    registry.start(eager=True)
    assert registry.classify([]) == [] and registry.forward_passes == 0  # no rows: nothing runs, nothing fails
    rows = [(n, t) for n in names for t in TEXTS]
    random.Random(1).shuffle(rows)
    results = registry.classify(rows)
    for name in names:
        predictor = load_predictor(tmp_path / name)
        proba = predictor.predict_proba(TEXTS)
        for (row_name, text), result in zip(rows, results):
            if row_name == name:
                assert isinstance(result, dict), result
                got = [result["probabilities"][n] for n in predictor.labels]
                np.testing.assert_allclose(got, proba[TEXTS.index(text)], atol=1e-5, rtol=0, err_msg=name)
    # One gathered pass for the LoRA, IA3, prompt- and p-tuning rows (the default mixing, "one"); DoRA, LoHa and
    # prefix tuning one pass each. With prompt rows apart ("tokens"), one pass more.
    assert registry.forward_passes == 4
    registry.mixing, before = "tokens", registry.forward_passes
    again = registry.classify(rows)
    assert [r["label"] for r in again] == [r["label"] for r in results]
    np.testing.assert_allclose([list(r["probabilities"].values()) for r in again],
                               [list(r["probabilities"].values()) for r in results], atol=1e-5, rtol=0)
    assert registry.forward_passes - before == 5


def test_generate_with_causal_lm_adapters(tmp_path: Path) -> None:
    import json

    import torch
    from conftest import WORDS, make_tokenizer
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.generate import generate, load_generator

    base = tmp_path / "base"
    base.mkdir()
    make_tokenizer(base)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS) + 31, hidden_size=32, intermediate_size=37,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=64, pad_token_id=0)).save_pretrained(str(base))
    adapters = tmp_path / "adapters"
    for seed, (name, config) in enumerate({"lora": LoraConfig(task_type="CAUSAL_LM", r=4),
                                           "prompt": PromptTuningConfig(task_type="CAUSAL_LM",
                                                                        num_virtual_tokens=3)}.items()):
        torch.manual_seed(seed)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(str(base)), config)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn_like(parameter) * 0.5)
        model.save_pretrained(str(adapters / name))
        (adapters / name / "peftlab.json").write_text(json.dumps(
            {"task": "causal-lm", "method": name, "base_model": str(base), "max_length": 32, "is_adapter": True}))

    prompts = ["the movie was", "great"]
    app = create_app(str(base), adapters, eager=False)
    with local_client(app) as causal:
        wait_ready(causal)
        for name in ("lora", "prompt"):
            response = causal.post("/v1/generate", json={"adapter": name, "prompts": prompts, "max_new_tokens": 5})
            assert response.status_code == 200, response.text
            want = generate(load_generator(adapters / name, base_model=str(base)), prompts, max_new_tokens=5)
            assert [r["text"] for r in response.json()["results"]] == want
        response = causal.post("/v1/classify", json={"adapter": "lora", "texts": ["great"]})
        assert response.status_code == 400 and error_of(response)["code"] == "wrong_task"
        response = causal.post("/v1/generate", json={"adapter": "lora", "prompts": ["a"], "max_new_tokens": 9999})
        assert response.status_code == 422


# -- CLI

def test_cli_serve_help_and_user_errors(tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from typer.testing import CliRunner

    from peftlab.cli import app, main

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "--max-loaded" in result.output and "--eager" in result.output
    for flag in ("--api-key", "PEFTLAB_API_KEY", "--allowed-host", "--cors-origin", "--trust-remote-code",
                 "--allow-pickle", "--request-timeout"):
        assert flag in result.output, flag

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["peftlab", "serve", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        return int(exit_info.value.code)

    assert run("--base", str(tmp_path / "nowhere"), "--adapters", str(tmp_path)) == 1
    assert "--base" in capsys.readouterr().err
    assert run("--base", str(tiny_bert), "--adapters", str(tmp_path / "missing")) == 1
    assert "is not a folder" in capsys.readouterr().err
    make_full_model(tiny_bert, tmp_path / "only-full")
    assert run("--base", str(tiny_bert), "--adapters", str(tmp_path)) == 1
    assert "no adapters" in capsys.readouterr().err

    import uvicorn

    make_adapter(tiny_bert, tmp_path / "lora", "lora")
    started: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.append(app))
    flags = ["--base", str(tiny_bert), "--adapters", str(tmp_path), "--host", "0.0.0.0"]
    assert run(*flags) == 2 and not started  # all interfaces and no key: refused, nothing listens
    assert "--api-key" in capsys.readouterr().err
    assert run(*flags, "--batch-window-ms", "2000", "--request-timeout", "1", "--api-key", KEY) == 2
    assert "shorter than the request timeout" in capsys.readouterr().err
    monkeypatch.setenv("PEFTLAB_API_KEY", KEY)
    monkeypatch.setattr(sys, "argv", ["peftlab", "serve", *flags, "--allowed-host", "peft.example"])
    with pytest.raises(SystemExit) as exit_info:
        main()  # the key from the environment: uvicorn (stubbed) would start
    assert exit_info.value.code == 0
    with TestClient(started[-1], base_url="http://peft.example") as served:
        assert served.get("/v1/adapters").status_code == 401
        assert served.get("/v1/adapters", headers=AUTH).status_code == 200


# -- the door: Host, Origin, API key

KEY = "k3y-for-tests_0123456789"


@pytest.fixture(scope="module")
def secured(tiny_bert: Path, adapters_dir: Path) -> Any:
    app = create_app(str(tiny_bert), adapters_dir, eager=False, max_loaded=0, batch_window_ms=0, api_key=KEY,
                     allowed_hosts=["peft.example"], cors_origins=["http://localhost:3000"])
    with local_client(app) as test_client:
        wait_ready(test_client)
        yield test_client


AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.2",
                                  "", "[::2]:8000"])
def test_other_host_headers_are_400_naming_the_flag(client: TestClient, host: str) -> None:
    response = client.get("/v1/adapters", headers={"host": host})
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "host_not_allowed" and "--allowed-host" in error_of(response)["message"]
    assert client.get("/health", headers={"host": host}).status_code == 400  # even health: rebinding reads it


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST.", "127.0.0.1:1234", "[::1]:8000", "::1"])
def test_local_host_headers_are_accepted(client: TestClient, host: str) -> None:
    assert client.get("/v1/adapters", headers={"host": host}).status_code == 200


def test_allowed_host_extends_the_list(secured: TestClient, client: TestClient) -> None:
    assert secured.get("/health", headers={"host": "peft.example:8000"}).status_code == 200
    assert client.get("/health", headers={"host": "peft.example"}).status_code == 400  # not without the flag


def test_cross_site_posts_are_403(client: TestClient, secured: TestClient) -> None:
    # A page on another site POSTs to load/unload: the browser sends its Origin; no CORS option allows it.
    for path in ("/v1/adapters/ia3/unload", "/v1/adapters/ia3/load"):
        response = client.post(path, headers={"origin": "http://evil.example"})
        assert response.status_code == 403, response.text
        assert error_of(response)["code"] == "origin_not_allowed" and "--cors-origin" in error_of(response)["message"]
    response = client.post("/v1/classify", json={"adapter": "lora", "texts": ["great"]}, headers={"origin": "null"})
    assert response.status_code == 403
    listed = {a["name"]: a for a in client.get("/v1/adapters").json()["adapters"]}
    assert listed["ia3"]["loaded"]  # the refused unload did not run
    # The page at / posts with its own origin; a --cors-origin origin is allowed too (with the key).
    response = client.post("/v1/classify", json={"adapter": "lora", "texts": ["great"]},
                           headers={"origin": "http://localhost"})
    assert response.status_code == 200, response.text
    response = secured.post("/v1/adapters/ia3/load", headers={"origin": "http://localhost:3000", **AUTH})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert secured.post("/v1/adapters/ia3/load", headers={"origin": "http://localhost:3001", **AUTH}).status_code == 403


def test_no_cors_unless_asked(client: TestClient, secured: TestClient) -> None:
    response = client.get("/v1/adapters", headers={"origin": "http://localhost:3000"})
    assert "access-control-allow-origin" not in response.headers
    preflight = {"origin": "http://localhost:3000", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}
    assert "access-control-allow-origin" not in client.options("/v1/classify", headers=preflight).headers
    response = secured.options("/v1/classify", headers=preflight)  # a preflight carries no key: not a 401
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "http://localhost:3000"
    response = secured.options("/v1/classify", headers={**preflight, "origin": "http://evil.example"})
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
                                     {"Authorization": "Bearer "}])
def test_api_key_is_required_but_for_health_and_static_pages(secured: TestClient, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/v1/adapters"), ("POST", "/v1/adapters/lora/load"),
                         ("POST", "/v1/adapters/lora/unload"), ("POST", "/v1/classify"), ("POST", "/v1/generate")):
        response = secured.request(method, path, headers=headers, json={"adapter": "lora", "texts": ["great"]})
        assert response.status_code == 401, (path, response.text)
        assert error_of(response)["code"] == "unauthorized" and "--api-key" in error_of(response)["message"]
        assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/health", "/", "/docs", "/openapi.json", "/static/swagger/swagger-ui.css"):
        assert secured.get(path, headers=headers).status_code == 200, path


def test_api_key_lets_requests_in(secured: TestClient) -> None:
    assert secured.get("/v1/adapters", headers=AUTH).status_code == 200
    assert secured.get("/v1/adapters", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    response = secured.post("/v1/classify", json={"adapter": "lora", "texts": ["great"]}, headers=AUTH)
    assert response.status_code == 200, response.text
    schemes = secured.get("/openapi.json").json()["components"]["securitySchemes"]  # the docs' Authorize button
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]


@pytest.mark.parametrize("key", ["", " ", "two words", "trailing ", "ключ"])
def test_unusable_api_keys_are_refused(tiny_bert: Path, adapters_dir: Path, key: str) -> None:
    with pytest.raises(ConfigError, match="api-key"):
        create_app(str(tiny_bert), adapters_dir, api_key=key)


# -- settings

@pytest.mark.parametrize("window_ms, timeout_s", [(60_000, 60.0), (2_000, 1.0), (-1, 60.0)])
def test_batch_window_must_be_shorter_than_the_request_timeout(tiny_bert: Path, adapters_dir: Path,
                                                                 window_ms: float, timeout_s: float) -> None:
    with pytest.raises(ConfigError, match="batch-window-ms"):
        create_app(str(tiny_bert), adapters_dir, batch_window_ms=window_ms, limits=ServeLimits(timeout_s=timeout_s))


def test_limits_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_texts must be > 0.*timeout_s must be > 0"):
        ServeLimits(timeout_s=0, max_texts=-1)


def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    import asyncio

    from peftlab.serve.door import BodyLimit as _BodyLimit

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not be reached")

    async def run() -> list[dict[str, Any]]:
        stalled = asyncio.Event()  # never set: the client sent headers, then nothing
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await stalled.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": []}
        await _BodyLimit(app, limit=1000, timeout_s=0.05)(scope, receive, send)
        return sent

    sent = asyncio.run(run())
    assert sent[0]["status"] == 408 and json.loads(sent[1]["body"])["error"]["code"] == "body_timeout"


def test_serve_sets_uvicorn_limits_and_guards_non_loopback_hosts(tiny_bert: Path, adapters_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from peftlab.serve.app import serve

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    serve(str(tiny_bert), adapters_dir, port=8123)
    settings = calls[0]
    assert settings["host"] == "127.0.0.1" and settings["timeout_keep_alive"] == 5
    assert settings["h11_max_incomplete_event_size"] == 16 * 1024 and settings["limit_concurrency"] == 256
    assert settings["http"].__name__ == "HeaderTimeoutH11Protocol"
    with pytest.raises(ConfigError, match="--api-key"):  # reachable from other machines: a key is required
        serve(str(tiny_bert), adapters_dir, host="0.0.0.0")
    serve(str(tiny_bert), adapters_dir, host="192.168.7.7", api_key=KEY)
    with TestClient(calls[-1]["app"], base_url="http://192.168.7.7:8000") as lan:  # its own address is a Host
        assert lan.get("/v1/adapters", headers=AUTH).status_code == 200
        assert lan.get("/v1/adapters", headers={"host": "evil.example", **AUTH}).status_code == 400


# -- adapters checked on load

def edit_weights(folder: Path, edit: Any) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def damaged(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """One good adapter beside adapters damaged in the ways a copy or a hand edit damages them."""
    root = tmp_path_factory.mktemp("damaged")
    make_adapter(tiny_bert, root / "good", "lora", seed=1)
    removed: dict[str, str] = {}

    def drop_one(weights: dict[str, Any]) -> None:
        removed["missing"] = next(k for k in sorted(weights) if "lora_B" in k)
        del weights[removed["missing"]]

    def add_one(weights: dict[str, Any]) -> None:
        import torch

        removed["unexpected"] = "base_model.model.bert.pooler.dense.lora_Z.weight"
        weights[removed["unexpected"]] = torch.zeros(2, 2)

    edit_weights(make_adapter(tiny_bert, root / "missing-key", "lora", seed=2), drop_one)
    edit_weights(make_adapter(tiny_bert, root / "unexpected-key", "lora", seed=3), add_one)
    truncated = make_adapter(tiny_bert, root / "truncated", "lora", seed=4)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[:len(data) // 2])
    # Trained for two classes, but its peftlab.json claims three: the head does not fit.
    head = make_adapter(tiny_bert, root / "wrong-head", "lora", seed=5, labels=TWO_LABELS)
    meta = json.loads((head / "peftlab.json").read_text())
    (head / "peftlab.json").write_text(json.dumps({**meta, "labels": ["a", "b", "c"]}))
    pickled = make_adapter(tiny_bert, root / "pickled", "ia3", seed=6)
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "adapter_model.safetensors")), str(pickled / "adapter_model.bin"))
    (pickled / "adapter_model.safetensors").unlink()
    return root, removed


def test_damaged_adapters_are_refused_on_load_and_the_good_one_serves(tiny_bert: Path,
                                                                      damaged: tuple[Path, dict[str, str]]) -> None:
    root, keys = damaged
    app = create_app(str(tiny_bert), root, eager=True, max_loaded=0, batch_window_ms=0)
    with local_client(app) as served:
        wait_ready(served)
        listed = {a["name"]: a for a in served.get("/v1/adapters").json()["adapters"]}
        assert [n for n, a in listed.items() if a["loaded"]] == ["good"]
        problems = {"missing-key": f"missing keys ['{keys['missing']}'", "unexpected-key": "unexpected keys",
                    "truncated": "SafetensorError", "wrong-head": "size mismatch", "pickled": "--allow-pickle"}
        for name, problem in problems.items():
            assert problem in listed[name]["error"], (name, listed[name]["error"])
            response = served.post("/v1/classify", json={"adapter": name, "texts": ["great"]})
            assert response.status_code == 422, (name, response.text)
            assert error_of(response)["code"] == "adapter_invalid" and problem in error_of(response)["message"]
            response = served.post(f"/v1/adapters/{name}/load")  # an explicit retry is refused the same way
            assert response.status_code == 422 and problem in error_of(response)["message"], name
        response = served.post("/v1/classify", json={"adapter": "good", "texts": TEXTS})
        assert response.status_code == 200
        want = expected_predictions(root, ["good"], TEXTS)
        for text, result in zip(TEXTS, response.json()["results"]):
            assert_matches(result, want, "good", text)
        # No half-loaded adapter stays in the shared LoRA group.
        registry = served.app.state.registry
        held = {n for group in registry._groups.values() for n in group.model.peft_config}
        assert held == {registry.entries["good"].peft_name}


def test_allow_pickle_is_honoured_for_adapters_and_base(tiny_bert: Path, damaged: tuple[Path, dict[str, str]],
                                                        tmp_path: Path) -> None:
    from peftlab.serve.registry import AdapterRegistry

    root, _ = damaged
    registry = AdapterRegistry(str(tiny_bert), root, max_loaded=0, allow_pickle=True)
    registry.start()
    assert registry.load("pickled")["loaded"] is True

    import shutil

    import torch
    from safetensors.torch import load_file

    pickle_base = tmp_path / "pickle-base"  # transformers 5 always saves safetensors: convert by hand
    shutil.copytree(tiny_bert, pickle_base)
    torch.save(load_file(str(pickle_base / "model.safetensors")), str(pickle_base / "pytorch_model.bin"))
    (pickle_base / "model.safetensors").unlink()
    refused = AdapterRegistry(str(pickle_base), root, max_loaded=0)
    refused.start()
    assert refused.state == "failed" and "allow_pickle" in (refused.error or "")
    allowed = AdapterRegistry(str(pickle_base), root, max_loaded=0, allow_pickle=True)
    allowed.start()
    assert allowed.state == "ready", allowed.error


def test_remote_code_base_needs_trust_remote_code(tiny_bert: Path, adapters_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from peftlab.serve.registry import AdapterRegistry

    base = tmp_path / "remote"
    shutil.copytree(tiny_bert, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling.Model"}}))
    refused = AdapterRegistry(str(base), adapters_dir)
    refused.start()
    assert refused.state == "failed" and "trust_remote_code" in (refused.error or "")
    seen: list[bool] = []
    import peftlab.models as models

    real = models.check_model_folder
    monkeypatch.setattr(models, "check_model_folder",
                        lambda folder, trust=False, pickle=False: seen.append(trust) or real(folder, trust, pickle))
    trusted = AdapterRegistry(str(base), adapters_dir, trust_remote_code=True)
    trusted.start()  # the folder has no modeling.py, so loading fails later; the check itself passed
    assert seen and all(seen) and "needs its own Python code" not in (trusted.error or "")


def test_skeletons_share_the_base_tensors(client: TestClient) -> None:
    registry = client.app.state.registry
    group = registry.group(registry.entries["lora"])
    shared = {t.data_ptr() for t in registry._shared.values()}
    base = [p for n, p in group.model.named_parameters() if "lora_" not in n and "modules_to_save" not in n
            and "classifier" not in n]
    assert base and all(p.data_ptr() in shared and not p.requires_grad for p in base)


def test_connections_whose_headers_never_complete_are_closed(tiny_bert: Path, adapters_dir: Path) -> None:
    import socket

    from serve_helpers import RunningServer

    from peftlab.serve.door import header_timeout_protocol

    app = create_app(str(tiny_bert), adapters_dir)  # its own app: a server runs the app's startup and shutdown
    with RunningServer(app, http=header_timeout_protocol(0.2)) as running:
        def closed_by_server(sent: bytes) -> bool:
            with socket.create_connection(("127.0.0.1", running.port), timeout=30) as sock:
                sock.sendall(sent)
                try:
                    return sock.recv(1024) == b""  # EOF: the server hung up without answering
                except TimeoutError:
                    return False

        assert closed_by_server(b"")  # connected, then silence
        assert closed_by_server(b"GET /health HTTP/1.1\r\nHost: local")  # headers that never end (slowloris)
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as sock:  # a whole request is served
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
