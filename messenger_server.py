"""Messenger server: chats over a hand-written HTTP/1.1 server on asyncio.streams.

Run it with ``python messenger_server.py --port 8000``; ``--help`` lists every flag.
The HTTP contract is ``API.md``; ``GET /openapi.json`` serves it as an OpenAPI 3.1 document.

Routes (all but the first three need ``Authorization: Bearer <token>``):
    GET    /health                          liveness
    GET    /openapi.json                    this API as OpenAPI 3.1
    POST   /connect                         register or log in; a new session and its token
    POST   /disconnect                      revoke the caller's token
    POST   /send                            send now (201), or later with send_at (202)
    GET    /messages                        news since a position; long-polls with wait
    GET    /messages/{id}                   a message and its comments
    GET    /history                         a chat's past
    GET    /scheduled                       the caller's pending scheduled messages
    DELETE /scheduled/{id}                  cancel one
    GET    /chat                            the chats the caller may see
    POST   /chat                            join (or create) a chat; it becomes the active one
    POST   /chat/{name}/leave               leave a chat
    POST   /chat/{name}/invite              the owner invites a user
    POST   /chat/{name}/link                the owner makes a join link
    GET    /chat/{name}/requests            the owner lists join requests
    POST   /chat/{name}/requests/{user}     the owner approves or denies one
    POST   /join/{token}                    ask to join through a link
    GET    /status                          the caller's state, limits and the server's
    POST   /report                          report an abuser
    POST   /files                           upload a file (raw body)
    GET    /files/{id}                      download one

The file reads top to bottom: configuration; errors; the HTTP protocol, no I/O (``Request``,
``ChunkedDecoder``, ``Response``, ``next_step``); routing (``Router``); the domain model, no
I/O (the records, then the parts of a messenger: ``Deadlines``, ``Accounts``,
``Membership``, ``Moderation``, ``Uploads``, and ``Messenger`` itself); persistence
(``Journal``, ``StateStore``, the snapshot format, ``RecordChecks``); the API handlers
(``MessengerApp``); the OpenAPI document; connection I/O (``Connection``); the server
lifecycle (``MessengerServer``); main().
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import email.utils
import enum
import errno
import fcntl
import functools
import gc
import hashlib
import heapq
import hmac
import inspect
import io
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import pickle
import re
import resource
import secrets
import signal
import socket
import stat
import struct
import sys
import time
import types
import typing
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Final, NamedTuple, Protocol, TypeVar
from urllib.parse import quote, unquote, unquote_plus

logger = logging.getLogger("messenger")
T = TypeVar("T")

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
LINGER_TIMEOUT: Final = 2.0  # seconds a refused request's remaining bytes are taken in
SKIP_LIMIT: Final = 1024 * 1024  # bytes of an unread body read past to keep a connection
MAX_CONNECTIONS: Final = 10_000  # open connections in all; then the longest idle makes room
MAX_CONNECTIONS_PER_IP: Final = 256  # open connections per client address; 503 above
# File descriptors kept from connections, under the open-file limit (RLIMIT_NOFILE): the
# listening sockets, the state folder's lock, journal and snapshot files, the event loop's own.
# --max-connections is lowered to fit below the limit.
FD_RESERVE: Final = 64
# Descriptors asked for each connection: its socket, and a file it downloads or uploads. One
# is required; when the limit allows no more, a download that finds none is answered 503.
FDS_PER_CONNECTION: Final = 2
ACCEPT_BATCH: Final = 128  # connections taken per wake-up of a listening socket
ACCEPT_PAUSE: Final = 0.1  # seconds accepting rests after a failure (out of descriptors)
LOG_EVERY: Final = 10.0  # seconds between two records of a repeated warning (refusals)
READ_SIZE: Final = 64 * 1024  # bytes asked of the stream per read
RENDERED_BYTES: Final = 8 * 1024 * 1024  # bytes of messages' JSON kept for their next readers
# A chunked body's framing (size lines, extensions, CRLFs) may take this many bytes, then one
# per CHUNK_FRAMING_SHARE bytes of data: chunks of 128 bytes or more always pass, and tiny ones
# (each a trip through the decoder: 1 MiB in 1-byte chunks cost 3 s of CPU) are refused (400).
CHUNK_FRAMING_FREE: Final = 64 * 1024
CHUNK_FRAMING_SHARE: Final = 16
PASSWORD_COST: Final = 17  # log2 of scrypt's n
HASH_QUEUE: Final = 4  # password hashes waiting per core; 503 above
MAX_WAIT: Final = 60.0  # seconds a long-poll may wait
SNAPSHOT_INTERVAL: Final = 30.0  # seconds between snapshots (when something changed)
JOURNAL_ROOM: Final = 64 * 1024  # bytes free before a disk found full takes changes again
FILE_BLOCK: Final = 4096  # bytes a stored file counts against the upload quota, at least
MIN_FREE_DISK: Final = 64 * 1024 * 1024  # bytes free on the state's disk; no upload below
# Bytes of memory a kept message (or notice, or scheduled message) takes besides its text: what
# it counts against the kept-text quotas on top of its text, so that they bound memory however
# short the texts (measured: about 420 bytes a message, 700 a notice, with their indexes).
MESSAGE_COST: Final = 512

JSON_TYPE: Final = "application/json; charset=utf-8"


MIB: Final = 1024 * 1024
MINUTE: Final = 60.0
HOUR: Final = 3600.0
DAY: Final = 24 * HOUR


def flag(value: Any, help_text: str, **argparse_options: Any) -> Any:
    """A configuration field that is also a command-line flag (``--field-name``): its
    default, its help, and anything else ``argparse.add_argument`` should know (a ``type``
    that parses it, and then the ``default`` as it is typed)."""
    return field(default=value, metadata={"help": help_text, **argparse_options})


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_prefix(text: str) -> int:
    """An IPv6 prefix length, for ``--ipv6-prefix``."""
    if not (text.isascii() and text.isdigit() and int(text) <= 128):
        raise argparse.ArgumentTypeError(f"an IPv6 prefix length is 0 to 128, not {text!r}")
    return int(text)


def parse_networks(text: str) -> tuple[IpNetwork, ...]:
    """``--forwarded-allow-ips``: comma-separated addresses or networks (CIDR), ``*`` for
    any, or ``none``."""
    if text.strip() == "none":
        return ()
    if text.strip() == "*":
        return (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    try:
        return tuple(ipaddress.ip_network(item.strip()) for item in text.split(",") if item.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The limits the HTTP parser enforces."""

    max_request_line: int = flag(MAX_REQUEST_LINE, "bytes of a request line; 414 above")
    max_header_line: int = flag(MAX_HEADER_LINE, "bytes of a header line; 431 above")
    max_headers: int = flag(MAX_HEADERS, "header lines; 431 above")
    max_head: int = flag(MAX_HEAD, "bytes of a whole head; 431 above")


@dataclass(frozen=True, slots=True)
class Rules:
    """The messenger's rules and quotas."""

    history: int = flag(20, "messages shown on connect and on join")
    message_ttl: float = flag(HOUR, "seconds a message lives after delivery")
    rate_limit: int = flag(20, "messages per user to general per rate window; 429 above")
    rate_window: float = flag(HOUR, "seconds")
    flood_limit: int = flag(
        60, "messages, invitations and join requests per user, anywhere, per flood window; "
        "429 above"
    )
    flood_window: float = flag(MINUTE, "seconds")
    max_undelivered: int = flag(
        1000, "private messages of a sender that nobody received yet; 403 above"
    )
    undelivered_ttl: float = flag(7 * DAY, "seconds a private message nobody received lives")
    max_scheduled: int = flag(100, "pending scheduled messages per user; 403 above")
    max_kept_text: int = flag(
        MIB, "bytes of a user's messages and notices the server still keeps or has scheduled "
        f"(UTF-8 text and {MESSAGE_COST} bytes each); 403 above"
    )
    max_total_text: int = flag(
        512 * MIB, "bytes of all messages and notices the server keeps or has scheduled "
        f"(UTF-8 text and {MESSAGE_COST} bytes each); 503 above"
    )
    max_memberships: int = flag(500, "chats a user may be a member of; 403 above")
    max_owned_chats: int = flag(100, "chats a user may create; 403 above")
    max_chats: int = flag(
        100_000, "chats in all; creating one more is 503: memory stays bounded however many "
        "accounts create them"
    )
    upload_quota: int = flag(50 * MIB, "bytes of stored files per user; 403 above")
    upload_quota_per_ip: int = flag(
        200 * MIB, "bytes of stored files of all the users registered from one client "
        "address; 403 above"
    )
    report_limit: int = flag(10, "new reports per user per rate window; 429 above")
    ban_threshold: int = flag(
        3, "reporters that ban a user from sending, counted once per address they registered from"
    )
    ban_duration: float = flag(4 * HOUR, "seconds a ban lasts")
    report_memory: float = flag(
        30 * DAY, "seconds after a ban during which the users whose reports caused it count "
        "toward no new ban of that user"
    )
    login_failures: int = flag(
        10, "wrong passwords for a name from an address per login window; 429 above"
    )
    login_window: float = flag(MINUTE, "seconds")
    password_checks_per_ip: int = flag(
        10, "logins and registrations (each a password hash) per client address per login "
        "window; 429 above"
    )
    registrations_per_ip: int = flag(
        10, "new users per client address per registration window; 429 above"
    )
    registration_window: float = flag(HOUR, "seconds")
    max_sessions: int = flag(100, "sessions per user; a new one revokes the least recently used")
    max_users: int = flag(
        100_000, "registered users in all; 503 above: memory stays bounded however many "
        "addresses register"
    )
    session_ttl: float = flag(30 * DAY, "seconds a session may go unused before it is revoked")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Everything the command line can set: every field is a flag (``--max-wait``...)."""

    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(8000, "TCP port (0 picks a free one)")
    state_dir: Path = flag(Path("state"), "folder of the snapshots, journals and files")
    log_level: str = flag("INFO", "DEBUG adds a line per request",
                          choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    log_format: str = flag("text", "for humans or for machines", choices=["text", "json"])
    http: HttpLimits = field(default_factory=HttpLimits)
    max_json_body: int = flag(MAX_JSON_BODY, "bytes of a JSON body; 413 above")
    max_file_size: int = flag(MAX_FILE_SIZE, "bytes of an uploaded file; 413 above")
    head_timeout: float = flag(
        HEAD_TIMEOUT, "seconds for a whole request head (408 after), and for a new connection's "
        "first request to begin (closed after)"
    )
    body_timeout: float = flag(BODY_TIMEOUT, "seconds for a whole request body; 408 after")
    idle_timeout: float = flag(IDLE_TIMEOUT, "seconds an idle keep-alive connection is kept")
    shutdown_timeout: float = flag(SHUTDOWN_TIMEOUT, "seconds requests get to finish at exit")
    max_connections: int = flag(
        MAX_CONNECTIONS, "open connections in all: a new one takes the place of the one idle the "
        "longest, 503 if none is (lowered to fit the open-file limit)"
    )
    max_connections_per_ip: int = flag(
        MAX_CONNECTIONS_PER_IP, "open connections per client address; 503 above"
    )
    ipv6_prefix: int = flag(
        64, "leading bits of an IPv6 client address that per-address rules count it by "
        "(a /64 is one subscriber)", type=parse_prefix,
    )
    forwarded_allow_ips: tuple[IpNetwork, ...] = flag(
        (), "proxies (addresses or networks, comma-separated, or *) whose X-Forwarded-For "
        "names the client", type=parse_networks, default="none",
    )
    rules: Rules = field(default_factory=Rules)
    password_cost: int = flag(PASSWORD_COST, "log2 of scrypt's n for new passwords")
    hash_queue: int = flag(HASH_QUEUE, "password hashes that may wait per core; 503 above")
    hash_share: int = flag(
        1, "password hashes one client address may have running or waiting, per core; "
        "503 above"
    )
    max_wait: float = flag(MAX_WAIT, "seconds a long-poll may wait")
    snapshot_interval: float = flag(SNAPSHOT_INTERVAL, "seconds between snapshots")
    min_free_disk: int = flag(
        MIN_FREE_DISK, "bytes the state folder's disk keeps free: no upload below (503)"
    )
    fsync: str = flag("everysec", "fsync the journal before each answer, or once a second",
                      choices=["always", "everysec"])

    @property
    def largest_body(self) -> int:
        """Bytes of the largest body any route takes: a bigger one is refused at once."""
        return max(self.max_json_body, self.max_file_size)


class Throttled:
    """A warning that may repeat fast (a refusal per connection, a failing accept): one
    record per LOG_EVERY seconds at most, which counts those left out since the last."""

    def __init__(self) -> None:
        self._next = 0.0
        self._left_out = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._left_out += 1
            return
        if self._left_out:
            message += f" ({self._left_out} more like it in the last {LOG_EVERY:g} s)"
        self._next, self._left_out = now + LOG_EVERY, 0
        logger.warning(message, *args)


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


class InvalidField(BadRequest):
    code = "invalid_field"


class BadJson(BadRequest):
    code = "bad_json"


class Unauthorized(MessengerError):
    status = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"

    def headers(self) -> list[tuple[str, str]]:
        return [("WWW-Authenticate", 'Bearer realm="messenger"')]


class Forbidden(MessengerError):
    status = HTTPStatus.FORBIDDEN
    code = "forbidden"


class QuotaExceeded(Forbidden):
    """Over a quota of stored things; the message names the quota and its limit."""

    code = "quota_exceeded"


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


class Conflict(MessengerError):
    status = HTTPStatus.CONFLICT
    code = "conflict"


class LengthRequired(MessengerError):
    status = HTTPStatus.LENGTH_REQUIRED
    code = "length_required"


class RateLimited(MessengerError):
    status = HTTPStatus.TOO_MANY_REQUESTS
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float, rate: RateInfo | None = None) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))
        self.rate = rate

    def headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(self.retry_after)), *rate_headers(self.rate)]


def how_many(count: int, noun: str) -> str:
    """A count with its noun, for messages: ``1 chat``, ``2 chats``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def rate_headers(rate: RateInfo | None) -> list[tuple[str, str]]:
    """GitHub's X-RateLimit-* headers, for sends to the general chat."""
    if rate is None:
        return []
    headers = [
        ("X-RateLimit-Limit", str(rate.limit)),
        ("X-RateLimit-Remaining", str(rate.remaining)),
    ]
    if rate.reset is not None:
        headers.append(("X-RateLimit-Reset", str(math.ceil(rate.reset))))
    return headers


class NotImplementedByServer(MessengerError):
    status = HTTPStatus.NOT_IMPLEMENTED
    code = "not_implemented"


class VersionNotSupported(MessengerError):
    status = HTTPStatus.HTTP_VERSION_NOT_SUPPORTED
    code = "http_version"


class Unavailable(MessengerError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "unavailable"

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> list[tuple[str, str]]:
        return [] if self.retry_after is None else [("Retry-After", str(self.retry_after))]


class InternalError(MessengerError):
    status = HTTPStatus.INTERNAL_SERVER_ERROR
    code = "internal"


# HTTP protocol, no I/O ######################################################

_TOKEN: Final = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_METHOD_RE: Final = re.compile(_TOKEN)
_TARGET_RE: Final = re.compile(rb"[\x21-\x7e]+")  # 1*VCHAR; the router judges the rest
_REQUEST_LINE_RE: Final = re.compile(
    rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/([0-9])\.([0-9])"
)
_FIELD: Final = _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*"  # a field line, OWS included
_FIELDS_RE: Final = re.compile(_FIELD + rb"(?:\r\n" + _FIELD + rb")*")
_HOST_RE: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[-A-Za-z0-9._~!$&'()*+,;=%]+)(?::[0-9]*)?")
_ABSOLUTE_RE: Final = re.compile(r"[hH][tT][tT][pP][sS]?://([^/?]*)(.*)")  # no "#" by then
_AUTHORITY_FORM_RE: Final = re.compile(r"[-A-Za-z0-9._~!$&'()*+,;=%]+:[0-9]+")
# A request line that has begun: a method, maybe a target, maybe the start of a version
# (or the CR of an empty line before it).
_PARTIAL_LINE_RE: Final = re.compile(
    rb"\r|(?:" + _TOKEN + rb"(?: [\x21-\x7e]*(?: [HTP/0-9.]*\r?)?)?)?"
)
_BARE_EOL_RE: Final = re.compile(rb"(?<!\r)\n|\r(?=[^\n])")
_CHUNK_SIZE_RE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,16})"
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN
    + rb'|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"))?)*'
)

# RFC 9110's methods, and QUERY (httpbis' safe method with a body): a path that does not take
# one answers 405 with Allow, as clients of those methods expect; any other token is a 501.
STANDARD_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "QUERY"}
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
        """The query string as a dict (``+`` is a space); the first of repeated names wins."""
        params: dict[str, str] = {}
        for pair in self.query.split("&"):
            name, _, value = pair.partition("=")
            if name:
                params.setdefault(_unquote_query(name), _unquote_query(value))
        return params

    def query_values(self, wanted: str) -> list[str]:
        """Every value of a query parameter that may be repeated, in order."""
        values = []
        for pair in self.query.split("&"):
            name, _, value = pair.partition("=")
            if name and _unquote_query(name) == wanted:
                values.append(_unquote_query(value))
        return values


def _unquote_query(text: str) -> str:
    if "%" not in text and "+" not in text:
        return text
    try:
        return unquote_plus(text, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequest("the query string is not valid UTF-8 percent-encoding") from exc


def check_partial_head(data: bytes | bytearray, limits: HttpLimits, checked: int = 0) -> None:
    """Refuse a head that is still arriving but can already be judged bad or too big.

    ``checked`` bytes were judged by an earlier call: bare line ends are only looked for
    in the new ones, so a head sent a byte at a time is not scanned again and again.
    """
    line_end = data.find(b"\r\n")
    first_line = data if line_end == -1 else data[:line_end]
    if len(first_line) > limits.max_request_line:
        raise UriTooLong(f"the request line is longer than {limits.max_request_line} bytes")
    if line_end == -1 and not _PARTIAL_LINE_RE.fullmatch(first_line):
        raise BadRequest("malformed request line")
    if _BARE_EOL_RE.search(data, max(0, checked - 1)):
        raise BadRequest("lines must end with CRLF")
    if len(data) > limits.max_head:
        raise HeadersTooLarge(f"the request head is larger than {limits.max_head} bytes")
    last_line_start = data.rfind(b"\r\n") + 2 if line_end != -1 else len(data)
    if len(data) - last_line_start > limits.max_header_line:
        raise HeadersTooLarge(f"a header line is longer than {limits.max_header_line} bytes")


def parse_head(head: bytes, limits: HttpLimits) -> Request:
    """Parse a request line and its header fields (RFC 9112 §3, §5), CRLF CRLF excluded."""
    line_end = head.find(b"\r\n")
    method, target, minor = _parse_request_line(head if line_end == -1 else head[:line_end], limits)
    if len(head) > limits.max_head:
        raise HeadersTooLarge(f"the request head is larger than {limits.max_head} bytes")
    headers = parse_fields(head[line_end + 2 :], limits) if line_end != -1 else {}
    path, query = _parse_target(method, target, headers, minor)
    content_length, chunked = _parse_framing(headers, minor)
    connection = headers.get("connection")
    if minor == 0:
        keep_alive = connection is not None and "keep-alive" in _split_list(connection.lower())
    else:
        keep_alive = connection is None or "close" not in _split_list(connection.lower())
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


def parse_fields(block: bytes, limits: HttpLimits) -> dict[str, str]:
    """``name: value`` lines joined by CRLF (RFC 9112 §5): no space before a colon, no
    folding, no control bytes. Names are lower-cased; repeated fields are joined by commas,
    except the ones a request may carry once."""
    lines = block.split(b"\r\n")
    if len(lines) > limits.max_headers:
        raise HeadersTooLarge(f"more than {limits.max_headers} header lines")
    if max(map(len, lines)) > limits.max_header_line:
        raise HeadersTooLarge(f"a header line is longer than {limits.max_header_line} bytes")
    if _FIELDS_RE.fullmatch(block) is None:
        raise BadRequest("malformed header line")
    headers: dict[str, str] = {}
    for line in lines:
        raw_name, _, raw_value = line.partition(b":")
        name = raw_name.lower().decode("ascii")
        value = raw_value.strip(b" \t").decode("latin-1")
        if name not in headers:
            headers[name] = value
        elif name in _SINGLETON_FIELDS:
            raise BadRequest(f"the {name} header appears twice")
        else:
            headers[name] += ", " + value
    return headers


def _parse_request_line(line: bytes, limits: HttpLimits) -> tuple[str, str, int]:
    if len(line) > limits.max_request_line:
        raise UriTooLong(f"the request line is longer than {limits.max_request_line} bytes")
    match = _REQUEST_LINE_RE.fullmatch(line)
    if match is None:
        raise BadRequest(_request_line_problem(line))
    method, target, major, minor = match.groups()
    if major != b"1":
        raise VersionNotSupported("only HTTP/1.x is served")
    return method.decode("ascii"), target.decode("ascii"), 0 if minor == b"0" else 1


def _request_line_problem(line: bytes) -> str:
    """What is wrong with a request line that does not match the grammar."""
    parts = line.split(b" ")
    if len(parts) != 3:
        return "the request line must be: method SP target SP version"
    method, target, _ = parts
    if not _METHOD_RE.fullmatch(method):
        return "the method is not a token"
    if not _TARGET_RE.fullmatch(target):
        return "the request target is empty or holds a forbidden byte"
    return "malformed HTTP version"


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
    if "#" in target:  # a fragment stays with the client: no form of target has one
        raise BadRequest("the request target must not hold a fragment (#)")
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
    how many input bytes it used; the caller keeps the rest for the next call, in front of
    what arrives next (a line left unfinished was searched already: see ``_take_line``).

    Each chunk costs a trip through ``feed``'s loop whatever its size: the framing may
    take CHUNK_FRAMING_FREE bytes, then one per CHUNK_FRAMING_SHARE bytes of data, so the
    work stays in proportion to the body (400 beyond).
    """

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self, limits: HttpLimits) -> None:
        self._limits = limits
        self._state = self._SIZE
        self._remaining = 0
        self._trailer_bytes = 0
        self._framing = 0  # bytes of size lines and CRLFs so far
        self._checked = 0  # bytes of the unfinished line searched by the last call
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
                    raise BadRequest("a chunk's data must end with CRLF right at its size")
                if len(end) < 2:
                    break
                pos += 2
                self._state = self._SIZE
        return b"".join(out), pos

    def _take_line(self, data: bytes | bytearray, pos: int) -> bytes | None:
        """The line that starts at ``pos``, or None while its CRLF has not come.

        Only the bytes that came since the last call are searched (from one byte back: a CR
        there may be followed by its LF now), like ``check_partial_head``: a line sent a
        byte at a time is not searched again and again.
        """
        start = pos + max(0, self._checked - 1)
        end = data.find(b"\r\n", start)
        if (end if end != -1 else len(data)) - pos > self._limits.max_header_line:
            raise HeadersTooLarge("a chunk size or trailer line is too long")
        if end == -1:
            if _BARE_EOL_RE.search(data, start):
                raise BadRequest("lines must end with CRLF")
            self._checked = len(data) - pos
            return None
        self._checked = 0
        return bytes(data[pos:end])

    def _on_line(self, line: bytes) -> None:
        if self._state == self._SIZE:
            size = parse_chunk_size(line)
            self.declared += size
            self._framing += len(line) + 4  # its CRLF, and the one after the data
            if self._framing > CHUNK_FRAMING_FREE + self.declared // CHUNK_FRAMING_SHARE:
                raise BadRequest(
                    "the chunks are too small: their framing may take "
                    f"{CHUNK_FRAMING_FREE} bytes, then one per {CHUNK_FRAMING_SHARE} bytes of "
                    "data (chunks of 128 bytes or more always pass)"
                )
            self._remaining = size
            self._state = self._DATA if size else self._TRAILER
        elif not line:
            self.done = True
        else:
            parse_fields(line, self._limits)  # trailer fields are checked, then dropped
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > self._limits.max_head:
                raise HeadersTooLarge("the trailer section is too large")


def client_address(peer: str, forwarded_for: str | None, trusted: Sequence[IpNetwork]) -> str:
    """Who sent a request. From a trusted proxy, the rightmost ``X-Forwarded-For`` entry
    that is not itself a trusted proxy (entries further left are whatever the client
    claimed); from anyone else, the peer. A malformed entry stops the walk at the proxy."""
    if forwarded_for is None or not _is_trusted(peer, trusted):
        return peer
    entries = _split_list(forwarded_for)
    for entry in reversed(entries):
        address = _forwarded_address(entry)
        if address is None:
            return peer
        if not any(address in network for network in trusted):
            return str(address)
    if not entries:
        return peer
    # Every entry (each one parsed above) is a trusted proxy: the leftmost is the client.
    return str(_forwarded_address(entries[0]))


def _forwarded_address(entry: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of an ``X-Forwarded-For`` entry: ``192.0.2.1``, ``2001:db8::1``, or with
    the port some proxies add, ``192.0.2.1:4711`` or ``[2001:db8::1]:4711``; None if it is
    none of these."""
    if entry.startswith("["):
        entry = entry[1:].partition("]")[0]
    elif entry.count(":") == 1:
        entry = entry.partition(":")[0]
    try:
        return ipaddress.ip_address(entry)
    except ValueError:
        return None


def address_group(address: str, ipv6_prefix: int) -> str:
    """What per-address rules count a client by: an IPv4 address itself (also when an
    IPv6 socket shows it mapped), an IPv6 address by its network of ``ipv6_prefix`` bits
    (one subscriber gets a whole /64: counted one by one, its addresses never run out)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return address


def _is_trusted(address: str, trusted: Sequence[IpNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 proxy
    return any(ip in network for network in trusted)


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
    file: BinaryIO | None = None  # an open file whose ``file_size`` bytes are the body
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
        head = f"{_STATUS_LINES[self.status]}Date: {_DateCache.now()}\r\n"
        if self.status != HTTPStatus.NO_CONTENT:
            head += f"Content-Type: {self.content_type}\r\nContent-Length: {self.length}\r\n"
        for name, value in self.headers:
            head += f"{name}: {value}\r\n"
        if close:
            head += "Connection: close\r\n"
        elif keep_alive_1_0:
            head += "Connection: keep-alive\r\n"
        return (head + "\r\n").encode("latin-1")


_STATUS_LINES: Final = {status: f"HTTP/1.1 {status} {status.phrase}\r\n" for status in HTTPStatus}
_json_encoder: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_json(data: object) -> bytes:
    return _json_encoder.encode(data).encode("utf-8")


class Body(enum.Enum):
    """How much of the current request's body is still in the stream."""

    NONE = "none: the request had none, or it was read to its end"
    UNREAD = "all of it, untouched (no 100 Continue sent): it can be skipped"
    READING = "some: reading began and did not end, so the next request's start is unknown"
    REFUSED = "all of it, refused unread: larger than its route takes"


class NextStep(enum.Enum):
    """What a connection does once a request has its answer."""

    KEEP_ALIVE = "send the answer, then read the next request"
    CLOSE = "send the answer, then close"
    SKIP_BODY = "read past the body, then decide again"
    LINGER = "send the answer, then close, taking in what the client still sends"
    TOO_LARGE = "send a 413 instead of the answer, then close as for LINGER"


def next_step(
    request: Request, body: Body, status: HTTPStatus, *, closing: bool, largest_body: int
) -> NextStep:
    """What follows the answer ``status`` to ``request`` while its body is as ``body``
    says, when the server is ``closing`` or not and no route takes over ``largest_body``.

    A body answered before it was read is skipped to keep the connection, unless the
    client waits for a 100 Continue or the body is large (a proxy does not pass Expect
    on): then the answer goes at once and the connection closes. A body too large for
    any route makes the answer a 413. A body left in the stream, or only partly read,
    ends the connection.
    """
    if body is Body.UNREAD:  # the answer came before the body
        length = request.content_length or 0
        if request.expect_continue:
            return NextStep.LINGER
        if length > largest_body:
            if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                return NextStep.LINGER
            return NextStep.TOO_LARGE
        if length > SKIP_LIMIT:  # answer now, not after the whole upload
            return NextStep.LINGER
        return NextStep.SKIP_BODY
    if body is not Body.NONE:
        return NextStep.LINGER
    if not request.keep_alive or closing:
        return NextStep.CLOSE
    return NextStep.KEEP_ALIVE


# Routing ###################################################################

Handler = Callable[["Call"], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    handler: Handler
    auth: bool  # it needs a bearer token
    body: bool  # its handler reads the request body
    durable: bool  # it changes state (read positions too): answered once it is journaled


class Router:
    """Maps a method and a path to a handler and its path parameters.

    Patterns are plain paths whose ``{name}`` segments become parameters, percent-decoded.
    An unknown path is a 404; a known path without the method is a 405 with ``Allow``.
    ``HEAD`` goes wherever ``GET`` goes: a handler whose GET changes state (read positions,
    deliveries) must not for a HEAD, which is safe (RFC 9110 §9.2.1).
    """

    def __init__(self) -> None:
        self._static: dict[str, dict[str, Route]] = {}
        self._dynamic: list[tuple[re.Pattern[str], dict[str, Route]]] = []
        self._patterns: dict[str, dict[str, Route]] = {}

    def add(
        self,
        method: str,
        pattern: str,
        handler: Handler,
        *,
        auth: bool,
        body: bool,
        durable: bool = False,
    ) -> None:
        methods = self._patterns.get(pattern)
        if methods is None:
            methods = self._patterns[pattern] = {}
            if "{" in pattern:
                regex = re.sub(r"\\\{\w+\\\}", "([^/]+)", re.escape(pattern))
                self._dynamic.append((re.compile(regex), methods))
            else:
                self._static[pattern] = methods
        methods[method] = Route(handler, auth, body, durable)

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


# Domain model ###############################################################

GENERAL: Final = "general"
USER_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
CHAT_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TEXT: Final = 4096  # characters in a message
MAX_SCHEDULE_AHEAD: Final = 7 * 24 * 3600.0  # seconds; send_at beyond is refused
IDEMPOTENCY_WINDOW: Final = 3600.0  # seconds a client_id is remembered, at least
SESSION_TOUCH: Final = 3600.0  # seconds between recorded uses of a session, at most
MAX_LIMIT: Final = 1000  # messages (or comments) per answer
# Bytes of messages in one answer, as sent: long messages come fewer at a time, so a client
# that asks a lot and reads nothing cannot make the server hold much. Each message counts its
# text and its file's name (``text_size``) and an allowance for its other fields.
MAX_ANSWER_TEXT: Final = 256 * 1024
MESSAGE_ALLOWANCE: Final = 400  # bytes of a message's JSON besides its text and file name
MOST_BYTES_A_CHAR: Final = 6  # in JSON as sent: a control character is \u0001

# Conversations: a chat by its name, a private exchange as "@<the other user>", and the
# user's notices as "@" (which, as a filter, also names every private exchange).
PRIVATE: Final = "@"
CONVERSATION_RE: Final = re.compile(r"@(?:[A-Za-z0-9_-]{1,32})?|[A-Za-z0-9_-]{1,64}")
NOTICE_TYPES: Final = frozenset(
    {"invited", "request", "approved", "denied", "scheduled_dropped", "banned"}
)
ANSWER_NOTICES: Final = frozenset({"approved", "denied"})  # an owner's answers to requests
NOTICE_KEYS: Final = frozenset({"type", "chat", "user", "scheduled"})

Event = tuple[Any, ...]  # ("kind", *fields): the unit of the journal
DERIVED: Final = {"derived": True}  # field metadata: rebuilt from the rest, never saved


class NotAMember(Forbidden):
    code = "not_a_member"

    def __init__(self, chat: str) -> None:
        super().__init__(f"you are not a member of {chat}")


class Banned(Forbidden):
    code = "banned"

    def __init__(self, until: float) -> None:
        super().__init__("you are banned from sending after reports from other users")
        self.until = until

    def body(self) -> dict[str, Any]:
        return {**super().body(), "until": self.until}


class UnknownUser(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"no user named {name!r}")


class UnknownChat(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"no chat named {name!r}")


class UnknownMessage(NotFound):
    def __init__(self, message_id: int | str) -> None:
        super().__init__(f"no message {message_id} that you can see")


class UnknownFile(NotFound):
    def __init__(self, file_id: str) -> None:
        super().__init__(f"no file {file_id!r} that you can use")


class UnknownScheduled(NotFound):
    def __init__(self, scheduled_id: str) -> None:
        super().__init__(f"no pending scheduled message {scheduled_id!r} of yours")


class Message(NamedTuple):
    """A message. Immutable: a snapshot can keep a shallow copy while the loop runs on.
    A notice is a private message from nobody (``sender`` None) that says what it is about
    in ``notice``: its type, and its chat, user or scheduled message."""

    id: int
    chat: str | None
    to: str | None
    sender: str | None
    text: str
    ts: float
    reply_to: int | None
    file: str | None
    notice: dict[str, str] | None = None


def text_size(text: str) -> int:
    """Bytes a message's text takes in an answer (its quotes aside): UTF-8 of its JSON
    escapes, up to 6 bytes a character (a control character), not its characters. The work
    stops with the answer's budget: at most MAX_ANSWER_TEXT and one message are measured."""
    if text.isascii() and text.isprintable():  # the usual text: a byte a character but two
        return len(text) + text.count('"') + text.count("\\")  # for a quote, a backslash
    return len(encode_json(text)) - 2


def kept_size(text: str) -> int:
    """What a message counts against ``--max-kept-text`` and ``--max-total-text``: its
    text's UTF-8 bytes and MESSAGE_COST."""
    return len(text.encode("utf-8")) + MESSAGE_COST


def conversation_of(message: Message, name: str) -> str:
    """The conversation ``message`` is in for ``name``, one of its audience: the chat's
    name, ``@`` and the other party of a private message, ``@`` alone for a notice."""
    if message.chat is not None:
        return message.chat
    if message.sender is None:
        return PRIVATE
    return PRIVATE + (message.sender if message.to == name else str(message.to))


@dataclass(slots=True)
class Window:
    """A counting window that opens with its first count and resets when it ends."""

    start: float | None = None
    count: int = 0

    def used(self, now: float, length: float) -> int:
        return self.count if self.start is not None and now < self.start + length else 0

    def add(self, now: float, length: float) -> None:
        if self.used(now, length) == 0:
            self.start, self.count = now, 0
        self.count += 1

    def reset_at(self, now: float, length: float) -> float | None:
        return self.start + length if self.used(now, length) and self.start is not None else None


class WindowsByKey:
    """Counting windows of one length by key (an address; a name and an address), kept in
    the order they opened, so that ended ones are dropped as new counts come: the memory
    is what the last window's length saw, whoever counts."""

    def __init__(self, length: float) -> None:
        self.length = length
        self.windows: dict[Any, Window] = {}

    def used(self, key: Any, now: float) -> int:
        window = self.windows.get(key)
        return 0 if window is None else window.used(now, self.length)

    def reset_at(self, key: Any, now: float) -> float:
        window = self.windows.get(key)
        reset = None if window is None else window.reset_at(now, self.length)
        return now if reset is None else reset

    def add(self, key: Any, now: float) -> None:
        while self.windows:
            oldest = next(iter(self.windows.values()))
            if oldest.used(now, self.length):
                break
            del self.windows[next(iter(self.windows))]
        window = self.windows.get(key)
        if window is None or not window.used(now, self.length):
            self.windows.pop(key, None)
            window = self.windows[key] = Window()
        window.add(now, self.length)


@dataclass(slots=True)
class User:
    name: str
    password: bytes  # scrypt of the password with salt, n = 2**cost
    salt: bytes
    cost: int
    created: float
    address: str = ""  # registered from (as the rules count addresses: ``address_group``)
    active_chat: str = GENERAL
    read_pos: int = 0  # every message id up to here has been read, in every conversation
    # Conversation ("@" for every private one) -> read up to there, when beyond read_pos.
    positions: dict[str, int] = field(default_factory=dict)
    chats: dict[str, int] = field(default_factory=dict)  # chat -> the last id when it joined
    sessions: set[str] = field(default_factory=set, metadata=DERIVED)  # token hashes
    reporters: set[str] = field(default_factory=set)
    banned_until: float | None = None
    # Addresses (``origin``) whose users' reports banned it -> when that ban ended (see
    # Moderation._spent_until).
    spent_origins: dict[str, float] = field(default_factory=dict)
    general: Window = field(default_factory=Window)  # messages sent to general
    flood: Window = field(default_factory=Window)  # messages sent anywhere
    reports_made: Window = field(default_factory=Window)
    client_ids: dict[str, tuple[str, int | str, float]] = field(default_factory=dict)
    private: list[int] = field(default_factory=list, metadata=DERIVED)  # ids to or from it
    # The same ids by private conversation ("@peer"; "@" the notices).
    conversations: dict[str, list[int]] = field(default_factory=dict, metadata=DERIVED)
    # The conversations that may hold unread messages; each other one is read to its end.
    unread: set[str] = field(default_factory=set, metadata=DERIVED)
    owned: int = field(default=0, metadata=DERIVED)  # chats it created
    # Its live messages by conversation (a chat's name, "@" and a recipient): who may report it.
    sent: dict[str, int] = field(default_factory=dict, metadata=DERIVED)
    undelivered: int = field(default=0, metadata=DERIVED)  # its private ones nobody received
    kept_text: int = field(default=0, metadata=DERIVED)  # bytes it pays for (Messenger._payer)
    scheduled: set[str] = field(default_factory=set, metadata=DERIVED)  # its pending ids
    stored: int = field(default=0, metadata=DERIVED)  # bytes of its files still kept

    @property
    def origin(self) -> str:
        """Where it registered from, as the per-address rules count it (bans, stored files);
        a user from before addresses were kept is one of its own."""
        return self.address or f"@{self.name}"


@dataclass(slots=True)
class Chat:
    name: str
    private: bool
    owner: str | None
    created: float
    members: set[str] = field(default_factory=set, metadata=DERIVED)  # from users' chats
    invited: set[str] = field(default_factory=set)
    requests: dict[str, float] = field(default_factory=dict)  # user -> when it asked
    link: str | None = None  # the hash of the current join link's token
    messages: list[int] = field(default_factory=list, metadata=DERIVED)  # live ids, oldest first
    # The members who have read it to its end: the next message makes it unread for them,
    # and only them (the others have it in their User.unread already).
    caught_up: set[str] = field(default_factory=set, metadata=DERIVED)


@dataclass(slots=True)
class Session:
    token_hash: str  # SHA-256 of the bearer token: the token itself is never kept
    user: str
    created: float
    used: float  # when it was last used, to within SESSION_TOUCH


@dataclass(slots=True)
class StoredFile:
    id: str
    owner: str
    name: str
    size: int
    type: str
    sha256: str
    ts: float
    messages: set[int] = field(default_factory=set, metadata=DERIVED)  # live ones carrying it
    scheduled: int = field(default=0, metadata=DERIVED)  # pending scheduled ones carrying it


@dataclass(slots=True)
class Scheduled:
    id: str
    sender: str
    send_at: float
    text: str
    chat: str | None
    to: str | None
    reply_to: int | None
    file: str | None
    client_id: str | None
    created: float


@dataclass(frozen=True, slots=True)
class Draft:
    """What a user asks to send."""

    text: str
    chat: str | None = None
    to: str | None = None
    reply_to: int | None = None
    file: str | None = None
    client_id: str | None = None
    send_at: float | None = None


class Unread(NamedTuple):
    """A user's unread messages (from others): by chat and by private peer (only those with
    some), and its unread notices."""

    chats: dict[str, int]
    private: dict[str, int]
    notices: int = 0

    @property
    def total(self) -> int:
        return sum(self.chats.values()) + sum(self.private.values()) + self.notices


@dataclass(frozen=True, slots=True)
class Standing:
    """A user's moderation state: distinct reporters now, and the end of a ban."""

    reports: int
    banned_until: float | None


@dataclass(frozen=True, slots=True)
class RateInfo:
    """The sender's standing against the general chat's limit after a send."""

    limit: int
    remaining: int
    reset: float | None


@dataclass(frozen=True, slots=True)
class SendResult:
    message: Message | None
    scheduled: Scheduled | None
    created: bool  # False for a retry with a known client_id
    rate: RateInfo | None  # set for sends to general


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def _ignore(*args: Any) -> None:
    """The default hook: the domain runs alone in unit tests."""


class Deadlines:
    """What falls due with time in a messenger, first due first: messages and files to
    expire, scheduled messages to send. Expiries are queues of ids in the order of their
    deadlines, read against the messenger's ``messages``, ``delivered`` and ``files``; the
    ids of what went another way (a message delivered, a file gone with its last message)
    are skipped when they come first."""

    def __init__(self, messenger: Messenger) -> None:
        self._messenger = messenger
        self._chat: deque[int] = deque()  # chat messages, oldest first
        self._private: deque[int] = deque()  # private messages, first delivered first
        self._undelivered: deque[int] = deque()  # private messages, oldest first
        self._file: deque[str] = deque()  # files, oldest first
        self._due: list[tuple[float, int, str]] = []  # heap of (send_at, order, scheduled id)
        self._client_ids: deque[tuple[float, str, str]] = deque()  # (ts, user, id), oldest first
        self._scheduled_count = 0  # orders scheduled messages due at the same time

    def add_message(self, message: Message) -> None:
        if message.chat is not None:
            self._chat.append(message.id)
        else:
            self._undelivered.append(message.id)

    def add_delivered(self, message_id: int) -> None:
        """A private message was received: its time to live starts."""
        self._private.append(message_id)

    def add_file(self, file_id: str) -> None:
        self._file.append(file_id)

    def add_client_id(self, ts: float, name: str, client_id: str) -> None:
        self._client_ids.append((ts, name, client_id))

    def schedule(self, scheduled: Scheduled) -> None:
        self._scheduled_count += 1
        heapq.heappush(self._due, (scheduled.send_at, self._scheduled_count, scheduled.id))

    def next_deadline(self) -> float | None:
        """The first deadline: a scheduled message's, or an expiry."""
        messenger = self._messenger
        ttl = messenger.rules.message_ttl
        candidates = []
        if self._due:
            candidates.append(self._due[0][0])
        if self._chat:
            candidates.append(messenger.messages[self._chat[0]].ts + ttl)
        if self._private:
            candidates.append(messenger.delivered[self._private[0]] + ttl)
        oldest = self._oldest_undelivered()
        if oldest is not None:
            candidates.append(messenger.messages[oldest].ts + messenger.rules.undelivered_ttl)
        oldest_file = self._oldest_file()
        if oldest_file is not None:
            candidates.append(oldest_file.ts + ttl)
        return min(candidates, default=None)

    def expired_messages(self, now: float) -> list[int]:
        """Take out the ids of the messages whose time is over; costs O(what expires)."""
        messenger = self._messenger
        ttl = messenger.rules.message_ttl
        expired: list[int] = []
        while self._chat and messenger.messages[self._chat[0]].ts + ttl <= now:
            expired.append(self._chat.popleft())
        while self._private and messenger.delivered[self._private[0]] + ttl <= now:
            expired.append(self._private.popleft())
        while self._undelivered and (oldest := self._oldest_undelivered()) is not None:
            if messenger.messages[oldest].ts + messenger.rules.undelivered_ttl > now:
                break
            expired.append(self._undelivered.popleft())
        return expired

    def expired_client_ids(self, now: float) -> list[tuple[float, str, str]]:
        """Take out the client_ids remembered (ts, user, id) whose lifetime is over."""
        expired: list[tuple[float, str, str]] = []
        if self._client_ids:  # most sends carry none: then nothing to work out
            lifetime = self._messenger.client_id_lifetime()
            while self._client_ids and self._client_ids[0][0] + lifetime <= now:
                expired.append(self._client_ids.popleft())
        return expired

    def expired_file(self, now: float) -> StoredFile | None:
        """Take out the oldest file if its time is over."""
        oldest = self._oldest_file() if self._file else None
        if oldest is None or oldest.ts + self._messenger.rules.message_ttl > now:
            return None
        self._file.popleft()
        return oldest

    def first_due(self, now: float) -> str | None:
        """The id of the scheduled message due first, if it is due by ``now``: it stays
        first until ``pop_due``."""
        return self._due[0][2] if self._due and self._due[0][0] <= now else None

    def pop_due(self) -> None:
        heapq.heappop(self._due)

    def _oldest_undelivered(self) -> int | None:
        """The oldest private message nobody received (delivered or gone ones are skipped)."""
        messenger, queue = self._messenger, self._undelivered
        while queue and (queue[0] not in messenger.messages or queue[0] in messenger.delivered):
            queue.popleft()
        return queue[0] if queue else None

    def _oldest_file(self) -> StoredFile | None:
        """The oldest file still kept (files gone with their last message are skipped)."""
        files = self._messenger.files
        while self._file and self._file[0] not in files:
            self._file.popleft()
        return files[self._file[0]] if self._file else None


class Accounts:
    """Who may act: registrations, bearer sessions and the login windows. A part of the
    ``Messenger``: its changes are the messenger's events (``user``, ``session``,
    ``touch``, ``revoke``), recorded by the messenger and applied here."""

    APPLIERS: ClassVar[dict[str, str]] = {
        "session": "_apply_session",
        "touch": "_apply_touch",
        "revoke": "_apply_revoke",
    }

    def __init__(self, messenger: Messenger) -> None:
        self._messenger = messenger
        self._users = messenger.users
        self._rules = messenger.rules
        self.sessions: dict[str, Session] = {}  # by token hash, least recently used first
        self.login_failures = WindowsByKey(self._rules.login_window)  # by (name, address)
        self.password_checks = WindowsByKey(self._rules.login_window)  # by address
        self.registrations = WindowsByKey(self._rules.registration_window)  # by address
        self._closed = Throttled()  # registration refused at --max-users

    def check_login_allowed(self, name: str, address: str) -> None:
        """429 while a name has had too many wrong passwords from an address in the login
        window (other addresses may still log in: the owner is not locked out)."""
        now = self._messenger.clock()
        if self.login_failures.used((name, address), now) >= self._rules.login_failures:
            reset = self.login_failures.reset_at((name, address), now)
            raise RateLimited("too many wrong passwords: try again later", reset - now)

    def login_failed(self, name: str, address: str) -> None:
        self.login_failures.add((name, address), self._messenger.clock())

    def check_password_allowed(self, address: str) -> None:
        """429 when an address has had its share of password checks in the login window
        (each costs a password hash, right password or not, known name or not)."""
        now = self._messenger.clock()
        if self.password_checks.used(address, now) >= self._rules.password_checks_per_ip:
            raise RateLimited(
                f"at most {how_many(self._rules.password_checks_per_ip, 'login')} per address "
                f"per {self._rules.login_window:g} seconds: try again later",
                self.password_checks.reset_at(address, now) - now,
            )

    def password_checked(self, address: str) -> None:
        self.password_checks.add(address, self._messenger.clock())

    def check_registration_allowed(self, address: str) -> None:
        """429 when an address has registered its share of users in the window; 503 when
        the server holds as many users as it may (accounts are never removed: only the
        operator can open registration again, with a larger --max-users)."""
        if len(self._users) >= self._rules.max_users:
            self._closed.warning("registration refused: %d users, the most allowed",
                                 len(self._users))
            raise Unavailable("registration is closed: the server has as many users as it may "
                              "hold")
        now = self._messenger.clock()
        if self.registrations.used(address, now) >= self._rules.registrations_per_ip:
            raise RateLimited(
                f"at most {how_many(self._rules.registrations_per_ip, 'new user')} per address "
                "and registration window: try again later",
                self.registrations.reset_at(address, now) - now,
            )

    def register(
        self, name: str, password: bytes, salt: bytes, cost: int, token: str, address: str
    ) -> User:
        if name in self._users:
            raise Conflict(f"the name {name} was taken a moment ago")
        self.check_registration_allowed(address)
        self._messenger.emit(
            "user", name, password, salt, cost, hash_token(token), address,
            self._messenger.clock(),
        )
        return self._users[name]

    def open_session(self, name: str, token: str) -> User:
        """A new session; at the most a user may hold, its least recently used goes."""
        user = self._users[name]
        if len(user.sessions) >= self._rules.max_sessions:
            oldest = min(user.sessions, key=lambda token_hash: self.sessions[token_hash].used)
            self._messenger.emit("revoke", oldest, name)
        self._messenger.emit("session", hash_token(token), name, self._messenger.clock())
        return user

    def authenticate(self, token: str) -> tuple[User, str]:
        """The user a bearer token belongs to, and the token's hash; 401 if none or if it
        went unused for the session TTL. A use is recorded about once an hour."""
        token_hash = hash_token(token)
        session = self.sessions.get(token_hash)
        if session is None:
            raise Unauthorized("unknown or revoked token: connect again")
        now = self._messenger.clock()
        if session.used + self._rules.session_ttl <= now:
            self._messenger.note("revoke", token_hash, session.user)
            raise Unauthorized("the session expired unused: connect again")
        if now - session.used >= min(SESSION_TOUCH, self._rules.session_ttl / 10):
            self._messenger.note("touch", token_hash, session.user, now)
        return self._users[session.user], token_hash

    def disconnect(self, token_hash: str) -> None:
        session = self.sessions.get(token_hash)
        if session is None:  # revoked by another request while this one's body came
            raise Unauthorized("unknown or revoked token: connect again")
        self._messenger.emit("revoke", token_hash, session.user)

    def expire_sessions(self, now: float) -> None:
        """Revoke the sessions unused for the session TTL (the least recently used first)."""
        while self.sessions:
            session = next(iter(self.sessions.values()))
            if session.used + self._rules.session_ttl > now:
                break
            self._messenger.emit("revoke", session.token_hash, session.user)

    # Applying events --------------------------------------------------------

    def _apply_session(self, token_hash: str, name: str, ts: float) -> None:
        self.add_session(Session(token_hash, name, ts, ts))

    def add_session(self, session: Session) -> None:
        """Sessions are kept least recently used first: the TTL sweep starts there."""
        self.sessions[session.token_hash] = session
        self._users[session.user].sessions.add(session.token_hash)

    def _apply_touch(self, token_hash: str, name: str, ts: float) -> None:
        session = self.sessions.pop(token_hash, None)
        if session is not None:
            session.used = ts
            self.add_session(session)

    def _apply_revoke(self, token_hash: str, name: str) -> None:
        session = self.sessions.pop(token_hash, None)
        if session is not None:
            self._users[session.user].sessions.discard(token_hash)


class Moderation:
    """Reports and bans: one report counts per reporter and target, and enough of them ban
    the target from sending for a while. A part of the ``Messenger`` (the ``report``
    event is applied here)."""

    APPLIERS: ClassVar[dict[str, str]] = {"report": "_apply_report"}

    def __init__(self, messenger: Messenger) -> None:
        self._messenger = messenger
        self._users = messenger.users
        self._rules = messenger.rules

    def report(self, reporter: str, target: str, reason: str) -> Standing:
        """One report per reporter and target; enough of them ban the target from sending."""
        if target == reporter:
            raise InvalidField("you cannot report yourself")
        user = self._users.get(target)
        if user is None:
            raise UnknownUser(target)
        if not self._has_seen_from(reporter, user):
            raise Forbidden(f"you can report {target} only for a message of theirs you can see")
        now = self._messenger.clock()
        already_counted = reporter in user.reporters and _ended_ban(user, now) is None
        if not already_counted and self._spent_until(user, reporter, now) <= now:
            made = self._users[reporter].reports_made
            if made.used(now, self._rules.rate_window) >= self._rules.report_limit:
                reset = made.reset_at(now, self._rules.rate_window) or now
                raise RateLimited("too many reports: try again later", reset - now)
            banned_until = user.banned_until
            self._messenger.emit("report", reporter, target, reason, now)
            if user.banned_until is not None and user.banned_until != banned_until:
                logger.warning("%r is banned until %s after %d reports",
                               target, user.banned_until, len(user.reporters))
                until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(user.banned_until))
                self._messenger.notify(
                    target, "banned",
                    f"after reports from other users, you may not send until {until}",
                )
        return self.standing(target)

    def _has_seen_from(self, name: str, target: User) -> bool:
        """Whether a stored message from ``target`` is one ``name`` can see: in a shared
        chat or sent to it (the cost is the reporter's chats, not the target's)."""
        if target.sent.get(f"@{name}"):
            return True
        return any(target.sent.get(chat) for chat in self._users[name].chats)

    def standing(self, name: str) -> Standing:
        """A user's reports and ban as of now: when a ban has ended, the count restarts."""
        user = self._users[name]
        if _ended_ban(user, self._messenger.clock()) is not None:
            return Standing(0, None)
        return Standing(len(user.reporters), user.banned_until)

    def _spent_until(self, user: User, reporter: str, now: float) -> float:
        """Until when ``reporter`` counts toward no new ban of ``user``: ``report_memory``
        after the end of a ban reported from its address (``User.origin``, as a ban counts
        reporters), else 0. Without it, the same few addresses could report their target
        again the moment each ban ends, with new accounts if need be."""
        origin = self._users[reporter].origin
        ended = _ended_ban(user, now)
        if ended is None or origin not in self._origins(user.reporters):
            ended = user.spent_origins.get(origin)
        return 0.0 if ended is None else ended + self._rules.report_memory

    def _apply_report(self, reporter: str, target: str, reason: str, ts: float) -> None:
        user = self._users[target]
        if self._spent_until(user, reporter, ts) > ts:
            return
        ended_at = _ended_ban(user, ts)
        if ended_at is not None:
            memory = self._rules.report_memory
            spent = {origin: ended for origin, ended in user.spent_origins.items()
                     if ended + memory > ts}
            user.spent_origins = spent | dict.fromkeys(self._origins(user.reporters), ended_at)
            user.banned_until = None
            user.reporters.clear()
        if reporter in user.reporters:
            return
        user.reporters.add(reporter)
        self._users[reporter].reports_made.add(ts, self._rules.rate_window)
        if self._counted(user.reporters) >= self._rules.ban_threshold and user.banned_until is None:
            user.banned_until = ts + self._rules.ban_duration

    def _counted(self, reporters: set[str]) -> int:
        """Reporters as a ban counts them: once per address they registered from, so that
        one stranger's accounts are one voice."""
        return len(self._origins(reporters))

    def _origins(self, reporters: set[str]) -> set[str]:
        return {self._users[name].origin for name in reporters}


class Uploads:
    """The files users upload: each owner's quota, who may read a file, and when a file
    goes (with its last message, once older than the TTL). A part of the ``Messenger``
    (the ``file`` event is applied here); the files are the messenger's ``files``."""

    APPLIERS: ClassVar[dict[str, str]] = {"file": "_apply_file"}

    def __init__(self, messenger: Messenger) -> None:
        self._messenger = messenger
        self._users = messenger.users
        self._files = messenger.files
        self._rules = messenger.rules
        self.stored_by_origin: dict[str, int] = {}  # bytes stored by users' ``origin``

    def check_upload(self, owner: str, size: int) -> None:
        """403 when ``size`` more bytes would take the user past its upload quota, or the
        users registered from its address past theirs (accounts are free to make)."""
        user = self._users[owner]
        if user.stored + _charged(size) > self._rules.upload_quota:
            raise QuotaExceeded(
                f"your stored files may total at most {self._rules.upload_quota} bytes "
                f"({user.stored} used)"
            )
        by_address = self.stored_by_origin.get(user.origin, 0)
        if by_address + _charged(size) > self._rules.upload_quota_per_ip:
            raise QuotaExceeded(
                "the stored files of the users registered from your address may total at most "
                f"{self._rules.upload_quota_per_ip} bytes ({by_address} used)"
            )

    def add_file(
        self, owner: str, file_id: str, name: str, size: int, media_type: str, sha256: str
    ) -> StoredFile:
        self.check_upload(owner, size)
        self._messenger.emit(
            "file", file_id, owner, name, size, media_type, sha256, self._messenger.clock()
        )
        return self._files[file_id]

    def readable_file(self, name: str, file_id: str) -> StoredFile:
        """A file for its uploader or a user who can see a message carrying it; else 404."""
        messenger = self._messenger
        messenger.expire(messenger.clock())
        stored = self._files.get(file_id)
        if stored is None or not (
            stored.owner == name
            or any(messenger.can_see(name, messenger.messages[i]) for i in stored.messages)
        ):
            raise UnknownFile(file_id)
        return stored

    def drop_if_unused(self, stored: StoredFile, now: float) -> None:
        """A file goes when no live message carries it and it is older than the TTL."""
        unused = not stored.messages and not stored.scheduled
        if unused and stored.ts + self._rules.message_ttl <= now and stored.id in self._files:
            self._remove(stored)
            self._messenger.changes += 1
            self._messenger.on_file_gone(stored.id)

    def forget_file(self, file_id: str) -> None:
        """Drop a file whose bytes are gone from the state folder (found at start: a crash
        after the file expired, before a snapshot said so). What carried it stays, without it."""
        stored = self._files.get(file_id)
        if stored is None:
            return
        messages = self._messenger.messages
        for message_id in stored.messages:
            messages[message_id] = messages[message_id]._replace(file=None)
        for scheduled in self._messenger.scheduled.values():
            if scheduled.file == file_id:
                scheduled.file = None
        self._remove(stored)

    def _apply_file(
        self, new_file: str, owner: str, file_name: str, size: int, media_type: str,
        sha256: str, ts: float,
    ) -> None:
        self.add(StoredFile(new_file, owner, file_name, size, media_type, sha256, ts))

    def add(self, stored: StoredFile) -> None:
        self._files[stored.id] = stored
        self._count(self._users[stored.owner], _charged(stored.size))
        self._messenger.deadlines.add_file(stored.id)

    def _remove(self, stored: StoredFile) -> None:
        del self._files[stored.id]
        self._count(self._users[stored.owner], -_charged(stored.size))

    def _count(self, owner: User, size: int) -> None:
        """``size`` more bytes stored (fewer if negative) by ``owner`` and its address."""
        owner.stored += size
        by_address = self.stored_by_origin.get(owner.origin, 0) + size
        if by_address:
            self.stored_by_origin[owner.origin] = by_address
        else:
            del self.stored_by_origin[owner.origin]


class Membership:
    """Who is in which chat: creating and joining chats, leaving them, invitations, join
    links and the owner's decisions on requests; the pages of chats a user may see. A part
    of the ``Messenger`` (the ``join``, ``leave``, ``invite``, ``link``, ``request`` and
    ``decide`` events are applied here); the chats are the messenger's ``chats``."""

    APPLIERS: ClassVar[dict[str, str]] = {
        "join": "_apply_join",
        "leave": "_apply_leave",
        "invite": "_apply_invite",
        "link": "_apply_link",
        "request": "_apply_request",
        "decide": "_apply_decide",
    }

    def __init__(self, messenger: Messenger) -> None:
        self._messenger = messenger
        self._users = messenger.users
        self._chats = messenger.chats
        self._rules = messenger.rules
        self.public_names = sorted(c.name for c in self._chats.values() if not c.private)
        self._links: dict[str, str] = {}  # link token hash -> chat
        self._full = Throttled()  # a chat refused at --max-chats

    def member_chat(self, user: User, chat_name: str) -> Chat:
        chat = self._chats.get(chat_name)
        if chat is None:
            raise UnknownChat(chat_name)
        if user.name not in chat.members:
            raise NotAMember(chat_name)
        return chat

    def _owned_chat(self, name: str, chat_name: str) -> Chat:
        chat = self._chats.get(chat_name)
        if chat is None:
            raise UnknownChat(chat_name)
        if chat.owner != name:
            raise Forbidden(f"only the owner of {chat_name} may do that")
        return chat

    def visible_chats(self, name: str, after: str = "", limit: int = MAX_LIMIT) -> list[Chat]:
        """Public chats and the private ones the user belongs to, by name after ``after``:
        at most ``limit``. The cost is the page and the user's chats, not all chats."""
        user = self._users[name]
        public = self.public_names
        public_after = itertools.islice(public, bisect.bisect_right(public, after), None)
        own_private = sorted(c for c in user.chats if self._chats[c].private and c > after)
        names = itertools.islice(heapq.merge(public_after, own_private), limit)
        return [self._chats[chat_name] for chat_name in names]

    def join(self, name: str, chat_name: str, private: bool | None) -> tuple[Chat, bool]:
        """Join a chat (creating it, owned by the user) and make it the active one."""
        user = self._users[name]
        chat = self._chats.get(chat_name)
        if chat is not None:
            if private is not None and private != chat.private:
                kind = "private" if chat.private else "public"
                raise Conflict(f"{chat_name} is already taken by a {kind} chat")
            allowed = name in chat.members or name in chat.invited or name == chat.owner
            if chat.private and not allowed:
                raise Forbidden(f"{chat_name} is private: ask its owner for an invitation")
            if name in chat.members and user.active_chat == chat_name:
                return chat, False
        elif user.owned >= self._rules.max_owned_chats:
            raise QuotaExceeded(
                f"you may create at most {how_many(self._rules.max_owned_chats, 'chat')}"
            )
        elif len(self._chats) >= self._rules.max_chats:
            self._full.warning("chat %r not created: %d chats, the most allowed", chat_name,
                               len(self._chats))
            raise Unavailable("no new chat: the server holds as many chats as it may")
        if chat is None or name not in chat.members:
            self.check_memberships(user)
        self._messenger.emit("join", chat_name, name, bool(private), self._messenger.clock())
        return self._chats[chat_name], chat is None

    def check_memberships(self, user: User) -> None:
        if len(user.chats) >= self._rules.max_memberships:
            raise QuotaExceeded(
                f"{user.name} may be a member of at most "
                f"{how_many(self._rules.max_memberships, 'chat')}"
            )

    def leave(self, name: str, chat_name: str) -> Chat:
        if chat_name == GENERAL:
            raise BadRequest(f"nobody leaves {GENERAL}: every user stays a member")
        chat = self.member_chat(self._users[name], chat_name)
        self._messenger.emit("leave", chat_name, name)
        return chat

    def invite(self, owner: str, chat_name: str, guest: str) -> Chat:
        """Invite ``guest`` (a notice tells it): a new invitation counts against the owner's
        flood window, one to a member or to someone invited already is no change."""
        chat = self._owned_chat(owner, chat_name)
        if guest not in self._users:
            raise UnknownUser(guest)
        if guest not in chat.members and guest not in chat.invited:
            now = self._messenger.clock()
            text = f"{owner} invited you to {chat_name}"
            self._messenger.check_flood(self._users[owner], now)
            self._messenger.check_text_room(self._users[owner], text)  # the owner's notice
            self._messenger.emit("invite", chat_name, guest, now)
            self._messenger.notify(guest, "invited", text, chat=chat_name, about=owner)
        return chat

    def make_link(self, owner: str, chat_name: str) -> str:
        """A new join link token for the chat; the previous one stops working."""
        self._owned_chat(owner, chat_name)
        token = secrets.token_hex(24)  # 192 bits; hex: never taken for an option
        self._messenger.emit("link", chat_name, hash_token(token))
        return token

    def request_join(self, name: str, token: str) -> tuple[Chat, bool]:
        """Ask to join through a link: (the chat, whether the user is already a member). A
        new request (a notice to the owner) counts against the user's flood window."""
        chat_name = self._links.get(hash_token(token))
        if chat_name is None:
            raise NotFound("unknown or revoked join link")
        chat = self._chats[chat_name]
        if name in chat.members:
            return chat, True
        if name not in chat.requests:
            now = self._messenger.clock()
            text = f"{name} asks to join {chat_name}"
            self._messenger.check_flood(self._users[name], now)
            self._messenger.check_text_room(self._users[name], text)  # the requester's notice
            self._messenger.emit("request", chat_name, name, now)
            if chat.owner is not None:
                self._messenger.notify(chat.owner, "request", text, chat=chat_name, about=name)
        return chat, False

    def pending_requests(self, owner: str, chat_name: str) -> dict[str, float]:
        return self._owned_chat(owner, chat_name).requests

    def decide(self, owner: str, chat_name: str, guest: str, approve: bool) -> Chat:
        chat = self._owned_chat(owner, chat_name)
        if guest not in chat.requests:
            raise NotFound(f"{guest} has no pending request to join {chat_name}")
        if approve:
            self.check_memberships(self._users[guest])
            kind, text = "approved", f"{owner} let you into {chat_name}"
        else:
            kind, text = "denied", f"{owner} turned down your request to join {chat_name}"
        # The answer counts against the requester's quota, as its request did (``_payer``):
        # never refused, so that an owner always gets through its requests.
        self._messenger.emit("decide", chat_name, guest, approve, self._messenger.clock())
        self._messenger.notify(guest, kind, text, chat=chat_name, about=owner)
        return chat

    # Applying events --------------------------------------------------------

    def _apply_join(self, chat_name: str, name: str, private: bool, ts: float) -> None:
        chat = self._chats.get(chat_name)
        if chat is None:
            chat = self._chats[chat_name] = Chat(chat_name, private, name, ts)
            self._users[name].owned += 1
            if not private:
                bisect.insort(self.public_names, chat_name)
        self.add_member(chat, name)
        self._users[name].active_chat = chat_name

    def add_member(self, chat: Chat, name: str) -> None:
        if name not in chat.members:
            chat.members.add(name)
            self._users[name].chats[chat.name] = self._messenger.last_id
            chat.caught_up.add(name)  # what came before is not the new member's to read
        chat.invited.discard(name)
        chat.requests.pop(name, None)

    def _apply_leave(self, chat: str, name: str) -> None:
        user = self._users[name]
        self._chats[chat].members.discard(name)
        self._chats[chat].caught_up.discard(name)
        user.chats.pop(chat, None)
        user.unread.discard(chat)
        user.positions.pop(chat, None)
        if user.active_chat == chat:
            user.active_chat = GENERAL

    def _apply_invite(self, chat: str, name: str, ts: float | None = None) -> None:
        """``name`` is invited into ``chat``, at ``ts`` in the owner's flood window. A journal
        written before invitations counted has no ``ts``: nothing to count then."""
        invited_to = self._chats[chat]
        invited_to.invited.add(name)
        if ts is not None and invited_to.owner is not None:
            self._users[invited_to.owner].flood.add(ts, self._rules.flood_window)

    def _apply_link(self, chat: str, token_hash: str) -> None:
        self.set_link(chat, token_hash)

    def set_link(self, chat: str, token_hash: str) -> None:
        """The chat's join link is now ``token_hash``'s; its previous one stops working."""
        joined = self._chats[chat]
        if joined.link is not None:
            self._links.pop(joined.link, None)
        joined.link = token_hash
        self._links[token_hash] = chat

    def _apply_request(self, chat: str, name: str, ts: float) -> None:
        self._chats[chat].requests.setdefault(name, ts)
        self._users[name].flood.add(ts, self._rules.flood_window)

    def _apply_decide(self, chat: str, name: str, approve: bool, ts: float) -> None:
        joined = self._chats[chat]
        joined.requests.pop(name, None)
        if approve:
            self.add_member(joined, name)


class Messenger:
    """The messenger's state and rules, with no I/O and no HTTP.

    Time comes from ``clock``. Every change is an event: ``record`` (the journal) takes it
    first, then it is applied, so a replay of the journal rebuilds the same state. Methods
    check everything before they record anything: a refused request changes nothing.

    Parts hold their own concerns: ``accounts`` (registrations, sessions, login windows),
    ``membership`` (who is in which chat, invitations, links), ``moderation`` (reports and
    bans), ``uploads`` (files, their quota and lifetime) and ``deadlines`` (what falls due
    with time).
    """

    # The applier of each kind of event but those of the parts (its parameters are the
    # event's fields).
    APPLIERS: ClassVar[dict[str, str]] = {
        "user": "_apply_user",
        "message": "_apply_message",
        "deliver": "_apply_deliver",
        "read": "_apply_read",
        "read_in": "_apply_read_in",
        "notice": "_apply_notice",
        "schedule": "_apply_schedule",
        "cancel": "_apply_cancel",
    }

    def __init__(self, rules: Rules, clock: Callable[[], float] = time.time) -> None:
        self.rules = rules
        self.clock = clock
        self.record: Callable[[Event], None] = _ignore
        self.on_message: Callable[[Message], None] = _ignore
        self.on_file_gone: Callable[[str], None] = _ignore
        self.clear()

    def clear(self) -> None:
        """Empty: no user, no message, only the general chat."""
        self.users: dict[str, User] = {}
        self.chats: dict[str, Chat] = {GENERAL: Chat(GENERAL, False, None, 0.0)}
        self.messages: dict[int, Message] = {}
        self.files: dict[str, StoredFile] = {}
        self.scheduled: dict[str, Scheduled] = {}
        self.last_id = 0
        self.changes = 0  # events applied and messages expired; snapshots watch it
        self.delivered: dict[int, float] = {}  # private message id -> first received
        self.kept_text = 0  # bytes of all kept messages, notices and scheduled ones (kept_size)
        self._text_full = Throttled()  # a send refused at --max-total-text
        self._replies: dict[int, list[int]] = {}  # message id -> comment ids
        self.deadlines = Deadlines(self)
        self.accounts = Accounts(self)
        self.membership = Membership(self)
        self.moderation = Moderation(self)
        self.uploads = Uploads(self)
        self._apply: dict[str, Callable[..., None]] = {}
        for part in (self, self.accounts, self.membership, self.moderation, self.uploads):
            self._apply.update((kind, getattr(part, name)) for kind, name in part.APPLIERS.items())

    # Events -----------------------------------------------------------------

    def emit(self, *event: Any) -> None:
        """Record an event, then apply it."""
        self.record(event)
        self.replay(event)
        if logger.isEnabledFor(logging.INFO):
            logger.info("%s", describe_event(event))

    def note(self, *event: Any) -> None:
        """Record what a read did (deliveries, read positions), or a notice that follows a
        change. When the journal refuses it (a full disk), the answer still goes out; the
        next read tries again."""
        try:
            self.emit(*event)
        except Unavailable:
            logger.warning("could not record a %s event: the state cannot be written", event[0])

    def replay(self, event: Event) -> None:
        """Apply one event, recorded now or read back from the journal."""
        self._apply[event[0]](*event[1:])
        self.changes += 1

    # Sending ----------------------------------------------------------------

    def send(self, name: str, draft: Draft) -> SendResult:
        """Post a message now, or schedule it for ``draft.send_at``."""
        user = self.users[name]
        now = self.clock()
        self.expire(now)
        known = self._known_client_id(user, draft.client_id, now)
        if known is not None:
            return known
        self._check_not_banned(user, now)
        chat, to, reply_to = self._destination(user, draft)
        file_id = self._check_file(user, draft.file)
        self.check_flood(user, now)
        counted = chat == GENERAL
        if counted:
            self._check_rate(user, now)
        self.check_text_room(user, draft.text)  # a scheduled text is kept from now on
        if draft.send_at is not None:
            if not now < draft.send_at <= now + MAX_SCHEDULE_AHEAD:
                raise InvalidField("send_at must be in the future, at most 7 days ahead")
            if len(user.scheduled) >= self.rules.max_scheduled:
                raise QuotaExceeded(
                    f"at most {how_many(self.rules.max_scheduled, 'scheduled message')} "
                    "may be pending"
                )
            scheduled_id = secrets.token_hex(12)  # hex: an id never starts with "-"
            self.emit(
                "schedule", scheduled_id, name, draft.send_at, draft.text, chat, to, reply_to,
                file_id, draft.client_id, now, counted,
            )
            return SendResult(None, self.scheduled[scheduled_id], True, self._rate(user, chat))
        self._check_undelivered(user, to)
        message = Message(self.last_id + 1, chat, to, name, draft.text, now, reply_to, file_id)
        self._post(message, client_id=draft.client_id, counted=counted)
        return SendResult(message, None, True, self._rate(user, chat))

    def _post(
        self,
        message: Message,
        *,
        client_id: str | None,
        counted: bool,
        scheduled_id: str | None = None,
    ) -> None:
        """Record and apply a new message: ``counted`` against the general chat's limit,
        delivering the scheduled message ``scheduled_id``."""
        notice = message[-1]  # the last field: never set here, a notice has its own event
        assert notice is None
        self.emit("message", *message[:-1], client_id, counted, scheduled_id)

    def _known_client_id(self, user: User, client_id: str | None, now: float) -> SendResult | None:
        """The first answer to a retried send, found by its client_id."""
        if client_id is None:
            return None
        known = user.client_ids.get(client_id)
        if known is None or known[2] + self.client_id_lifetime() <= now:
            return None
        kind, ref, _ = known
        if kind == "scheduled":
            scheduled = self.scheduled[str(ref)]  # a cancelled one forgets its client_id
            return SendResult(None, scheduled, False, self._rate(user, scheduled.chat))
        message = self.messages.get(int(ref))
        if message is None:
            raise NotFound(f"the message sent with client_id {client_id} has expired")
        return SendResult(message, None, False, self._rate(user, message.chat))

    def _destination(self, user: User, draft: Draft) -> tuple[str | None, str | None, int | None]:
        """Where a draft goes: (chat, to, reply_to); a comment goes where its parent is."""
        if draft.chat is not None and draft.to is not None:
            raise InvalidField("give chat or to, not both")
        if draft.reply_to is not None:
            parent = self.visible_message(user.name, draft.reply_to)
            if parent.notice is not None:
                raise InvalidField("a notice cannot be answered or commented on")
            if parent.chat is not None:
                chat, to = parent.chat, None
            else:
                chat, to = None, parent.to if parent.sender == user.name else parent.sender
            if draft.chat not in (None, chat) or draft.to not in (None, to):
                raise InvalidField("a comment goes where its parent is: drop chat and to")
            return chat, to, parent.id
        if draft.to is not None:
            if draft.to not in self.users:
                raise UnknownUser(draft.to)
            return None, draft.to, None
        chat_name = draft.chat if draft.chat is not None else user.active_chat
        self.membership.member_chat(user, chat_name)
        return chat_name, None, None

    def _check_file(self, user: User, file_id: str | None) -> str | None:
        if file_id is None:
            return None
        stored = self.files.get(file_id)
        if stored is None or stored.owner != user.name:
            raise UnknownFile(file_id)
        return file_id

    @staticmethod
    def _check_not_banned(user: User, now: float) -> None:
        if user.banned_until is not None and user.banned_until > now:
            raise Banned(user.banned_until)

    def check_flood(self, user: User, now: float) -> None:
        """429 past the flood limit. What makes others' messages or notices counts: messages
        anywhere (scheduled ones when accepted), invitations, join requests."""
        if user.flood.used(now, self.rules.flood_window) >= self.rules.flood_limit:
            reset = user.flood.reset_at(now, self.rules.flood_window) or now
            raise RateLimited(
                f"messages, invitations and join requests are limited to "
                f"{self.rules.flood_limit} per {self.rules.flood_window:g} seconds: slow down",
                reset - now,
            )

    def _check_undelivered(self, user: User, to: str | None) -> None:
        """403 when a private message would wait beside too many others nobody received."""
        if to is not None and user.undelivered >= self.rules.max_undelivered:
            raise QuotaExceeded(
                f"at most {self.rules.max_undelivered} of your private messages may wait "
                "for recipients who have not received them"
            )

    def check_text_room(self, user: User, text: str) -> None:
        """403 when the messages and notices the user pays for would take too many bytes,
        503 when all would (``kept_size``): memory stays bounded whoever sends (a message
        lives an hour after delivery, a private one or a notice nobody received up to
        ``undelivered_ttl``, a scheduled one up to a week before it is sent)."""
        size = kept_size(text)
        if user.kept_text + size > self.rules.max_kept_text:
            raise QuotaExceeded(
                f"your messages and notices still kept or scheduled may take at most "
                f"{self.rules.max_kept_text} bytes ({user.kept_text} used; each counts its "
                f"text and {MESSAGE_COST}): older ones must expire first"
            )
        if self.kept_text + size > self.rules.max_total_text:
            self._text_full.warning("kept messages are at their limit of %d bytes",
                                    self.rules.max_total_text)
            raise Unavailable("the server keeps as much message text as it may: try again later",
                              retry_after=60)

    def _check_rate(self, user: User, now: float) -> None:
        window = self.rules.rate_window
        if user.general.used(now, window) >= self.rules.rate_limit:
            rate = self._rate(user, GENERAL)
            reset = rate.reset if rate is not None and rate.reset is not None else now
            raise RateLimited(
                f"at most {how_many(self.rules.rate_limit, 'message')} per window in {GENERAL}",
                reset - now,
                rate,
            )

    def _rate(self, user: User, chat: str | None) -> RateInfo | None:
        if chat != GENERAL:
            return None
        now = self.clock()
        used = user.general.used(now, self.rules.rate_window)
        reset = user.general.reset_at(now, self.rules.rate_window)
        return RateInfo(self.rules.rate_limit, max(0, self.rules.rate_limit - used), reset)

    def quotas_left(self, name: str) -> dict[str, int]:
        """What the user may still send now, schedule, and upload."""
        user = self.users[name]
        rules = self.rules
        return {
            "flood_left": rules.flood_limit - user.flood.used(self.clock(), rules.flood_window),
            "scheduled_left": rules.max_scheduled - len(user.scheduled),
            "upload_left": max(0, rules.upload_quota - user.stored),
        }

    def rate_status(self, name: str) -> RateInfo:
        rate = self._rate(self.users[name], GENERAL)
        assert rate is not None
        return rate

    # Reading ----------------------------------------------------------------

    def poll(
        self, name: str, since: int | None, keys: list[str] | None, limit: int,
        *, mark: bool = True,
    ) -> tuple[list[Message], int]:
        """Messages the user can see, oldest first, and the position to poll from next, in
        the conversations ``keys`` names (chat names, ``@user``, ``@`` for every private
        one and the notices; None for all of them).

        Without ``since``, each conversation starts at the user's read position there: the
        answer is the unread messages, and nothing is marked read. With ``since``, each
        starts after it, and every conversation named is marked read up to it (no other),
        for every session of the user. Either way the cost follows the conversations named
        or with something new, never all the user's conversations (see ``_chats_after``).

        ``mark`` False answers the same and changes nothing (a HEAD, which must be safe):
        neither read positions nor deliveries.
        """
        user = self.users[name]
        self.expire(self.clock())
        chats, peers, every_private = self._named(user, keys)
        if since is None:
            sources = self._unread_sources(user, keys, chats, peers, every_private)
        elif since >= self.last_id:  # nothing newer exists: a caught-up long-poll's case
            sources = []
        else:
            if keys is None:
                chats = self._chats_after(user, since)
            sources = [
                self._after(self.chats[chat].messages, max(since, user.chats[chat]))
                for chat in chats
            ]
            if every_private:
                sources.append(self._after(user.private, since))
            else:
                sources += [self._after(user.conversations.get(key, []), since) for key in peers]
        found: list[Message] = []
        if sources:
            merged = sources[0] if len(sources) == 1 else heapq.merge(*sources)
            ids = list(itertools.islice(merged, limit))
            found = self._within_budget(self.messages[message_id] for message_id in ids)
            if mark:
                self._mark_delivered(user, found)
        if mark and since is not None:
            self._mark_read(user, keys, [*chats, *peers], min(since, self.last_id))
        start = self.last_id if since is None else since
        return found, found[-1].id if found else start

    def _unread_sources(
        self, user: User, keys: list[str] | None, chats: list[str], peers: list[str],
        every_private: bool,
    ) -> list[Iterator[int]]:
        """The unread ids of each conversation named (every one without a filter) that
        may hold some (``User.unread``), each from the user's position there."""
        if keys is None:
            unread = list(user.unread)
        else:
            private = [key for key in user.unread if key.startswith(PRIVATE)]
            named = [*chats, *(private if every_private else peers)]
            unread = [key for key in named if key in user.unread]
        return [self._after(self._ids_in(user, key), self._position(user, key)) for key in unread]

    def _named(self, user: User, keys: list[str] | None) -> tuple[list[str], list[str], bool]:
        """The conversations a filter names: its chats (404 unknown, 403 not a member), its
        private ones (404 for an unknown user), and whether it names every private one
        (``@``, which a missing filter does too). Each once. No filter names no chat here:
        the caller finds those that matter (``_chats_after``, ``User.unread``)."""
        if keys is None:
            return [], [], True
        chats: list[str] = []
        peers: list[str] = []
        for key in dict.fromkeys(keys):
            if not key.startswith(PRIVATE):
                chats.append(self.membership.member_chat(user, key).name)
            elif key != PRIVATE:
                if key[1:] not in self.users:
                    raise UnknownUser(key[1:])
                peers.append(key)
        every_private = PRIVATE in keys
        return chats, [] if every_private else peers, every_private

    def _chats_after(self, user: User, since: int) -> list[str]:
        """The user's chats that may hold messages after ``since``. Every other one is read
        to its end (it is not in ``unread``) at a position no later than ``since`` (its own
        mark, if any, is not later): so none of its messages is newer. Behind the mark of
        every conversation (a second client lagging behind the first), every chat."""
        if since < user.read_pos:
            return list(user.chats)
        ahead = [key for key, position in user.positions.items() if position > since]
        candidates = dict.fromkeys([*user.unread, *ahead]) if ahead else user.unread
        return [key for key in candidates if key in user.chats]

    def _mark_read(
        self, user: User, keys: list[str] | None, named: list[str], position: int
    ) -> None:
        """Mark the conversations a filter named read up to ``position``: all of them
        (``read``) without a filter, else each one named (``read_in``; ``@`` for every
        private one).

        Only conversations the user has are marked: its chats (``_named`` checked them),
        the private ones with live messages, and ``@``; a private one with nobody is no
        position (else one per user named could be kept). One read up to there already is
        no event: a poll that changes nothing writes nothing."""
        if keys is None:
            if position > user.read_pos:
                self.note("read", user.name, position)
            return
        for key in [*named, *([PRIVATE] if PRIVATE in keys else [])]:
            exists = key == PRIVATE or not key.startswith(PRIVATE) or key in user.conversations
            if exists and position > self._position(user, key):
                self.note("read_in", user.name, key, position)

    def _position(self, user: User, key: str) -> int:
        """Where the user has read a conversation up to: its mark there, the mark of every
        private conversation (for a private one), the mark of everything, and for a chat
        the last id when the user joined (it sees nothing older in a poll)."""
        position = max(user.read_pos, user.positions.get(key, 0))
        if key.startswith(PRIVATE):
            return max(position, user.positions.get(PRIVATE, 0))
        return max(position, user.chats.get(key, 0))

    def _ids_in(self, user: User, key: str) -> list[int]:
        """The live message ids of one of the user's conversations, oldest first."""
        if key.startswith(PRIVATE):
            return user.conversations.get(key, [])
        return self.chats[key].messages

    def _unread_count(self, user: User, key: str) -> int:
        ids = self._ids_in(user, key)
        return len(ids) - bisect.bisect_right(ids, self._position(user, key))

    def _within_budget(self, messages: Iterable[Message]) -> list[Message]:
        """As many of ``messages`` as fit in one answer's budget (one at least). When they
        all fit even at the most a character can take (6 bytes: ``\\u0001``), none is
        measured: the usual poll of a few short messages."""
        candidates = list(messages)
        most = sum(
            MOST_BYTES_A_CHAR * (len(m.text) + (0 if m.file is None else MAX_FILE_NAME))
            for m in candidates
        )
        if most + MESSAGE_ALLOWANCE * len(candidates) <= MAX_ANSWER_TEXT:
            return candidates
        kept: list[Message] = []
        budget = MAX_ANSWER_TEXT
        for message in candidates:
            budget -= text_size(message.text) + MESSAGE_ALLOWANCE
            if message.file is not None:
                budget -= text_size(self.files[message.file].name)
            if budget < 0 and kept:
                break
            kept.append(message)
        return kept

    @staticmethod
    def _after(ids: list[int], position: int) -> Iterator[int]:
        return itertools.islice(ids, bisect.bisect_right(ids, position), None)

    def history(self, name: str, chat_name: str, before: int | None, limit: int) -> list[Message]:
        """The newest ``limit`` messages of a chat below ``before``, oldest first (fewer
        when they are long: see MAX_ANSWER_TEXT)."""
        self.expire(self.clock())
        chat = self.membership.member_chat(self.users[name], chat_name)
        end = len(chat.messages) if before is None else bisect.bisect_left(chat.messages, before)
        newest_first = reversed(chat.messages[max(0, end - limit) : end])
        return self._within_budget(self.messages[i] for i in newest_first)[::-1]

    def visible_message(self, name: str, message_id: int) -> Message:
        """A message the user may see; 404 for every other, existing or not."""
        self.expire(self.clock())
        message = self.messages.get(message_id)
        if message is None or not self.can_see(name, message):
            raise UnknownMessage(message_id)
        return message

    def thread(
        self, name: str, message_id: int, after: int = 0, limit: int = MAX_LIMIT,
        *, mark: bool = True,
    ) -> tuple[Message, list[Message]]:
        """A message and its comments after ``after``, oldest first: at most ``limit``,
        fewer when they are long (see MAX_ANSWER_TEXT). Private ones are delivered unless
        ``mark`` is False (a HEAD)."""
        message = self.visible_message(name, message_id)
        live = self._after(self._replies.get(message_id, []), after)
        comments = self._within_budget(self.messages[i] for i in itertools.islice(live, limit))
        if mark:
            self._mark_delivered(self.users[name], [message, *comments])
        return message, comments

    def can_see(self, name: str, message: Message) -> bool:
        if message.chat is not None:
            return name in self.chats[message.chat].members
        return name in (message.sender, message.to)

    def _mark_delivered(self, user: User, messages: list[Message]) -> None:
        """Private messages reaching their recipient start to age (their TTL starts)."""
        first_time = [
            m.id for m in messages
            if m.to == user.name and m.chat is None and m.id not in self.delivered
        ]
        if first_time:
            self.note("deliver", user.name, first_time, self.clock())

    def unread(self, name: str) -> Unread:
        """Unread messages by conversation, of those that may hold some: one's own are never
        unread, as sending moves one's position."""
        user = self.users[name]
        self.expire(self.clock())
        by_chat: dict[str, int] = {}
        by_peer: dict[str, int] = {}
        notices = 0
        for key in sorted(user.unread):
            count = self._unread_count(user, key)
            if key == PRIVATE:
                notices = count
            elif key.startswith(PRIVATE) and count:
                by_peer[key[1:]] = count
            elif count:
                by_chat[key] = count
        return Unread(by_chat, by_peer, notices)

    def unread_in(self, name: str, chat_name: str) -> int:
        """Unread messages in one chat (0 for a chat the user is not in)."""
        user = self.users[name]
        return self._unread_count(user, chat_name) if chat_name in user.chats else 0

    # Notices ----------------------------------------------------------------

    def notify(
        self, to: str, kind: str, text: str, *, chat: str | None = None,
        about: str | None = None, scheduled_id: str | None = None,
    ) -> None:
        """Tell ``to`` of a change that concerns it, as a private message from nobody in its
        conversation ``@``; it follows the change's own event (see ``note``)."""
        self.note(
            "notice", self.last_id + 1, to, kind, chat, about, scheduled_id, text, self.clock()
        )

    # Scheduled messages -----------------------------------------------------

    def scheduled_of(self, name: str) -> list[Scheduled]:
        """The user's pending scheduled messages (at most ``max_scheduled``), soonest first."""
        pending = (self.scheduled[i] for i in self.users[name].scheduled)
        return sorted(pending, key=lambda s: (s.send_at, s.id))

    def cancel(self, name: str, scheduled_id: str) -> None:
        scheduled = self.scheduled.get(scheduled_id)
        if scheduled is None or scheduled.sender != name:
            raise UnknownScheduled(scheduled_id)
        self.emit("cancel", scheduled_id, name, self.clock())

    # Time -------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``tick`` has something to do next: a scheduled message or an expiry."""
        return self.deadlines.next_deadline()

    def tick(self) -> None:
        """Send the scheduled messages now due, in due order, and drop expired data."""
        now = self.clock()
        self.expire(now)
        self.accounts.expire_sessions(now)
        while (scheduled_id := self.deadlines.first_due(now)) is not None:
            scheduled = self.scheduled.get(scheduled_id)
            if scheduled is not None:
                self._send_scheduled(scheduled, now)  # if the journal fails, it stays due
            self.deadlines.pop_due()

    def _send_scheduled(self, scheduled: Scheduled, now: float) -> None:
        """Check a due message again: a banned sender or a lost membership drops it."""
        user = self.users[scheduled.sender]
        try:
            self._check_not_banned(user, now)
            self._check_undelivered(user, scheduled.to)
            if scheduled.chat is not None:
                self.membership.member_chat(user, scheduled.chat)
            if scheduled.reply_to is not None:
                self.visible_message(user.name, scheduled.reply_to)
        except MessengerError as exc:
            logger.info("dropped scheduled message %s of %r: %r",
                        scheduled.id, user.name, exc.message)
            self.emit("cancel", scheduled.id, user.name, now)
            self.notify(user.name, "scheduled_dropped",
                        f"your scheduled message {scheduled.id} was not sent: {exc.message}",
                        chat=scheduled.chat, scheduled_id=scheduled.id)
            return
        message = Message(
            self.last_id + 1, scheduled.chat, scheduled.to, scheduled.sender, scheduled.text,
            now, scheduled.reply_to, scheduled.file,
        )  # counted when it was scheduled
        self._post(message, client_id=scheduled.client_id, counted=False, scheduled_id=scheduled.id)

    def expire(self, now: float) -> None:
        """Drop the messages, files and client_ids whose time is over; costs O(what
        expires)."""
        expired = self.deadlines.expired_messages(now)
        if expired:
            self._remove_messages(expired, now)
        while (stored := self.deadlines.expired_file(now)) is not None:
            self.uploads.drop_if_unused(stored, now)
        for ts, name, client_id in self.deadlines.expired_client_ids(now):
            remembered = self.users[name].client_ids
            if client_id in remembered and remembered[client_id][2] == ts:  # not used again
                del remembered[client_id]

    def _remove_messages(self, ids: list[int], now: float) -> None:
        by_chat: dict[str, int] = {}
        by_user: dict[str, list[int]] = {}
        by_conversation: dict[tuple[str, str], list[int]] = {}
        by_parent: dict[int, list[int]] = {}  # comments that go, by the message they are on
        for message_id in ids:
            message = self.messages.pop(message_id)
            self._replies.pop(message_id, None)
            if message.reply_to is not None:
                by_parent.setdefault(message.reply_to, []).append(message_id)
            sender = None if message.sender is None else self.users[message.sender]
            self._count_kept(self._payer(message), -kept_size(message.text))
            if sender is not None:
                conversation = conversation_of(message, sender.name)
                sender.sent[conversation] -= 1
                if not sender.sent[conversation]:
                    del sender.sent[conversation]
            if message.chat is not None:  # expiring chat messages are a prefix of their chat
                by_chat[message.chat] = by_chat.get(message.chat, 0) + 1
            else:
                if self.delivered.pop(message_id, None) is None and sender is not None:
                    sender.undelivered -= 1
                for name in {message.sender, message.to}:
                    if name is not None:
                        by_user.setdefault(name, []).append(message_id)
                        place = (name, conversation_of(message, name))
                        by_conversation.setdefault(place, []).append(message_id)
            if message.file is not None:
                stored = self.files[message.file]
                stored.messages.discard(message_id)
                self.uploads.drop_if_unused(stored, now)
        for chat_name, count in by_chat.items():
            del self.chats[chat_name].messages[:count]
        for name, gone in by_user.items():
            _remove_ids(self.users[name].private, gone)
        for parent, gone in by_parent.items():
            replies = self._replies.get(parent)  # None if the parent went too
            if replies is not None:
                _remove_ids(replies, gone)
                if not replies:
                    del self._replies[parent]
        for (name, key), gone in by_conversation.items():
            user = self.users[name]
            live = user.conversations[key]
            _remove_ids(live, gone)
            # A mark below every live message says nothing any more: it goes, whenever the
            # expiry runs (a replay expires later, in one go, and must end the same).
            # "@" stays: it is also the mark of every private conversation.
            if key != PRIVATE and user.positions.get(key, 0) < (live[0] if live else math.inf):
                user.positions.pop(key, None)
            if not live:
                del user.conversations[key]
                self._settle(user, [key])
        self.changes += len(ids)

    # Applying events --------------------------------------------------------

    def _apply_user(
        self, new_user: str, password: bytes, salt: bytes, cost: int, token_hash: str,
        address: str, ts: float,
    ) -> None:
        """A new user, member of general, with its first session: one event, all or nothing."""
        self.users[new_user] = User(new_user, password, salt, cost, ts, address=address)
        self.accounts.registrations.add(address, ts)
        self.membership.add_member(self.chats[GENERAL], new_user)
        self.accounts.add_session(Session(token_hash, new_user, ts, ts))

    def _apply_message(
        self, message_id: int, chat: str | None, to: str | None, sender: str, text: str,
        ts: float, reply_to: int | None, file_id: str | None, client_id: str | None,
        counted: bool, scheduled_id: str | None,
    ) -> None:
        message = Message(message_id, chat, to, sender, text, ts, reply_to, file_id)
        self._add_message(message)
        user = self.users[sender]
        if counted:
            user.general.add(ts, self.rules.rate_window)
        if scheduled_id is None:  # a scheduled one counted when it was accepted
            user.flood.add(ts, self.rules.flood_window)
        if client_id is not None:
            self._remember_client_id(user, client_id, "message", message_id, ts)
        if scheduled_id is not None:
            self._remove_scheduled(scheduled_id, ts)
        self._mark_unread(message)
        self.on_message(message)

    def _apply_notice(
        self, message_id: int, to: str, kind: str, chat: str | None, about: str | None,
        scheduled_id: str | None, text: str, ts: float,
    ) -> None:
        """A notice to ``to``: about ``chat``, the user ``about``, or its scheduled message."""
        fields = {"chat": chat, "user": about, "scheduled": scheduled_id}
        notice = {"type": kind, **{key: value for key, value in fields.items() if value}}
        message = Message(message_id, None, to, None, text, ts, None, None, notice)
        self._add_message(message)
        self._mark_unread(message)
        self.on_message(message)

    def _add_message(self, message: Message) -> None:
        self.messages[message.id] = message
        self.deadlines.add_message(message)
        self.last_id = max(self.last_id, message.id)
        sender = None if message.sender is None else self.users[message.sender]  # None: a notice
        self._count_kept(self._payer(message), kept_size(message.text))
        if sender is not None:
            conversation = conversation_of(message, sender.name)
            sender.sent[conversation] = sender.sent.get(conversation, 0) + 1
        if message.chat is not None:
            self.chats[message.chat].messages.append(message.id)
        else:
            for name in {message.sender, message.to}:
                if name is not None:
                    user = self.users[name]
                    user.private.append(message.id)
                    key = conversation_of(message, name)
                    user.conversations.setdefault(key, []).append(message.id)
            if sender is not None:
                sender.undelivered += 1  # until ``_deliver``
        if message.reply_to is not None:
            self._replies.setdefault(message.reply_to, []).append(message.id)
        if message.file is not None:
            self.files[message.file].messages.add(message.id)

    def _count_kept(self, payer: User | None, size: int) -> None:
        """``size`` more bytes kept (fewer if negative), a message's, a notice's or a
        scheduled one's: for the user who pays for it (none for the server's notices) and
        in all."""
        self.kept_text += size
        if payer is not None:
            payer.kept_text += size

    def _payer(self, message: Message) -> User | None:
        """Whose quota a message counts against: its sender's; for a notice, the user whose
        action it tells of (an invitation, a join request), but for the answer to a request
        the requester's, who asked for it (an owner turning down a stranger again and again
        must not pay for it); none for the server's own (a ban, a dropped message)."""
        if message.notice is None:
            name = message.sender
        elif message.notice["type"] in ANSWER_NOTICES:
            name = message.to
        else:
            name = message.notice.get("user")
        return None if name is None else self.users[name]

    def _apply_deliver(self, name: str, ids: list[int], ts: float) -> None:
        """Private messages ``name`` received: their time to live starts."""
        self._deliver(ids, ts)

    def _deliver(self, ids: list[int], ts: float) -> None:
        for message_id in ids:
            if message_id in self.messages and message_id not in self.delivered:
                self.delivered[message_id] = ts
                self.deadlines.add_delivered(message_id)
                sender = self.messages[message_id].sender
                if sender is not None:  # else a notice
                    self.users[sender].undelivered -= 1

    def _mark_unread(self, message: Message) -> None:
        """A new message is unread for its audience, but for its sender: sending moves one's
        position to it (as Telegram does). Only the chat's members who had read it to its
        end are told: the others have it among their unread conversations already.

        The cost is one step per member in ``caught_up``, and a member gets there only by
        a read that reached the chat's end: at most one step per such read, never one per
        member and message."""
        if message.chat is not None:
            chat = self.chats[message.chat]
            for name in chat.caught_up:
                self.users[name].unread.add(chat.name)
            chat.caught_up.clear()
        elif message.to is not None:
            self.users[message.to].unread.add(conversation_of(message, message.to))
        if message.sender is not None:
            sender = self.users[message.sender]
            key = conversation_of(message, sender.name)
            sender.positions[key] = max(sender.positions.get(key, 0), message.id)
            self._read_to_end(sender, key)  # the message was just added last to ``key``

    def _settle(self, user: User, keys: Iterable[str]) -> None:
        """Of the conversations ``keys``, those now read to their end leave the user's
        unread ones (see ``_read_to_end``)."""
        for key in keys:
            if self._position(user, key) >= next(reversed(self._ids_in(user, key)), 0):
                self._read_to_end(user, key)

    def _read_to_end(self, user: User, key: str) -> None:
        """The user has read the conversation ``key`` to its end: it leaves the user's
        unread ones, and a chat counts the user among those to tell of its next message."""
        user.unread.discard(key)
        if key in user.chats:
            self.chats[key].caught_up.add(user.name)

    def _apply_read(self, name: str, position: int) -> None:
        """Every conversation is read up to ``position``."""
        user = self.users[name]
        user.read_pos = max(user.read_pos, position)
        for key in [key for key, mark in user.positions.items() if mark <= user.read_pos]:
            del user.positions[key]  # the mark of everything covers it
        self._settle(user, list(user.unread))

    def _apply_read_in(self, name: str, conversation: str, position: int) -> None:
        """One conversation is read up to ``position``; ``@``: every private one."""
        user = self.users[name]
        user.positions[conversation] = max(user.positions.get(conversation, 0), position)
        if conversation == PRIVATE:
            self._settle(user, [key for key in user.unread if key.startswith(PRIVATE)])
        else:
            self._settle(user, [conversation])

    def _apply_schedule(
        self, new_scheduled: str, sender: str, send_at: float, text: str, chat: str | None,
        to: str | None, reply_to: int | None, file_id: str | None, client_id: str | None,
        ts: float, counted: bool,
    ) -> None:
        scheduled = Scheduled(
            new_scheduled, sender, send_at, text, chat, to, reply_to, file_id, client_id, ts
        )
        self._add_scheduled(scheduled)
        user = self.users[sender]
        if counted:
            user.general.add(ts, self.rules.rate_window)
        user.flood.add(ts, self.rules.flood_window)
        if client_id is not None:
            self._remember_client_id(user, client_id, "scheduled", new_scheduled, ts)

    def client_id_lifetime(self) -> float:
        return max(IDEMPOTENCY_WINDOW, self.rules.message_ttl)

    def _remember_client_id(
        self, user: User, client_id: str, kind: str, ref: int | str, ts: float
    ) -> None:
        """Keep a client_id, newest last, until its lifetime is over (``expire``)."""
        user.client_ids.pop(client_id, None)
        user.client_ids[client_id] = (kind, ref, ts)
        self.deadlines.add_client_id(ts, user.name, client_id)

    def _add_scheduled(self, scheduled: Scheduled) -> None:
        self.scheduled[scheduled.id] = scheduled
        sender = self.users[scheduled.sender]
        sender.scheduled.add(scheduled.id)
        self._count_kept(sender, kept_size(scheduled.text))
        self.deadlines.schedule(scheduled)
        if scheduled.file is not None:
            self.files[scheduled.file].scheduled += 1

    def _apply_cancel(self, scheduled_id: str, name: str, ts: float) -> None:
        scheduled = self.scheduled.get(scheduled_id)
        if scheduled is not None and scheduled.client_id is not None:
            self.users[scheduled.sender].client_ids.pop(scheduled.client_id, None)
        self._remove_scheduled(scheduled_id, ts)

    def _remove_scheduled(self, scheduled_id: str, now: float) -> None:
        scheduled = self.scheduled.pop(scheduled_id, None)
        if scheduled is not None:
            sender = self.users[scheduled.sender]
            sender.scheduled.discard(scheduled_id)
            self._count_kept(sender, -kept_size(scheduled.text))
        if scheduled is not None and scheduled.file is not None:
            stored = self.files[scheduled.file]
            stored.scheduled -= 1
            self.uploads.drop_if_unused(stored, now)

    # Snapshots: plain builtins out and in ------------------------------------

    def export(self) -> tuple[dict[str, Any], list[Message]]:
        """The state as plain builtins by field name (derived fields left out: ``restore``
        rebuilds them), and the messages, immutable, to pickle in steps."""
        self.expire(self.clock())
        state = {
            "last_id": self.last_id,
            "chats": [to_plain(chat) for chat in self.chats.values()],
            "users": [to_plain(user) for user in self.users.values()],
            "sessions": [to_plain(session) for session in self.accounts.sessions.values()],
            "files": [to_plain(stored) for stored in self.files.values()],
            "scheduled": [to_plain(scheduled) for scheduled in self.scheduled.values()],
            "delivered": list(self.delivered.items()),
            "registrations": {
                address: to_plain(window)
                for address, window in self.accounts.registrations.windows.items()
            },
        }
        return state, list(self.messages.values())

    def restore(self, state: dict[str, Any], rows: Iterable[Any]) -> None:
        """Rebuild the state from ``export``'s builtins, into an empty Messenger. Each record
        is checked like input: one of the wrong shape, or naming what does not exist, is
        logged and skipped; a state that is not ``export``'s at all raises BadRecord."""
        if type(state.get("last_id")) is not int:
            raise BadRecord("the state has no last_id")
        self.last_id = state["last_id"]
        checks = RecordChecks(self)
        for chat in load_records(state, "chats", Chat, checks.chat):
            self.chats[chat.name] = chat
        self.membership.public_names = sorted(
            c.name for c in self.chats.values() if not c.private
        )
        for user in load_records(state, "users", User, checks.user):
            self.users[user.name] = user
            for chat_name in user.chats:
                self.chats[chat_name].members.add(user.name)
        for chat in self.chats.values():
            chat.invited &= self.users.keys()
            chat.requests = {name: ts for name, ts in chat.requests.items() if name in self.users}
            if chat.owner in self.users:
                self.users[chat.owner].owned += 1
            if chat.link is not None:
                self.membership.set_link(chat.name, chat.link)
        for session in load_records(state, "sessions", Session, checks.session):
            self.accounts.add_session(session)
        for stored in load_records(state, "files", StoredFile, checks.file):
            self.uploads.add(stored)
        for message in load_rows(rows, Message, checks.message):
            self._add_message(message)
        for message_id, ts in sorted(load_delivered(state), key=lambda item: item[1]):
            if message_id in self.messages and self.messages[message_id].chat is None:
                self._deliver([message_id], ts)
        for scheduled in load_records(state, "scheduled", Scheduled, checks.scheduled):
            self._add_scheduled(scheduled)
        self.accounts.registrations.windows = load_windows(state, "registrations")
        remembered = sorted(
            (ts, user.name, client_id)
            for user in self.users.values() for client_id, (_, _, ts) in user.client_ids.items()
        )
        for ts, name, client_id in remembered:
            self.deadlines.add_client_id(ts, name, client_id)
        for user in self.users.values():
            for key in [*user.chats, *user.conversations]:
                user.unread.add(key)
            self._settle(user, list(user.unread))


def _charged(size: int) -> int:
    """What a file of ``size`` bytes counts against its owner's upload quota: at least a disk
    block, so that empty files are not free to make by the thousand."""
    return max(size, FILE_BLOCK)


def _ended_ban(user: User, now: float) -> float | None:
    """When the user's ban ended, if one has by ``now``."""
    ended = user.banned_until
    return ended if ended is not None and ended <= now else None


def _remove_ids(ids: list[int], gone: list[int]) -> None:
    """Remove ``gone`` from the sorted ``ids`` in one pass (usually its oldest: a slice)."""
    gone.sort()
    if ids[: len(gone)] == gone:
        del ids[: len(gone)]
    else:
        gone_set = set(gone)
        ids[:] = [i for i in ids if i not in gone_set]


# Persistence ################################################################

SNAPSHOT_MAGIC: Final = b"MSGRSNAP"
SNAPSHOT_FORMAT: Final = 2
SNAPSHOT_HEADER: Final = struct.Struct(">8sIQ32s")  # magic, format, payload bytes, sha256
RECORD_HEADER: Final = struct.Struct(">II")  # journal record: payload bytes, crc32
FRAME_HEADER: Final = struct.Struct(">Q")  # snapshot frame: pickle bytes
# Bytes of records (texts, and an allowance for the rest) pickled per step of a snapshot:
# this bounds how long the event loop waits for a snapshot, whatever holds the memory.
SNAPSHOT_FRAME_BYTES: Final = 1 << 20
RECORD_ALLOWANCE: Final = 200  # bytes of a record besides its text
KEEP_SNAPSHOTS: Final = 2  # the newest and one to fall back on
LOCK_FILE: Final = "lock"  # in the state folder: held (flock) by the server using it
NO_FOLLOW: Final = os.O_NOFOLLOW | os.O_CLOEXEC  # no file of the state is opened via a symlink
# The ids the server makes. Anything else read from the state folder is refused.
FILE_ID_RE: Final = re.compile(r"[0-9a-f]{32}")  # secrets.token_hex(16)
SCHEDULED_ID_RE: Final = re.compile(r"[0-9a-f]{24}")  # secrets.token_hex(12)
TOKEN_HASH_RE: Final = re.compile(r"[0-9a-f]{64}")  # sha256 hex of a token


class DamagedState(Exception):
    """A snapshot that cannot be trusted: wrong magic, size or checksum."""


class StateLocked(Exception):
    """Another server holds the state folder."""

    def __init__(self, folder: Path, pid: str) -> None:
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"the state folder {str(folder)!r} is in use by {holder}: "
                         "one server per state folder (see --state-dir)")


class BadRecord(Exception):
    """A record read from the state folder that is not one the server could have written."""


class _BuiltinsUnpickler(pickle.Unpickler):
    """Loads plain builtins only: a state file can never name a class or a function."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name}: state files hold plain builtins only")


def create_private(path: Path) -> BinaryIO:
    """A new file only the server's user may read (mode 0600); never through a symlink."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o600), "wb")


def read_private(path: Path) -> bytes:
    """The bytes of a state file; a symlink is refused (OSError), not followed."""
    with os.fdopen(os.open(path, os.O_RDONLY | NO_FOLLOW), "rb") as file:
        return file.read()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Records: plain builtins by field name, checked when read --------------------

_SCALARS: Final[dict[Any, frozenset[type]]] = {
    int: frozenset({int}),
    float: frozenset({float, int}),
    str: frozenset({str}),
    bytes: frozenset({bytes}),
    bool: frozenset({bool}),
    type(None): frozenset({type(None)}),
}


def type_check(hint: Any) -> Callable[[Any], bool]:
    """A test for "``value`` has the type ``hint``", built once from a type hint, for the
    types the state is made of: scalars, unions, lists, sets, dicts and tuples of them."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _SCALARS or (origin is types.UnionType and all(a in _SCALARS for a in args)):
        allowed = frozenset().union(*(_SCALARS[a] for a in (args or (hint,))))
        return lambda value: type(value) in allowed
    if origin is types.UnionType:
        alternatives = [type_check(arg) for arg in args]
        return lambda value: any(check(value) for check in alternatives)
    if origin in (list, set):
        item = type_check(args[0])
        return lambda value: type(value) is origin and all(map(item, value))
    if origin is dict:
        key, item = type_check(args[0]), type_check(args[1])
        return lambda value: type(value) is dict and all(
            key(k) and item(v) for k, v in value.items()
        )
    if origin is tuple:
        parts = [type_check(arg) for arg in args]
        return lambda value: (
            type(value) is tuple and len(value) == len(parts)
            and all(check(part) for check, part in zip(parts, value, strict=True))
        )
    if dataclasses.is_dataclass(hint):
        return lambda value: type(value) is dict  # from_plain checks its fields
    raise TypeError(f"no check for the type {hint!r}")


_RECORD_FIELDS: Final[dict[type, list[tuple[str, Any, Callable[[Any], bool]]]]] = {}


def _record_fields(cls: type) -> list[tuple[str, Any, Callable[[Any], bool]]]:
    """The saved fields of a state class, each with its type hint and type check, built
    once: a dataclass's fields but the derived ones, or a NamedTuple's (a Message's)."""
    fields = _RECORD_FIELDS.get(cls)
    if fields is None:
        hints = typing.get_type_hints(cls)
        names = list(hints)
        if dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")]
        fields = [(name, hints[name], type_check(hints[name])) for name in names]
        _RECORD_FIELDS[cls] = fields
    return fields


def to_plain(record: Any) -> dict[str, Any]:
    """A state object as plain builtins by field name, derived fields left out. Containers
    are copied: the result stays as it is while the object changes. (A snapshot makes one
    per user, chat and session while the loop waits: the field lists come made.)"""
    names, read, copied, nested = _plain_layout(type(record))
    plain = dict(zip(names, read(record), strict=True))
    for name in copied:
        if plain[name] is not None:
            plain[name] = plain[name].copy()
    for name in nested:
        plain[name] = to_plain(plain[name])
    return plain


PlainLayout = tuple[
    tuple[str, ...], Callable[[Any], tuple[Any, ...]], tuple[str, ...], tuple[str, ...]
]
_PLAIN_LAYOUTS: Final[dict[type, PlainLayout]] = {}


def _plain_layout(cls: type) -> PlainLayout:
    """For ``to_plain``, made once per class: a state class's saved fields, a getter of
    their values, the fields holding a container (list, set or dict, maybe None) and those
    holding a record."""
    layout = _PLAIN_LAYOUTS.get(cls)
    if layout is None:
        fields = _record_fields(cls)
        names = tuple(name for name, _, _ in fields)
        if len(names) < 2:  # attrgetter gives a tuple of two or more
            raise TypeError(f"{cls.__name__} has fewer than two saved fields")
        copied = tuple(name for name, hint, _ in fields if _holds_container(hint))
        nested = tuple(
            name for name, hint, _ in fields
            if isinstance(hint, type) and dataclasses.is_dataclass(hint)
        )
        layout = _PLAIN_LAYOUTS[cls] = (names, operator.attrgetter(*names), copied, nested)
    return layout


def _holds_container(hint: Any) -> bool:
    """Whether a field of type ``hint`` holds a list, set or dict (or None)."""
    union = typing.get_origin(hint) in (types.UnionType, typing.Union)
    return any(
        option in (list, set, dict) or typing.get_origin(option) in (list, set, dict)
        for option in (typing.get_args(hint) if union else (hint,))
    )


def from_plain(cls: type[T], plain: Any) -> T:
    """The state object ``to_plain`` made; BadRecord for anything else."""
    if type(plain) is not dict:
        raise BadRecord(f"a {cls.__name__} record is not a dict")
    fields = _record_fields(cls)
    unknown = plain.keys() - {name for name, _, _ in fields}
    if unknown:
        raise BadRecord(f"a {cls.__name__} record has unknown fields {sorted(unknown)!r}")
    values: dict[str, Any] = {}
    for name, hint, check in fields:
        if name not in plain:
            continue  # a field added later: its default
        value = plain[name]
        if not check(value):
            raise BadRecord(f"{cls.__name__}.{name} has the wrong type")
        nested = isinstance(hint, type) and dataclasses.is_dataclass(hint)
        values[name] = from_plain(hint, value) if nested else value
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise BadRecord(f"a {cls.__name__} record lacks a field: {exc}") from exc


# The classes that apply events: the messenger and its parts.
EVENT_APPLIERS: Final = (Messenger, Accounts, Membership, Moderation, Uploads)
EVENT_KINDS: Final = frozenset(kind for part in EVENT_APPLIERS for kind in part.APPLIERS)


def applier_of(kind: str) -> Callable[..., None]:
    """The function that applies an event of ``kind``, in the messenger or one of its parts."""
    part = next(part for part in EVENT_APPLIERS if kind in part.APPLIERS)
    applier: Callable[..., None] = getattr(part, part.APPLIERS[kind])
    return applier


@functools.cache
def _event_fields(apply: Callable[..., None]) -> list[tuple[str, Callable[[Any], bool]]]:
    """The fields of an event: the parameters of its applier (``self`` aside), and their
    type checks."""
    hints = typing.get_type_hints(apply)
    names = list(inspect.signature(apply).parameters)[1:]
    return [(name, type_check(hints[name])) for name in names]


@functools.cache
def _required_event_fields(apply: Callable[..., None]) -> int:
    """How many fields an event must have: its applier's parameters without a default.
    Those with one were added later (the ``ts`` of an invitation): an event written by a
    previous version lacks them, and still loads."""
    parameters = list(inspect.signature(apply).parameters.values())[1:]
    return sum(1 for parameter in parameters if parameter.default is parameter.empty)


def check_event(messenger: Messenger, event: Any) -> None:
    """Refuse (BadRecord) a journal event the server could not have written: an unknown
    kind, fields of the wrong number or type (those of its applier in Messenger), names
    of things that do not exist, or ids the server does not make."""
    if type(event) is not tuple or not event or event[0] not in EVENT_KINDS:
        raise BadRecord("not an event")
    apply = applier_of(event[0])
    fields = _event_fields(apply)
    if not _required_event_fields(apply) <= len(event) - 1 <= len(fields):
        raise BadRecord(f"a {event[0]} event with {len(event) - 1} fields")
    for (name, check), value in zip(fields, event[1:], strict=False):
        if not check(value):
            raise BadRecord(f"a {event[0]} event whose {name} has the wrong type")
        what = EVENT_REFERENCES.get(name)
        if what is not None and value is not None and not _names_known(messenger, what, value):
            raise BadRecord(f"a {event[0]} event names an unknown or invalid {name}: {value!r}")


# What an event's field names, by the field's name in the appliers' signatures.
EVENT_REFERENCES: Final = {
    "name": "user", "sender": "user", "owner": "user", "reporter": "user", "target": "user",
    "to": "user", "new_user": "new user", "chat": "chat", "chat_name": "chat name",
    "file_id": "file", "new_file": "new file", "token_hash": "token hash",
    "scheduled_id": "scheduled id", "new_scheduled": "new scheduled", "message_id": "new message",
    "about": "user", "conversation": "conversation", "kind": "notice type",
}


def _names_known(messenger: Messenger, what: str, value: Any) -> bool:
    match what:
        case "user":
            return value in messenger.users
        case "new user":
            return USER_NAME_RE.fullmatch(value) is not None and value not in messenger.users
        case "chat":
            return value in messenger.chats
        case "chat name":
            return CHAT_NAME_RE.fullmatch(value) is not None
        case "file":
            return value in messenger.files
        case "new file":
            return FILE_ID_RE.fullmatch(value) is not None and value not in messenger.files
        case "token hash":
            return TOKEN_HASH_RE.fullmatch(value) is not None
        case "scheduled id":
            return SCHEDULED_ID_RE.fullmatch(value) is not None
        case "new scheduled":
            return SCHEDULED_ID_RE.fullmatch(value) is not None and value not in messenger.scheduled
        case "new message":
            return bool(value > messenger.last_id)
        case "conversation":
            if value.startswith(PRIVATE):
                return value == PRIVATE or value[1:] in messenger.users
            return value in messenger.chats
        case "notice type":
            return value in NOTICE_TYPES
    raise AssertionError(what)


class RecordChecks:
    """Whether a record read back from a snapshot fits what the messenger restored so far:
    None when it does, else what is wrong, for the log (``load_records`` skips it). The
    types were checked before (``from_plain``); these are the names and ids."""

    def __init__(self, messenger: Messenger) -> None:
        self._messenger = messenger
        self._users = messenger.users
        self._chats = messenger.chats
        self._files = messenger.files

    def chat(self, chat: Chat) -> str | None:
        if not CHAT_NAME_RE.fullmatch(chat.name):
            return f"the chat name {chat.name!r}"
        if chat.owner is not None and not USER_NAME_RE.fullmatch(chat.owner):
            return f"the owner {chat.owner!r}"
        if chat.link is not None and not TOKEN_HASH_RE.fullmatch(chat.link):
            return "a link that is no token hash"
        return None

    def user(self, user: User) -> str | None:
        if not USER_NAME_RE.fullmatch(user.name) or user.name in self._users:
            return f"the user name {user.name!r}"
        unknown = user.chats.keys() - self._chats.keys()
        if unknown:
            return f"{user.name!r} is in unknown chats {sorted(unknown)!r}"
        if GENERAL not in user.chats or user.active_chat not in user.chats:
            return f"{user.name!r} is not in {GENERAL} or not in its active chat"
        if not all(CONVERSATION_RE.fullmatch(key) for key in user.positions):
            return f"{user.name!r} has a read position in no conversation"
        return None

    def session(self, session: Session) -> str | None:
        if not TOKEN_HASH_RE.fullmatch(session.token_hash) or session.user not in self._users:
            return "a session of an unknown user or with no token hash"
        return None

    def file(self, stored: StoredFile) -> str | None:
        if not FILE_ID_RE.fullmatch(stored.id) or stored.owner not in self._users:
            return f"the file id {stored.id!r} or its owner"
        return None

    def message(self, message: Message) -> str | None:
        if not self._messenger.last_id >= message.id > next(reversed(self._messenger.messages), 0):
            return f"message id {message.id} out of order"
        if message.sender is None:
            return self.notice(message)
        if message.sender not in self._users or message.notice is not None:
            return f"message {message.id} is from an unknown user"
        return self.destination(message.chat, message.to, message.file)

    def notice(self, message: Message) -> str | None:
        notice = message.notice or {}
        if (
            message.to not in self._users or message.chat is not None
            or notice.get("type") not in NOTICE_TYPES or not notice.keys() <= NOTICE_KEYS
            or notice.get("chat", GENERAL) not in self._chats
            or notice.get("user", message.to) not in self._users
            or message.reply_to is not None or message.file is not None
        ):
            return f"message {message.id} is from nobody and no notice"
        return None

    def scheduled(self, scheduled: Scheduled) -> str | None:
        if not SCHEDULED_ID_RE.fullmatch(scheduled.id) or scheduled.sender not in self._users:
            return f"the scheduled id {scheduled.id!r} or its sender"
        return self.destination(scheduled.chat, scheduled.to, scheduled.file)

    def destination(
        self, chat: str | None, to: str | None, file_id: str | None
    ) -> str | None:
        if (chat is None) == (to is None):
            return "not in one chat or to one user"
        if chat is not None and chat not in self._chats:
            return f"in the unknown chat {chat!r}"
        if to is not None and to not in self._users:
            return f"to the unknown user {to!r}"
        if file_id is not None and file_id not in self._files:
            return f"carrying the unknown file {file_id!r}"
        return None


def load_records(
    state: dict[str, Any], key: str, cls: type[T], problem: Callable[[T], str | None]
) -> Iterator[T]:
    """The records of ``state[key]`` as ``cls`` objects; those of the wrong shape, or of
    which ``problem`` says something, are logged and skipped."""
    rows = state.get(key)
    if type(rows) is not list:
        raise BadRecord(f"the state has no list of {key}")
    return load_rows(rows, cls, problem)


def load_rows(
    rows: Iterable[Any], cls: type[T], problem: Callable[[T], str | None]
) -> Iterator[T]:
    """``load_records`` for rows already at hand: by field name for a dataclass, by
    position for a NamedTuple (a Message: the bulk of a snapshot)."""
    for row in rows:
        try:
            record = _tuple_record(cls, row) if _is_named_tuple(cls) else from_plain(cls, row)
            found = problem(record)
        except BadRecord as exc:
            found = str(exc)
        if found is not None:
            logger.error("state: skipped a %s record: %s", cls.__name__, found)
            continue
        yield record


def load_windows(state: dict[str, Any], key: str) -> dict[Any, Window]:
    """Counting windows by key (``WindowsByKey.windows``); bad ones are skipped."""
    windows: dict[Any, Window] = {}
    for name, plain in state.get(key, {}).items():
        try:
            windows[name] = from_plain(Window, plain)
        except BadRecord as exc:
            logger.error("state: skipped a window of %s: %s", key, exc)
    return windows


def _is_named_tuple(cls: type) -> bool:
    return issubclass(cls, tuple)


def _tuple_record(cls: type[T], row: Any) -> T:
    """A NamedTuple from its fields in order; those added later (with a default) may be
    missing."""
    fields = _record_fields(cls)
    required = len(fields) - len(getattr(cls, "_field_defaults", {}))
    if type(row) is not tuple or not required <= len(row) <= len(fields):
        raise BadRecord(f"a {cls.__name__} record is not a tuple of {len(fields)}")
    for (name, _, check), value in zip(fields[: len(row)], row, strict=True):
        if not check(value):
            raise BadRecord(f"{cls.__name__}.{name} has the wrong type")
    return cls(*row)


_DELIVERED_CHECK: Final = type_check(list[tuple[int, float]])


def load_delivered(state: dict[str, Any]) -> list[tuple[int, float]]:
    """When each private message was first received, as (id, time) pairs."""
    delivered = [tuple(pair) if type(pair) is list else pair for pair in state.get("delivered", ())]
    if not _DELIVERED_CHECK(delivered):
        logger.error("state: skipped the delivery times, of the wrong shape")
        return []
    return delivered


# Describing changes, for the log ---------------------------------------------

# Event fields never logged: secrets, and what users wrote.
UNLOGGED_FIELDS: Final = frozenset({"password", "salt", "token_hash", "text", "reason", "ts"})


def describe_event(event: Event) -> str:
    """One log line for a change: its kind and its fields by name, secrets and texts left
    out, every value quoted (``%r``) so what came from a client cannot forge a line."""
    fields = _event_fields(applier_of(event[0]))
    parts = [event[0]]
    for (name, _), value in zip(fields, event[1:], strict=False):  # an old event: fewer
        if name in UNLOGGED_FIELDS or value is None:
            continue
        if isinstance(value, list) and len(value) > 5:
            parts.append(f"{name}=[{len(value)} items]")
        else:
            parts.append(f"{name}={value!r}")
    return " ".join(parts)


# The journal ----------------------------------------------------------------


class Journal:
    """The append-only log of the events since the last snapshot.

    ``append`` hands each record to the OS before it returns, so a killed process loses
    nothing. ``sync`` puts everything appended so far on disk; with ``always`` every
    change waits for it in ``durable`` (requests waiting together share one fsync),
    otherwise the server calls it once a second. ``switch`` starts each file, the first
    one included.
    """

    def __init__(self, *, always: bool) -> None:
        self.always = always
        self.broken = False  # a write could not be undone or an fsync failed: refuse changes
        self.full = False  # a write found the disk full: refuse changes until it has room
        self.path: Path | None = None
        self._fd = -1
        self._size = 0
        self._written = 0  # records appended
        self._synced = 0  # records known to be on disk
        self._switched: list[int] = []  # earlier files, to fsync and close
        self._lock = asyncio.Lock()

    def append(self, event: Event) -> None:
        if self.broken or self._fd < 0 or (self.full and not self._has_room()):
            raise Unavailable("the state cannot be written: nothing was stored")
        data = pickle.dumps(event, protocol=pickle.HIGHEST_PROTOCOL)
        record = RECORD_HEADER.pack(len(data), zlib.crc32(data)) + data
        try:
            _write_all(self._fd, record)
        except OSError as exc:
            logger.error("journal write failed: %s", exc)
            self.full = exc.errno == errno.ENOSPC  # smaller records would still fit: no
            try:
                os.ftruncate(self._fd, self._size)  # never leave half a record behind
            except OSError:
                self.broken = True
            raise Unavailable("the state cannot be written: nothing was stored") from exc
        self._size += len(record)
        self._written += 1

    def _has_room(self) -> bool:
        """Whether a disk found full has room again (``JOURNAL_ROOM`` bytes free)."""
        stats = os.fstatvfs(self._fd)
        self.full = stats.f_bavail * stats.f_frsize < JOURNAL_ROOM
        return not self.full

    async def durable(self) -> None:
        """With ``--fsync always``: return once every record appended so far is on disk."""
        target = self._written
        while self.always and self._synced < target:
            await self.sync()

    async def sync(self) -> None:
        """Put every record appended so far on disk, those in earlier files included."""
        async with self._lock:
            written = self._written
            if written <= self._synced and not self._switched:
                return
            try:
                while self._switched:
                    await asyncio.to_thread(os.fsync, self._switched[0])
                    os.close(self._switched.pop(0))
                await asyncio.to_thread(os.fsync, self._fd)
            except OSError as exc:  # the disk may have dropped what it had: trust it no more
                logger.error("journal fsync failed, refusing changes until a new file: %s", exc)
                self.broken = True
                raise Unavailable(
                    "the change was made but may not be on disk (disk error); "
                    "the server takes no changes until it can write its state again"
                ) from exc
            self._synced = max(self._synced, written)

    def switch(self, path: Path) -> None:
        """Continue in the new file ``path`` from now on; the next ``sync`` closes the old one.
        A file that exists already is never truncated: that is an error."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o600)
        if self._fd >= 0:
            self._switched.append(self._fd)
        self._fd, self._size, self.broken, self.path = fd, 0, False, path

    def close(self) -> None:
        for fd in [*self._switched, self._fd]:
            if fd < 0:
                continue
            try:
                os.fsync(fd)
            except OSError as exc:
                logger.error("journal fsync failed at close: %s", exc)
            os.close(fd)
        self._switched, self._fd = [], -1


def read_journal(path: Path) -> Iterator[Any]:
    """The records of a journal file, unpickled (``check_event`` judges them); a torn or
    damaged last record ends it quietly."""
    data = read_private(path)
    position = 0
    while position < len(data):
        header_end = position + RECORD_HEADER.size
        if header_end > len(data):
            break
        length, checksum = RECORD_HEADER.unpack_from(data, position)
        payload = data[header_end : header_end + length]
        if len(payload) < length or zlib.crc32(payload) != checksum:
            break
        try:
            event = _unpickle(payload)
        except Exception as exc:  # a record that passed its checksum yet is no event
            logger.error("%s: record at byte %d is unreadable (%s): stopping there",
                         path, position, exc)
            return
        yield event
        position = header_end + length
    if position < len(data):
        logger.warning("%s: ignored %d bytes of a torn last record", path, len(data) - position)


# The state folder -----------------------------------------------------------


class StateStore:
    """The state folder: its lock, numbered snapshots and journals, and the uploaded files.

    ``open`` takes the folder (an exclusive lock, before anything else is read or written)
    and ``close`` lets it go; ``abandon`` instead undoes what a failed start created.
    Snapshot N holds the state at the moment journal N began. Start-up loads the newest
    snapshot that is intact and replays every journal from its number on; the previous
    snapshot and its journals are kept until a newer snapshot is safely on disk.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = folder / "files"
        self._lock_fd = -1
        self._created: list[Path] = []  # what ``open`` made, for ``abandon``

    def open(self) -> None:
        """Create the folder if need be (mode 0700) and lock it; StateLocked if another
        server holds it, having changed nothing."""
        missing = [p for p in (self.folder, *self.folder.parents) if not os.path.lexists(p)]
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._created = missing[::-1]
        lock = self.folder / LOCK_FILE
        while True:  # a lock file removed by a failed start meanwhile is not the lock
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o600)
                created = True
            except FileExistsError:
                fd, created = os.open(lock, os.O_RDWR | NO_FOLLOW), False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                self.abandon()
                raise StateLocked(self.folder, pid if pid.isdigit() else "") from None
            if os.path.lexists(lock) and os.stat(fd).st_ino == os.lstat(lock).st_ino:
                break
            os.close(fd)
        if created:
            self._created.append(lock)
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.folder.chmod(0o700)
        self._open_files_folder()

    def _open_files_folder(self) -> None:
        if os.path.islink(self.files):
            aside = self.folder / f"files.symlink-{secrets.token_hex(4)}"
            logger.error("%s is a symlink, never followed: moved aside as %s",
                         self.files, aside.name)
            self.files.rename(aside)
        if not self.files.exists():
            self.files.mkdir(mode=0o700)
            self._created.append(self.files)
        self.files.chmod(0o700)

    def close(self) -> None:
        """Let the folder go (the lock file stays, for the next server)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self._created = []

    def abandon(self) -> None:
        """A start that failed: remove what ``open`` created (the lock file while still
        holding it), so the folder is as it was."""
        for path in reversed(self._created):
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
        self.close()

    def created(self, path: Path) -> None:
        """``path`` was made by this start: a failed start removes it."""
        self._created.append(path)

    def _numbered(self, prefix: str, suffix: str) -> dict[int, Path]:
        found = {}
        for path in self.folder.glob(f"{prefix}-*{suffix}"):
            number = path.name[len(prefix) + 1 : -len(suffix)]
            if number.isdigit() and len(number) == 8:
                found[int(number)] = path
        return found

    def snapshot_path(self, number: int) -> Path:
        return self.folder / f"snapshot-{number:08d}.bin"

    def journal_path(self, number: int) -> Path:
        return self.folder / f"journal-{number:08d}.log"

    def file_path(self, file_id: str) -> Path:
        """Where an uploaded file lives; only ids the server makes name one."""
        if not FILE_ID_RE.fullmatch(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self.files / file_id

    def load(self, messenger: Messenger) -> int:
        """Fill an empty ``messenger`` from disk; return the number for the next journal."""
        snapshots = self._numbered("snapshot", ".bin")
        journals = self._numbered("journal", ".log")
        base = 0
        for number in sorted(snapshots, reverse=True):
            try:
                state, messages = read_snapshot(snapshots[number])
                messenger.restore(state, messages)
            except (DamagedState, OSError, pickle.UnpicklingError, EOFError) as exc:
                damaged = snapshots[number].with_suffix(".damaged")
                logger.error("snapshot %s is damaged (%s): set aside as %s, falling back",
                             snapshots[number].name, exc, damaged.name)
                snapshots[number].rename(damaged)
                messenger.clear()
                continue
            base = number
            logger.info("loaded %s: %d messages", snapshots[number].name, len(messenger.messages))
            break
        replayed = refused = 0
        for number in sorted(n for n in journals if n >= base):
            try:
                events = list(read_journal(journals[number]))
            except OSError as exc:
                logger.error("journal %s cannot be read (%s): skipped", journals[number].name, exc)
                continue
            for event in events:
                try:
                    check_event(messenger, event)
                except BadRecord as exc:
                    refused += 1
                    logger.error("%s: refused a record: %s", journals[number].name, exc)
                    continue
                messenger.replay(event)
                replayed += 1
        logger.info("replayed %d journal events (%d refused)", replayed, refused)
        self._remove_unknown_files(messenger)
        return max([*snapshots, *journals, 0]) + 1

    def free_bytes(self) -> int:
        """Bytes free for us on the state folder's disk."""
        stats = os.statvfs(self.folder)
        return stats.f_bavail * stats.f_frsize

    async def save_upload(self, chunks: AsyncIterator[bytes]) -> tuple[str, str, int]:
        """Store an upload under a new server-made name, on disk before this returns (it is
        journaled next, whatever ``--fsync`` says); its id, its sha256 and its size. An
        upload cut short leaves nothing behind."""
        file_id = secrets.token_hex(16)
        temporary = self.files / f".upload-{file_id}"
        digest = hashlib.sha256()
        size = 0
        try:
            with create_private(temporary) as out:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())
            os.replace(temporary, self.file_path(file_id))
            await asyncio.to_thread(_fsync_folder, self.files)
        finally:
            temporary.unlink(missing_ok=True)
        return file_id, digest.hexdigest(), size

    def open_file(self, file_id: str) -> BinaryIO:
        """A stored file, for reading; a symlink in its place is refused, never followed."""
        return os.fdopen(os.open(self.file_path(file_id), os.O_RDONLY | NO_FOLLOW), "rb")

    def remove_file(self, file_id: str) -> None:
        self.file_path(file_id).unlink(missing_ok=True)

    def _remove_unknown_files(self, messenger: Messenger) -> None:
        """A crash may leave uploads cut short or never journaled, and half-written
        snapshots: files nobody knows. Remove them (a symlink goes, its target stays).
        A known file that is not a regular file is dropped from the state."""
        for path in self.files.iterdir():
            mode = path.lstat().st_mode
            if path.name in messenger.files and stat.S_ISREG(mode):
                continue
            if path.name in messenger.files:
                logger.error("stored file %r is not a regular file: dropped", path.name)
                messenger.uploads.forget_file(path.name)
            if stat.S_ISDIR(mode):
                logger.error("%s: an unexpected folder, left alone", path)
            else:
                path.unlink()
        for file_id in [i for i in messenger.files if not os.path.lexists(self.files / i)]:
            logger.error("stored file %s is missing: dropped", file_id)
            messenger.uploads.forget_file(file_id)
        for path in self.folder.glob("snapshot-*.tmp"):
            path.unlink()

    async def write_snapshot(
        self, number: int, state: dict[str, Any], messages: list[Message]
    ) -> int:
        """Write snapshot ``number`` atomically, in steps that let the loop run; its size.

        The first frame holds the state's scalars; each list of records (users, files,
        scheduled messages... and the messages, last) follows in frames of about
        SNAPSHOT_FRAME_BYTES, as ``(kind, records)``."""
        path = self.snapshot_path(number)
        temporary = path.with_suffix(".tmp")
        temporary.unlink(missing_ok=True)
        digest = hashlib.sha256()
        length = 0
        bulk = [(kind, rows) for kind, rows in state.items() if isinstance(rows, list)]
        head = {kind: [] if isinstance(value, list) else value for kind, value in state.items()}
        bulk.append(("messages", messages))
        try:
            with create_private(temporary) as out:
                out.write(bytes(SNAPSHOT_HEADER.size))
                for frame in itertools.chain([head], _frames(bulk)):
                    data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
                    data = FRAME_HEADER.pack(len(data)) + data
                    digest.update(data)
                    out.write(data)
                    length += len(data)
                    await asyncio.sleep(0)
                out.seek(0)
                out.write(
                    SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT, length, digest.digest())
                )
                out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())
            os.replace(temporary, path)
            await asyncio.to_thread(_fsync_folder, self.folder)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return SNAPSHOT_HEADER.size + length

    def prune(self) -> None:
        """Keep the newest snapshots and the journals they need; remove the rest."""
        snapshots = self._numbered("snapshot", ".bin")
        keep = sorted(snapshots, reverse=True)[:KEEP_SNAPSHOTS]
        if not keep:
            return
        for number, path in snapshots.items():
            if number not in keep:
                path.unlink(missing_ok=True)
        for number, path in self._numbered("journal", ".log").items():
            if number < min(keep):
                path.unlink(missing_ok=True)


def read_snapshot(path: Path) -> tuple[dict[str, Any], Iterator[Any]]:
    """A snapshot's state, and its message rows: decoded one frame at a time, as they are
    used. The whole file is checked (size, checksum) before anything is decoded; what it
    holds is checked by ``Messenger.restore``."""
    data = read_private(path)
    if len(data) < SNAPSHOT_HEADER.size:
        raise DamagedState("shorter than its header")
    magic, version, length, digest = SNAPSHOT_HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC or version != SNAPSHOT_FORMAT:
        raise DamagedState(f"not a format {SNAPSHOT_FORMAT} snapshot")
    payload = memoryview(data)[SNAPSHOT_HEADER.size :]
    if len(payload) != length or hashlib.sha256(payload).digest() != digest:
        raise DamagedState("size or checksum mismatch")
    frames = _split_frames(payload)
    state = _unpickle(next(frames))
    if type(state) is not dict:
        raise DamagedState("its first frame is not the state")
    for frame in frames:
        kind, rows = _records(frame)
        if kind == "messages":  # the last kind: decoded as restore goes
            rest = (_records(frame, "messages")[1] for frame in frames)
            return state, itertools.chain(rows, itertools.chain.from_iterable(rest))
        state.setdefault(kind, []).extend(rows)
    return state, iter([])


def _frames(bulk: list[tuple[str, list[Any]]]) -> Iterator[tuple[str, list[Any]]]:
    """Each kind's records in groups of about SNAPSHOT_FRAME_BYTES, as (kind, group);
    messages as tuples."""
    for kind, records in bulk:
        group: list[Any] = []
        size = 0
        for record in records:
            if isinstance(record, Message):
                group.append(tuple(record))
                size += RECORD_ALLOWANCE + len(record.text)
            else:
                group.append(record)
                text = record.get("text", "") if isinstance(record, dict) else ""
                size += RECORD_ALLOWANCE + len(text)
            if size >= SNAPSHOT_FRAME_BYTES:
                yield kind, group
                group, size = [], 0
        if group:
            yield kind, group


def _records(frame: memoryview, kind: str | None = None) -> tuple[str, list[Any]]:
    """A frame of records: (its kind, the records); the kind must be ``kind`` if given."""
    found = _unpickle(frame)
    if not (type(found) is tuple and len(found) == 2 and type(found[0]) is str
            and type(found[1]) is list and kind in (None, found[0])):
        raise DamagedState("a frame that is no list of records")
    return found[0], found[1]


def _split_frames(payload: memoryview) -> Iterator[memoryview]:
    """The length-prefixed pickles of a snapshot, one at a time."""
    position = 0
    while position < len(payload):
        (length,) = FRAME_HEADER.unpack_from(payload, position)
        position += FRAME_HEADER.size
        yield payload[position : position + length]
        position += length


def _unpickle(data: bytes | memoryview) -> Any:
    """One pickle of plain builtins (each pickle has its own memo: one unpickler each)."""
    return _BuiltinsUnpickler(io.BytesIO(data)).load()


# API handlers ###############################################################

MAX_PASSWORD: Final = 1024  # characters
MAX_REASON: Final = 1024  # characters in a report's reason
MAX_FILE_NAME: Final = 255  # characters
DEFAULT_POLL_LIMIT: Final = 100  # messages per answer of GET /messages without limit
MAX_CONVERSATIONS: Final = 100  # chat= values in one GET /messages
DEFAULT_CHAT_PAGE: Final = 100  # chats per answer of GET /chat without limit
MAX_STATUS_CHATS: Final = 100  # chats in a GET /status answer, those with unread first
MAX_TIMER_SLEEP: Final = 1.0  # seconds the timer task sleeps at most between looks
ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")  # file, scheduled message and link ids
# A number in a query: digits, a fraction, an exponent (``1e2``), a sign.
_DECIMAL_RE: Final = re.compile(r"[-+]?[0-9]{1,18}(?:\.[0-9]{1,18})?(?:[eE][-+]?[0-9]{1,3})?")
_MEDIA_TYPE_RE: Final = re.compile(
    r"[-!#$%&'*+.^_`|~0-9A-Za-z]+/[-!#$%&'*+.^_`|~0-9A-Za-z]+"
    r"""(?:[ \t]*;[ \t]*[-!#$%&'*+.^_`|~0-9A-Za-z]+=(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+|"[^"\\]*"))*"""
)
_UNSAFE_FILE_NAME_RE: Final = re.compile(r"[^A-Za-z0-9._ ()+-]")


@dataclass(slots=True)
class Call:
    """One request on its way through a handler: the head, path parameters, the body."""

    request: Request
    params: tuple[str, ...]
    channel: Channel
    user: str = ""  # set for routes that need a token
    token_hash: str = ""

    @property
    def address(self) -> str:
        """The client's address (behind a trusted proxy, the one it forwarded)."""
        return self.channel.address or "?"


class Channel(Protocol):
    """The connection as a handler sees it: where the body comes from, and who is on it."""

    user: str | None
    address: str | None  # the client's, behind a trusted proxy too

    async def read(self, request: Request, limit: int) -> bytes: ...

    def stream(self, request: Request, limit: int) -> AsyncIterator[bytes]: ...

    async def discard(self, request: Request) -> None: ...

    def next_read(self) -> asyncio.Future[bytes]: ...


class Fields:
    """Typed access to a JSON object or a query string; every refusal names the field."""

    def __init__(self, values: dict[str, Any], *, from_query: bool = False) -> None:
        self._values = values
        self._from_query = from_query

    def string(
        self,
        name: str,
        *,
        max_length: int = MAX_TEXT,
        pattern: re.Pattern[str] | None = None,
    ) -> str:
        value = self.optional_string(name, max_length=max_length, pattern=pattern)
        if value is None:
            raise InvalidField(f"{name} is required")
        return value

    def optional_string(
        self,
        name: str,
        *,
        max_length: int = MAX_TEXT,
        min_length: int = 1,
        pattern: re.Pattern[str] | None = None,
    ) -> str | None:
        value = self._values.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InvalidField(f"{name} must be a string")
        if pattern is not None and not pattern.fullmatch(value):
            raise InvalidField(f"{name} must match {pattern.pattern}")
        if not min_length <= len(value) <= max_length:
            if min_length == 0:
                raise InvalidField(f"{name} must be at most {max_length} characters")
            raise InvalidField(f"{name} must be {min_length} to {max_length} characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidField(f"{name} holds a lone surrogate") from exc
        return value

    def optional_int(self, name: str, *, minimum: int = 0) -> int | None:
        value = self._values.get(name)
        if value is None:
            return None
        if self._from_query and isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value) if len(value) <= 18 else sys.maxsize
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise InvalidField(f"{name} must be an integer of at least {minimum}")
        return value

    def optional_float(
        self, name: str, *, minimum: float = 0.0, clamp_to: float = math.inf
    ) -> float | None:
        """A number of at least ``minimum``; one above ``clamp_to`` is taken as ``clamp_to``,
        +inf too (``1e400`` reads as it) when there is a clamp. NaN is always refused."""
        value = self._values.get(name)
        if value is None:
            return None
        if self._from_query and isinstance(value, str) and _DECIMAL_RE.fullmatch(value):
            value = float(value)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidField(f"{name} must be a number")
        number = float(value)  # no overflow: see _parse_json_int
        unbounded = math.isinf(clamp_to)
        if math.isnan(number) or number < minimum or (number == math.inf and unbounded):
            if unbounded:
                raise InvalidField(f"{name} must be a finite number of at least {minimum:g}")
            raise InvalidField(f"{name} must be between {minimum:g} and {clamp_to:g}")
        return min(number, clamp_to)

    def optional_bool(self, name: str) -> bool | None:
        value = self._values.get(name)
        if value is not None and not isinstance(value, bool):
            raise InvalidField(f"{name} must be true or false")
        return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


MAX_INT_DIGITS: Final = 300  # longer than any id or time: a float (finite, or inf) instead


def _parse_json_int(digits: str) -> int | float:
    """A JSON integer: a long one is read as a float (of up to 308 digits, finite; then
    inf), so that every number has one check and one message, however many its digits
    (``int()`` refuses more than 4,300 of them; ``float()`` of a longer int overflows)."""
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float(digits)


_json_decoder: Final = json.JSONDecoder(
    parse_constant=_reject_constant, parse_int=_parse_json_int
)


class Waiters:
    """Long-polls waiting for news, by user; a message wakes its whole audience at once."""

    def __init__(self) -> None:
        self._by_user: dict[str, set[asyncio.Future[None]]] = {}

    async def wait(self, user: str, seconds: float, client: asyncio.Future[bytes]) -> None:
        """Until a message for ``user`` arrives, ``seconds`` pass, or the ``client`` read
        ends (it hung up, or sent its next request).

        Each of the three completes one future: ``asyncio.wait`` would do the same with a
        waiter, a set and callbacks on both futures, for every parked poll of a fan-out."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def end(_: object = None) -> None:
            if not future.done():
                future.set_result(None)

        waiting = self._by_user.setdefault(user, set())
        waiting.add(future)
        timer = loop.call_later(seconds, end)
        client.add_done_callback(end)
        try:
            await future
        finally:
            timer.cancel()
            client.remove_done_callback(end)
            waiting.discard(future)
            if not waiting and self._by_user.get(user) is waiting:
                del self._by_user[user]

    def wake(self, users: Iterable[str]) -> None:
        for user in users:
            for future in self._by_user.get(user, ()):
                if not future.done():
                    future.set_result(None)

    def wake_among(self, members: set[str]) -> None:
        """Wake the waiting members of a chat, walking the smaller of the two sets."""
        if len(self._by_user) < len(members):
            self.wake([user for user in self._by_user if user in members])
        else:
            self.wake(members)

    def wake_all(self) -> None:
        self.wake(list(self._by_user))


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this process may run on (Linux)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def content_disposition(name: str) -> str:
    """An attachment header safe for any name: an ASCII fallback and the UTF-8 original."""
    fallback = _UNSAFE_FILE_NAME_RE.sub("_", name) or "file"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


_HEALTH_BODY: Final = encode_json({"status": "ok"})


class RenderedMessages:
    """Messages as answers carry them, JSON encoded once for all their readers: a message
    reads the same to everyone, and the answers to one send in a chat of a thousand
    long-polls would encode it a thousand times. Holds at most ``limit`` bytes, the first
    rendered going first. An entry serves only the very record it was made from: a message
    rewritten (without its file) is rendered again."""

    def __init__(self, render: Callable[[Message], dict[str, Any]], limit: int) -> None:
        self._render = render
        self._limit = limit
        self._size = 0  # bytes held
        self._kept: OrderedDict[int, tuple[Message, bytes]] = OrderedDict()

    def __call__(self, message: Message) -> bytes:
        kept = self._kept.get(message.id)
        if kept is not None and kept[0] is message:
            return kept[1]
        if kept is not None:
            del self._kept[message.id]
            self._size -= len(kept[1])
        data = encode_json(self._render(message))
        self._kept[message.id] = (message, data)
        self._size += len(data)
        while self._size > self._limit:
            _, (_, dropped) = self._kept.popitem(last=False)
            self._size -= len(dropped)
        return data


class MessengerApp:
    """The HTTP API: one thin method per route, and the dispatcher that answers errors."""

    def __init__(
        self,
        config: ServerConfig,
        messenger: Messenger,
        journal: Journal,
        store: StateStore,
    ) -> None:
        self.config = config
        self.messenger = messenger
        self.journal = journal
        self.store = store
        self.waiters = Waiters()
        self.online: dict[str, int] = {}  # user -> open connections that used its token
        self.uploading: dict[str, int] = {}  # user -> bytes of its uploads under way
        self.closing = False
        self.wake_timer: Callable[[], None] = _ignore
        self.started = messenger.clock()
        self._hash_slots = _usable_cores()
        self._hashing = asyncio.Semaphore(self._hash_slots)  # a hash per core at a time
        self._hashes_waiting = 0  # connects waiting for a place to hash
        self._hashes_by: dict[str, int] = {}  # hashes waiting or running, by client address
        messenger.on_message = self._on_message
        self.rendered = RenderedMessages(self._message, RENDERED_BYTES)
        self.router = Router()
        routes: list[tuple[str, str, Handler, bool, bool, bool]] = [
            # method   path                              handler             token  body   durable
            ("GET",    "/health",                        self.health,        False, False, False),
            ("GET",    "/openapi.json",                  self.openapi,       False, False, False),
            ("POST",   "/connect",                       self.connect,       False, True,  True),
            ("POST",   "/disconnect",                    self.disconnect,    True,  False, True),
            ("POST",   "/send",                          self.send,          True,  True,  True),
            ("GET",    "/messages",                      self.poll,          True,  False, True),
            ("GET",    "/messages/{id}",                 self.thread,        True,  False, True),
            ("GET",    "/history",                       self.history,       True,  False, False),
            ("GET",    "/scheduled",                     self.scheduled,     True,  False, False),
            ("DELETE", "/scheduled/{id}",                self.cancel,        True,  False, True),
            ("GET",    "/chat",                          self.chats,         True,  False, False),
            ("POST",   "/chat",                          self.join,          True,  True,  True),
            ("POST",   "/chat/{name}/leave",             self.leave,         True,  False, True),
            ("POST",   "/chat/{name}/invite",            self.invite,        True,  True,  True),
            ("POST",   "/chat/{name}/link",              self.link,          True,  False, True),
            ("GET",    "/chat/{name}/requests",          self.requests,      True,  False, False),
            ("POST",   "/chat/{name}/requests/{user}",   self.decide,        True,  True,  True),
            ("POST",   "/join/{token}",                  self.request_join,  True,  False, True),
            ("GET",    "/status",                        self.status,        True,  False, False),
            ("POST",   "/report",                        self.report,        True,  True,  True),
            ("POST",   "/files",                         self.upload,        True,  True,  True),
            ("GET",    "/files/{id}",                    self.download,      True,  False, False),
        ]
        for method, path, handler, auth, body, durable in routes:
            self.router.add(method, path, handler, auth=auth, body=body, durable=durable)

    # Dispatch ---------------------------------------------------------------

    async def dispatch(self, request: Request, channel: Channel) -> Response:
        """Answer one request. The only place where exceptions become responses."""
        try:
            if request.method not in STANDARD_METHODS:
                raise NotImplementedByServer(f"the method {request.method} is not implemented")
            if request.path == "*":
                allow = ", ".join(self.router.all_methods())
                return Response(HTTPStatus.NO_CONTENT, headers=[("Allow", allow)])
            if not request.path.startswith("/"):  # CONNECT host:port: no resource of ours
                raise MethodNotAllowed("this is an origin server: CONNECT is refused", [])
            route, params = self._route(request)
            call = Call(request, params, channel)
            if route.auth:
                self._authenticate(call)
            if request.has_body and not route.body:
                await channel.discard(request)  # a malformed body fails before any change
            answer = await route.handler(call)
            if route.durable:
                # The answer to a change waits until the journal holds the change as
                # --fsync says; it is shaped before: what happens meanwhile cannot change it.
                await self.journal.durable()
            return answer
        except MessengerError as exc:
            logger.info("%s %r from %r -> %d %r", request.method, request.path, channel.address,
                        exc.status, exc.message)
            return Response.error(exc)
        except Exception:
            logger.exception("unhandled error in %s %r", request.method, request.path)
            return Response.error(InternalError("internal server error"))

    def _route(self, request: Request) -> tuple[Route, tuple[str, ...]]:
        """The route of a request: 404 or 405 if none, but 413 for a body larger than any
        route takes (it could never be read)."""
        try:
            return self.router.match(request.method, request.path)
        except (NotFound, MethodNotAllowed):
            largest = self.config.largest_body
            if (request.content_length or 0) > largest:
                raise PayloadTooLarge(f"no route takes a body over {largest} bytes") from None
            raise

    def _authenticate(self, call: Call) -> None:
        scheme, _, token = call.request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("this route needs Authorization: Bearer <token>")
        user, call.token_hash = self.messenger.accounts.authenticate(token.strip())
        call.user = user.name
        channel = call.channel
        if channel.user != user.name:
            self.forget(channel)
            channel.user = user.name
            self.online[user.name] = self.online.get(user.name, 0) + 1

    def forget(self, channel: Channel) -> None:
        """The connection closed or changed hands: it no longer makes its user online."""
        if channel.user is not None:
            self.online[channel.user] -= 1
            if not self.online[channel.user]:
                del self.online[channel.user]
            channel.user = None

    def _on_message(self, message: Message) -> None:
        if message.chat is not None:
            self.waiters.wake_among(self.messenger.chats[message.chat].members)
        else:
            self.waiters.wake(name for name in {message.sender, message.to} if name is not None)

    async def _json(self, call: Call) -> Fields:
        raw = await call.channel.read(call.request, self.config.max_json_body)
        try:
            data = _json_decoder.decode(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BadJson("the body is not valid JSON") from exc
        if not isinstance(data, dict):
            raise BadJson("the body must be a JSON object")
        return Fields(data)

    @staticmethod
    def _query(call: Call) -> Fields:
        return Fields(call.request.query_params(), from_query=True)

    # JSON shapes ------------------------------------------------------------

    def _message(self, message: Message) -> dict[str, Any]:
        stored = self.messenger.files.get(message.file) if message.file is not None else None
        return {
            "id": message.id,
            "chat": message.chat,
            "to": message.to,
            "from": message.sender,
            "text": message.text,
            "ts": message.ts,
            "reply_to": message.reply_to,
            "file": None if stored is None else self._file(stored, with_digest=False),
            "notice": message.notice,
        }

    def _listed(self, messages: list[Message]) -> bytes:
        """A JSON list of messages, each as ``rendered`` keeps it."""
        return b"[" + b",".join(map(self.rendered, messages)) + b"]"

    @staticmethod
    def _encoded(
        status: HTTPStatus = HTTPStatus.OK, headers: list[tuple[str, str]] | None = None,
        **fields: bytes,
    ) -> Response:
        """A JSON object answer of fields encoded already (messages: ``_listed``,
        ``rendered``): the bytes ``Response.json`` would make of them."""
        pairs = b",".join(b'"%s":%s' % (name.encode(), value) for name, value in fields.items())
        return Response(status, b"{" + pairs + b"}", headers=headers or [])

    @staticmethod
    def _file(stored: StoredFile, *, with_digest: bool = True) -> dict[str, Any]:
        shown = {"id": stored.id, "name": stored.name, "size": stored.size, "type": stored.type}
        return {**shown, "sha256": stored.sha256} if with_digest else shown

    def _chat(self, chat: Chat, user: str, unread: int | None = None) -> dict[str, Any]:
        """A chat object for ``user``: ``unread`` is counted unless given."""
        if unread is None:
            unread = self.messenger.unread_in(user, chat.name)
        return {
            "name": chat.name,
            "private": chat.private,
            "owner": chat.owner,
            "members": len(chat.members),
            "unread": unread,
            "requests": len(chat.requests) if chat.owner == user else 0,
        }

    @staticmethod
    def _scheduled(scheduled: Scheduled) -> dict[str, Any]:
        return {
            "id": scheduled.id,
            "send_at": scheduled.send_at,
            "text": scheduled.text,
            "chat": scheduled.chat,
            "to": scheduled.to,
            "reply_to": scheduled.reply_to,
            "file": scheduled.file,
        }

    # Routes -----------------------------------------------------------------

    async def health(self, call: Call) -> Response:
        return Response(body=_HEALTH_BODY)

    async def openapi(self, call: Call) -> Response:
        return Response(body=_OPENAPI_BODY)

    async def connect(self, call: Call) -> Response:
        """Register on first use, else check the password; open a session either way."""
        body = await self._json(call)
        name = body.string("user", pattern=USER_NAME_RE, max_length=32)
        password = body.string("password", max_length=MAX_PASSWORD)
        group = address_group(call.address, self.config.ipv6_prefix)  # the rules count by it
        self.messenger.accounts.check_login_allowed(name, group)
        token = secrets.token_urlsafe(32)
        status = HTTPStatus.CREATED
        user = await self._register(name, password, token, group)
        if user is None:  # the name is taken: this is a login
            status = HTTPStatus.OK
            user = await self._log_in(name, password, token, group, call.address)
        history = self.messenger.history(name, user.active_chat, None, self.config.rules.history)
        return self._encoded(
            status, token=encode_json(token), user=encode_json(name),
            chat=encode_json(user.active_chat), history=self._listed(history),
            unread=b"%d" % self.messenger.unread(name).total,
        )

    async def _register(self, name: str, password: str, token: str, group: str) -> User | None:
        """A new user with its first session; None when the name is taken. ``group`` is
        the client's address as the rules count it."""
        if name in self.messenger.users:
            return None
        self.messenger.accounts.check_registration_allowed(group)  # before the cost of a hash
        salt = os.urandom(16)
        digest = await self._scrypt(password, salt, self.config.password_cost, group)
        if name in self.messenger.users:  # somebody took it during the hash
            return None
        return self.messenger.accounts.register(
            name, digest, salt, self.config.password_cost, token, group
        )

    async def _log_in(
        self, name: str, password: str, token: str, group: str, address: str
    ) -> User:
        """A new session for a known user, if the password is right."""
        known = self.messenger.users[name]
        digest = await self._scrypt(password, known.salt, known.cost, group)
        self.messenger.accounts.check_login_allowed(name, group)  # parallel guesses count too
        if not hmac.compare_digest(digest, known.password):
            self.messenger.accounts.login_failed(name, group)
            logger.warning("wrong password for %r from %r", name, address)
            raise Unauthorized("wrong password")
        return self.messenger.accounts.open_session(name, token)

    async def _scrypt(self, password: str, salt: bytes, cost: int, group: str) -> bytes:
        """scrypt (n = 2**cost, r=8, p=1) off the event loop, one per core at a time.

        An address (``group``) may start ``--password-checks-per-ip`` of them per login
        window, and hold ``--hash-share`` places per core (running or waiting); at most
        ``--hash-queue`` per core wait in all. Beyond, 429 or 503 at once: a flood of
        connects costs the server little but reading their bodies, and a few addresses
        cannot take every place."""
        self.messenger.accounts.check_password_allowed(group)
        cores = self._hash_slots
        busy = self._hashes_waiting >= self.config.hash_queue * cores
        if busy or self._hashes_by.get(group, 0) >= self.config.hash_share * cores:
            raise Unavailable("the server is busy checking passwords: try again", retry_after=1)
        self.messenger.accounts.password_checked(group)
        self._hashes_by[group] = self._hashes_by.get(group, 0) + 1
        try:
            self._hashes_waiting += 1
            try:
                await self._hashing.acquire()
            finally:
                self._hashes_waiting -= 1
            try:
                n = 2**cost
                return await asyncio.to_thread(
                    hashlib.scrypt, password.encode("utf-8"), salt=salt, n=n, r=8, p=1,
                    maxmem=256 * n * 8 + 2**20, dklen=32,
                )
            finally:
                self._hashing.release()
        finally:
            self._hashes_by[group] -= 1
            if not self._hashes_by[group]:
                del self._hashes_by[group]

    async def disconnect(self, call: Call) -> Response:
        self.messenger.accounts.disconnect(call.token_hash)
        self.forget(call.channel)  # the connection no longer makes its user online
        return Response(HTTPStatus.NO_CONTENT)

    async def send(self, call: Call) -> Response:
        body = await self._json(call)
        draft = Draft(
            text=body.optional_string("text", min_length=0) or "",
            chat=body.optional_string("chat", pattern=CHAT_NAME_RE),
            to=body.optional_string("to", pattern=USER_NAME_RE),
            reply_to=body.optional_int("reply_to", minimum=1),
            file=body.optional_string("file", pattern=ID_RE),
            client_id=body.optional_string("client_id", min_length=0, max_length=64) or None,
            send_at=body.optional_float("send_at"),
        )
        if not draft.text and draft.file is None:
            raise InvalidField(f"text must be 1 to {MAX_TEXT} characters, or empty with a file")
        result = self.messenger.send(call.user, draft)
        headers = rate_headers(result.rate)
        if result.scheduled is not None:
            self.wake_timer()
            status = HTTPStatus.ACCEPTED if result.created else HTTPStatus.OK
            return Response.json({"scheduled": self._scheduled(result.scheduled)}, status, headers)
        assert result.message is not None
        status = HTTPStatus.CREATED if result.created else HTTPStatus.OK
        # Rendered once here, the message is ready for the long-polls the send wakes.
        return self._encoded(status, headers, message=self.rendered(result.message))

    async def poll(self, call: Call) -> Response:
        """New messages; with ``wait``, a long-poll answered as soon as there is one."""
        params = call.request.query_params()
        query = Fields(params, from_query=True)
        since = query.optional_int("since")
        chats = None  # every conversation, unless the query names some
        if "chat" in params:
            keys = call.request.query_values("chat")
            if not all(CONVERSATION_RE.fullmatch(key) for key in keys):
                raise InvalidField("each chat must be a chat name, @user or @")
            if len(set(keys)) > MAX_CONVERSATIONS:  # each one named may be a read event
                raise InvalidField(f"at most {MAX_CONVERSATIONS} chat values in one request")
            chats = keys
        limit = min(query.optional_int("limit", minimum=1) or DEFAULT_POLL_LIMIT, MAX_LIMIT)
        wait = query.optional_float("wait", clamp_to=self.config.max_wait) or 0.0
        mark = call.request.method != "HEAD"  # a HEAD is safe: it marks nothing read
        found, next_id = self.messenger.poll(call.user, since, chats, limit, mark=mark)
        if not found and wait > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            # The client's next bytes end the wait too: it hung up, or sent its next request.
            client_read = call.channel.next_read()
            while not (found or self.closing or client_read.done()):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self.waiters.wait(call.user, remaining, client_read)
                found, next_id = self.messenger.poll(call.user, since, chats, limit, mark=mark)
        return self._encoded(messages=self._listed(found), next=b"%d" % next_id)

    async def thread(self, call: Call) -> Response:
        message_id = call.params[0]
        if not message_id.isascii() or not message_id.isdigit() or len(message_id) > 18:
            raise UnknownMessage(message_id)
        query = self._query(call)
        after = query.optional_int("after") or 0
        limit = min(query.optional_int("limit", minimum=1) or MAX_LIMIT, MAX_LIMIT)
        message, comments = self.messenger.thread(
            call.user, int(message_id), after, limit, mark=call.request.method != "HEAD"
        )
        return self._encoded(message=self.rendered(message), comments=self._listed(comments))

    async def history(self, call: Call) -> Response:
        query = self._query(call)
        chat = query.optional_string("chat", pattern=CHAT_NAME_RE)
        before = query.optional_int("before", minimum=1)
        limit = min(query.optional_int("limit", minimum=1) or self.config.rules.history, MAX_LIMIT)
        chat = chat or self.messenger.users[call.user].active_chat
        found = self.messenger.history(call.user, chat, before, limit)
        return self._encoded(messages=self._listed(found))

    async def scheduled(self, call: Call) -> Response:
        pending = self.messenger.scheduled_of(call.user)
        return Response.json({"scheduled": [self._scheduled(s) for s in pending]})

    async def cancel(self, call: Call) -> Response:
        self.messenger.cancel(call.user, call.params[0])
        return Response(HTTPStatus.NO_CONTENT)

    async def chats(self, call: Call) -> Response:
        """A page of the chats the caller can see, by name."""
        query = self._query(call)
        after = query.optional_string("after", pattern=CHAT_NAME_RE) or ""
        limit = min(query.optional_int("limit", minimum=1) or DEFAULT_CHAT_PAGE, MAX_LIMIT)
        page = self.messenger.membership.visible_chats(call.user, after, limit + 1)
        chats = [self._chat(chat, call.user) for chat in page[:limit]]
        last = page[limit - 1].name if len(page) > limit else None
        return Response.json({"chats": chats, "next": last})

    async def join(self, call: Call) -> Response:
        body = await self._json(call)
        name = body.string("chat_name", pattern=CHAT_NAME_RE, max_length=64)
        private = body.optional_bool("private")
        chat, created = self.messenger.membership.join(call.user, name, private)
        history = self.messenger.history(call.user, name, None, self.config.rules.history)
        status = HTTPStatus.CREATED if created else HTTPStatus.OK
        return self._encoded(
            status, chat=encode_json(self._chat(chat, call.user)), history=self._listed(history)
        )

    def _chat_param(self, call: Call) -> str:
        name = call.params[0]
        if not CHAT_NAME_RE.fullmatch(name):
            raise UnknownChat(name)
        return name

    async def leave(self, call: Call) -> Response:
        chat = self.messenger.membership.leave(call.user, self._chat_param(call))
        return Response.json({"chat": self._chat(chat, call.user)})

    async def invite(self, call: Call) -> Response:
        name = self._chat_param(call)
        guest = (await self._json(call)).string("user", pattern=USER_NAME_RE, max_length=32)
        chat = self.messenger.membership.invite(call.user, name, guest)
        return Response.json({"chat": self._chat(chat, call.user)})

    async def link(self, call: Call) -> Response:
        token = self.messenger.membership.make_link(call.user, self._chat_param(call))
        return Response.json({"link": f"/join/{token}"}, HTTPStatus.CREATED)

    async def request_join(self, call: Call) -> Response:
        chat, member = self.messenger.membership.request_join(call.user, call.params[0])
        if member:
            return Response.json({"status": "member", "chat": chat.name})
        return Response.json({"status": "pending", "chat": chat.name}, HTTPStatus.ACCEPTED)

    async def requests(self, call: Call) -> Response:
        pending = self.messenger.membership.pending_requests(call.user, self._chat_param(call))
        ordered = sorted(pending.items(), key=lambda item: item[1])
        return Response.json({"requests": [{"user": user, "ts": ts} for user, ts in ordered]})

    async def decide(self, call: Call) -> Response:
        name = self._chat_param(call)
        approve = (await self._json(call)).optional_bool("approve")
        if approve is None:
            raise InvalidField("approve is required: true or false")
        chat = self.messenger.membership.decide(call.user, name, call.params[1], approve)
        return Response.json({"chat": self._chat(chat, call.user)})

    async def status(self, call: Call) -> Response:
        messenger = self.messenger
        user = messenger.users[call.user]
        standing = messenger.moderation.standing(call.user)
        unread = messenger.unread(call.user)
        rate = messenger.rate_status(call.user)
        read = (name for name in user.chats if name not in unread.chats)
        unread_first = itertools.chain(unread.chats, read)
        chats = [
            self._chat(messenger.chats[name], call.user, unread.chats.get(name, 0))
            for name in itertools.islice(unread_first, MAX_STATUS_CHATS)
        ]
        return Response.json(
            {
                "user": user.name,
                "chat": user.active_chat,
                "sessions": len(user.sessions),
                "chats": chats,
                "unread": {
                    "total": unread.total,
                    "chats": unread.chats,
                    "private": unread.private,
                    "notices": unread.notices,
                },
                "limits": {
                    "general_left": rate.remaining,
                    "general_reset": rate.reset,
                    "reports": standing.reports,
                    "banned_until": standing.banned_until,
                },
                "quotas": messenger.quotas_left(call.user),
                "server": {
                    "version": VERSION,
                    "uptime": messenger.clock() - self.started,
                    "users": len(messenger.users),
                    "online": len(self.online),
                },
            }
        )

    async def report(self, call: Call) -> Response:
        body = await self._json(call)
        target = body.string("user", pattern=USER_NAME_RE, max_length=32)
        reason = body.optional_string("reason", max_length=MAX_REASON, min_length=0) or ""
        standing = self.messenger.moderation.report(call.user, target, reason)
        answer = {
            "user": target, "reports": standing.reports, "banned_until": standing.banned_until
        }
        return Response.json(answer)

    async def upload(self, call: Call) -> Response:
        """Store the raw body as a file of the caller's, under a name the server makes."""
        request = call.request
        limit = self.config.max_file_size
        if request.content_length is None and not request.chunked:
            raise LengthRequired("a file upload needs Content-Length or a chunked body")
        if (request.content_length or 0) > limit:
            raise PayloadTooLarge(f"files are limited to {limit} bytes")
        name = self._query(call).string("name", max_length=MAX_FILE_NAME)
        if not name.isprintable():
            raise InvalidField("name must not hold control characters")
        media_type = request.headers.get("content-type", "application/octet-stream")
        if not _MEDIA_TYPE_RE.fullmatch(media_type):
            raise InvalidField("Content-Type must be a media type such as image/png")
        # Uploads under way count as stored already, for the quota and for the disk: a disk
        # block at least (never 0: an empty one overlapping another keeps their count).
        expected = _charged(limit if request.content_length is None else request.content_length)
        under_way = self.uploading.get(call.user, 0)
        self.messenger.uploads.check_upload(call.user, under_way + (request.content_length or 0))
        free = self.store.free_bytes() - sum(self.uploading.values())
        if free - expected < self.config.min_free_disk:
            logger.warning("upload of %r refused: the state folder's disk is nearly full",
                           call.user)
            raise Unavailable("the server's disk is nearly full: no uploads for now", 60)
        self.uploading[call.user] = under_way + expected
        try:
            file_id, sha256, size = await self.store.save_upload(
                call.channel.stream(request, limit)
            )
        except OSError as exc:
            logger.error("could not store an upload: %s", exc)
            raise Unavailable("the file cannot be stored now") from exc
        finally:
            self.uploading[call.user] -= expected
            if not self.uploading[call.user]:
                del self.uploading[call.user]
        try:
            stored = self.messenger.uploads.add_file(
                call.user, file_id, name, size, media_type, sha256
            )
        except MessengerError:  # over the quota once a chunked body is counted; a full journal
            self.store.remove_file(file_id)
            raise
        return Response.json({"file": self._file(stored)}, HTTPStatus.CREATED)

    async def download(self, call: Call) -> Response:
        file_id = call.params[0]
        if not ID_RE.fullmatch(file_id):
            raise UnknownFile(file_id)
        stored = self.messenger.uploads.readable_file(call.user, file_id)
        try:
            handle = self.store.open_file(stored.id)
        except OSError as exc:  # out of descriptors; else gone, or a symlink in its place
            logger.error("stored file %s cannot be opened: %s", stored.id, exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise Unavailable("the server has too many files open: try again",
                                  retry_after=1) from exc
            raise UnknownFile(file_id) from exc
        headers = [
            ("Content-Disposition", content_disposition(stored.name)),
            ("X-Content-Type-Options", "nosniff"),
        ]
        return Response(
            content_type=stored.type, headers=headers, file=handle, file_size=stored.size
        )


# OpenAPI document ###########################################################


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(required: str, **properties: Any) -> dict[str, Any]:
    """An object schema; ``required`` lists the required property names, space-separated."""
    return {"type": "object", "required": required.split(), "properties": properties}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if isinstance(schema.get("type"), str):
        return {**schema, "type": [schema["type"], "null"]}
    return {"oneOf": [schema, {"type": "null"}]}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _operation(
    summary: str,
    answers: dict[int, tuple[str, dict[str, Any] | None]],
    *,
    errors: Sequence[int] = (),
    body: dict[str, Any] | None = None,
    parameters: Sequence[dict[str, Any]] = (),
    public: bool = False,
) -> dict[str, Any]:
    """One operation: its answers, the errors it may give, its body and parameters."""
    responses: dict[str, Any] = {}
    for status, (description, schema) in answers.items():
        responses[str(status)] = {"description": description}
        if schema is not None:
            responses[str(status)]["content"] = _json_content(schema)
    for status in [*errors, *([] if public else [401, 503])]:
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if public:
        operation["security"] = []
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json_content(body)}
    if parameters:
        operation["parameters"] = list(parameters)
    return operation


def _parameter(
    name: str, where: str, schema: dict[str, Any], description: str, *, required: bool = False
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": description,
    }


def build_openapi() -> dict[str, Any]:
    """The contract (API.md) as an OpenAPI 3.1 document."""
    string, integer, number, boolean = (
        {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
    )
    natural, positive = {"type": "integer", "minimum": 0}, {"type": "integer", "minimum": 1}
    user_name = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,32}$"}
    chat_name = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
    conversation = {"type": "string", "pattern": f"^(?:{CONVERSATION_RE.pattern})$"}
    chat_path = _parameter("name", "path", chat_name, "the chat")
    chat_answer = ("The chat", _object("chat", chat=_ref("Chat")))
    messages = {"type": "array", "items": _ref("Message")}
    schemas = {
        "Error": _object(
            "error message", error=string, message=string,
            until={"type": "number", "description": "end of a ban (403 banned)"},
        ),
        "FileRef": _object("id name size type", id=string, name=string, size=integer, type=string),
        "File": _object(
            "id name size type sha256", id=string, name=string, size=integer, type=string,
            sha256=string,
        ),
        "Message": _object(
            "id chat to from text ts reply_to file notice", id=integer,
            chat=_nullable(chat_name), to=_nullable(user_name), text=string, ts=number,
            reply_to=_nullable(integer), file=_nullable(_ref("FileRef")),
            notice=_nullable(_ref("Notice")),
            **{"from": {**_nullable(user_name), "description": "null on a notice"}},
        ),
        "Notice": _object(
            "type", type={"type": "string", "enum": sorted(NOTICE_TYPES)}, chat=chat_name,
            user=user_name, scheduled=string,
        ),
        "Chat": _object(
            "name private owner members unread requests", name=chat_name, private=boolean,
            owner=_nullable(user_name), members=integer, unread=integer,
            requests={"type": "integer", "description": "pending join requests (owner only)"},
        ),
        "Scheduled": _object(
            "id send_at text chat to reply_to file", id=string, send_at=number, text=string,
            chat=_nullable(chat_name), to=_nullable(user_name), reply_to=_nullable(integer),
            file=_nullable(string),
        ),
        "Status": _object(
            "user chat sessions chats unread limits quotas server", user=user_name, chat=chat_name,
            sessions=integer, chats={"type": "array", "items": _ref("Chat")},
            unread=_object(
                "total chats private notices", total=integer,
                chats={"type": "object", "additionalProperties": integer},
                private={"type": "object", "additionalProperties": integer},
                notices=integer,
            ),
            limits=_object(
                "general_left general_reset reports banned_until", general_left=integer,
                general_reset=_nullable(number), reports=integer,
                banned_until=_nullable(number),
            ),
            quotas=_object(
                "flood_left scheduled_left upload_left", flood_left=integer,
                scheduled_left=integer, upload_left=integer,
            ),
            server=_object(
                "version uptime users online", version=string, uptime=number,
                users=integer, online=integer,
            ),
        ),
    }
    error_descriptions = {
        400: "Malformed HTTP, bad JSON, or a missing or invalid field",
        401: "No, unknown or revoked token, or a wrong password",
        403: "Not the owner, not a member, banned, or over a quota",
        404: "Unknown route or resource, or one the caller may not see",
        405: "Known path, wrong method (with Allow)",
        408: "Head or body too slow",
        409: "Chat name taken with the other privacy",
        411: "File upload with neither Content-Length nor chunked",
        413: "Body over its limit",
        414: "Request line too long",
        429: "Over a limit (with Retry-After)",
        431: "Headers too large or too many",
        501: "Unknown method or transfer coding",
        503: "Busy or full for now: the state cannot be written, too many connections, or a "
             "server-wide limit is reached (with Retry-After when known)",
        505: "HTTP version not supported",
    }
    connect_answer = _object(
        "token user chat history unread", token=string, user=user_name, chat=chat_name,
        history=messages, unread=integer,
    )
    send_body = _object(  # optional fields may also be null, which means absent
        "", text=_nullable({"type": "string", "maxLength": MAX_TEXT}),
        chat=_nullable(chat_name), to=_nullable(user_name), reply_to=_nullable(positive),
        send_at=_nullable(number), file=_nullable(string),
        client_id=_nullable({"type": "string", "maxLength": 64}),
    )
    send_body["anyOf"] = [  # a text, or a file with an empty or no text
        {"required": ["text"], "properties": {"text": {"type": "string", "minLength": 1}}},
        {"required": ["file"], "properties": {"file": {"type": "string"}}},
    ]
    sent = _object("message", message=_ref("Message"))
    scheduled = _object("scheduled", scheduled=_ref("Scheduled"))
    paths = {
        "/health": {"get": _operation("Liveness", {200: ("Up", _object("status", status=string))},
                                      public=True)},
        "/openapi.json": {"get": _operation("This document", {200: ("OpenAPI 3.1", {})},
                                            public=True)},
        "/connect": {"post": _operation(
            "Register on first use, or log in; opens a session",
            {200: ("Logged in", connect_answer), 201: ("Registered", connect_answer)},
            errors=[400, 401, 413, 429, 503],
            body=_object("user password", user=user_name,
                         password={"type": "string", "minLength": 1, "maxLength": MAX_PASSWORD}),
            public=True,
        )},
        "/disconnect": {"post": _operation("Revoke the caller's token", {204: ("Revoked", None)})},
        "/send": {"post": _operation(
            "Send to the active chat, a chat, or privately; or schedule with send_at",
            {200: ("A retry with a known client_id", {"oneOf": [sent, scheduled]}),
             201: ("Sent", sent), 202: ("Scheduled", scheduled)},
            errors=[400, 403, 404, 413, 429], body=send_body,
        )},
        "/messages": {"get": _operation(
            "Messages the caller can see after since, oldest first; long-polls with wait",
            {200: ("Messages", _object("messages next", messages=messages, next=integer))},
            errors=[400, 403, 404],
            parameters=[
                _parameter("since", "query", natural,
                           "start after this id and mark the conversations named read up to "
                           "it (without: each at its read position, nothing marked)"),
                _parameter("wait", "query", {"type": "number", "minimum": 0},
                           "seconds to long-poll (0-60; larger is clamped)"),
                {**_parameter("chat", "query", {"type": "array", "items": conversation},
                              "only these conversations: a chat's name, @user, or @ for "
                              "every private one and the notices (default: all)"),
                 "style": "form", "explode": True},
                _parameter("limit", "query", positive, "at most this many (1-1000)"),
            ],
        )},
        "/messages/{id}": {"get": _operation(
            "A message and its comments",
            {200: ("The thread", _object("message comments", message=_ref("Message"),
                                         comments=messages))},
            errors=[400, 404],
            parameters=[
                _parameter("id", "path", integer, "message id"),
                _parameter("after", "query", natural, "only comments after this id"),
                _parameter("limit", "query", positive, "at most this many comments (1-1000)"),
            ],
        )},
        "/history": {"get": _operation(
            "A chat's past, oldest first",
            {200: ("Messages", _object("messages", messages=messages))},
            errors=[400, 403, 404],
            parameters=[
                _parameter("chat", "query", chat_name, "the chat (default: the active one)"),
                _parameter("before", "query", positive, "only ids below this"),
                _parameter("limit", "query", positive, "the newest this many (1-1000)"),
            ],
        )},
        "/scheduled": {"get": _operation(
            "The caller's pending scheduled messages",
            {200: ("Pending", _object("scheduled", scheduled={"type": "array",
                                                              "items": _ref("Scheduled")}))},
        )},
        "/scheduled/{id}": {"delete": _operation(
            "Cancel a scheduled message", {204: ("Cancelled", None)}, errors=[404],
            parameters=[_parameter("id", "path", string, "scheduled message id")],
        )},
        "/chat": {
            "get": _operation(
                "Public chats and the caller's private ones, by name, a page at a time",
                {200: ("Chats", _object(
                    "chats next", chats={"type": "array", "items": _ref("Chat")},
                    next=_nullable(chat_name),
                ))},
                errors=[400],
                parameters=[
                    _parameter("after", "query", chat_name, "only chats named after this"),
                    _parameter("limit", "query", positive, "at most this many (1-1000)"),
                ],
            ),
            "post": _operation(
                "Join a chat (creating it) and make it active",
                {200: ("Joined", _object("chat history", chat=_ref("Chat"), history=messages)),
                 201: ("Created", _object("chat history", chat=_ref("Chat"), history=messages))},
                errors=[400, 403, 409, 413],
                body=_object("chat_name", chat_name=chat_name, private=_nullable(boolean)),
            ),
        },
        "/chat/{name}/leave": {"post": _operation(
            "Leave a chat", {200: chat_answer}, errors=[400, 403, 404], parameters=[chat_path])},
        "/chat/{name}/invite": {"post": _operation(
            "Invite a user (owner only)", {200: chat_answer}, errors=[400, 403, 404, 429],
            body=_object("user", user=user_name), parameters=[chat_path])},
        "/chat/{name}/link": {"post": _operation(
            "A new join link (owner only); the old one stops working",
            {201: ("The link", _object("link", link=string))}, errors=[403, 404],
            parameters=[chat_path])},
        "/chat/{name}/requests": {"get": _operation(
            "Pending join requests (owner only)",
            {200: ("Requests", _object("requests", requests={"type": "array", "items": _object(
                "user ts", user=user_name, ts=number)}))},
            errors=[403, 404], parameters=[chat_path])},
        "/chat/{name}/requests/{user}": {"post": _operation(
            "Approve or deny a join request (owner only)", {200: chat_answer},
            errors=[400, 403, 404], body=_object("approve", approve=boolean),
            parameters=[chat_path, _parameter("user", "path", user_name, "who asked")])},
        "/join/{token}": {"post": _operation(
            "Ask to join through a link",
            {200: ("Already a member", _object("status chat", status=string, chat=chat_name)),
             202: ("Pending the owner's approval",
                   _object("status chat", status=string, chat=chat_name))},
            errors=[403, 404, 429],
            parameters=[_parameter("token", "path", string, "the link's token")])},
        "/status": {"get": _operation("The caller's state", {200: ("Status", _ref("Status"))})},
        "/report": {"post": _operation(
            "Report an abuser",
            {200: ("Reported", _object("user reports banned_until", user=user_name,
                                       reports=integer, banned_until=_nullable(number)))},
            errors=[400, 403, 404, 429],
            body=_object("user", user=user_name, reason=_nullable({"type": "string"})))},
        "/files": {"post": {
            **_operation(
                "Upload a file: the raw bytes with their Content-Type",
                {201: ("Stored", _object("file", file=_ref("File")))},
                errors=[400, 403, 411, 413],
                parameters=[
                    _parameter("name", "query", string, "the file's name", required=True)
                ],
            ),
            "requestBody": {"required": True, "content": {"*/*": {"schema": {
                "type": "string", "format": "binary"}}}},
        }},
        "/files/{id}": {"get": {
            **_operation("Download a file", {}, errors=[404],
                         parameters=[_parameter("id", "path", string, "file id")]),
            "responses": {
                "200": {"description": "The bytes, as an attachment",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                "401": {"$ref": "#/components/responses/E401"},
                "404": {"$ref": "#/components/responses/E404"},
            },
        }},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Messenger",
            "version": VERSION,
            "description": "Chats over HTTP/1.1. Every error is JSON: {error, message}.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                f"E{status}": {"description": text, "content": _json_content(_ref("Error"))}
                for status, text in error_descriptions.items()
            },
        },
    }


OPENAPI: Final = build_openapi()
_OPENAPI_BODY: Final = encode_json(OPENAPI)


# Connection I/O ############################################################

class Phase(enum.Enum):
    """Where a connection is in a request's life: its deadline depends on it."""

    IDLE = "waiting for a request"
    HEAD = "reading a request head"
    BODY = "reading a request body"
    HANDLER = "answering"
    WRITE = "sending"


class Connection:
    """One client connection: reads requests from the stream and answers them in order.

    ``deadline`` and ``phase`` are watched by the server's watchdog, which answers 408 to
    a head or body that is too slow and closes a connection idle for too long.
    """

    def __init__(
        self,
        server: MessengerServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self._server = server
        self._config = server.config
        self._largest_body = server.config.largest_body  # a property: computed once here
        self._reader = reader
        self._writer = writer
        self._peer = peer  # the address the connection comes from
        self._proxied = _is_trusted(peer, self._config.forwarded_allow_ips)
        # The client's address, counted against its connection cap: the peer's, or for a
        # trusted proxy the one its current request names (None before the first).
        self.address: str | None = None if self._proxied else peer
        self._buffer = bytearray()
        self._loop = asyncio.get_running_loop()
        self.phase = Phase.IDLE
        # A new connection gets as long for its first request as a head gets to arrive, not
        # the idle timeout of a keep-alive one: sockets that never send hold no place long.
        first_request = min(self._config.head_timeout, self._config.idle_timeout)
        self.deadline = self._loop.time() + first_request
        self._body = Body.NONE  # the current request's body
        self.cut_off = False  # the server ended it (a deadline, shutdown): say no more
        self.user: str | None = None  # whose token the connection used last
        self._next_read: asyncio.Future[bytes] | None = None  # a read begun by a handler

    async def serve(self) -> None:
        idle = self._server.idle
        try:
            while True:
                request = await self._read_request()
                if request is None:
                    return
                idle.pop(self, None)
                if self._proxied:
                    self._attribute(request)
                self.phase, self.deadline = Phase.HANDLER, float("inf")
                response = await self._server.app.dispatch(request, self)
                if self.cut_off:
                    return
                step = next_step(request, self._body, response.status,
                                 closing=self._server.closing, largest_body=self._largest_body)
                if step in (NextStep.SKIP_BODY, NextStep.TOO_LARGE):
                    response, step = await self._settle_body(request, response, step)
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug(
                        "%s %s %s -> %d", self.peer, request.method, request.target, response.status
                    )
                close = step is not NextStep.KEEP_ALIVE
                await self._send(request, response, close)
                if close:
                    await self._close(linger=step is not NextStep.CLOSE)
                    return
                self.phase = Phase.IDLE
                self.deadline = self._loop.time() + self._config.idle_timeout
                if self._buffer:  # pipelined requests wait their turn behind other clients
                    await asyncio.sleep(0)
        except MessengerError as exc:
            if not self.cut_off:
                logger.info("bad request from %s: %d %r", self.peer, exc.status, exc.message)
                with contextlib.suppress(ConnectionError):
                    await self._send(None, Response.error(exc), close=True)
                    await self._close(linger=True)
        except OSError as exc:  # the client went away, or a file could not be read
            logger.debug("connection with %s ended: %s", self.peer, exc)
        finally:
            idle.pop(self, None)
            self._server.app.forget(self)
            if self._next_read is not None:
                self._next_read.cancel()
            self._writer.close()

    def _attribute(self, request: Request) -> None:
        """Count a proxied connection against the address its request comes from."""
        forwarded = request.headers.get("x-forwarded-for")
        address = client_address(self._peer, forwarded, self._config.forwarded_allow_ips)
        if address == self.address:
            return
        self._server.release(self.address)
        self.address = None
        if not self._server.admit(address):
            raise Unavailable("too many open connections from your address")
        self.address = address

    async def _settle_body(
        self, request: Request, response: Response, step: NextStep
    ) -> tuple[Response, NextStep]:
        """The answer to send and what follows it, when ``next_step`` said ``step``: to skip
        the body or to answer 413. A body answered before it was read is skipped if it can
        be; one larger than any route takes turns the answer into a 413, and so does one
        found too large while skipped (chunked), unless the answer is one; one found
        malformed turns it into a 400."""
        closing, largest = self._server.closing, self._largest_body
        if step is NextStep.TOO_LARGE:
            too_large = PayloadTooLarge(f"the body is larger than {largest} bytes")
            return Response.error(too_large), step
        if step is NextStep.SKIP_BODY:
            try:
                await self.discard(request)
            except PayloadTooLarge as exc:
                if response.status != HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                    response = Response.error(exc)
            except MessengerError as exc:
                response = Response.error(exc)
            step = next_step(request, self._body, response.status, closing=closing,
                             largest_body=largest)
        return response, step

    async def _close(self, *, linger: bool) -> None:
        """Close after the last answer. If the client may still be sending (a body we did
        not read, a bad request), stop writing first and take in what comes for a moment:
        closing at once would reset the connection and could destroy the answer on its way
        (RFC 9112 §9.6)."""
        if linger and self._writer.can_write_eof():
            self.phase, self.deadline = Phase.WRITE, self._loop.time() + LINGER_TIMEOUT
            self._writer.write_eof()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LINGER_TIMEOUT):
                    while await self._fill():
                        self._buffer.clear()
        self._writer.close()

    @property
    def peer(self) -> str:
        """Who is on the line, for the logs: the client's address (and the proxy's)."""
        if self._proxied:
            return f"{self.address} via {self._peer}"
        return self._peer

    async def _fill(self) -> bool:
        """Read what the client sent next into the buffer; False once the client is gone."""
        started, self._next_read = self._next_read, None
        try:
            data = await (started if started is not None else self._reader.read(READ_SIZE))
        except ConnectionError:
            return False
        self._buffer += data
        return bool(data)

    async def _read_request(self) -> Request | None:
        buffer = self._buffer
        checked = 0  # bytes of the buffer already judged by check_partial_head
        while True:
            if buffer.startswith(b"\r\n"):
                self._skip_empty_lines()
                checked = 0
            end = buffer.find(b"\r\n\r\n", max(0, checked - 3))
            if end != -1:
                break
            if buffer:
                if self.phase == Phase.IDLE:
                    self.phase = Phase.HEAD
                    self.deadline = self._loop.time() + self._config.head_timeout
                    self._server.idle.pop(self, None)
                check_partial_head(buffer, self._config.http, checked)
                checked = len(buffer)
            elif self.phase == Phase.IDLE:  # waiting for a request, since it was first here
                self._server.idle.setdefault(self)
            if not await self._fill():
                if buffer and not self.cut_off:
                    raise BadRequest("the connection ended in the middle of a request head")
                return None
        head = bytes(buffer[:end])
        del buffer[: end + 4]
        request = parse_head(head, self._config.http)
        self._body = Body.UNREAD if request.has_body else Body.NONE
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
        if self._body is Body.NONE:
            return
        if request.content_length is not None and request.content_length > limit:
            self._body = Body.REFUSED
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        if request.expect_continue and self._body is Body.UNREAD:
            self._writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.phase = Phase.BODY
        self.deadline = self._loop.time() + self._config.body_timeout
        self._body = Body.READING  # until the body has been read to its end
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
        self._body = Body.NONE
        self.phase, self.deadline = Phase.HANDLER, float("inf")

    async def discard(self, request: Request) -> None:
        """Read and drop a body nobody needs: 413 beyond the largest body any route takes,
        400 if malformed."""
        async for _ in self.stream(request, self._largest_body):
            pass

    def next_read(self) -> asyncio.Future[bytes]:
        """The client's next bytes, read from now on while a request waits (a long-poll):
        done with nothing if the client hangs up, at once if a next request is already
        here. ``_fill`` takes what it brings."""
        if self._next_read is None:
            if self._buffer:
                self._next_read = self._loop.create_future()
                self._next_read.set_result(bytes(self._buffer))
                self._buffer.clear()
            else:
                self._next_read = asyncio.ensure_future(self._reader.read(READ_SIZE))
        return self._next_read

    async def _send(self, request: Request | None, response: Response, close: bool) -> None:
        """Write ``response``; for HEAD only its head. Waits while the client is slow to read."""
        keep_alive_1_0 = request is not None and request.minor == 0 and not close
        head = response.serialize_head(close=close, keep_alive_1_0=keep_alive_1_0)
        with_body = request is None or request.method != "HEAD"
        if response.file is not None:
            with response.file:
                self._writer.write(head)
                if with_body:
                    await self._send_file(response.file, response.file_size)
        else:
            self._writer.write(head + response.body if with_body else head)
            # The transport keeps what it could not send yet: the answer is not kept twice
            # while a slow client reads.
            response.body = b""
        if self._writer.transport.is_closing():  # no use answering what else it sent
            raise ConnectionResetError("the client went away")
        if self._writer.transport.get_write_buffer_size():
            await self._drain()

    async def _drain(self) -> None:
        """Wait while the client reads; one that reads nothing for idle_timeout is dropped."""
        self.phase = Phase.WRITE
        self.deadline = self._loop.time() + self._config.idle_timeout
        await self._writer.drain()

    async def _send_file(self, file: BinaryIO, size: int) -> None:
        while size > 0:
            chunk = file.read(min(READ_SIZE, size))
            if not chunk:
                raise ConnectionAbortedError("the file shrank while it was sent")
            size -= len(chunk)
            self._writer.write(chunk)
            await self._drain()

    def past_deadline(self) -> None:
        """Called by the watchdog past the deadline: 408 for a slow head or body, then close."""
        if self.phase in (Phase.HEAD, Phase.BODY):
            what = "request head" if self.phase == Phase.HEAD else "request body"
            logger.warning("%s too slow with its %s: 408", self.peer, what)
            self._refuse(RequestTimeout(f"the {what} did not arrive in time"))
        else:
            self.drop()

    def shut_down(self) -> None:
        """The server stops: close between requests; tell a client in mid-head why."""
        if self.phase == Phase.IDLE:
            self.drop()
        elif self.phase == Phase.HEAD:
            self._refuse(Unavailable("the server is shutting down"))

    def _refuse(self, error: MessengerError) -> None:
        """Answer a request that will never be read to its end, and close."""
        self.cut_off = True
        response = Response.error(error)
        self._writer.write(response.serialize_head(close=True) + response.body)
        self._writer.close()

    def drop(self) -> None:
        """Close now; what a client that does not read has left pending is thrown away."""
        self.cut_off = True
        if self._writer.transport.get_write_buffer_size():
            self._writer.transport.abort()
        else:
            self._writer.close()


# Server lifecycle ##########################################################

def connection_cap(wanted: int) -> int:
    """How many connections may be open at once: ``wanted``, or fewer if the open-file
    limit is too low for a descriptor each and FD_RESERVE more.

    The soft limit is raised first, toward the hard one, as far as FDS_PER_CONNECTION
    descriptors a connection. A lowered cap is said once, in a warning.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + FD_RESERVE
    asked = wanted * FDS_PER_CONNECTION + FD_RESERVE
    raised = asked if hard == resource.RLIM_INFINITY else min(asked, hard)
    if soft != resource.RLIM_INFINITY and soft < raised:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError) as exc:  # above the kernel's nr_open, say
            logger.warning("cannot raise the open-file limit to %d: %s", raised, exc)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    cap = max(1, soft - min(FD_RESERVE, soft // 2))
    logger.warning(
        "--max-connections lowered from %d to %d: the open-file limit (ulimit -n) is %d, "
        "hard limit %s, and %d descriptors stay for the journal, snapshots, uploads and the "
        "listening socket", wanted, cap, soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard, soft - cap,
    )
    return cap


def _freeze_loaded_state() -> None:
    """Keep the state loaded at start out of the cyclic garbage collector's sight.

    Stored messages live long, yet each full collection would walk all of them: with a
    million messages, a 250 ms pause of the event loop. Messages form no reference
    cycles, so refcounting still frees them when they expire. Done once, before any
    connection exists: frozen objects in a cycle (a transport, say) would never be freed.
    """
    gc.collect()
    gc.freeze()


class MessengerServer:
    """The server: ``async with MessengerServer(config) as server`` serves until the end.

    Start-up loads the state folder; background tasks expire connections past their
    deadlines, run the messenger's timers, fsync the journal every second and take
    snapshots; ``stop`` stops accepting, lets requests in flight finish, and saves.
    """

    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.store = StateStore(config.state_dir)
        self.messenger = Messenger(config.rules, clock)
        self.journal = Journal(always=config.fsync == "always")
        self._journal_number = 0  # the journal file in use; 0 before ``open``
        self.messenger.record = self.journal.append
        self.messenger.on_file_gone = self.store.remove_file
        self.app = MessengerApp(config, self.messenger, self.journal, self.store)
        self.app.wake_timer = self.wake_timer
        self._older_snapshot_changes = -1  # the state's change count in the older snapshot
        self._newer_snapshot_changes = -1  # ... and in the newer one
        self._saving = asyncio.Lock()
        self._timer_wakeup = asyncio.Event()
        self.max_connections = config.max_connections  # lowered by ``start`` if need be
        self._listeners: list[socket.socket] = []  # empty until started, and once stopped
        self._open_sockets = 0  # connections accepted and not closed yet
        self._starting: set[asyncio.Task[None]] = set()  # accepted, not yet in _connections
        self._refusals = Throttled()
        self._accept_failures = Throttled()
        self._connections: dict[Connection, asyncio.Task[None]] = {}
        # Connections waiting for a request, idle the longest first: at the cap, the first
        # makes room for a new one.
        self.idle: OrderedDict[Connection, None] = OrderedDict()
        self._per_address: dict[str, int] = {}  # open connections by client address
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def closing(self) -> bool:
        """The server is stopping (the app knows it too: its long-polls answer at once)."""
        return self.app.closing

    @property
    def port(self) -> int:
        assert self._listeners
        port: int = self._listeners[0].getsockname()[1]
        return port

    async def __aenter__(self) -> MessengerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def open(self) -> None:
        """Take the state folder (StateLocked if another server has it), load it, and begin
        a new journal. A failure leaves the folder as it was."""
        self.store.open()
        try:
            self._journal_number = self.store.load(self.messenger)
            path = self.store.journal_path(self._journal_number)
            self.journal.switch(path)
            self.store.created(path)
        except BaseException:
            self.journal.close()
            self.store.abandon()
            raise

    def close(self) -> None:
        """Put the journal on disk and let the state folder go (``stop`` does it too)."""
        self.journal.close()
        self.store.close()

    async def start(self) -> None:
        """Listen (a port in use fails before the state folder is touched), open the
        state, then serve: connections made meanwhile wait in the backlog."""
        self.max_connections = connection_cap(self.config.max_connections)
        self._listeners = await self._bind()
        try:
            if not self._journal_number:
                self.open()
            _freeze_loaded_state()
            self.messenger.tick()  # what fell due while the server was down goes out now
            loop = asyncio.get_running_loop()
            for listener in self._listeners:
                listener.listen(1024)
                loop.add_reader(listener.fileno(), self._accept, listener)
        except BaseException:
            self._stop_accepting()
            self.journal.close()
            self.store.abandon()
            raise
        loops = (self._watch_deadlines, self._run_timers, self._sync_journal, self._save_often)
        self._tasks = [asyncio.create_task(loop()) for loop in loops]
        logger.info("listening on http://%s:%d", self.config.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (bounded), save, close."""
        if not self._listeners:
            return
        self.app.closing = True
        self._stop_accepting()
        if self._starting:
            await asyncio.wait(self._starting, timeout=1.0)
        self.app.waiters.wake_all()
        for connection in self._connections:
            connection.shut_down()
        if self._connections:
            await asyncio.wait(self._connections.values(), timeout=self.config.shutdown_timeout)
        for connection in list(self._connections):  # past the time given: cut them off
            connection.drop()
        if self._connections:
            await asyncio.wait(self._connections.values(), timeout=1.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.save()
        self.close()
        logger.info("stopped")

    def wake_timer(self) -> None:
        """Something new is due (a scheduled message): let the timer task look again."""
        self._timer_wakeup.set()

    async def save(self) -> None:
        """Take a snapshot: start a new journal, then write the state it starts from."""
        async with self._saving:
            loop = asyncio.get_running_loop()
            started = loop.time()
            number = self._journal_number + 1
            try:
                self.journal.switch(self.store.journal_path(number))
            except OSError as exc:
                logger.error("cannot start journal %d, no snapshot now: %s", number, exc)
                return
            self._journal_number = number
            state, messages = self.messenger.export()  # the state journal `number` starts from
            changes, count = self.messenger.changes, len(messages)
            # The snapshot holds a list of every message while it is written: the cyclic
            # garbage collector pauses meanwhile, as each of its passes would walk that list.
            gc.disable()
            try:
                await self.journal.sync()
                size = await self.store.write_snapshot(number, state, messages)
            except (OSError, Unavailable) as exc:
                logger.error("snapshot %d failed, the journals keep everything: %s", number, exc)
                return
            finally:
                gc.enable()
            del state, messages
            self._older_snapshot_changes = self._newer_snapshot_changes
            self._newer_snapshot_changes = changes
            self.store.prune()
            logger.info(
                "snapshot %d: %d messages, %d bytes, %.3f s",
                number, count, size, loop.time() - started,
            )

    async def _bind(self) -> list[socket.socket]:
        """Sockets bound to every address of the host (as asyncio binds them), not listening
        yet: the server accepts on them itself (``_accept``)."""
        bound = await asyncio.get_running_loop().create_server(
            asyncio.Protocol, self.config.host, self.config.port, start_serving=False
        )
        listeners = [wrapped.dup() for wrapped in bound.sockets]
        bound.close()  # its sockets; the copies stay bound
        for listener in listeners:
            listener.setblocking(False)
        return listeners

    def _stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners = []

    def _accept(self, listener: socket.socket) -> None:
        """Take the connections waiting on ``listener``. At ``max_connections`` a new one
        takes the place of the connection idle the longest; if none is idle, it is answered
        503 and closed right away, so that neither the backlog nor refused connections hold
        descriptors. Out of descriptors all the same (EMFILE), accepting rests for
        ACCEPT_PAUSE, with a warning now and then."""
        for _ in range(ACCEPT_BATCH):
            try:
                client, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failures.warning(
                    "cannot accept connections, pausing %g s: %s", ACCEPT_PAUSE, exc
                )
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_PAUSE, self._resume_accepting, listener)
                return
            peer = address[0] if isinstance(address, tuple) else "?"
            at_cap = self._open_sockets >= self.max_connections
            if at_cap and not (self._admissible(peer) and self._close_longest_idle()):
                self._refuse_now(client, peer, "too many open connections: try again later")
                continue
            self._open_sockets += 1
            task = asyncio.create_task(self._serve_socket(client))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)
            if at_cap:  # the next ones once the loop has let the closed one's descriptor go
                return

    def _admissible(self, peer: str) -> bool:
        """Whether a connection from ``peer`` would be admitted (``admit``), as far as is
        known at accept: none while closing, nor from an address at its cap (the clients of
        a trusted proxy are known by their requests only). One that would not makes no room."""
        if self.closing:
            return False
        if _is_trusted(peer, self.config.forwarded_allow_ips):
            return True
        return self._has_room(address_group(peer, self.config.ipv6_prefix))

    def _close_longest_idle(self) -> bool:
        """At the cap, close the connection waiting longest for a request, to make room for
        a new one (a client may find its idle connection closed any time, RFC 9112 §9.6):
        the places go to clients that use them, not to sockets kept open. False if every
        connection is busy."""
        if not self.idle:
            return False
        connection, _ = self.idle.popitem(last=False)
        logger.debug("closed the connection of %s, idle the longest, for a new one",
                     connection.peer)
        connection.drop()
        return True

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener in self._listeners:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    def _refuse_now(self, client: socket.socket, peer: str, refusal: str) -> None:
        """Answer 503 on a connection just accepted and close it, without waiting for
        anything: what the client sent already is read first, so the close is no reset."""
        with client:
            client.setblocking(False)
            with contextlib.suppress(OSError):
                client.recv(READ_SIZE)
            with contextlib.suppress(OSError):
                client.send(self._refused(peer, refusal))

    def _refused(self, peer: str, refusal: str) -> bytes:
        """The 503 that refuses a connection, logged (a few lines at most: ``Throttled``)."""
        self._refusals.warning("refused a connection from %s: %s", peer, refusal)
        response = Response.error(Unavailable(refusal))
        return response.serialize_head(close=True) + response.body

    async def _serve_socket(self, client: socket.socket) -> None:
        try:
            try:
                reader, writer = await asyncio.open_connection(sock=client, limit=READ_SIZE)
            except OSError:  # gone already
                client.close()
                return
            await self._on_connect(reader, writer)
        finally:
            self._open_sockets -= 1

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        connection = Connection(self, reader, writer, peer[0] if isinstance(peer, tuple) else "?")
        refusal = None
        if self.closing:
            refusal = "the server is shutting down"
        elif connection.address is not None and not self.admit(connection.address):
            refusal = "too many open connections from your address"
        if refusal is not None:
            writer.write(self._refused(connection.peer, refusal))
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections[connection] = task
        try:
            await connection.serve()
        finally:
            del self._connections[connection]
            self.release(connection.address)

    def admit(self, address: str) -> bool:
        """Count one more open connection from ``address`` (its group: ``address_group``),
        unless it is at its cap."""
        group = address_group(address, self.config.ipv6_prefix)
        if not self._has_room(group):
            return False
        self._per_address[group] = self._per_address.get(group, 0) + 1
        return True

    def _has_room(self, group: str) -> bool:
        """Whether an address group is below its cap of open connections."""
        return self._per_address.get(group, 0) < self.config.max_connections_per_ip

    def release(self, address: str | None) -> None:
        if address is not None:
            group = address_group(address, self.config.ipv6_prefix)
            self._per_address[group] -= 1
            if not self._per_address[group]:
                del self._per_address[group]

    async def _watch_deadlines(self) -> None:
        """Expire the connections past their deadline, a few times a second."""
        loop = asyncio.get_running_loop()
        config = self.config
        tick = min(1.0, min(config.head_timeout, config.body_timeout, config.idle_timeout) / 10)
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for connection in [c for c in self._connections if c.deadline <= now]:
                if not connection.cut_off:
                    connection.past_deadline()

    async def _run_timers(self) -> None:
        """Deliver scheduled messages when due and drop expired ones (one timer for all)."""
        while True:
            deadline = self.messenger.next_deadline()
            delay = MAX_TIMER_SLEEP if deadline is None else deadline - self.clock()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._timer_wakeup.wait(), max(0.0, min(delay, MAX_TIMER_SLEEP))
                )
            self._timer_wakeup.clear()
            try:
                self.messenger.tick()
            except Unavailable:  # the journal is failing and says so: the due messages wait
                await asyncio.sleep(MAX_TIMER_SLEEP)
            except Exception:
                logger.exception("timer failed")
                await asyncio.sleep(MAX_TIMER_SLEEP)

    async def _sync_journal(self) -> None:
        """``--fsync everysec``: put the journal on disk once a second."""
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Unavailable):
                await self.journal.sync()

    async def _save_often(self) -> None:
        """A snapshot every ``--snapshot-interval``, while something changed."""
        while True:
            await asyncio.sleep(self.config.snapshot_interval)
            if self.snapshot_due():
                await self.save()

    def snapshot_due(self) -> bool:
        """True while the older snapshot kept is behind the current state (so an expired
        message leaves every file, even on a server that turned quiet), or while the journal
        refuses changes and needs a new file."""
        return self.messenger.changes != self._older_snapshot_changes or self.journal.broken


# Entry point ###############################################################


def parse_args(argv: Sequence[str] | None) -> ServerConfig:
    """The configuration from the command line: a flag for every field of ServerConfig
    and of the groups it holds (HttpLimits, Rules), with their defaults and help."""
    parser = argparse.ArgumentParser(
        description="The messenger server: HTTP/1.1 on asyncio.streams.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_flags(parser, ServerConfig)
    args = vars(parser.parse_args(argv))
    return _build(ServerConfig, args)


def _add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for option in dataclasses.fields(cls):
        hint = hints[option.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            _add_flags(parser, hint)  # a group of settings (HttpLimits, Rules)
            continue
        options = {"type": hint, "default": option.default, **option.metadata}
        parser.add_argument("--" + option.name.replace("_", "-"), **options)


def _build(cls: type[T], args: dict[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    values = {
        option.name: _build(hints[option.name], args)
        if dataclasses.is_dataclass(hints[option.name]) else args[option.name]
        for option in dataclasses.fields(cls)  # type: ignore[arg-type]
    }
    return cls(**values)


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with MessengerServer(config):
        await stop.wait()
        logger.info("shutting down")


class JsonLogFormatter(logging.Formatter):
    """``--log-format json``: one JSON object per line, for machines."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextLogFormatter(logging.Formatter):
    """``--log-format text``: one line per record. Client input is quoted where it is
    logged; as a second guard, control characters left in a message are escaped, so no
    record can make a line that looks like another."""

    _ESCAPES: Final = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F, 0x85]} | {
        0x2028: "\\u2028", 0x2029: "\\u2029"  # line and paragraph separators
    }

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = record.message.translate(self._ESCAPES)
        return super().formatMessage(record)


def setup_logging(level: str, log_format: str) -> None:
    # No record needs where it was logged from, nor the thread, process or task: each of
    # these costs time on every line (the logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if sys.version_info >= (3, 12):
        logging.logAsyncioTasks = False
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(TextLogFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config))
    except (OSError, StateLocked) as exc:
        logger.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
