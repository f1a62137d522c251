"""Messenger client: the command line for messenger_server.py.

Run it with ``python messenger_client.py --help``; every command has its own ``--help``.
It speaks the HTTP contract of ``API.md`` with the standard library only (``http.client``)::

    python messenger_client.py connect alice        # log in (the first connect registers)
    python messenger_client.py send "hello"         # to the active chat
    python messenger_client.py send --to bob "hi"   # a private message
    python messenger_client.py read --follow        # print messages as they arrive

Group options: ``--server`` (env ``MESSENGER_SERVER``), ``--user`` (one of the saved logins),
``--json`` (the server's answer as is, and errors as JSON on stderr). ``connect`` saves the token
in ``config.json`` under ``click.get_app_dir("messenger")`` or ``MESSENGER_CONFIG_DIR``, readable
by its owner only. Files move in chunks, with a progress bar when stderr is a terminal.

The server is not trusted further than its contract: an answer is read up to 16 MiB, within a
deadline, and checked against the shapes below before use; its strings reach the terminal
with their control characters shown as codes (``clean``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.message
import email.utils
import functools
import http.client
import ipaddress
import json
import logging
import math
import mimetypes
import os
import re
import secrets
import selectors
import socket
import sys
import tempfile
import threading
import time
import types
import typing
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Final, NotRequired, TypedDict, TypeVar, cast
from urllib.parse import quote, urlencode, urlsplit

import click

logger = logging.getLogger("messenger.client")
T = TypeVar("T")

# Configuration ##############################################################

VERSION: Final = "1.0.0"
DEFAULT_SERVER: Final = "http://127.0.0.1:8000"
CONFIG_FILE: Final = "config.json"
REQUEST_TIMEOUT: Final = 30.0  # seconds for one request's answer, beyond any long-poll wait
MAX_ANSWER: Final = 16 * 1024 * 1024  # bytes of a JSON answer read, at most (files: no limit)
FOLLOW_WAIT: Final = 30  # seconds each long poll of `read --follow` may wait
MAX_PAGE: Final = 1000  # messages per answer, the server's maximum
RETRY_FIRST: Final = 0.5  # seconds `read --follow` waits before its first new attempt...
RETRY_MAX: Final = 15.0  # ...doubling at each failure up to this
# Answers `read --follow` waits through: the server (or a proxy in front) is restarting or busy.
RETRY_STATUSES: Final = frozenset({502, 503, 504})
CHUNK: Final = 64 * 1024  # bytes of a file read, sent or received at a time
CONTINUE_TIMEOUT: Final = 1.0  # seconds to wait for "100 Continue" before sending a body (curl's)
INTERRUPTED: Final = 130  # exit status after Ctrl-C, as a shell gives (128 + SIGINT)
# What an error answer that is not the messenger's own JSON likely means: a proxy in front.
PROXY_HINTS: Final = {
    413: "a proxy in front may limit bodies, see README",
    502: "a proxy in front got no answer from the server, is it running?",
    503: "a proxy in front finds the server unavailable",
    504: "a proxy in front gave up waiting for the server, see README",
}
PROXY_HINT: Final = "not the messenger's answer, check --server or the proxy in front"
JSON_TYPE: Final = "application/json; charset=utf-8"
DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}  # seconds per unit
BIDI_CONTROLS: Final = frozenset([0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F),
                                  *range(0x2066, 0x206A)])  # marks that reorder shown text


class Config:
    """The saved logins, ``{"servers": {url: {"tokens": {user: token}, "last_user": user}}}``.

    The file holds tokens: it is written atomically (temporary file, rename) with mode 0600.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.servers: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot read {path}: {exc}") from exc
        if not _is_config(data):
            raise ClientError(f"cannot read {path}: not a messenger config file")
        for server, entry in data["servers"].items():  # two spellings of one address: merged
            saved = self.servers.setdefault(_saved_address(server), entry)
            saved["tokens"] = {**entry.get("tokens", {}), **saved.get("tokens", {})}

    def token(self, server: str, user: str) -> str | None:
        token: str | None = self.servers.get(server, {}).get("tokens", {}).get(user)
        return token

    def last_user(self, server: str) -> str | None:
        user: str | None = self.servers.get(server, {}).get("last_user")
        return user

    def remember(self, server: str, user: str, token: str) -> None:
        entry = self.servers.setdefault(server, {})
        entry.setdefault("tokens", {})[user] = token
        entry["last_user"] = user
        self.save()

    def forget(self, server: str, user: str) -> None:
        entry = self.servers.get(server, {})
        entry.get("tokens", {}).pop(user, None)
        if entry.get("last_user") == user:
            entry.pop("last_user")
        self.save()

    def save(self) -> None:
        data = json.dumps({"servers": self.servers}, indent=2, sort_keys=True)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".config-")  # mode 0600
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, self.path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as exc:
            raise ClientError(f"cannot save {self.path}: {exc}") from exc


def _is_config(data: Any) -> bool:
    """The shape of the config file: servers, each with tokens by user and a last user."""
    if not isinstance(data, dict) or not isinstance(data.get("servers"), dict):
        return False
    for entry in data["servers"].values():
        if not isinstance(entry, dict):
            return False
        tokens = entry.get("tokens", {})
        last_user = entry.get("last_user")
        if not isinstance(tokens, dict) or not all(isinstance(t, str) for t in tokens.values()):
            return False
        if last_user is not None and not isinstance(last_user, str):
            return False
    return True


def _saved_address(server: str) -> str:
    """A server address from the config file, spelled as ``server_url`` does (files saved by
    older versions hold other spellings); as it is if it is not an address."""
    try:
        return server_url(server)
    except ClientError:
        return server


def server_url(text: str) -> str:
    """The one spelling of a server's address, so that one server is one saved login:
    ``http://`` assumed, scheme and host in lower case, no default port, no trailing slash
    (``127.0.0.1:8000/`` is ``http://127.0.0.1:8000``, ``HTTP://LocalHost:80`` is
    ``http://localhost``). ``ClientError`` when it is not an http(s) address."""
    address = text.strip()
    if "://" not in address:
        address = "http://" + address
    try:
        parts = urlsplit(address)
        port = parts.port
        host = (parts.hostname or "").encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:
        raise ClientError(f"not a server address: {text} ({exc})") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ClientError(f"not an http:// server address: {text}")
    if ":" in host:
        try:
            host = f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError as exc:
            raise ClientError(f"not a server address: {text} ({exc})") from exc
    elif not host:
        raise ClientError(f"not a server address: {text} (no host)")
    elif not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", host):
        raise ClientError(f"not a server address: {text} ({host!r} is not a host name)")
    if parts.username is not None or parts.query or parts.fragment:
        raise ClientError(f"not a server address: {text} (a user, query or fragment in it)")
    if port == 0:
        raise ClientError(f"not a server address: {text} (port 0)")
    default_port = 443 if scheme == "https" else 80
    netloc = host if port in (None, default_port) else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


# Errors ####################################################################


class ClientError(click.ClickException):
    """Root of the client's errors: click prints ``Error: <message>`` and exits 1; under
    ``--json``, ``details()`` is printed as one JSON object instead."""

    code = "client_error"

    def format_message(self) -> str:
        """The message on one line, shown safely (``clean``): it may quote the server."""
        return clean(self.message, keep_newlines=False)

    def details(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.format_message()}


class NotLoggedIn(ClientError):
    """No saved token for the chosen server and user."""

    code = "not_logged_in"


class ServerUnreachable(ClientError):
    """The request did not get an answer: refused, reset, timed out, cut short."""

    code = "unreachable"

    def __init__(self, server: str, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            reason = "connection refused"
        elif isinstance(exc, TimeoutError):
            reason = "timed out"
        elif isinstance(exc, http.client.RemoteDisconnected):
            reason = "the server closed the connection"
        elif isinstance(exc, http.client.IncompleteRead) and exc.expected is not None:
            reason = f"the answer stopped {exc.expected} bytes short"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror.lower()
        else:
            reason = str(exc) or type(exc).__name__
        super().__init__(f"cannot reach {server}: {reason}")


class ApiError(ClientError):
    """An error answer: its HTTP status, the error code and the server's message, a hint of
    what to do, and how long to wait before trying again (``Retry-After``) if it says."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        hint: str = "",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.hint = hint
        self.retry_after = retry_after

    def format_message(self) -> str:
        text = f"{self.message} ({self.hint})" if self.hint else self.message
        return clean(text, keep_newlines=False)

    def details(self) -> dict[str, Any]:
        details = {"error": self.code, "message": self.message, "status": self.status}
        if self.hint:
            details["hint"] = self.hint
        if self.retry_after is not None:
            details["retry_after"] = self.retry_after
        return details


class BadAnswer(ClientError):
    """An answer the contract does not allow (a field of another type, a time out of range, a
    page that goes nowhere): the server, or whatever answers in its place, is wrong."""

    code = "bad_answer"

    def __init__(self, what: str) -> None:
        super().__init__(f"the server sent an answer this client does not understand: {what}")


def error_details(error: click.ClickException) -> dict[str, Any]:
    """What ``--json`` prints for an error: ``{"error": code, "message": text, ...}``."""
    if isinstance(error, ClientError):
        return error.details()
    code = "usage" if isinstance(error, click.UsageError) else "error"
    return {"error": code, "message": error.format_message()}


# HTTP client ###############################################################


class FileInfo(TypedDict):
    id: str
    name: str
    size: int
    type: str


class UploadedFile(FileInfo):
    sha256: str


class Notice(TypedDict):
    """What a notice is about: its type, and its chat, user or scheduled message."""

    type: str
    chat: NotRequired[str]
    user: NotRequired[str]
    scheduled: NotRequired[str]


# The functional form, because "from" is a keyword. "from" is None on a notice only.
Message = TypedDict(
    "Message",
    {
        "id": int,
        "chat": str | None,
        "to": str | None,
        "from": str | None,
        "text": str,
        "ts": float,
        "reply_to": int | None,
        "file": FileInfo | None,
        "notice": Notice | None,
    },
)


class Scheduled(TypedDict):
    id: str
    send_at: float
    text: str
    chat: str | None
    to: str | None
    reply_to: int | None
    file: str | None  # the file's id


class Chat(TypedDict):
    name: str
    private: bool
    owner: str | None
    members: int
    unread: int
    requests: int  # pending join requests (for the owner; else 0)


class ConnectAnswer(TypedDict):
    token: str
    user: str
    chat: str
    history: list[Message]
    unread: int


class SendAnswer(TypedDict):
    message: NotRequired[Message]
    scheduled: NotRequired[Scheduled]


class MessagesPage(TypedDict):
    messages: list[Message]
    next: int


class HistoryPage(TypedDict):
    messages: list[Message]


class Thread(TypedDict):
    message: Message
    comments: list[Message]


class ScheduledList(TypedDict):
    scheduled: list[Scheduled]


class ChatList(TypedDict):
    chats: list[Chat]
    next: str | None  # the name to list from (``after``) for the next page; None at the end


class JoinAnswer(TypedDict):
    chat: Chat
    history: list[Message]


class ChatAnswer(TypedDict):
    chat: Chat


class LinkAnswer(TypedDict):
    link: str


class JoinRequestAnswer(TypedDict):
    status: str
    chat: str


class JoinRequest(TypedDict):
    user: str
    ts: float


class RequestList(TypedDict):
    requests: list[JoinRequest]


class ReportAnswer(TypedDict):
    user: str
    reports: int
    banned_until: float | None


class UploadAnswer(TypedDict):
    file: UploadedFile


class Unread(TypedDict):
    total: int
    chats: dict[str, int]
    private: dict[str, int]
    notices: int


class Limits(TypedDict):
    general_left: int
    general_reset: float | None
    reports: int
    banned_until: float | None


class Quotas(TypedDict):
    flood_left: int
    scheduled_left: int
    upload_left: int


class ServerInfo(TypedDict):
    version: str
    uptime: float
    users: int
    online: int


class Status(TypedDict):
    user: str
    chat: str
    sessions: int
    chats: list[Chat]
    unread: Unread
    limits: Limits
    quotas: Quotas
    server: ServerInfo


KINDS: Final = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def check_shape(value: Any, shape: Any, where: str = "answer") -> None:
    """Raise ``BadAnswer`` unless ``value``, parsed JSON, is of ``shape``: one of the
    TypedDicts above or a type in them. A record needs its required fields (and ignores
    others); a ``float`` may be an integer, not an infinity; a ``bool`` is no integer."""
    origin, args = typing.get_origin(shape), typing.get_args(shape)
    if typing.is_typeddict(shape):
        if not isinstance(value, dict):
            raise BadAnswer(f"{where} is not an object")
        for name, (hint, required) in record_fields(shape).items():
            if name in value:
                check_shape(value[name], hint, f"{where}.{name}")
            elif required:
                raise BadAnswer(f"{where} has no {name!r}")
    elif origin is list:
        if not isinstance(value, list):
            raise BadAnswer(f"{where} is not an array")
        for index, item in enumerate(value):
            check_shape(item, args[0], f"{where}[{index}]")
    elif origin is dict:  # dict[str, X]: JSON's keys are strings
        if not isinstance(value, dict):
            raise BadAnswer(f"{where} is not an object")
        for key, item in value.items():
            check_shape(item, args[1], f"{where}[{json.dumps(key)}]")
    elif origin is types.UnionType:  # X | None, the only unions of the shapes
        if value is not None:
            check_shape(value, args[0], where)
    elif shape is float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise BadAnswer(f"{where} is not a number")
    elif type(value) is not shape:  # str, int, bool
        raise BadAnswer(f"{where} is not {KINDS[shape]}")


@functools.cache
def record_fields(shape: Any) -> dict[str, tuple[Any, bool]]:
    """A TypedDict's fields: the type of each, and whether it is required. (Its
    ``__required_keys__`` misses ``NotRequired`` under postponed annotations, before 3.14.)"""
    fields = {}
    for name, hint in typing.get_type_hints(shape, include_extras=True).items():
        optional = typing.get_origin(hint) is NotRequired
        fields[name] = (typing.get_args(hint)[0], False) if optional else (hint, True)
    return fields


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer, read whole."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self, server: str, shape: type[T]) -> T:
        """The answer's JSON, checked to be of ``shape`` (see ``check_shape``)."""
        try:
            answer = json.loads(self.body)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise ClientError(f"{server} answered {self.status} with something not JSON") from exc
        check_shape(answer, shape)
        return cast(T, answer)


def print_nothing(_: int) -> None:
    """The progress shown when nobody watches."""


@dataclass(frozen=True, slots=True)
class Upload:
    """A request body read from ``file`` as it is sent: ``size`` bytes, ``sent`` told of each
    chunk (a progress bar)."""

    name: str
    file: BinaryIO
    size: int
    content_type: str
    sent: Callable[[int], object]


@dataclass(frozen=True, slots=True)
class Download:
    """A file's answer whose bytes are not read yet: ``chunks()`` reads them."""

    response: http.client.HTTPResponse
    server: str
    filename: str | None
    content_type: str
    size: int | None  # from Content-Length

    def chunks(self) -> Iterator[bytes]:
        """The file's bytes as they arrive; ``ServerUnreachable`` if they stop short."""
        received = 0
        while True:
            try:
                chunk = self.response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise ServerUnreachable(self.server, exc) from exc
            if not chunk:
                break
            received += len(chunk)
            yield chunk
        if self.size is not None and received != self.size:
            cut = http.client.IncompleteRead(b"", self.size - received)
            raise ServerUnreachable(self.server, cut)


class MessengerClient:
    """One method per route of API.md; errors raise ``ApiError`` or ``ServerUnreachable``.

    Each request uses a new connection, so nothing depends on a keep-alive that went stale.
    """

    def __init__(self, server: str, token: str | None = None) -> None:
        self.server = server_url(server)
        self.token = token
        parts = urlsplit(self.server)
        self._plain = parts.scheme == "http"
        self._connection_class = (
            http.client.HTTPConnection if self._plain else http.client.HTTPSConnection
        )
        self._host = parts.hostname or ""  # server_url made sure there is one
        self._port = parts.port
        self._prefix = parts.path

    # Identity

    def connect(self, user: str, password: str) -> tuple[ConnectAnswer, bool]:
        """Log in, registering ``user`` on its first connect; also whether it was created."""
        reply = self._request("POST", "/connect", body={"user": user, "password": password})
        return reply.json(self.server, ConnectAnswer), reply.status == HTTPStatus.CREATED

    def disconnect(self) -> None:
        self._request("POST", "/disconnect")

    def status(self) -> Status:
        return self._json(Status, "GET", "/status")

    # Messages

    def send(
        self,
        text: str,
        *,
        chat: str | None = None,
        to: str | None = None,
        reply_to: int | None = None,
        send_at: float | None = None,
        file_id: str | None = None,
    ) -> SendAnswer:
        """Send once: a dropped connection is retried once with the same ``client_id``."""
        body: dict[str, Any] = {"text": text, "client_id": secrets.token_urlsafe(16)}
        optional = {"chat": chat, "to": to, "reply_to": reply_to, "send_at": send_at}
        body.update({name: value for name, value in optional.items() if value is not None})
        if file_id is not None:
            body["file"] = file_id
        try:
            answer = self._json(SendAnswer, "POST", "/send", body=body)
        except ServerUnreachable as exc:
            logger.info("%s; sending again with the same client_id", exc.format_message())
            answer = self._json(SendAnswer, "POST", "/send", body=body)
        if "message" not in answer and "scheduled" not in answer:
            raise BadAnswer("answer has neither 'message' nor 'scheduled'")
        return answer

    def messages(
        self,
        *,
        since: int | None = None,
        wait: int | None = None,
        chats: list[str] | None = None,
        limit: int | None = None,
    ) -> MessagesPage:
        """Messages of the conversations ``chats`` (chat names, ``@user``, ``@``; None for
        all): without ``since`` the unread ones, else those after it, marking it read."""
        query = {"since": since, "wait": wait, "chat": chats, "limit": limit}
        timeout = REQUEST_TIMEOUT + (wait or 0)
        return self._json(MessagesPage, "GET", "/messages", query=query, timeout=timeout)

    def history(
        self, chat: str, *, before: int | None = None, limit: int | None = None
    ) -> HistoryPage:
        query = {"chat": chat, "before": before, "limit": limit}
        return self._json(HistoryPage, "GET", "/history", query=query)

    def message(self, message_id: int) -> Thread:
        return self._json(Thread, "GET", f"/messages/{message_id}")

    def scheduled(self) -> ScheduledList:
        return self._json(ScheduledList, "GET", "/scheduled")

    def cancel(self, scheduled_id: str) -> None:
        self._request("DELETE", f"/scheduled/{_segment(scheduled_id)}")

    # Chats

    def chats(self, *, after: str | None = None) -> ChatList:
        """A page of the chats the user can see, by name, after the chat ``after``."""
        return self._json(ChatList, "GET", "/chat", query={"after": after})

    def all_chats(self) -> Iterator[Chat]:
        """Every chat the user can see, by name, a page at a time; ``BadAnswer`` if a page
        does not move on (its ``next`` not after the last one: the pages would never end)."""
        after: str | None = None
        while True:
            page = self.chats(after=after)
            yield from page["chats"]
            if page["next"] is None:
                return
            if after is not None and page["next"] <= after:
                raise BadAnswer(f"the chats after {after!r} go on after {page['next']!r}")
            after = page["next"]

    def join(self, chat: str, *, private: bool = False) -> tuple[JoinAnswer, bool]:
        """Join ``chat`` (it becomes active), creating it if new; also whether it was created."""
        # "private": false would demand a public chat (409 if it is private): only send true.
        body = {"chat_name": chat, "private": True} if private else {"chat_name": chat}
        reply = self._request("POST", "/chat", body=body)
        return reply.json(self.server, JoinAnswer), reply.status == HTTPStatus.CREATED

    def leave(self, chat: str) -> ChatAnswer:
        return self._json(ChatAnswer, "POST", f"/chat/{_segment(chat)}/leave")

    def invite(self, chat: str, user: str) -> ChatAnswer:
        path = f"/chat/{_segment(chat)}/invite"
        return self._json(ChatAnswer, "POST", path, body={"user": user})

    def link(self, chat: str) -> LinkAnswer:
        return self._json(LinkAnswer, "POST", f"/chat/{_segment(chat)}/link")

    def request_join(self, token: str) -> JoinRequestAnswer:
        return self._json(JoinRequestAnswer, "POST", f"/join/{_segment(token)}")

    def requests(self, chat: str) -> RequestList:
        return self._json(RequestList, "GET", f"/chat/{_segment(chat)}/requests")

    def decide(self, chat: str, user: str, *, approve: bool) -> ChatAnswer:
        path = f"/chat/{_segment(chat)}/requests/{_segment(user)}"
        return self._json(ChatAnswer, "POST", path, body={"approve": approve})

    # Moderation and files

    def report(self, user: str, reason: str | None = None) -> ReportAnswer:
        body = {"user": user} if reason is None else {"user": user, "reason": reason}
        return self._json(ReportAnswer, "POST", "/report", body=body)

    def upload(
        self, name: str, file: BinaryIO, size: int, sent: Callable[[int], object] = print_nothing
    ) -> UploadAnswer:
        """Upload ``size`` bytes of ``file`` under ``name``, in chunks: it is never held whole.
        The server (or a proxy) may refuse it before the body is sent: then it is not."""
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        upload = Upload(name, file, size, content_type, sent)
        reply = self._request("POST", "/files", query={"name": name}, upload=upload)
        return reply.json(self.server, UploadAnswer)

    @contextlib.contextmanager
    def download(self, file_id: str) -> Iterator[Download]:
        """The answer for file ``file_id``, its bytes to read while the connection is open."""
        with self._exchange("GET", f"/files/{_segment(file_id)}", stream=True) as response:
            filename = attachment_name(response.headers.get("Content-Disposition", ""))
            content_type = response.headers.get("Content-Type", "application/octet-stream")
            yield Download(response, self.server, filename, content_type, response.length)

    # Transport

    def _json(
        self,
        shape: type[T],
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> T:
        """Make a request; its answer, checked to be of ``shape``."""
        reply = self._request(method, path, query=query, body=body, timeout=timeout)
        return reply.json(self.server, shape)

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        upload: Upload | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> Reply:
        """Send one request on a new connection and read its answer whole (MAX_ANSWER bytes
        at most)."""
        with self._exchange(
            method, path, query=query, body=body, upload=upload, timeout=timeout
        ) as response:
            return Reply(response.status, response.headers, self._read(response))

    @contextlib.contextmanager
    def _exchange(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        upload: Upload | None = None,
        timeout: float = REQUEST_TIMEOUT,
        stream: bool = False,
    ) -> Iterator[http.client.HTTPResponse]:
        """Send one request on a new connection (a JSON ``body``, or an ``upload`` sent in
        chunks) and give its answer, its body not read yet; an error status raises
        ``ApiError``. Once the request is sent, its answer has ``timeout`` seconds to come
        and be read within this block, however slowly its bytes trickle in; after that,
        ``ServerUnreachable`` (timed out). A ``stream`` (a file) has them for its head only."""
        target = self._prefix + path
        params = {name: value for name, value in (query or {}).items() if value is not None}
        if params:
            target += "?" + urlencode(params, doseq=True)  # a list: the name repeated
        headers = {"Accept": "application/json", "User-Agent": f"messenger-client/{VERSION}"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers.update({"Content-Type": JSON_TYPE, "Content-Length": str(len(data))})
        elif upload is not None:
            headers["Content-Type"] = upload.content_type
            headers["Content-Length"] = str(upload.size)
            if self._plain:  # a refusal (401, 413) then comes before the body is sent
                headers["Expect"] = "100-continue"
        elif method == "POST":
            headers["Content-Length"] = "0"
        connection = self._connection_class(self._host, self._port, timeout=timeout)
        deadline = None
        try:
            try:
                connection.putrequest(method, target, skip_accept_encoding=True)
                for name, value in headers.items():
                    connection.putheader(name, value)
                # The server may refuse a body early (413...) and close: its answer is there.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    connection.endheaders(data)
                    if upload is not None:
                        _send_upload(connection, upload, expect="Expect" in headers)
                deadline = Deadline(connection.sock, timeout)
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise ServerUnreachable(self.server, exc) from exc
            logger.debug("%s %s -> %d", method, target, response.status)
            if response.status >= 400:
                raise self._error(response.status, response.headers, self._read(response))
            if stream:
                deadline.cancel()
            yield response
            if deadline.expired:  # an answer without a length, cut short by the deadline
                raise TimeoutError
        except (ClientError, TimeoutError) as exc:
            if deadline is None or not deadline.expired:
                raise
            raise ServerUnreachable(self.server, TimeoutError()) from exc
        finally:
            if deadline is not None:
                deadline.cancel()
            connection.close()

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        """A JSON answer's body: MAX_ANSWER bytes at most, far more than any answer of the
        contract (a file's bytes are read by ``Download``, with no limit)."""
        try:
            body = response.read(MAX_ANSWER + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise ServerUnreachable(self.server, exc) from exc
        if len(body) > MAX_ANSWER:
            raise BadAnswer(f"longer than {format_size(MAX_ANSWER)}")
        if response.length:  # the connection ended before the Content-Length did
            cut = http.client.IncompleteRead(body, response.length)
            raise ServerUnreachable(self.server, cut)
        return body

    def _error(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> ApiError:
        """The error an answer means: the messenger's own JSON error, or else (a proxy's
        page, most likely) its status and a hint."""
        try:
            answer = json.loads(body)
            code, message = str(answer["error"]), str(answer["message"])
        except (ValueError, TypeError, KeyError, RecursionError):
            hint = PROXY_HINTS.get(status, PROXY_HINT)
            return ApiError(status, "http_error", f"the server answered {status}: {hint}")
        retry_after = headers.get("Retry-After", "")
        hint = ""
        if status == HTTPStatus.UNAUTHORIZED and self.token is not None:
            hint = "log in again with: connect USER"
        elif status == HTTPStatus.TOO_MANY_REQUESTS and retry_after:
            hint = f"try again in {retry_after} s"
        elif type(answer.get("until")) in (int, float):
            hint = f"until {format_time(answer['until'])}"
        wait = int(retry_after) if re.fullmatch(r"[0-9]{1,9}", retry_after) else None
        return ApiError(status, code, message, hint, wait)


class Deadline:
    """Ends the reads of a connection's socket ``seconds`` from now, by shutting it down (a
    socket's timeout bounds each read alone: a server sending a byte now and then would hold
    a request forever); ``expired`` tells whether it did. ``cancel`` stops it."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.expired = False
        self._sock = sock
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        with contextlib.suppress(OSError):  # closed meanwhile
            # socket.socket's own, for a TLS socket too: SSLSocket's drops its TLS state,
            # which a read in the other thread may be about to use.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


def _send_upload(connection: http.client.HTTPConnection, upload: Upload, *, expect: bool) -> None:
    """Send the body of ``upload`` in chunks; with ``expect``, only after the server's
    100 Continue (or a second without an answer, as curl does). Stop as soon as an answer
    comes: a refusal, the server (or a proxy in front) takes no more."""
    sock = connection.sock
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        if expect and not _continued(sock, selector):
            return
        left = upload.size
        while left and not selector.select(0):
            try:
                chunk = upload.file.read(min(CHUNK, left))
            except OSError as exc:
                raise ClientError(f"cannot read {upload.name}: {exc.strerror}") from exc
            if not chunk:
                raise ClientError(f"{upload.name} shrank while it was being sent")
            sock.sendall(chunk)
            left -= len(chunk)
            upload.sent(len(chunk))


def _continued(sock: socket.socket, selector: selectors.BaseSelector) -> bool:
    """After a request announcing ``Expect: 100-continue``: whether to send the body. The
    interim answers (1xx) are taken off the stream; a final answer is left for
    ``getresponse``, and the body is not sent."""
    while selector.select(CONTINUE_TIMEOUT):
        # An answer's status line comes in one segment: a peek shows it whole.
        status_line = sock.recv(len(b"HTTP/1.1 100"), socket.MSG_PEEK)
        if not re.fullmatch(rb"HTTP/1\.\d 1\d\d", status_line):
            return False  # a final answer, or the end of the stream
        head = b""
        while not head.endswith(b"\r\n\r\n"):  # the interim answer, a few bytes
            byte = sock.recv(1)
            if not byte:
                return False
            head += byte
        if status_line.endswith(b" 100"):
            return True
    return True


def attachment_name(disposition: str) -> str | None:
    """The file name in a Content-Disposition header; ``filename*`` wins (RFC 6266)."""
    header = email.message.Message()
    header["Content-Disposition"] = disposition
    params = header.get_params([], header="Content-Disposition")
    names = [value for key, value in params if key == "filename"]
    encoded = [value for value in names if isinstance(value, tuple)]  # filename*=UTF-8''...
    chosen = encoded or names
    return email.utils.collapse_rfc2231_value(chosen[0]) if chosen else None


def _segment(value: str) -> str:
    """One path segment, percent-encoded."""
    return quote(value, safe="")


# Output ####################################################################


def format_time(ts: float) -> str:
    """Local time: ``18:30`` today, ``2024-05-01 18:30`` on another day; ``BadAnswer`` if
    there is no such day."""
    try:
        moment = dt.datetime.fromtimestamp(ts)
    except (OverflowError, ValueError, OSError) as exc:
        raise BadAnswer(f"a time out of range: {ts}") from exc
    if moment.date() == dt.date.today():
        return moment.strftime("%H:%M")
    return moment.strftime("%Y-%m-%d %H:%M")


def format_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def format_uptime(seconds: float) -> str:
    """``3 days, 4:05:06``; ``BadAnswer`` past what a ``timedelta`` holds."""
    try:
        return str(dt.timedelta(seconds=int(seconds)))
    except OverflowError as exc:
        raise BadAnswer(f"an uptime out of range: {seconds}") from exc


def clean(text: str, *, keep_newlines: bool = True) -> str:
    """Text from others, safe for a terminal: control characters (escapes) and the marks
    that reorder text on screen (bidi overrides) are shown as codes like ``\\x1b`` or
    ``\\u202e``; newlines too unless ``keep_newlines``. Text cleaned once is left as it is."""
    return "".join(_code(char) if _unsafe(char, keep_newlines) else char for char in text)


def _code(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _unsafe(char: str, keep_newlines: bool = True) -> bool:
    if char == "\n" and keep_newlines:
        return False
    return unicodedata.category(char) == "Cc" or ord(char) in BIDI_CONTROLS


def echo(text: str = "", *, err: bool = False) -> None:
    """Print a line for people, cleaned (``clean``): every line the commands print comes
    through here, whatever strings of the server's it holds (names, notices, messages)."""
    click.echo(clean(text), err=err)


def json_text(value: object, indent: int | None = None) -> str:
    """``value`` as JSON, safe for a terminal: ``json.dumps`` escapes the C0 controls, and
    here the other characters ``clean`` shows as codes are written ``\\u0085`` too (the
    same JSON: outside its strings JSON has none of them)."""
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    return "".join(f"\\u{ord(char):04x}" if _unsafe(char) else char for char in text)


def where(chat: str | None, to: str | None, sender: str | None, me: str) -> str:
    """The conversation: the chat's name, or ``@user`` for the other one of a private exchange."""
    if chat is not None:
        return chat
    return f"@{sender if to == me else to}"


def format_message(message: Message, me: str) -> str:
    """``#12 18:30 general alice (on #9): hello [file 3: cat.png, 1.2 KiB]``, or a notice.
    Like every line of the server's strings, for ``echo`` to print (it cleans them)."""
    if message["notice"] is not None or message["from"] is None:
        return format_notice(message)
    sender = message["from"] + (f" (on #{message['reply_to']})" if message["reply_to"] else "")
    chat = where(message["chat"], message["to"], message["from"], me)
    line = f"#{message['id']} {format_time(message['ts'])} {chat} {sender}:"
    if message["text"]:
        line += " " + message["text"].replace("\n", "\n    ")
    if message["file"] is not None:
        file = message["file"]
        line += f" [file {file['id']}: {file['name']}, {format_size(file['size'])}]"
    return line


def format_notice(message: Message) -> str:
    """``#7 18:30 notice: alice invited you to plans: join plans``: what the server tells,
    and the command that acts on it."""
    line = f"#{message['id']} {format_time(message['ts'])} notice: {message['text']}"
    notice = message["notice"] or Notice(type="")
    chat, user = notice.get("chat", ""), notice.get("user", "")
    command = {
        "invited": f"join {chat}",
        "request": f"approve {chat} {user}",
        "approved": f"join {chat}",
    }.get(notice["type"])
    return f"{line}: {command}" if command else line


def unread_counts(unread: Unread, leave_out: list[str] | None = None) -> list[str]:
    """``room1 3``, ``@bob 1``, ``notices 2``: unread counts by conversation, but for the
    conversations ``leave_out`` names (``@``: every private one and the notices)."""
    skipped = leave_out or []
    private = "@" in skipped
    counts = [f"{name} {count}" for name, count in unread["chats"].items() if name not in skipped]
    counts += [f"@{name} {count}" for name, count in unread["private"].items()
               if not private and f"@{name}" not in skipped]
    if unread["notices"] and not private:
        counts.append(f"notices {unread['notices']}")
    return counts


def format_chat(chat: Chat) -> str:
    privacy = "private" if chat["private"] else "public"
    owner = f"owner {chat['owner']}" if chat["owner"] else ""
    members = plural(chat["members"], "member")
    unread = f"{chat['unread']} unread" if chat["unread"] else ""
    return f"{chat['name']:<20} {privacy:<8} {members:<12} {owner:<20} {unread}".rstrip()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def print_json(answer: object) -> None:
    click.echo(json_text(answer, indent=2))


@contextlib.contextmanager
def progress(size: int | None, label: str) -> Iterator[Callable[[int], object]]:
    """A progress bar of ``size`` bytes on stderr when it is a terminal, none when it is
    piped (or the size is unknown): the function to call with each chunk's length."""
    if size is None or not sys.stderr.isatty():
        yield print_nothing
        return
    with click.progressbar(length=size, label=clean(label), file=sys.stderr) as bar:
        yield bar.update


# Commands ##################################################################


def parse_duration(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``--in``: ``90``, ``90s``, ``10m``, ``2h`` or ``1d``, as seconds."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)([smhd]?)", value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not a duration like 90s, 10m, 2h or 1d")
    return int(match[1]) * DURATION_UNITS[match[2] or "s"]


def parse_time(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``--at``: ``18:30`` (today, or tomorrow if past) or an ISO datetime, as unix seconds."""
    if value is None:
        return None
    try:
        clock = dt.time.fromisoformat(value)
    except ValueError:
        pass
    else:
        now = dt.datetime.now(clock.tzinfo)  # naive local time unless the value has an offset
        moment = dt.datetime.combine(now.date(), clock)
        if moment <= now:
            moment += dt.timedelta(days=1)
        return moment.timestamp()
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a time like 18:30 or 2024-05-01T18:30"
        ) from None


@dataclass(slots=True)
class App:
    """The group's options, shared by every command (``pass_app``)."""

    server: str
    user: str | None
    json_output: bool
    config: Config

    def anonymous(self) -> MessengerClient:
        return MessengerClient(self.server)

    def printed_as_json(self, answer: object) -> bool:
        """With --json, print the server's answer as is; whether it did."""
        if self.json_output:
            print_json(answer)
        return self.json_output

    def login(self) -> tuple[MessengerClient, str]:
        """A client with the chosen user's saved token, and that user's name."""
        user = self.user or self.config.last_user(self.server)
        if user is None:
            raise NotLoggedIn(f"not logged in to {self.server}; log in with: connect USER")
        token = self.config.token(self.server, user)
        if token is None:
            raise NotLoggedIn(f"no saved login for {user} on {self.server}; run: connect {user}")
        return MessengerClient(self.server, token), user


pass_app = click.make_pass_decorator(App)


class MessengerGroup(click.Group):
    """The command group: Ctrl-C ends any command on a new line with status 130, and under
    ``--json`` errors are one JSON object on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            echo(err=True)  # the shell's next prompt on its own line, not after "^C"
            raise click.exceptions.Exit(INTERRUPTED) from None
        except click.Abort as exc:  # Ctrl-C at the password prompt, which ends its line
            if not isinstance(exc.__context__, KeyboardInterrupt):
                raise
            raise click.exceptions.Exit(INTERRUPTED) from None
        except click.ClickException as exc:
            if not ctx.params.get("json_output"):
                raise
            click.echo(json_text(error_details(exc)), err=True)
            raise click.exceptions.Exit(exc.exit_code) from exc


@click.group(
    cls=MessengerGroup,
    context_settings={"auto_envvar_prefix": "MESSENGER", "help_option_names": ["-h", "--help"]},
)
@click.option(
    "--server",
    metavar="URL",
    default=DEFAULT_SERVER,
    show_default=True,
    envvar="MESSENGER_SERVER",
    show_envvar=True,
    help="The server's address (http:// is assumed).",
)
@click.option(
    "--user",
    metavar="NAME",
    envvar="MESSENGER_USER",
    show_envvar=True,
    help="Which saved login to use (default: the last one connected).",
)
@click.option(
    "--json", "json_output", is_flag=True, help="Print the server's JSON answer (errors too)."
)
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="MESSENGER_CONFIG_DIR",
    show_envvar=True,
    help="Folder of the saved logins (default: the platform's app folder).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every request to stderr.")
@click.version_option(VERSION)
@click.pass_context
def cli(
    ctx: click.Context,
    *,
    server: str,
    user: str | None,
    json_output: bool,
    config_dir: Path | None,
    verbose: bool,
) -> None:
    """A command-line client for the messenger server."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    folder = config_dir or Path(click.get_app_dir("messenger"))
    ctx.obj = App(server_url(server), user, json_output, Config(folder / CONFIG_FILE))


@cli.command()
@click.argument("user")
@click.password_option(
    "--password",
    envvar="MESSENGER_PASSWORD",
    show_envvar=True,
    confirmation_prompt=False,
    help="The password (asked if not given). The first connect sets it.",
)
@pass_app
def connect(app: App, user: str, password: str) -> None:
    """Log in as USER (registering the name on its first connect) and save the token.

    A new account sees the last messages of its chat (general); an existing one, what waits
    unread in each conversation, and how to read it. The session of USER's previous saved
    login, if any, is revoked.
    """
    previous = app.config.token(app.server, user)
    answer, created = app.anonymous().connect(user, password)
    app.config.remember(app.server, answer["user"], answer["token"])
    if previous is not None:
        with contextlib.suppress(ClientError):  # already revoked, or the server went away
            MessengerClient(app.server, previous).disconnect()
    if app.printed_as_json(answer):
        return
    account = " (new account)" if created else ""
    echo(f"Connected to {app.server} as {answer['user']}{account}.")
    echo(f"Active chat: {answer['chat']}")
    if created:
        for message in answer["history"]:
            echo(format_message(message, answer["user"]))
    if not answer["unread"]:
        echo("No unread messages.")
        return
    client = MessengerClient(app.server, answer["token"])
    echo(f"Unread: {', '.join(unread_counts(client.status()['unread']))}")
    echo(f"Read them with: read ({answer['chat']} and private ones), read --chat NAME,"
         " or read --all")


@cli.command()
@pass_app
def disconnect(app: App) -> None:
    """Log out: revoke this login's token and forget it."""
    client, user = app.login()
    try:
        client.disconnect()
    except ApiError as exc:
        # A token the server no longer knows is as good as revoked.
        if exc.status != HTTPStatus.UNAUTHORIZED:
            raise
    app.config.forget(app.server, user)
    if not app.json_output:
        echo(f"Disconnected {user} from {app.server}.")


@cli.command()
@pass_app
def chats(app: App) -> None:
    """List the public chats and the private ones you belong to."""
    client, _ = app.login()
    if app.json_output:
        print_json({"chats": list(client.all_chats()), "next": None})
        return
    for chat in client.all_chats():
        echo(format_chat(chat))


@cli.command()
@click.argument("chat")
@click.option("--private", is_flag=True, help="Create it private: members join by invitation.")
@pass_app
def join(app: App, chat: str, private: bool) -> None:
    """Join CHAT, creating it if it does not exist, and make it the active chat."""
    client, user = app.login()
    answer, created = client.join(chat, private=private)
    if app.printed_as_json(answer):
        return
    joined = answer["chat"]
    privacy = "private" if joined["private"] else "public"
    verb = "Created" if created else "Joined"
    echo(f"{verb} {privacy} chat {joined['name']}; it is now your active chat.")
    for message in answer["history"]:
        echo(format_message(message, user))
    if answer["history"]:  # shown once: read does not show it again
        client.messages(since=answer["history"][-1]["id"], chats=[joined["name"]], limit=1)


@cli.command()
@click.argument("chat")
@pass_app
def leave(app: App, chat: str) -> None:
    """Leave CHAT (not general)."""
    client, _ = app.login()
    answer = client.leave(chat)
    if app.printed_as_json(answer):
        return
    echo(f"Left {answer['chat']['name']}.")


@cli.command()
@click.argument("text", required=False)
@click.option("--to", metavar="USER", help="Send a private message to USER.")
@click.option("--chat", metavar="CHAT", help="Send to CHAT (default: the active chat).")
@click.option("--reply-to", type=int, metavar="ID", help="Comment on message ID.")
@click.option(
    "--at",
    "send_at",
    metavar="TIME",
    callback=parse_time,
    help="Send at a time: 18:30 or an ISO datetime.",
)
@click.option(
    "--in",
    "delay",
    metavar="DURATION",
    callback=parse_duration,
    help="Send after a delay: 90s, 10m, 2h, 1d.",
)
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Attach a file (TEXT may then be left out).",
)
@pass_app
def send(
    app: App,
    *,
    text: str | None,
    to: str | None,
    chat: str | None,
    reply_to: int | None,
    send_at: float | None,
    delay: int | None,
    path: Path | None,
) -> None:
    """Send TEXT to the active chat, a chat, or a user; now or later."""
    if to is not None and chat is not None:
        raise click.UsageError("give --to or --chat, not both")
    if send_at is not None and delay is not None:
        raise click.UsageError("give --at or --in, not both")
    if text is None and path is None:
        raise click.UsageError("give a TEXT, a --file, or both")
    if delay is not None:
        send_at = time.time() + delay
    client, user = app.login()
    file_id = None if path is None else upload_file(client, path)
    answer = client.send(
        text or "", chat=chat, to=to, reply_to=reply_to, send_at=send_at, file_id=file_id
    )
    if app.json_output:
        print_json(answer)
    elif "scheduled" in answer:
        scheduled = answer["scheduled"]
        echo(
            f"Scheduled {scheduled['id']} for {format_time(scheduled['send_at'])}"
            f" to {where(scheduled['chat'], scheduled['to'], user, user)};"
            f" cancel it with: cancel {scheduled['id']}"
        )
    else:
        echo(format_message(answer["message"], user))


def upload_file(client: MessengerClient, path: Path) -> str:
    """Upload the file at ``path`` in chunks, with a progress bar on a terminal; its id."""
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            with progress(size, f"Sending {path.name}") as sent:
                return client.upload(path.name, file, size, sent)["file"]["id"]
    except OSError as exc:
        raise ClientError(f"cannot read {path}: {exc.strerror}") from exc


@cli.command()
@click.option("--chat", metavar="CHAT", help="Only this chat, or @USER, or @ (private ones).")
@click.option("--all", "everything", is_flag=True, help="Every conversation.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new messages until Ctrl-C.")
@pass_app
def read(app: App, chat: str | None, everything: bool, follow: bool) -> None:
    """Print the unread messages of your active chat and private ones, and mark them read.

    Then one line tells what waits unread elsewhere. --chat reads one conversation instead
    (a chat, @USER, or @ for every private one and the notices), --all every one. With
    --follow, keep printing new ones as they come (reconnecting if the server restarts, or
    while a proxy in front answers 502, 503 or 504), your own from other clients included;
    only what is printed is marked read.
    """
    if chat is not None and everything:
        raise click.UsageError("give --chat or --all, not both")
    client, user = app.login()
    attempt = Retrier(app.server, retry=follow)  # --follow waits for the server from the start
    if everything:
        chats = None
    elif chat is not None:
        chats = [chat]
    else:
        chats = [attempt(client.status)["chat"], "@"]
    seen, position = read_unread(app, client, user, chats, attempt)
    if follow:
        if app.json_output and seen:
            click.echo(json_text({"messages": seen, "next": position}))
        follow_messages(app, client, user, chats, position, attempt)
        return
    if app.json_output:
        print_json({"messages": seen, "next": position})
        return
    if not seen:
        echo("No unread messages.")
    if chats is not None:
        elsewhere = unread_counts(client.status()["unread"], chats)
        if elsewhere:
            echo(f"Unread elsewhere: {', '.join(elsewhere)} (read --chat NAME, or read --all)")


def read_unread(
    app: App, client: MessengerClient, user: str, chats: list[str] | None, attempt: Retrier
) -> tuple[list[Message], int]:
    """Print the unread messages of the conversations ``chats`` (all if None), marking read
    what was printed and nothing else; what was printed, and the position to go on from.
    Each request is made through ``attempt``."""
    seen: list[Message] = []
    position = 0  # what is printed and marked read: each page of unread ones comes after it
    while True:
        # No since: the unread ones.
        page = attempt(functools.partial(client.messages, chats=chats, limit=MAX_PAGE))
        position = next_position(page, position)
        if not page["messages"]:
            return seen, position
        seen += page["messages"]
        if not app.json_output:
            for message in page["messages"]:
                echo(format_message(message, user))
        # Everything unread up to "next" was printed: mark just that, in just those.
        attempt(functools.partial(client.messages, since=position, chats=chats, limit=1))


def next_position(page: MessagesPage, position: int) -> int:
    """The ``next`` of ``page``, asked for after ``position``, checked: its messages come
    after ``position``, and ``next`` is not before any of them (nor before ``position``).
    Else ``BadAnswer``: ``read`` would print the same messages again, maybe forever."""
    ids = [message["id"] for message in page["messages"]]
    if ids and min(ids) <= position:
        raise BadAnswer(f"message {min(ids)} when asked for those after {position}")
    if page["next"] < max([position, *ids]):
        raise BadAnswer(f"next {page['next']} is before {max([position, *ids])}")
    return page["next"]


class Retrier:
    """Makes the requests of ``read``; with ``retry`` (``--follow``), waits for the server.

    While the server is unreachable or answers 502, 503 or 504 (it restarts, or a proxy in
    front cannot reach it), say so once and try again: after RETRY_FIRST seconds, then twice
    as long each time up to RETRY_MAX, or longer if the server asks (``Retry-After``). The
    first answer after says it is back. Shared by every request of one ``read --follow``,
    its first reads included, so one outage is told once.
    """

    def __init__(self, server: str, *, retry: bool) -> None:
        self.server = server
        self.retry = retry
        self.delay = 0.0  # 0 while the server answers

    def __call__(self, request: Callable[[], T]) -> T:
        while True:
            try:
                answer = request()
            except (ServerUnreachable, ApiError) as exc:
                refused = isinstance(exc, ApiError) and exc.status not in RETRY_STATUSES
                if refused or not self.retry:
                    raise
                if not self.delay:
                    echo(f"{exc.format_message()}; waiting for it (Ctrl-C to stop)", err=True)
                self.delay = min(RETRY_MAX, self.delay * 2 or RETRY_FIRST)
                asked = exc.retry_after if isinstance(exc, ApiError) else None
                time.sleep(min(RETRY_MAX, max(self.delay, asked or 0)))
                continue
            if self.delay:
                echo(f"Reconnected to {self.server}.", err=True)
                self.delay = 0.0
            return answer


def follow_messages(
    app: App, client: MessengerClient, user: str, chats: list[str] | None, position: int,
    attempt: Retrier,
) -> None:
    """Long-poll and print messages as they come after ``position``, until Ctrl-C; each
    poll marks read what the previous one printed. ``attempt`` waits for the server while
    it is down (see ``Retrier``)."""
    while True:
        page = attempt(
            functools.partial(client.messages, since=position, wait=FOLLOW_WAIT, chats=chats)
        )
        after = next_position(page, position)  # checked first: nothing is printed twice
        if app.json_output and page["messages"]:
            click.echo(json_text(page))
        elif not app.json_output:
            for message in page["messages"]:
                echo(format_message(message, user))
        position = after


@cli.command()
@click.argument("chat")
@click.option("--before", type=int, metavar="ID", help="Only messages older than ID.")
@click.option("--limit", type=click.IntRange(1, 1000), help="How many (server default: 20).")
@pass_app
def history(app: App, chat: str, before: int | None, limit: int | None) -> None:
    """Print CHAT's last messages, from before you joined too."""
    client, user = app.login()
    answer = client.history(chat, before=before, limit=limit)
    if app.printed_as_json(answer):
        return
    for message in answer["messages"]:
        echo(format_message(message, user))
    if not answer["messages"]:
        echo(f"No messages in {chat}.")


@cli.command()
@click.argument("message_id", metavar="ID", type=int)
@pass_app
def show(app: App, message_id: int) -> None:
    """Print message ID and its comments."""
    client, user = app.login()
    answer = client.message(message_id)
    if app.printed_as_json(answer):
        return
    echo(format_message(answer["message"], user))
    for comment in answer["comments"]:
        echo("    " + format_message(comment, user))


@cli.command()
@pass_app
def status(app: App) -> None:
    """Print who you are, your unread counts, your limits and the server's state."""
    client, _ = app.login()
    answer = client.status()
    if app.printed_as_json(answer):
        return
    unread, limits, server = answer["unread"], answer["limits"], answer["server"]
    sessions = plural(answer["sessions"], "session")
    echo(f"{answer['user']} on {app.server}, {sessions}, active chat {answer['chat']}")
    counts = unread_counts(unread)
    details = f" ({', '.join(counts)})" if counts else ""
    echo(f"Unread: {unread['total']}{details}")
    echo(f"Chats: {', '.join(chat['name'] for chat in answer['chats'])}")
    reset = limits["general_reset"]
    resets = f" (resets at {format_time(reset)})" if reset is not None else ""
    echo(f"Messages left in general: {limits['general_left']}{resets}")
    echo(f"Reported by: {plural(limits['reports'], 'user')}")
    if limits["banned_until"] is not None:
        echo(f"Banned until {format_time(limits['banned_until'])}")
    echo(
        f"Server {server['version']}, up {format_uptime(server['uptime'])},"
        f" {plural(server['users'], 'user')}, {server['online']} online"
    )


@cli.command()
@pass_app
def scheduled(app: App) -> None:
    """List your scheduled messages that are not sent yet."""
    client, user = app.login()
    answer = client.scheduled()
    if app.printed_as_json(answer):
        return
    for item in answer["scheduled"]:
        text = item["text"].replace("\n", " ")
        file = f" [file {item['file']}]" if item["file"] else ""
        target = where(item["chat"], item["to"], user, user)
        echo(f"{item['id']} {format_time(item['send_at'])} {target}: {text}{file}")
    if not answer["scheduled"]:
        echo("No scheduled messages.")


@cli.command()
@click.argument("scheduled_id", metavar="ID")
@pass_app
def cancel(app: App, scheduled_id: str) -> None:
    """Cancel scheduled message ID (see: scheduled)."""
    client, _ = app.login()
    client.cancel(scheduled_id)
    if not app.json_output:
        echo(f"Cancelled {scheduled_id}.")


@cli.command()
@click.argument("user")
@click.option("--reason", help="Why, for the moderators.")
@pass_app
def report(app: App, user: str, reason: str | None) -> None:
    """Report USER; enough reports ban them from sending for a while."""
    client, _ = app.login()
    answer = client.report(user, reason)
    if app.printed_as_json(answer):
        return
    echo(f"Reported {answer['user']} ({plural(answer['reports'], 'report')}).")
    if answer["banned_until"] is not None:
        echo(f"{answer['user']} is banned until {format_time(answer['banned_until'])}.")


@cli.command()
@click.argument("chat")
@click.argument("user")
@pass_app
def invite(app: App, chat: str, user: str) -> None:
    """Invite USER to your chat CHAT; they may then join it."""
    client, _ = app.login()
    answer = client.invite(chat, user)
    if app.printed_as_json(answer):
        return
    echo(f"Invited {user} to {answer['chat']['name']}; they can now run: join {chat}")


@cli.command()
@click.argument("chat")
@pass_app
def link(app: App, chat: str) -> None:
    """Make a join link for your chat CHAT (the previous link stops working)."""
    client, _ = app.login()
    answer = client.link(chat)
    if app.printed_as_json(answer):
        return
    echo(app.server + answer["link"])


@cli.command()
@click.argument("link")
@pass_app
def request(app: App, link: str) -> None:
    """Ask to join a chat with LINK: a URL, /join/TOKEN, or the bare token."""
    token = urlsplit(link).path.rpartition("/join/")[2]
    if not token or "/" in token:
        raise click.BadParameter(f"{link!r} is not a join link", param_hint="LINK")
    client, _ = app.login()
    answer = client.request_join(token)
    if app.json_output:
        print_json(answer)
    elif answer["status"] == "member":
        echo("You are already a member of that chat.")
    else:
        echo(f"Asked to join {answer.get('chat', 'the chat')}; its owner must approve.")


@cli.command()
@click.argument("chat")
@pass_app
def requests(app: App, chat: str) -> None:
    """List the pending requests to join your chat CHAT."""
    client, _ = app.login()
    answer = client.requests(chat)
    if app.printed_as_json(answer):
        return
    for pending in answer["requests"]:
        echo(f"{pending['user']} (asked {format_time(pending['ts'])})")
    if not answer["requests"]:
        echo(f"No pending requests for {chat}.")


def decide_request(app: App, chat: str, user: str, *, approve: bool, done: str) -> None:
    """Approve or deny USER's request to join CHAT, then show the answer: as JSON, or as
    ``done`` with ``{user}`` and ``{chat}`` (the chat's name) filled in."""
    client, _ = app.login()
    answer = client.decide(chat, user, approve=approve)
    if app.printed_as_json(answer):
        return
    echo(done.format(user=user, chat=answer["chat"]["name"]))


@cli.command()
@click.argument("chat")
@click.argument("user")
@pass_app
def approve(app: App, chat: str, user: str) -> None:
    """Let USER into your chat CHAT."""
    decide_request(
        app, chat, user, approve=True, done="Approved: {user} is now a member of {chat}."
    )


@cli.command()
@click.argument("chat")
@click.argument("user")
@pass_app
def deny(app: App, chat: str, user: str) -> None:
    """Turn down USER's request to join your chat CHAT."""
    decide_request(app, chat, user, approve=False, done="Denied {user}'s request to join {chat}.")


@cli.command()
@click.argument("file_id", metavar="FILE_ID")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Where to save it (a file or a folder; default: its name, here).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@pass_app
def download(app: App, file_id: str, output: Path | None, force: bool) -> None:
    """Save the file FILE_ID (shown in messages as [file ID: name]).

    An existing file is refused before anything is fetched (or, when its name comes from the
    server, before the file's bytes are); with --force it is replaced once the download is
    complete. The file moves in chunks, with a progress bar on a terminal.
    """
    if output is not None and not force and not output.is_dir() and output.exists():
        raise ClientError(f"{output} exists; add --force to overwrite it")
    client, _ = app.login()
    with client.download(file_id) as got:
        name = saved_name(got.filename, file_id)
        target = output or Path(name)
        if target.is_dir():
            target /= name
        size = save_download(got, target, force=force)
    if app.json_output:
        print_json({"path": str(target), "size": size, "type": got.content_type})
    else:
        echo(f"Saved {target} ({format_size(size)}, {got.content_type}).")


def saved_name(filename: str | None, file_id: str) -> str:
    """The name to save a download under, from the one its uploader gave: its base name
    only (never a path somebody chose), each character ``clean`` would show as a code
    made ``_``, without leading dots (no hidden file) or spaces around; ``file-ID`` when
    nothing is left."""
    base = PurePosixPath((filename or "").replace("\\", "/")).name
    name = "".join("_" if _unsafe(char, keep_newlines=False) else char for char in base)
    return name.strip().lstrip(".").strip() or f"file-{file_id}"


def save_download(got: Download, target: Path, *, force: bool) -> int:
    """Write the bytes of ``got`` to ``target`` as they come; how many. Without ``force``
    ``target`` must not exist (checked before the first byte is read); with it, a temporary
    file beside it replaces it once complete. Nothing is left behind on failure."""
    path = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part") if force else target
    try:
        file = path.open("xb")
    except FileExistsError as exc:
        raise ClientError(f"{target} exists; add --force to overwrite it") from exc
    except OSError as exc:
        raise ClientError(f"cannot write {target}: {exc.strerror}") from exc
    written = 0
    complete = False
    try:
        with file, progress(got.size, f"Receiving {target.name}") as received:
            for chunk in got.chunks():
                file.write(chunk)
                written += len(chunk)
                received(len(chunk))
        if force:
            os.replace(path, target)
        complete = True
    except OSError as exc:
        raise ClientError(f"cannot write {target}: {exc.strerror}") from exc
    finally:
        if not complete:
            path.unlink(missing_ok=True)
    return written


if __name__ == "__main__":
    cli()
