"""The HTTP layer: a thin FastAPI app over :class:`~peftlab.serve.registry.AdapterRegistry`.

Endpoints: ``GET /health`` (503 until the base model is loaded), ``GET /v1/adapters``,
``POST /v1/adapters/{name}/load`` and ``/unload``, ``POST /v1/classify``,
``POST /v1/generate``, the try-it page at ``/`` and the OpenAPI docs at ``/docs``.
Every error is JSON ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftlab.errors import PeftlabError
from peftlab.serve.registry import (
    AdapterRegistry,
    AdapterUnavailableError,
    BatchQueue,
    InvalidAdapterNameError,
    NotReadyError,
    UnknownAdapterError,
    WrongTaskError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask for.

    Attributes:
        max_texts: texts (or items, or prompts) per request; more is a 413.
        max_chars: characters per text; longer is a 422.
        max_body_bytes: request body size; larger is a 413 before it is parsed.
        max_new_tokens: the most tokens ``/v1/generate`` may ask for.
        timeout_s: how long a request may wait for its batch before a 504.
    """

    max_texts: int = 64
    max_chars: int = 4000
    max_body_bytes: int = 1_000_000
    max_new_tokens: int = 128
    timeout_s: float = 60.0


class ApiError(Exception):
    """An error with its HTTP status and a short machine-readable code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


# -- request and response models

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown key is a typo, not something to ignore


class ClassifyItem(_Strict):
    """One text for one adapter."""

    adapter: str = Field(description="Adapter name (see GET /v1/adapters).", examples=["lora"])
    text: str = Field(description="Text to classify.", examples=["a wonderful film"])


class ClassifyRequest(_Strict):
    """Either ``adapter`` + ``texts`` (one adapter), or ``items`` (each names its adapter)."""

    adapter: str | None = Field(None, description="Adapter for every text in `texts`.", examples=["lora"])
    texts: list[str] | None = Field(None, description="Texts to classify with `adapter`.",
                                    examples=[["a wonderful film", "dull and messy"]])
    items: list[ClassifyItem] | None = Field(None, description="Mixed batch: each item names its adapter.")

    @model_validator(mode="after")
    def _one_form(self) -> "ClassifyRequest":
        if self.items is not None and (self.adapter is not None or self.texts is not None):
            raise ValueError("give either `items` or `adapter` + `texts`, not both")
        if self.items is None and (self.adapter is None or self.texts is None):
            raise ValueError("give `adapter` and `texts`, or `items` (a list of {adapter, text})")
        return self

    def rows(self) -> list[tuple[str, str]]:
        if self.items is not None:
            return [(item.adapter, item.text) for item in self.items]
        return [(self.adapter or "", text) for text in self.texts or []]


class Classification(BaseModel):
    """One text's result with its adapter's own class names."""

    adapter: str
    text: str
    label: str
    score: float = Field(description="Probability of `label`.")
    probabilities: dict[str, float] = Field(description="Every class's probability (fp32 softmax).")


class ClassifyResponse(BaseModel):
    results: list[Classification] = Field(description="One per text, in request order.")


class GenerateRequest(_Strict):
    """Greedy continuations from one causal-LM adapter."""

    adapter: str = Field(examples=["lora"])
    prompts: list[str] = Field(examples=[["Write a haiku about autumn."]])
    max_new_tokens: int = Field(32, ge=1, description="Tokens to generate per prompt.")


class Generation(BaseModel):
    adapter: str
    prompt: str
    text: str = Field(description="The generated continuation (without the prompt).")


class GenerateResponse(BaseModel):
    results: list[Generation]


class AdapterInfo(BaseModel):
    name: str
    method: str
    task: str
    labels: list[str]
    size_bytes: int = Field(description="Adapter weights on disk (tokenizer files excluded).")
    loaded: bool
    error: str | None = Field(None, description="Why it failed to load, if it did.")


class AdaptersResponse(BaseModel):
    adapters: list[AdapterInfo]


class Health(BaseModel):
    status: str
    base: str
    adapters: int
    loaded: int
    failed: int
    forward_passes: int
    batches: int


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in ((400, "Invalid adapter name or malformed JSON"), (404, "Unknown adapter"),
                         (413, "Too many texts or body too large"), (422, "Invalid request"),
                         (500, "Adapter failed to load, or internal error"), (503, "Not ready"))
}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _api_error(exc: PeftlabError) -> ApiError:
    """The HTTP form of a registry error."""
    for kind, status, code in ((InvalidAdapterNameError, 400, "invalid_adapter_name"),
                               (UnknownAdapterError, 404, "adapter_not_found"),
                               (WrongTaskError, 400, "wrong_task"),
                               (AdapterUnavailableError, 500, "adapter_failed"),
                               (NotReadyError, 503, "not_ready")):
        if isinstance(exc, kind):
            return ApiError(status, code, str(exc))
    return ApiError(400, "bad_request", str(exc))


# -- ASGI middleware (pure ASGI: they see every request, before routing and parsing)

class _BodyLimit:
    """Refuse bodies over ``limit`` bytes with a 413, whether or not Content-Length is sent."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_large = _error(413, "body_too_large", f"request body over {self.limit} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(scope, receive, send)
            return
        # Read the (bounded) body here and replay it: cheaper and clearer than failing mid-parse.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _InternalErrors:
    """Log any unhandled exception with its traceback and answer a 500 that reveals nothing internal."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            logger.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _error(500, "internal_error", "internal server error; the server log has the details")(
                    scope, receive, send)


# -- the app

def create_app(base: str, adapters_dir: Path, *, eager: bool = False, max_loaded: int = 32,
               batch_window_ms: float = 5.0, limits: ServeLimits | None = None, max_batch_rows: int = 64,
               device: str | None = None, dtype: str = "auto") -> FastAPI:
    """Build the serving app. Adapters are discovered now; models load in the background at startup.

    Args:
        base: base model alias or folder, loaded once and shared by every adapter.
        adapters_dir: folder whose subfolders are adapters (``<name>/`` or ``<method>/model/``).
        eager: load adapters at startup (up to ``max_loaded``) instead of on first use.
        max_loaded: most adapters held in memory; least recently used are unloaded (0: no limit).
        batch_window_ms: how long a request waits for others to share its forward pass.
        limits: request bounds (:class:`ServeLimits`).
        max_batch_rows: texts per forward pass.
        device: torch device; default CUDA when available.
        dtype: auto, float32, bfloat16 or float16.

    Raises:
        AdapterError: ``adapters_dir`` is not a folder or holds no adapter.
    """
    limits = limits or ServeLimits()
    registry = AdapterRegistry(base, adapters_dir, max_loaded=max_loaded, device=device, dtype=dtype,
                               max_batch_rows=max_batch_rows)
    batcher = BatchQueue(registry.classify, window_s=batch_window_ms / 1000.0, max_rows=max_batch_rows)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background so /health can answer 503 while the base model loads.
        loader = threading.Thread(target=registry.start, kwargs={"eager": eager}, name="peftlab-loader",
                                  daemon=True)
        loader.start()
        batcher.start()
        try:
            yield
        finally:
            batcher.close()

    app = FastAPI(title="peftlab serve", version=_version(), lifespan=lifespan, responses=ERROR_RESPONSES,
                  description="Many PEFT adapters on one shared base model. Errors are "
                              "`{\"error\": {\"code\", \"message\"}}`.")
    app.state.registry = registry
    app.state.batcher = batcher
    app.state.limits = limits
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(_InternalErrors)  # added last = outermost: also catches errors of the body limit

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(PeftlabError)
    async def peftlab_error(request: Request, exc: PeftlabError) -> JSONResponse:
        error = _api_error(exc)
        return _error(error.status, error.code, error.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return _error(400, "malformed_json", "the request body is not valid JSON")
        message = "; ".join(f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body') or 'body'}: {p.get('msg')}"
                            for p in problems[:10])
        return _error(422, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        from importlib.resources import files

        return HTMLResponse(files("peftlab.serve").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
    def health() -> Any:
        """200 with counts once the base model is loaded; 503 before (or if it failed)."""
        if not registry.ready:
            message = registry.error or "loading the base model"
            return _error(503, "not_ready" if registry.state == "starting" else "base_failed", message)
        return Health(status="ok", base=str(base), batches=batcher.batches, **registry.counts())

    @app.get("/v1/adapters", response_model=AdaptersResponse)
    def adapters() -> AdaptersResponse:
        """Every registered adapter: method, task, labels, size on disk, loaded or not, load error."""
        return AdaptersResponse(adapters=[AdapterInfo(**a) for a in registry.adapters()])

    @app.post("/v1/adapters/{name}/load", response_model=AdapterInfo)
    async def load(name: str) -> AdapterInfo:
        """Load an adapter now (retries one that failed); may unload the least recently used."""
        return AdapterInfo(**await run_in_threadpool(registry.load, name))

    @app.post("/v1/adapters/{name}/unload", response_model=AdapterInfo)
    async def unload(name: str) -> AdapterInfo:
        """Free an adapter's memory; it stays registered and loads again when used."""
        return AdapterInfo(**await run_in_threadpool(registry.unload, name))

    @app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(request: ClassifyRequest) -> ClassifyResponse:
        """Label, score and every class's probability per text; concurrent requests share forward passes."""
        rows = request.rows()
        _check_texts([text for _, text in rows], limits, "texts" if request.items is None else "items")
        for name in dict.fromkeys(name for name, _ in rows):  # 400/404 before anything is queued
            entry = registry.entry(name)
            if entry.task != "classification":
                raise WrongTaskError(f"adapter {name!r} is a {entry.task} adapter, not a classifier; "
                                     f"use /v1/generate")
        if not registry.ready:
            raise NotReadyError(registry.error or "the server is loading its base model; retry shortly")
        future = batcher.submit(rows)
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(future), timeout=limits.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no result within {limits.timeout_s:g} s; the server is "
                                           f"overloaded") from None
        return ClassifyResponse(results=[Classification(text=text, **result)
                                         for (_, text), result in zip(rows, results)])

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(request: GenerateRequest) -> GenerateResponse:
        """Greedy continuations from a causal-LM adapter (a classifier adapter is a 400)."""
        _check_texts(request.prompts, limits, "prompts")
        if request.max_new_tokens > limits.max_new_tokens:
            raise ApiError(422, "invalid_request", f"max_new_tokens {request.max_new_tokens} is over the limit "
                                                   f"{limits.max_new_tokens}")
        texts = await run_in_threadpool(registry.generate, request.adapter, request.prompts, request.max_new_tokens)
        return GenerateResponse(results=[Generation(adapter=request.adapter, prompt=p, text=t)
                                         for p, t in zip(request.prompts, texts)])

    return app


def _check_texts(texts: list[str], limits: ServeLimits, field: str) -> None:
    if not texts:
        raise ApiError(422, "invalid_request", f"{field} is empty: give at least one text")
    if len(texts) > limits.max_texts:
        raise ApiError(413, "too_many_texts", f"{len(texts)} {field} in one request; the limit is "
                                              f"{limits.max_texts}: split the request")
    for index, text in enumerate(texts):
        if len(text) > limits.max_chars:
            raise ApiError(422, "text_too_long", f"{field}[{index}] has {len(text)} characters; the limit is "
                                                 f"{limits.max_chars}")


def _version() -> str:
    from peftlab import __version__

    return __version__


def serve(base: str, adapters_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, eager: bool = False,
          max_loaded: int = 32, batch_window_ms: float = 5.0, limits: ServeLimits | None = None,
          log_level: str = "info") -> None:
    """Check the base model and adapters, then run the app with uvicorn until interrupted.

    Raises:
        ModelError: ``base`` is neither a shipped alias nor a model folder.
        AdapterError: ``adapters_dir`` holds no adapter.
    """
    import uvicorn

    from peftlab.errors import ModelError
    from peftlab.models import check_model_folder, resolve_model_path

    try:
        check_model_folder(resolve_model_path(base))  # fail now with a message, not later in a thread
    except ModelError as exc:
        raise ModelError(f"--base {base}: {exc}") from None
    app = create_app(base, adapters_dir, eager=eager, max_loaded=max_loaded, batch_window_ms=batch_window_ms,
                     limits=limits)
    names = json.dumps(sorted(app.state.registry.entries))
    logger.info("serving adapters %s on http://%s:%d (docs at /docs)", names, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
