"""The HTTP layer: a thin FastAPI app over :class:`~peftlab.serve.registry.AdapterRegistry`.

Endpoints: ``GET /health`` (503 until the base model is loaded), ``GET /v1/adapters``,
``POST /v1/adapters/{name}/load`` and ``/unload``, ``POST /v1/classify``,
``POST /v1/generate``, the try-it page at ``/`` and the OpenAPI docs at ``/docs`` (Swagger UI served from
the ``swagger-ui-bundle-v2`` package: no CDN). Every error is JSON ``{"error": {"code": ..., "message": ...}}``
(:mod:`~peftlab.serve.schemas`).

Every request passes one door first (:mod:`~peftlab.serve.door`): the Host, Origin and API-key checks and the
body limit, before anything is routed or parsed; here are the routes and the checks of what a request asks for
(:class:`ServeLimits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from peftlab.errors import ConfigError, PeftlabError
from peftlab.serve.batching import BatchQueue
from peftlab.serve.door import LOCAL_HOSTS, BodyLimit, Guard, check_api_key, is_loopback, uvicorn_limits
from peftlab.serve.errors import TextError
from peftlab.serve.registry import AdapterRegistry
from peftlab.serve.schemas import (
    ERROR_RESPONSES,
    AdapterInfo,
    AdaptersResponse,
    ApiError,
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Generation,
    Health,
    as_api_error,
    error_response,
)

__all__ = ["ServeLimits", "create_app", "serve"]

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
        check_api_key(api_key)
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
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False, max_age=600)
    app.add_middleware(Guard, allowed_hosts=list(allowed_hosts), allowed_origins=list(cors_origins),
                       api_key=api_key)
    # Only declares the scheme (the docs' Authorize button); Guard enforces it, before the body is read.
    v1: list[Any] = [Security(HTTPBearer(auto_error=False, description="the --api-key"))] if api_key else []

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette runs this in its outermost middleware (errors of the body limit too), then re-raises for
        # the server's own log; the reply reveals nothing internal.
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal_error", "internal server error; the server log has the details")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(PeftlabError)
    async def peftlab_error(request: Request, exc: PeftlabError) -> JSONResponse:
        error = as_api_error(exc)
        return error_response(error.status, error.code, error.message)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        message = "; ".join(f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body') or 'body'}: {p.get('msg')}"
                            for p in problems[:10])
        return error_response(422, "invalid_request", message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

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
            return error_response(503, "not_ready" if registry.state == "starting" else "base_failed", message)
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
    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_limits())
