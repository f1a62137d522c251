"""Messenger server: chats over a hand-written HTTP/1.1 server on asyncio.streams.

Run it with ``python messenger_server.py --port 8000``; ``--help`` lists every flag.
The HTTP contract is ``API.md``; ``GET /openapi.json`` serves it as an OpenAPI 3.1 document.

Routes:
    GET    /health                         liveness, no token
    GET    /openapi.json                   this API as OpenAPI 3.1, no token
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.utils
import json
import logging
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol
from urllib.parse import parse_qsl, unquote

logger = logging.getLogger("messenger")

# Configuration ##############################################################

VERSION: Final = "1.0.0"

MAX_REQUEST_LINE: Final = 8 * 1024  # bytes; 414 above
MAX_HEADER_LINE: Final = 8 * 1024  # bytes; 431 above
MAX_HEADERS: Final = 100  # header lines; 431 above
MAX_HEAD: Final = 32 * 1024  # bytes of request line and headers together; 431 above
MAX_EMPTY_LINES: Final = 8  # CRLFs ignored before a request line (RFC 9112 §2.2); 400 above
MAX_JSON_BODY: Final = 64 * 1024  # bytes; 413 above
MAX_FILE_SIZE: Final = 5 * 1024 * 1024  # bytes; 413 above
HEAD_TIMEOUT: Final = 10.0  # seconds from a head's first byte to its end; 408 after
BODY_TIMEOUT: Final = 30.0  # seconds for a whole body; 408 after
IDLE_TIMEOUT: Final = 75.0  # seconds an idle keep-alive connection is kept
SHUTDOWN_TIMEOUT: Final = 10.0  # seconds in-flight requests get to finish at shutdown
MAX_CONNECTIONS_PER_IP: Final = 256  # open connections per client address; 503 above
READ_SIZE: Final = 64 * 1024  # bytes asked of the stream per read

JSON_TYPE: Final = "application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The limits the HTTP parser enforces; each one is a server flag."""

    max_request_line: int = MAX_REQUEST_LINE
    max_header_line: int = MAX_HEADER_LINE
    max_headers: int = MAX_HEADERS
    max_head: int = MAX_HEAD


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the command line can set."""

    host: str = "127.0.0.1"
    port: int = 8000
    state_dir: Path = Path("state")
    log_level: str = "INFO"
    http: HttpLimits = field(default_factory=HttpLimits)
    max_json_body: int = MAX_JSON_BODY
    max_file_size: int = MAX_FILE_SIZE
    head_timeout: float = HEAD_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    shutdown_timeout: float = SHUTDOWN_TIMEOUT
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP


# Errors ####################################################################


class MessengerError(Exception):
    """An error with a designed answer: its status, its code and a message for humans."""

    status: ClassVar[HTTPStatus] = HTTPStatus.INTERNAL_SERVER_ERROR
    code: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> list[tuple[str, str]]:
        """Extra response headers the error needs (Allow, Retry-After...)."""
        return []

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message}


class BadRequest(MessengerError):
    status = HTTPStatus.BAD_REQUEST
    code = "bad_request"


class MethodNotAllowed(MessengerError):
    status = HTTPStatus.METHOD_NOT_ALLOWED
    code = "method_not_allowed"

    def __init__(self, message: str, allow: Sequence[str]) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> list[tuple[str, str]]:
        return [("Allow", ", ".join(self.allow))]


class NotFound(MessengerError):
    status = HTTPStatus.NOT_FOUND
    code = "not_found"


class RequestTimeout(MessengerError):
    status = HTTPStatus.REQUEST_TIMEOUT
    code = "timeout"


class PayloadTooLarge(MessengerError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "too_large"


class UriTooLong(MessengerError):
    status = HTTPStatus.REQUEST_URI_TOO_LONG
    code = "uri_too_long"


class HeadersTooLarge(MessengerError):
    status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
    code = "headers_too_large"


class NotImplementedByServer(MessengerError):
    status = HTTPStatus.NOT_IMPLEMENTED
    code = "not_implemented"


class VersionNotSupported(MessengerError):
    status = HTTPStatus.HTTP_VERSION_NOT_SUPPORTED
    code = "http_version"


class Unavailable(MessengerError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "unavailable"


class InternalError(MessengerError):
    status = HTTPStatus.INTERNAL_SERVER_ERROR
    code = "internal"


# HTTP protocol, no I/O ######################################################

_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_METHOD_RE: Final = re.compile(_TOKEN)
_TARGET_RE: Final = re.compile(rb"[\x21-\x7e]+")  # 1*VCHAR; the router judges the rest
_VERSION_RE: Final = re.compile(rb"HTTP/([0-9])\.([0-9])")
_FIELD_RE: Final = re.compile(rb"(" + _TOKEN + rb"):([\t\x20-\x7e\x80-\xff]*)")
_HOST_RE: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~!$&'()*+,;=%]+)(?::[0-9]*)?")
_ABSOLUTE_RE: Final = re.compile(r"[hH][tT][tT][pP][sS]?://([^/?#]*)([^#]*)(?:#.*)?")
_AUTHORITY_FORM_RE: Final = re.compile(r"[-A-Za-z0-9._~!$&'()*+,;=%]+:[0-9]+")
# A request line that has begun: a method, maybe a target, maybe the start of a version.
_PARTIAL_LINE_RE: Final = re.compile(
    rb"(?:" + _TOKEN + rb"(?: [\x21-\x7e]*(?: [HTP/0-9.]*\r?)?)?)?"
)
_BARE_EOL_RE: Final = re.compile(rb"(?<!\r)\n|\r(?=[^\n])")
_CHUNK_SIZE_RE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,16})"
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN
    + rb'|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"))?)*'
)

STANDARD_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE"}
)
# Fields a request may carry once only: two of them make the request ambiguous.
_SINGLETON_FIELDS: Final = frozenset({"host", "content-length", "authorization"})


@dataclass(slots=True)
class Request:
    """A parsed request head. The body stays in the stream until a handler asks for it."""

    method: str
    target: str
    path: str
    query: str
    minor: int  # HTTP/1.<minor>; 1 for every 1.x above 1.0
    headers: dict[str, str]
    keep_alive: bool
    content_length: int | None = None
    chunked: bool = False
    expect_continue: bool = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def query_params(self) -> dict[str, str]:
        """The query string as a dict; the first of repeated names wins."""
        try:
            pairs = parse_qsl(self.query, keep_blank_values=True, errors="strict")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest("the query string is not valid UTF-8 percent-encoding") from exc
        params: dict[str, str] = {}
        for name, value in pairs:
            params.setdefault(name, value)
        return params


def check_partial_head(data: bytes | bytearray, limits: HttpLimits) -> None:
    """Refuse a head that is still arriving but can already be judged bad or too big."""
    line_end = data.find(b"\r\n")
    first_line = data if line_end == -1 else data[:line_end]
    if len(first_line) > limits.max_request_line:
        raise UriTooLong(f"the request line is longer than {limits.max_request_line} bytes")
    if line_end == -1 and not _PARTIAL_LINE_RE.fullmatch(first_line):
        raise BadRequest("malformed request line")
    if _BARE_EOL_RE.search(data):
        raise BadRequest("lines must end with CRLF")
    if len(data) > limits.max_head:
        raise HeadersTooLarge(f"the request head is larger than {limits.max_head} bytes")
    last_line_start = data.rfind(b"\r\n") + 2 if line_end != -1 else len(data)
    if len(data) - last_line_start > limits.max_header_line:
        raise HeadersTooLarge(f"a header line is longer than {limits.max_header_line} bytes")


def parse_head(head: bytes, limits: HttpLimits) -> Request:
    """Parse a request line and its header fields (RFC 9112 §3, §5), CRLF CRLF excluded."""
    lines = head.split(b"\r\n")
    method, target, minor = _parse_request_line(lines[0], limits)
    if len(head) > limits.max_head:
        raise HeadersTooLarge(f"the request head is larger than {limits.max_head} bytes")
    if len(lines) - 1 > limits.max_headers:
        raise HeadersTooLarge(f"more than {limits.max_headers} header lines")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, value = parse_field_line(line, limits)
        if name in headers:
            if name in _SINGLETON_FIELDS:
                raise BadRequest(f"the {name} header appears twice")
            headers[name] += ", " + value
        else:
            headers[name] = value
    path, query = _parse_target(method, target, headers, minor)
    content_length, chunked = _parse_framing(headers, minor)
    connection = headers.get("connection", "").lower()
    if minor == 0:
        keep_alive = "keep-alive" in _split_list(connection)
    else:
        keep_alive = "close" not in _split_list(connection) if connection else True
    expect = headers.get("expect")
    return Request(
        method=method,
        target=target,
        path=path,
        query=query,
        minor=minor,
        headers=headers,
        keep_alive=keep_alive and method != "CONNECT",
        content_length=content_length,
        chunked=chunked,
        expect_continue=minor == 1 and expect is not None and expect.lower() == "100-continue",
    )


def parse_field_line(line: bytes, limits: HttpLimits) -> tuple[str, str]:
    """One ``name: value`` line: no space before the colon, no folding, no control bytes."""
    if len(line) > limits.max_header_line:
        raise HeadersTooLarge(f"a header line is longer than {limits.max_header_line} bytes")
    match = _FIELD_RE.fullmatch(line)
    if match is None:
        raise BadRequest("malformed header line")
    name, value = match.groups()
    return name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")


def _parse_request_line(line: bytes, limits: HttpLimits) -> tuple[str, str, int]:
    if len(line) > limits.max_request_line:
        raise UriTooLong(f"the request line is longer than {limits.max_request_line} bytes")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadRequest("the request line must be: method SP target SP version")
    method, target, version = parts
    if not _METHOD_RE.fullmatch(method):
        raise BadRequest("the method is not a token")
    if not _TARGET_RE.fullmatch(target):
        raise BadRequest("the request target is empty or holds a forbidden byte")
    match = _VERSION_RE.fullmatch(version)
    if match is None:
        raise BadRequest("malformed HTTP version")
    if match[1] != b"1":
        raise VersionNotSupported("only HTTP/1.x is served")
    return method.decode("ascii"), target.decode("ascii"), min(int(match[2]), 1)


def _parse_target(
    method: str, target: str, headers: dict[str, str], minor: int
) -> tuple[str, str]:
    """Check Host and the target's form (RFC 9112 §3.2); return the path and query."""
    host = headers.get("host")
    if host is None:
        if minor == 1:
            raise BadRequest("HTTP/1.1 requests need a Host header")
    elif not _HOST_RE.fullmatch(host):
        raise BadRequest("the Host header is not a valid host[:port]")
    if target.startswith("/"):
        origin = target
    elif target == "*":
        if method != "OPTIONS":
            raise BadRequest("the asterisk form is for OPTIONS only")
        return "*", ""
    elif method == "CONNECT":
        if not _AUTHORITY_FORM_RE.fullmatch(target):
            raise BadRequest("CONNECT needs a host:port target")
        return target, ""
    else:
        match = _ABSOLUTE_RE.fullmatch(target)
        if match is None or not _HOST_RE.fullmatch(match[1]):
            raise BadRequest("the request target must be a path or an absolute http URI")
        origin = match[2] if match[2].startswith("/") else "/" + match[2]
    origin = origin.partition("#")[0]
    path, _, query = origin.partition("?")
    return path, query


def _parse_framing(headers: dict[str, str], minor: int) -> tuple[int | None, bool]:
    """How the body is delimited (RFC 9112 §6.3): a length, chunked, or nothing."""
    transfer_encoding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if transfer_encoding is not None:
        if length is not None:
            raise BadRequest("Content-Length and Transfer-Encoding together")
        if minor == 0:
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = _split_list(transfer_encoding.lower())
        if "chunked" in codings and (codings[-1] != "chunked" or codings.count("chunked") > 1):
            raise BadRequest("chunked must be the last transfer coding, once")
        if not codings:
            raise BadRequest("an empty Transfer-Encoding")
        if codings != ["chunked"]:
            raise NotImplementedByServer("only the chunked transfer coding is supported")
        return None, True
    if length is None:
        return None, False
    if not length.isdigit() or not length.isascii():
        raise BadRequest("Content-Length must be decimal digits")
    # Longer than 18 digits is beyond any limit; int() of thousands of digits is refused.
    return (int(length) if len(length) <= 18 else sys.maxsize), False


def _split_list(value: str) -> list[str]:
    """A comma-separated field value, empty elements dropped (RFC 9110 §5.6.1)."""
    return [item for item in (part.strip(" \t") for part in value.split(",")) if item]


def parse_chunk_size(line: bytes) -> int:
    """The size of a chunk from its size line; extensions are checked, then ignored."""
    match = _CHUNK_SIZE_RE.fullmatch(line)
    if match is None:
        raise BadRequest("malformed chunk size line")
    return int(match[1], 16)


class ChunkedDecoder:
    """Decodes a chunked body (RFC 9112 §7.1) from the bytes fed to it; no I/O.

    ``feed`` takes whatever has arrived and returns the body bytes it could decode and
    how many input bytes it used; the caller keeps the rest for the next call.
    """

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, limits: HttpLimits) -> None:
        self._limits = limits
        self._state = self._SIZE
        self._remaining = 0
        self._trailer_bytes = 0
        self.declared = 0  # the sum of the chunk sizes announced so far
        self.done = False

    def feed(self, data: bytes | bytearray) -> tuple[bytes, int]:
        out: list[bytes] = []
        pos = 0
        while not self.done:
            if self._state in (self._SIZE, self._TRAILER):
                line = self._take_line(data, pos)
                if line is None:
                    break
                pos += len(line) + 2
                self._on_line(line)
            elif self._state == self._DATA:
                take = min(self._remaining, len(data) - pos)
                if take == 0:
                    break
                out.append(bytes(data[pos : pos + take]))
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END
            else:
                end = data[pos : pos + 2]
                if not b"\r\n".startswith(end):
                    raise BadRequest("a chunk is longer than its size")
                if len(end) < 2:
                    break
                pos += 2
                self._state = self._SIZE
        return b"".join(out), pos

    def _take_line(self, data: bytes | bytearray, pos: int) -> bytes | None:
        end = data.find(b"\r\n", pos)
        if (end if end != -1 else len(data)) - pos > self._limits.max_header_line:
            raise HeadersTooLarge("a chunk size or trailer line is too long")
        if end == -1:
            if _BARE_EOL_RE.search(data, pos):
                raise BadRequest("lines must end with CRLF")
            return None
        return bytes(data[pos:end])

    def _on_line(self, line: bytes) -> None:
        if self._state == self._SIZE:
            size = parse_chunk_size(line)
            self.declared += size
            self._remaining = size
            self._state = self._DATA if size else self._TRAILER
        elif not line:
            self.done = True
        else:
            parse_field_line(line, self._limits)  # trailer fields are checked, then dropped
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > self._limits.max_head:
                raise HeadersTooLarge("the trailer section is too large")


class _DateCache:
    """The Date header value, formatted once a second."""

    second = -1
    value = ""

    @classmethod
    def now(cls) -> str:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, email.utils.formatdate(second, usegmt=True)
        return cls.value


@dataclass(slots=True)
class Response:
    """A response: JSON or raw bytes in ``body``, or a file on disk streamed by the server."""

    status: HTTPStatus = HTTPStatus.OK
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    file: Path | None = None
    file_size: int = 0

    @classmethod
    def json(
        cls,
        data: object,
        status: HTTPStatus = HTTPStatus.OK,
        headers: list[tuple[str, str]] | None = None,
    ) -> Response:
        return cls(status, encode_json(data), JSON_TYPE, headers or [])

    @classmethod
    def error(cls, error: MessengerError) -> Response:
        return cls.json(error.body(), error.status, error.headers())

    @property
    def length(self) -> int:
        return self.file_size if self.file is not None else len(self.body)

    def serialize_head(self, *, close: bool, keep_alive_1_0: bool = False) -> bytes:
        """The status line and header section (RFC 9112 §4), ready for the wire."""
        status = self.status
        lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Date: {_DateCache.now()}"]
        if status != HTTPStatus.NO_CONTENT:
            lines.append(f"Content-Type: {self.content_type}")
            lines.append(f"Content-Length: {self.length}")
        lines.extend(f"{name}: {value}" for name, value in self.headers)
        if close:
            lines.append("Connection: close")
        elif keep_alive_1_0:
            lines.append("Connection: keep-alive")
        lines.append("\r\n")
        return "\r\n".join(lines).encode("latin-1")


_json_encoder: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_json(data: object) -> bytes:
    return _json_encoder.encode(data).encode("utf-8")


# Routing ###################################################################

Handler = Callable[["Call"], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler
    auth: bool


class Router:
    """Maps a method and a path to a handler and its path parameters.

    Patterns are plain paths whose ``{name}`` segments become parameters, percent-decoded.
    An unknown path is a 404; a known path without the method is a 405 with ``Allow``.
    ``HEAD`` goes wherever ``GET`` goes.
    """

    def __init__(self) -> None:
        self._static: dict[str, dict[str, Route]] = {}
        self._dynamic: list[tuple[re.Pattern[str], dict[str, Route]]] = []
        self._patterns: dict[str, dict[str, Route]] = {}

    def add(self, method: str, pattern: str, handler: Handler, *, auth: bool = True) -> None:
        methods = self._patterns.get(pattern)
        if methods is None:
            methods = self._patterns[pattern] = {}
            if "{" in pattern:
                regex = re.sub(r"\\\{\w+\\\}", "([^/]+)", re.escape(pattern))
                self._dynamic.append((re.compile(regex), methods))
            else:
                self._static[pattern] = methods
        methods[method] = Route(handler, auth)

    def match(self, method: str, path: str) -> tuple[Route, tuple[str, ...]]:
        params: tuple[str, ...] = ()
        methods = self._static.get(path)
        if methods is None:
            for regex, candidate in self._dynamic:
                found = regex.fullmatch(path)
                if found is not None:
                    methods, params = candidate, tuple(map(_decode_segment, found.groups()))
                    break
            else:
                raise NotFound(f"no such resource: {path}")
        route = methods.get("GET" if method == "HEAD" else method)
        if route is None:
            raise MethodNotAllowed(f"{path} does not take {method}", self.allowed(methods))
        return route, params

    @staticmethod
    def allowed(methods: dict[str, Route]) -> list[str]:
        allow = sorted(methods)
        return sorted([*allow, "HEAD"]) if "GET" in allow else allow

    def all_methods(self) -> list[str]:
        methods = {method for routes in self._patterns.values() for method in routes}
        return sorted(methods | {"HEAD"})


def _decode_segment(segment: str) -> str:
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError as exc:
        raise NotFound("a path segment is not valid UTF-8") from exc


# API handlers ##############################################################


@dataclass(slots=True)
class Call:
    """One request on its way through a handler: the head, path parameters, the body."""

    request: Request
    params: tuple[str, ...]
    body: BodySource


class BodySource(Protocol):
    """Where a handler's request body comes from: the connection that holds the stream."""

    async def read(self, request: Request, limit: int) -> bytes: ...

    def stream(self, request: Request, limit: int) -> AsyncIterator[bytes]: ...


_HEALTH_BODY: Final = encode_json({"status": "ok"})


class MessengerApp:
    """The HTTP API: one method per route, and the dispatcher that answers every error."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.router = Router()
        self.router.add("GET", "/health", self.health, auth=False)
        self.router.add("GET", "/openapi.json", self.openapi, auth=False)

    async def dispatch(self, request: Request, body: BodySource) -> Response:
        """Answer one request. The only place where exceptions become responses."""
        try:
            if request.method not in STANDARD_METHODS:
                raise NotImplementedByServer(f"the method {request.method} is not implemented")
            if request.path == "*":
                return Response(HTTPStatus.NO_CONTENT, headers=[("Allow", self._allow_all())])
            if request.method == "CONNECT":
                raise MethodNotAllowed("this is an origin server: CONNECT is refused", [])
            route, params = self.router.match(request.method, request.path)
            return await route.handler(Call(request, params, body))
        except MessengerError as exc:
            logger.info("%s %s -> %d %s", request.method, request.path, exc.status, exc.message)
            return Response.error(exc)
        except Exception:
            logger.exception("unhandled error in %s %s", request.method, request.path)
            return Response.error(InternalError("internal server error"))

    def _allow_all(self) -> str:
        return ", ".join(self.router.all_methods())

    async def health(self, call: Call) -> Response:
        return Response(body=_HEALTH_BODY)

    async def openapi(self, call: Call) -> Response:
        return Response.json(openapi_document())


def openapi_document() -> dict[str, Any]:
    """The contract as OpenAPI 3.1."""
    error = {"$ref": "#/components/schemas/Error"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Messenger", "version": VERSION},
        "paths": {
            "/health": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {
                        "200": _json_response("The server is up", {"type": "object"}),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": _json_response("OpenAPI 3.1", {"type": "object"})},
                }
            },
        },
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
                }
            },
            "responses": {"Error": _json_response("An error", error)},
        },
    }


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


# Server lifecycle ##########################################################

_IDLE, _HEAD, _BODY, _HANDLER, _WRITE = "idle", "head", "body", "handler", "write"


class Connection:
    """One client connection: reads requests from the stream and answers them in order.

    ``deadline`` and ``phase`` are watched by the server's watchdog, which answers 408 to
    a head or body that is too slow and closes a connection idle for too long.
    """

    def __init__(
        self, server: MessengerServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._config = server.config
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()
        self._loop = asyncio.get_running_loop()
        self.phase = _IDLE
        self.deadline = self._loop.time() + self._config.idle_timeout
        self._body_left = False  # a request body that is still (partly) in the stream
        self._continued = False  # 100 Continue sent for the current request
        self._broken = False  # the stream position is in doubt: answer, then close
        self.expired = False

    async def serve(self) -> None:
        try:
            while True:
                request = await self._read_request()
                if request is None:
                    return
                self.phase, self.deadline = _HANDLER, float("inf")
                response = await self._server.app.dispatch(request, self)
                if self.expired:
                    return
                close = not request.keep_alive or self._server.closing
                if self._body_left:
                    try:
                        close = not await self._discard_body(request) or close
                    except MessengerError as exc:  # a malformed body makes a bad request
                        response = Response.error(exc)
                close = close or self._broken
                await self._send(request, response, close)
                if close:
                    return
                self.phase = _IDLE
                self.deadline = self._loop.time() + self._config.idle_timeout
        except MessengerError as exc:
            if not self.expired:
                logger.info("bad request from %s: %d %s", self.peer, exc.status, exc.message)
                with contextlib.suppress(ConnectionError):
                    await self._send(None, Response.error(exc), close=True)
        except ConnectionError:
            pass
        finally:
            self._writer.close()

    @property
    def peer(self) -> str:
        peer = self._writer.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    async def _fill(self) -> bool:
        """Read what the client sent next into the buffer; False at end of stream."""
        data = await self._reader.read(READ_SIZE)
        self._buffer += data
        return bool(data)

    async def _read_request(self) -> Request | None:
        buffer = self._buffer
        searched = 0
        while True:
            if buffer.startswith(b"\r\n"):
                self._skip_empty_lines()
            end = buffer.find(b"\r\n\r\n", searched)
            if end != -1:
                break
            if buffer:
                if self.phase == _IDLE:
                    self.phase = _HEAD
                    self.deadline = self._loop.time() + self._config.head_timeout
                check_partial_head(buffer, self._config.http)
                searched = max(0, len(buffer) - 3)
            if not await self._fill():
                if buffer and not self.expired:
                    raise BadRequest("the connection ended in the middle of a request head")
                return None
        head = bytes(buffer[:end])
        del buffer[: end + 4]
        request = parse_head(head, self._config.http)
        self._body_left = request.has_body
        self._continued = False
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s %s HTTP/1.%d", self.peer, request.method, request.target, request.minor
            )
        return request

    def _skip_empty_lines(self) -> None:
        count = 0
        while self._buffer.startswith(b"\r\n"):
            del self._buffer[:2]
            count += 1
        if count > MAX_EMPTY_LINES:
            raise BadRequest("too many empty lines before the request line")

    async def read(self, request: Request, limit: int) -> bytes:
        """The whole body of ``request``, refused with 413 beyond ``limit`` bytes."""
        return b"".join([chunk async for chunk in self.stream(request, limit)])

    async def stream(self, request: Request, limit: int) -> AsyncIterator[bytes]:
        """The body of ``request`` as it arrives, in chunks; 413 beyond ``limit`` bytes."""
        if not self._body_left:
            return
        if request.content_length is not None and request.content_length > limit:
            self._broken = True
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        if request.expect_continue and not self._continued:
            self._continued = True
            self._writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.phase = _BODY
        self.deadline = self._loop.time() + self._config.body_timeout
        self._broken = True  # until the body has been read to its end
        if request.content_length is not None:
            remaining = request.content_length
            while remaining:
                if not self._buffer and not await self._fill():
                    raise BadRequest("the connection ended in the middle of a body")
                chunk = bytes(self._buffer[:remaining])
                del self._buffer[: len(chunk)]
                remaining -= len(chunk)
                yield chunk
        else:
            decoder = ChunkedDecoder(self._config.http)
            while True:
                data, used = decoder.feed(self._buffer)
                del self._buffer[:used]
                if decoder.declared > limit:
                    raise PayloadTooLarge(f"the body is larger than {limit} bytes")
                if data:
                    yield data
                if decoder.done:
                    break
                if not await self._fill():
                    raise BadRequest("the connection ended in the middle of a body")
        self._broken = False
        self._body_left = False
        self.phase, self.deadline = _HANDLER, float("inf")

    async def _discard_body(self, request: Request) -> bool:
        """Skip a body no handler read, if it is small; False when the connection must close.

        A malformed body raises its error: the request was a bad one after all.
        """
        if request.expect_continue and not self._continued:
            return False  # the client waits for our word before it sends the body
        try:
            async for _ in self.stream(request, self._config.max_json_body):
                pass
        except PayloadTooLarge:
            return False
        return True

    async def _send(self, request: Request | None, response: Response, close: bool) -> None:
        """Write ``response``; for HEAD only its head."""
        self.phase = _WRITE
        self.deadline = self._loop.time() + self._config.idle_timeout
        keep_alive_1_0 = request is not None and request.minor == 0 and not close
        head = response.serialize_head(close=close, keep_alive_1_0=keep_alive_1_0)
        if request is not None and request.method == "HEAD":
            self._writer.write(head)
        elif response.file is None:
            self._writer.write(head + response.body)
        else:
            self._writer.write(head)
            await self._send_file(response.file)
        await self._writer.drain()

    async def _send_file(self, path: Path) -> None:
        with path.open("rb") as file:
            while chunk := file.read(READ_SIZE):
                self._writer.write(chunk)
                await self._writer.drain()

    def expire(self) -> None:
        """Called by the watchdog past the deadline: 408 for a slow head or body, then close."""
        self.expired = True
        if self.phase in (_HEAD, _BODY):
            what = "request head" if self.phase == _HEAD else "request body"
            logger.info("%s too slow with its %s: 408", self.peer, what)
            response = Response.error(RequestTimeout(f"the {what} did not arrive in time"))
            self._writer.write(response.serialize_head(close=True) + response.body)
            self._writer.close()
        else:
            self._writer.transport.abort()


class MessengerServer:
    """The server: ``async with MessengerServer(config) as server`` listens until closed."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.app = MessengerApp(config)
        self.closing = False
        self._server: asyncio.Server | None = None
        self._connections: dict[Connection, asyncio.Task[None]] = {}
        self._per_ip: dict[str, int] = {}
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> MessengerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connect, self.config.host, self.config.port, limit=READ_SIZE, backlog=1024
        )
        self._watchdog = asyncio.create_task(self._watch_deadlines())
        logger.info("listening on http://%s:%d", self.config.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), close everything."""
        if self._server is None:
            return
        self.closing = True
        self._server.close()
        for connection in self._connections:
            if connection.phase == _IDLE:
                connection.expire()
        tasks = list(self._connections.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.config.shutdown_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self._server.wait_closed()
        self._server = None
        logger.info("stopped")

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "?"
        if self._per_ip.get(ip, 0) >= self.config.max_connections_per_ip:
            logger.warning("refused a connection from %s: too many open connections", ip)
            error = Unavailable("too many open connections from your address")
            response = Response.error(error)
            writer.write(response.serialize_head(close=True) + response.body)
            writer.close()
            return
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        connection = Connection(self, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._connections[connection] = task
        try:
            await connection.serve()
        finally:
            del self._connections[connection]
            self._per_ip[ip] -= 1
            if not self._per_ip[ip]:
                del self._per_ip[ip]

    async def _watch_deadlines(self) -> None:
        """Once per tick, expire the connections past their deadline."""
        loop = asyncio.get_running_loop()
        config = self.config
        tick = min(1.0, min(config.head_timeout, config.body_timeout, config.idle_timeout) / 10)
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for connection in [c for c in self._connections if c.deadline <= now]:
                if not connection.expired:
                    connection.expire()


# Entry point ###############################################################


def parse_args(argv: Sequence[str] | None) -> ServerConfig:
    parser = argparse.ArgumentParser(
        description="The messenger server: HTTP/1.1 on asyncio.streams.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on")
    add("--port", type=int, default=8000, help="TCP port (0 picks a free one)")
    add("--state-dir", type=Path, default=Path("state"), help="folder for snapshots and files")
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add("--max-request-line", type=int, default=MAX_REQUEST_LINE, help="bytes; 414 above")
    add("--max-header-line", type=int, default=MAX_HEADER_LINE, help="bytes; 431 above")
    add("--max-headers", type=int, default=MAX_HEADERS, help="header lines; 431 above")
    add("--max-head", type=int, default=MAX_HEAD, help="bytes of the whole head; 431 above")
    add("--max-json-body", type=int, default=MAX_JSON_BODY, help="bytes; 413 above")
    add("--max-file-size", type=int, default=MAX_FILE_SIZE, help="bytes; 413 above")
    add("--head-timeout", type=float, default=HEAD_TIMEOUT, help="seconds; 408 after")
    add("--body-timeout", type=float, default=BODY_TIMEOUT, help="seconds; 408 after")
    add("--idle-timeout", type=float, default=IDLE_TIMEOUT, help="seconds of keep-alive")
    add("--shutdown-timeout", type=float, default=SHUTDOWN_TIMEOUT, help="seconds")
    add("--max-connections-per-ip", type=int, default=MAX_CONNECTIONS_PER_IP)
    args = parser.parse_args(argv)
    return ServerConfig(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        log_level=args.log_level,
        http=HttpLimits(
            max_request_line=args.max_request_line,
            max_header_line=args.max_header_line,
            max_headers=args.max_headers,
            max_head=args.max_head,
        ),
        max_json_body=args.max_json_body,
        max_file_size=args.max_file_size,
        head_timeout=args.head_timeout,
        body_timeout=args.body_timeout,
        idle_timeout=args.idle_timeout,
        shutdown_timeout=args.shutdown_timeout,
        max_connections_per_ip=args.max_connections_per_ip,
    )


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with MessengerServer(config):
        await stop.wait()
        logger.info("shutting down")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
