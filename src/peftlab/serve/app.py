"""The HTTP layer: a thin FastAPI app over :class:`~peftlab.serve.registry.AdapterRegistry`.

Endpoints: ``GET /health`` (503 until the base model is loaded), ``GET /v1/adapters``,
``POST /v1/adapters/{name}/load`` and ``/unload``, ``POST /v1/classify``,
``POST /v1/generate``, the try-it page at ``/`` and the OpenAPI docs at ``/docs`` (Swagger UI served from
the ``swagger-ui-bundle-v2`` package: no CDN). Every error is JSON ``{"error": {"code": ..., "message": ...}}``.

Every request passes one door (:class:`_Guard`): the Host header must be a local name or one given with
``--allowed-host`` (DNS rebinding), a POST from a browser page of another origin is refused unless
``--cors-origin`` allows it (CSRF on load/unload), and with ``--api-key`` every endpoint but ``/health``
and the static page/docs needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Sequence
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from peftlab.errors import ConfigError, PeftlabError
from peftlab.serve.registry import (
    AdapterRegistry,
    AdapterUnavailableError,
    BatchQueue,
    InvalidAdapterError,
    InvalidAdapterNameError,
    NotReadyError,
    TextError,
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
        body_timeout_s: how long a request body may take to arrive before a 408 (a slow client).
    """

    max_texts: int = 64
    max_chars: int = 4000
    max_body_bytes: int = 1_000_000
    max_new_tokens: int = 128
    timeout_s: float = 60.0
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        names = ("max_texts", "max_chars", "max_body_bytes", "max_new_tokens", "timeout_s", "body_timeout_s")
        bad = [f"{name} must be > 0 (got {getattr(self, name)!r})" for name in names if not getattr(self, name) > 0]
        if bad:
            raise ConfigError("invalid server limits: " + "; ".join(bad))


# Names a browser on this machine uses for it; anything else in a Host header may be a DNS-rebinding page.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# Reachable without the API key: they hold no data (the page and the docs are static; /openapi.json is the
# schema, not the adapters) and a browser cannot add a bearer header to a page it navigates to.
PUBLIC_PATHS = ("/", "/health", "/docs", "/openapi.json")
PUBLIC_PREFIXES = ("/static/",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


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
    for status, text in ((400, "Invalid adapter name or malformed JSON"),
                         (401, "Missing or wrong API key (only with --api-key)"), (404, "Unknown adapter"),
                         (413, "Too many texts or body too large"),
                         (422, "Invalid request or text, or an adapter whose files are unusable"),
                         (500, "Adapter failed to load, or internal error"), (503, "Not ready"),
                         (504, "No result within the request timeout"))
}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _api_error(exc: PeftlabError) -> ApiError:
    """The HTTP form of a registry error."""
    for kind, status, code in ((InvalidAdapterNameError, 400, "invalid_adapter_name"),
                               (UnknownAdapterError, 404, "adapter_not_found"),
                               (WrongTaskError, 400, "wrong_task"),
                               (InvalidAdapterError, 422, "adapter_invalid"),  # before its base class
                               (AdapterUnavailableError, 500, "adapter_failed"),
                               (TextError, 422, "text_failed"),
                               (NotReadyError, 503, "not_ready")):
        if isinstance(exc, kind):
            return ApiError(status, code, str(exc))
    return ApiError(400, "bad_request", str(exc))


# -- ASGI middleware (pure ASGI: they see every request, before routing and parsing)

class _Guard:
    """The door: Host allow-list, cross-origin POSTs, API key -- before anything is read or parsed.

    Args:
        allowed_hosts: Host names accepted besides :data:`LOCAL_HOSTS` (``*`` any, ``*.example.com`` subdomains).
        allowed_origins: browser origins whose POSTs are accepted besides the page's own (``--cors-origin``).
        api_key: the bearer token every non-public path needs; None for none.
    """

    def __init__(self, app: Any, allowed_hosts: Sequence[str] = (), allowed_origins: Sequence[str] = (),
                 api_key: str | None = None) -> None:
        self.app = app
        self.allowed_hosts = [h.lower().rstrip(".") for h in (*LOCAL_HOSTS, *allowed_hosts)]
        self.allowed_origins = {o.lower().rstrip("/") for o in allowed_origins}
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: dict[str, Any], headers: dict[str, str]) -> JSONResponse | None:
        host_header = headers.get("host", "")
        host = _host_name(host_header)
        if not any(_host_matches(host, pattern) for pattern in self.allowed_hosts):
            return _error(400, "host_not_allowed",
                          f"Host header {host_header[:100]!r} is not allowed (this guards against DNS rebinding); "
                          f"if clients reach this server by that name, start it with --allowed-host {host or 'NAME'}")
        origin = headers.get("origin")
        if scope["method"] not in SAFE_METHODS and origin is not None and not self._origin_allowed(origin, host_header):
            return _error(403, "origin_not_allowed",
                          f"a POST from a page of origin {origin[:100]!r} is refused (cross-site requests could load "
                          f"or unload adapters); to let that page use the API, start the server with "
                          f"--cors-origin {origin[:100]}")
        if self.api_key is not None and scope["method"] != "OPTIONS" and not _is_public(scope["path"]):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken does not tell how many leading characters were right.
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                response = _error(401, "unauthorized", "missing or wrong API key: send the header "
                                                       "'Authorization: Bearer <key>' with the key given to "
                                                       "--api-key (or PEFTLAB_API_KEY)")
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        return None

    def _origin_allowed(self, origin: str, host_header: str) -> bool:
        origin = origin.lower().rstrip("/")
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        # The page at / posts to its own origin: scheme://<the Host header>. "null" (sandboxed, file://) is no host.
        return origin != "null" and urlsplit(origin).netloc == host_header.lower()


def _host_name(host_header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case: '[::1]:8000' -> '::1'."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    if value.count(":") == 1:
        value = value.split(":")[0]
    return value.rstrip(".")


def _host_matches(host: str, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return bool(host) and host == pattern


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def is_loopback(host: str) -> bool:
    """True for a listening address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _BodyLimit:
    """Refuse bodies over ``limit`` bytes with a 413, whether or not Content-Length is sent; a 408 if the body
    does not arrive within ``timeout_s`` (a slow client holds a connection, not the model)."""

    def __init__(self, app: Any, limit: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        too_large = _error(413, "body_too_large", f"request body over {self.limit} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_large(scope, receive, send)
            return
        # Read the (bounded) body here and replay it: cheaper and clearer than failing mid-parse.
        chunks, size, more = [], 0, True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await _error(408, "body_timeout", f"the request body did not arrive within {self.timeout_s:g} s")(
                    scope, receive, send)
                return
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


# -- the app

def create_app(base: str, adapters_dir: Path, *, eager: bool = False, max_loaded: int = 32,
               batch_window_ms: float = 5.0, limits: ServeLimits | None = None, max_batch_rows: int = 64,
               device: str | None = None, dtype: str = "auto", api_key: str | None = None,
               allowed_hosts: Sequence[str] = (), cors_origins: Sequence[str] = (), trust_remote_code: bool = False,
               allow_pickle: bool = False) -> FastAPI:
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
        api_key: bearer token required on every endpoint but ``/health``, ``/``, ``/docs`` and its assets.
        allowed_hosts: Host header names accepted besides localhost, 127.0.0.1 and ::1.
        cors_origins: browser origins allowed to call the API (CORS, and their POSTs); none by default.
        trust_remote_code: run the base model folder's own Python code.
        allow_pickle: accept pickle (``.bin``) weights for the base model and adapters.

    Raises:
        AdapterError: ``adapters_dir`` is not a folder or holds no adapter.
        ConfigError: the batching window is not shorter than the request timeout, or the API key is unusable.
    """
    limits = limits or ServeLimits()
    if not 0 <= batch_window_ms < 1000 * limits.timeout_s:
        # A window as long as the timeout answers every lone request with a 504 (LitServe checks the same).
        raise ConfigError(f"--batch-window-ms {batch_window_ms:g} must be >= 0 and shorter than the request timeout "
                          f"({1000 * limits.timeout_s:g} ms); a few ms is enough to share forward passes")
    if api_key is not None:
        _check_api_key(api_key)
    registry = AdapterRegistry(base, adapters_dir, max_loaded=max_loaded, device=device, dtype=dtype,
                               max_batch_rows=max_batch_rows, trust_remote_code=trust_remote_code,
                               allow_pickle=allow_pickle)
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

    # docs_url/redoc_url None: FastAPI's own pages load Swagger UI / ReDoc from a CDN; /docs below is local.
    app = FastAPI(title="peftlab serve", version=_version(), lifespan=lifespan, responses=ERROR_RESPONSES,
                  docs_url=None, redoc_url=None,
                  description="Many PEFT adapters on one shared base model. Errors are "
                              "`{\"error\": {\"code\", \"message\"}}`.")
    app.state.registry = registry
    app.state.batcher = batcher
    app.state.limits = limits
    # Added last = outermost: the guard runs first, then CORS (its preflights need no key), then the body limit.
    app.add_middleware(_BodyLimit, limit=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False, max_age=600)
    app.add_middleware(_Guard, allowed_hosts=list(allowed_hosts), allowed_origins=list(cors_origins),
                       api_key=api_key)
    # Only declares the scheme (the docs' Authorize button); _Guard enforces it, before the body is read.
    v1: list[Any] = [Security(HTTPBearer(auto_error=False, description="the --api-key"))] if api_key else []

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette runs this in its outermost middleware (errors of the body limit too), then re-raises for
        # the server's own log; the reply reveals nothing internal.
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal_error", "internal server error; the server log has the details")

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

    swagger = _swagger_assets()
    if swagger is not None:
        app.mount("/static/swagger", StaticFiles(directory=swagger), name="swagger")

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        if swagger is None:  # the serve extra not installed: still offline, with the schema's address
            return HTMLResponse(f"<!doctype html><title>peftlab serve</title><p>Swagger UI is not installed "
                                f"(pip install swagger-ui-bundle-v2). The OpenAPI schema is at "
                                f"<a href='{root}/openapi.json'>/openapi.json</a>.</p>")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title="peftlab serve - docs",
                                   swagger_js_url=f"{root}/static/swagger/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/static/swagger/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/static/swagger/favicon-32x32.png",
                                   oauth2_redirect_url=None)

    @app.get("/health", response_model=Health, responses={503: {"model": ErrorResponse}})
    def health() -> Any:
        """200 with counts once the base model is loaded; 503 before (or if it failed)."""
        if not registry.ready:
            message = registry.error or "loading the base model"
            return _error(503, "not_ready" if registry.state == "starting" else "base_failed", message)
        return Health(status="ok", base=str(base), batches=batcher.batches, **registry.counts())

    @app.get("/v1/adapters", response_model=AdaptersResponse, dependencies=v1)
    def adapters() -> AdaptersResponse:
        """Every registered adapter: method, task, labels, size on disk, loaded or not, load error."""
        return AdaptersResponse(adapters=[AdapterInfo(**a) for a in registry.adapters()])

    @app.post("/v1/adapters/{name}/load", response_model=AdapterInfo, dependencies=v1)
    async def load(name: str) -> AdapterInfo:
        """Load an adapter now (retries one that failed); may unload the least recently used."""
        return AdapterInfo(**await run_in_threadpool(registry.load, name))

    @app.post("/v1/adapters/{name}/unload", response_model=AdapterInfo, dependencies=v1)
    async def unload(name: str) -> AdapterInfo:
        """Free an adapter's memory; it stays registered and loads again when used."""
        return AdapterInfo(**await run_in_threadpool(registry.unload, name))

    @app.post("/v1/classify", response_model=ClassifyResponse, dependencies=v1)
    async def classify(request: ClassifyRequest) -> ClassifyResponse:
        """Label, score and every class's probability per text; concurrent requests share forward passes."""
        rows = request.rows()
        field = "texts" if request.items is None else "items"
        _check_texts([text for _, text in rows], limits, field)  # one bad text: 422 before it shares a batch
        for name in dict.fromkeys(name for name, _ in rows):  # 400/404 before anything is queued
            registry.classifier(name)
        registry.require_ready()
        future = batcher.submit(rows)
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(future), timeout=limits.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no result within {limits.timeout_s:g} s; the server is "
                                           f"overloaded") from None
        except TextError as exc:
            raise ApiError(422, "text_failed", f"{field}[{exc.index}]: {exc}") from None
        return ClassifyResponse(results=[Classification(text=text, **result)
                                         for (_, text), result in zip(rows, results)])

    @app.post("/v1/generate", response_model=GenerateResponse, dependencies=v1)
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
        if not text.strip():
            raise ApiError(422, "empty_text", f"{field}[{index}] is empty or only whitespace; training drops such "
                                              f"texts, so no adapter has learnt a label for them: remove it")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON may carry "\ud800": a lone surrogate, which no tokenizer takes
            raise ApiError(422, "invalid_text", f"{field}[{index}] is not valid Unicode: {exc.reason} "
                                                f"(U+{ord(text[exc.start]):04X} at character {exc.start}); send "
                                                f"UTF-8 text, with surrogates only in pairs") from None


def _check_api_key(key: str) -> None:
    if not key or not key.isascii() or not key.isprintable() or key != key.strip() or " " in key:
        raise ConfigError("--api-key (or PEFTLAB_API_KEY) must be a non-empty token of printable ASCII without "
                          "spaces (it travels in an HTTP header); e.g. python -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))'")


def _swagger_assets() -> Path | None:
    """Swagger UI's files from the swagger-ui-bundle-v2 package (the serve extra), or None without it."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    folder = Path(str(swagger_ui_path))
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _version() -> str:
    from peftlab import __version__

    return __version__


# uvicorn settings, set here rather than left to its defaults, each bounding what one client can hold.
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after 5 s: browsers reconnect cheaply
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11): a bearer token and a browser's headers fit 10x over
MAX_CONNECTIONS = 256  # connections + requests in flight; beyond, uvicorn answers 503 at once, not a queue
HEADER_TIMEOUT_S = 10.0  # a request line + headers must arrive within 10 s of their first byte (or of connecting)


def header_timeout_protocol(timeout_s: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol with a deadline on each request's headers, which uvicorn does not have.

    Without it a client that connects and sends nothing, or drips its headers a byte at a time
    (slowloris), holds its connection -- and one of ``MAX_CONNECTIONS`` -- for ever. The keep-alive
    timeout covers only the wait between two requests, and uvicorn cancels it on the first byte.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):  # type: ignore[misc]
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # a request begun, its headers not complete yet
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)
            else:
                self._cancel_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


def serve(base: str, adapters_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, eager: bool = False,
          max_loaded: int = 32, batch_window_ms: float = 5.0, limits: ServeLimits | None = None,
          log_level: str = "info", api_key: str | None = None, allowed_hosts: Sequence[str] = (),
          cors_origins: Sequence[str] = (), trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    """Check the base model and adapters, then run the app with uvicorn until interrupted.

    Listening on an address other machines can reach (``--host 0.0.0.0``, a LAN address) needs ``api_key``;
    a specific address is added to the allowed Host names, other names need ``allowed_hosts``.

    Raises:
        ModelError: ``base`` is neither a shipped alias nor a model folder (or needs remote code / pickle).
        AdapterError: ``adapters_dir`` holds no adapter.
        ConfigError: a non-loopback ``host`` without ``api_key``; a bad API key or batching window.
    """
    import uvicorn

    from peftlab.errors import ModelError
    from peftlab.models import check_model_folder, resolve_model_path

    hosts = list(allowed_hosts)
    if not is_loopback(host):
        if not api_key:
            raise ConfigError(f"--host {host} lets other machines reach the server, which can then classify and "
                              f"load/unload adapters: set --api-key (or PEFTLAB_API_KEY), or listen on 127.0.0.1")
        if host not in ("0.0.0.0", "::", ""):  # clients that use the address itself send it as the Host
            hosts.append(host)
        logger.info("listening on %s: accepted Host names are %s; add the names clients use with --allowed-host",
                    host, ", ".join([*LOCAL_HOSTS, *hosts]))
    try:  # fail now with a message, not later in a thread
        check_model_folder(resolve_model_path(base), trust_remote_code, allow_pickle)
    except ModelError as exc:
        raise ModelError(f"--base {base}: {exc}".replace("set model.trust_remote_code: true (or --set "
                                                          "model.trust_remote_code=true)", "pass --trust-remote-code")
                         .replace("set model.allow_pickle: true", "pass --allow-pickle")) from None
    app = create_app(base, adapters_dir, eager=eager, max_loaded=max_loaded, batch_window_ms=batch_window_ms,
                     limits=limits, api_key=api_key, allowed_hosts=hosts, cors_origins=cors_origins,
                     trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    names = json.dumps(sorted(app.state.registry.entries))
    logger.info("serving adapters %s on http://%s:%d (docs at /docs)", names, host, port)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S,
                h11_max_incomplete_event_size=MAX_HEADER_BYTES, limit_concurrency=MAX_CONNECTIONS,
                http=header_timeout_protocol())
