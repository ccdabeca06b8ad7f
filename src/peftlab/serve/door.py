"""The door: what every request and connection passes before the app sees it.

Pure ASGI middleware (it sees every request, before routing and parsing): :class:`Guard` -- the Host header
must be a local name or one given with ``--allowed-host`` (DNS rebinding), a POST from a browser page of another
origin is refused unless ``--cors-origin`` allows it (CSRF on load/unload), and with ``--api-key`` every endpoint
but ``/health`` and the static page/docs needs ``Authorization: Bearer <key>``; :class:`BodyLimit` -- the body's
size and the time it may take to arrive. For uvicorn: the bounds on each connection (:func:`uvicorn_limits`).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from typing import Any, Sequence
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

from peftlab.errors import ConfigError
from peftlab.serve.schemas import error_response

# Names a browser on this machine uses for it; anything else in a Host header may be a DNS-rebinding page.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
# Reachable without the API key: they hold no data (the page and the docs are static; /openapi.json is the
# schema, not the adapters) and a browser cannot add a bearer header to a page it navigates to.
_PUBLIC_PATHS = ("/", "/health", "/docs", "/openapi.json")
_PUBLIC_PREFIXES = ("/static/",)
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class Guard:
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
            return error_response(400, "host_not_allowed",
                                  f"Host header {host_header[:100]!r} is not allowed (this guards against DNS "
                                  f"rebinding); if clients reach this server by that name, start it with "
                                  f"--allowed-host {host or 'NAME'}")
        origin = headers.get("origin")
        if (scope["method"] not in _SAFE_METHODS and origin is not None
                and not self._origin_allowed(origin, host_header)):
            return error_response(403, "origin_not_allowed",
                                  f"a POST from a page of origin {origin[:100]!r} is refused (cross-site requests "
                                  f"could load or unload adapters); to let that page use the API, start the server "
                                  f"with --cors-origin {origin[:100]}")
        if self.api_key is not None and scope["method"] != "OPTIONS" and not _is_public(scope["path"]):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken does not tell how many leading characters were right.
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                response = error_response(401, "unauthorized", "missing or wrong API key: send the header "
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
    return path in _PUBLIC_PATHS or path.startswith(_PUBLIC_PREFIXES)


def is_loopback(host: str) -> bool:
    """True for a listening address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with a 413, whether or not Content-Length is sent; a 408 if the body
    does not arrive within ``timeout_s`` (a slow client holds a connection, not the model)."""

    def __init__(self, app: Any, limit: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in _SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        too_large = error_response(413, "body_too_large", f"request body over {self.limit} bytes")
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
                timed_out = error_response(408, "body_timeout",
                                           f"the request body did not arrive within {self.timeout_s:g} s")
                await timed_out(scope, receive, send)
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


def check_api_key(key: str) -> None:
    """Raise :class:`ConfigError` unless ``key`` can travel in an ``Authorization`` header as is."""
    if not key or not key.isascii() or not key.isprintable() or key != key.strip() or " " in key:
        raise ConfigError("--api-key (or PEFTLAB_API_KEY) must be a non-empty token of printable ASCII without "
                          "spaces (it travels in an HTTP header); e.g. python -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))'")


# uvicorn settings, set here rather than left to its defaults, each bounding what one client can hold.
_KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after 5 s: browsers reconnect cheaply
_MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11): a bearer token and a browser's headers fit 10x over
_MAX_CONNECTIONS = 256  # connections + requests in flight; beyond, uvicorn answers 503 at once, not a queue
_HEADER_TIMEOUT_S = 10.0  # a request line + headers must arrive within 10 s of their first byte (or of connecting)


def header_timeout_protocol(timeout_s: float = _HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol with a deadline on each request's headers, which uvicorn does not have.

    Without it a client that connects and sends nothing, or drips its headers a byte at a time
    (slowloris), holds its connection -- and one of ``_MAX_CONNECTIONS`` -- for ever. The keep-alive
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


def uvicorn_limits() -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` that bound each connection (keep-alive, headers, connections)."""
    return {"timeout_keep_alive": _KEEP_ALIVE_S, "h11_max_incomplete_event_size": _MAX_HEADER_BYTES,
            "limit_concurrency": _MAX_CONNECTIONS, "http": header_timeout_protocol()}
