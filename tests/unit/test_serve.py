"""peftlab serve on a tiny random BERT: mixed-adapter batches, limits, errors, loading, LRU (seconds, offline)."""

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
from peftlab.serve.registry import BatchQueue, InvalidAdapterNameError, TextError, check_adapter_name  # noqa: E402

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
    from peftlab.serve.registry import discover_adapters

    with caplog.at_level(logging.INFO, logger="peftlab.serve.registry"):
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
        rng = random.Random(seed)
        for number in range(20):
            items = [{"adapter": rng.choice(GOOD), "text": rng.choice(TEXTS)} for _ in range(rng.randint(1, 3))]
            response = client.post("/v1/classify", json={"items": items})
            try:
                assert response.status_code == 200, response.text
                for item, result in zip(items, response.json()["results"]):
                    assert_matches(result, expected, item["adapter"], item["text"])
            except AssertionError as exc:
                failures.append(f"client {seed} request {number}: {exc}")

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
        rng = random.Random(seed)
        for _ in range(4):
            items = [{"adapter": rng.choice(GOOD), "text": rng.choice(TEXTS)} for _ in range(rng.randint(1, 4))]
            response = client.post("/v1/classify", json={"items": items})
            try:
                assert response.status_code == 200, response.text
                for item, result in zip(items, response.json()["results"]):
                    assert_matches(result, expected, item["adapter"], item["text"])
            except AssertionError as exc:
                failures.append(str(exc))

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
    for seed, method in enumerate(methods):
        make_adapter(tiny_bert, tmp_path / method, method, seed=seed)
    registry = AdapterRegistry(str(tiny_bert), tmp_path, max_loaded=0)
    registry.start(eager=True)
    rows = [(m, t) for m in methods for t in TEXTS]
    random.Random(1).shuffle(rows)
    results = registry.classify(rows)
    for method in methods:
        predictor = load_predictor(tmp_path / method)
        proba = predictor.predict_proba(TEXTS)
        for (name, text), result in zip(rows, results):
            if name == method:
                assert isinstance(result, dict), result
                got = [result["probabilities"][n] for n in predictor.labels]
                np.testing.assert_allclose(got, proba[TEXTS.index(text)], atol=1e-5, rtol=0, err_msg=method)
    # Only plain LoRA mixes; DoRA, LoHa, IA3 and each prompt-learning adapter take their own pass.
    assert registry.forward_passes == len(methods)


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

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--max-loaded" in result.output and "--eager" in result.output

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
