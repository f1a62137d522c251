"""Fixtures: a real server on an ephemeral port, a raw HTTP/1.1 client for it (``Client``,
and ``call`` for one request), a user of it (``Api``, from ``login``), the contract's error
check, and server processes (``spawn``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import pytest
import pytest_asyncio

import messenger_server as ms
from tests.servers import ServerProcess, Spawn

JSON_TYPE = "application/json; charset=utf-8"


@dataclasses.dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(
    reader: asyncio.StreamReader, *, head_only: bool = False
) -> RawResponse | None:
    """One response from the stream (1xx skipped); None if the server closed first."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            assert not exc.partial, f"response cut short: {exc.partial!r}"
            return None
        except ConnectionResetError:
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        if int(status) >= 200:
            break
    length = int(headers.get("content-length", "0"))
    body = b"" if head_only else await reader.readexactly(length)
    return RawResponse(int(status), headers, body)


async def at_eof(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the stream (waits for the close, up to 5 s)."""
    try:
        data = await asyncio.wait_for(reader.read(1), 5)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return data == b""


class Client:
    """Raw HTTP/1.1 on one connection to the test server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def __aenter__(self) -> Client:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.writer.close()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head_only: bool = False) -> RawResponse:
        response = await read_response(self.reader, head_only=head_only)
        assert response is not None, "the server closed the connection"
        return response

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> RawResponse:
        if body is None or isinstance(body, bytes):
            data = body or b""
        else:
            data = json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", "Host: test"]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
        if data or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(data)}")
        await self.send_raw(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        return await self.response(head_only=method == "HEAD")

    async def closed(self) -> bool:
        return await at_eof(self.reader)


class SourceClient(Client):
    """A ``Client`` whose connection leaves from a chosen loopback address (127.0.0.x)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        super().__init__(port)
        self.source = source

    async def __aenter__(self) -> SourceClient:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(self.source, 0)
        )
        return self


async def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> RawResponse:
    """One request on a fresh connection."""
    async with Client(port) as client:
        return await client.request(method, path, body, token=token, headers=headers)


def json_body(response: RawResponse) -> Any:
    """The body of a 200 answer in JSON."""
    assert response.status == 200, response.body
    assert response.headers["content-type"] == JSON_TYPE
    return response.json()


def assert_contract_error(response: RawResponse, status: int) -> dict[str, Any]:
    """Only the contract's error shape: ``status``, JSON whose ``error`` and ``message`` are
    strings that say something; the body. For generated requests, whose error no test can
    name; a test that knows the request names its error with ``assert_error``."""
    assert response.status == status, (response.status, response.body[:300])
    assert response.headers["content-type"] == JSON_TYPE
    body: dict[str, Any] = response.json()
    assert isinstance(body["error"], str) and isinstance(body["message"], str), body
    assert body["error"] and body["message"], body
    return body


def assert_error(
    response: RawResponse, status: int | set[int], code: str | set[str], message: str
) -> dict[str, Any]:
    """The contract's error: the status (or one of a set), JSON whose ``error`` is the code
    (or one of a set) and whose ``message`` says ``message`` (a part of it); the body."""
    statuses = {status} if isinstance(status, int) else status
    assert response.status in statuses, (response.status, response.body[:300])
    assert response.headers["content-type"] == JSON_TYPE
    body: dict[str, Any] = response.json()
    assert isinstance(body["error"], str) and isinstance(body["message"], str), body
    codes = {code} if isinstance(code, str) else code
    assert body["error"] in codes, body
    assert message and message in body["message"], (message, body)
    return body


class FakeClock:
    """An injectable clock: tests move time with ``advance`` instead of sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


TRUSTING: Final = {"forwarded_allow_ips": ms.parse_networks("127.0.0.1")}  # a local proxy


def make_config(tmp_path: Path, **overrides: Any) -> ms.ServerConfig:
    """A server configuration for tests: port 0, state in a temporary folder, cheap scrypt."""
    config = ms.ServerConfig(port=0, state_dir=tmp_path / "state", password_cost=4)
    return dataclasses.replace(config, **overrides)


def opened(config: ms.ServerConfig, clock: Callable[[], float]) -> ms.MessengerServer:
    """A server that holds its state folder and has loaded it, but does not listen."""
    server = ms.MessengerServer(config, clock)
    server.open()
    return server


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture
async def server(tmp_path: Path, clock: FakeClock) -> AsyncIterator[ms.MessengerServer]:
    async with ms.MessengerServer(make_config(tmp_path, **TRUSTING), clock) as running:
        yield running


@pytest_asyncio.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Starts server processes (``spawn(*flags, state_dir=..., open_files=...)``); kills
    what is left."""
    started: list[ServerProcess] = []

    async def start(
        *flags: str, state_dir: Path | None = None, open_files: int | None = None
    ) -> ServerProcess:
        process = ServerProcess(state_dir or tmp_path / "state", *flags, open_files=open_files)
        started.append(process)
        await process.start()
        return process

    yield start
    for process in started:
        await process.ensure_dead()


@pytest_asyncio.fixture
async def client(server: ms.MessengerServer) -> AsyncIterator[Client]:
    async with Client(server.port) as connected:
        yield connected


async def connect(
    port: int, user: str, password: str = "secret", *, address: str | None = None
) -> str:
    """Connect ``user`` (registering it on first use) and return its token; ``address``
    is the client's as a proxy forwards it (to a server that trusts 127.0.0.1: see
    ``TRUSTING``)."""
    headers = None if address is None else {"X-Forwarded-For": address}
    response = await call(
        port, "POST", "/connect", {"user": user, "password": password}, headers=headers
    )
    assert response.status in (200, 201), response.body
    token: str = response.json()["token"]
    return token


@dataclasses.dataclass(frozen=True)
class Api:
    """One user of the server: its token, and a fresh connection per request."""

    port: int
    name: str
    token: str

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> RawResponse:
        return await call(self.port, method, path, body, token=self.token, headers=headers)

    async def get(self, path: str) -> RawResponse:
        return await self.call("GET", path)

    async def post(self, path: str, body: Any = None) -> RawResponse:
        return await self.call("POST", path, {} if body is None else body)

    async def json(self, path: str) -> Any:
        """GET ``path``, which must answer 200 with JSON; the body."""
        return json_body(await self.get(path))

    async def send(self, text: str = "hello", **fields: Any) -> RawResponse:
        return await self.post("/send", {"text": text, **fields})

    async def posted(self, text: str = "hello", **fields: Any) -> dict[str, Any]:
        """Send a message that must be accepted now; return it."""
        response = await self.send(text, **fields)
        assert response.status == 201, response.body
        message: dict[str, Any] = response.json()["message"]
        return message

    async def join(self, chat: str, **fields: Any) -> RawResponse:
        """POST /chat: create or join ``chat`` and make it the active chat."""
        return await self.post("/chat", {"chat_name": chat, **fields})

    async def messages(self, path: str) -> list[dict[str, Any]]:
        """The messages a GET of ``path`` (/messages or /history) answers."""
        messages: list[dict[str, Any]] = (await self.json(path))["messages"]
        return messages

    async def texts(self, path: str) -> list[str]:
        return [message["text"] for message in await self.messages(path)]

    async def seen(self) -> list[dict[str, Any]]:
        """Everything the user can see in /messages (``since=0`` marks nothing read)."""
        return await self.messages("/messages?since=0&limit=1000")

    async def seen_texts(self) -> list[str]:
        return [message["text"] for message in await self.seen()]

    async def history(self, chat: str = "general") -> list[str]:
        return await self.texts(f"/history?chat={chat}&limit=1000")

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self.json("/status")
        return status

    async def scheduled(self) -> list[dict[str, Any]]:
        pending: list[dict[str, Any]] = (await self.json("/scheduled"))["scheduled"]
        return sorted(pending, key=lambda record: record["send_at"])

    async def chat_names(self) -> set[str]:
        return {chat["name"] for chat in (await self.json("/chat"))["chats"]}

    async def upload(
        self, data: bytes, name: str = "blob.bin", media_type: str = "application/octet-stream"
    ) -> RawResponse:
        return await self.call(
            "POST", f"/files?name={quote(name, safe='')}", data,
            headers={"Content-Type": media_type},
        )

    async def uploaded(
        self, data: bytes, name: str = "blob.bin", media_type: str = "application/octet-stream"
    ) -> dict[str, Any]:
        """Upload a file that must be stored; its record."""
        response = await self.upload(data, name, media_type)
        assert response.status == 201, response.body
        record: dict[str, Any] = response.json()["file"]
        return record

    def on(self, server: ms.MessengerServer) -> Api:
        """The same user (same token) on another server instance."""
        return dataclasses.replace(self, port=server.port)


async def login(
    server: ms.MessengerServer, *names: str, password: str = "secret", apart: bool = False
) -> list[Api]:
    """Connect each name (registering it on first use; a name twice is two sessions).
    ``apart``: each from its own address (10.0.0.1, 10.0.0.2…), through the proxy a
    ``TRUSTING`` server believes, as strangers are (a ban counts reporters by address)."""
    return [
        Api(server.port, name, await connect(
            server.port, name, password, address=f"10.0.0.{number}" if apart else None
        ))
        for number, name in enumerate(names, 1)
    ]


async def settle(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Wait until ``predicate`` holds, for states that offer no event to await (a count in
    the server, a child process's /proc); False if ``seconds`` pass first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def waiting(server: ms.MessengerServer, user: str) -> Callable[[], bool]:
    """Whether ``user`` has a long poll parked in ``server`` (a predicate for ``settle``)."""
    return lambda: bool(server.app.waiters._by_user.get(user))


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that really fills up (needs root, as CI and developers are)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True, check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_up(folder: Path) -> Path:
    """Write a file until the disk is full; return it (unlink it to free the space)."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)
    return filler


class Restarter:
    """A server on a state folder of its own, stopped and started again on demand."""

    def __init__(self, config: ms.ServerConfig, clock: FakeClock) -> None:
        self.config = config
        self.clock = clock
        self.server = opened(config, clock)

    async def restart(self) -> ms.MessengerServer:
        await self.server.stop()
        self.server = opened(self.config, self.clock)
        await self.server.start()
        return self.server


@pytest_asyncio.fixture
async def restartable(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Restarter]:
    restarter = Restarter(make_config(tmp_path, **TRUSTING), clock)
    await restarter.server.start()
    yield restarter
    await restarter.server.stop()
