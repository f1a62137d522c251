"""The HTTP/1.1 transport over real sockets: connections, framing, limits and timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import messenger_server as ms
from tests.conftest import (
    Client,
    FakeClock,
    RawResponse,
    assert_error,
    connect,
    make_config,
    settle,
)

LOGIN = json.dumps({"user": "alice", "password": "secret"}).encode()


# Helpers ####################################################################


def head(*lines: str) -> bytes:
    """A request head from its lines, CRLF-terminated, with the blank line."""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_head(client: Client) -> bytes:
    """The next raw response head (1xx included), as sent; it must come within 2 s."""
    return await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 2)


async def read_body(client: Client, raw_head: bytes) -> Any:
    """The JSON body that follows ``raw_head``."""
    fields = dict(
        line.split(": ", 1) for line in raw_head.decode("latin-1").lower().split("\r\n")[1:-2]
    )
    return json.loads(await client.reader.readexactly(int(fields["content-length"])))


async def response_while_trickling(client: Client, byte: bytes) -> RawResponse:
    """The response, within 3 s, while ``client`` sends ``byte`` every 20 ms (200 at most)."""

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                await client.send_raw(byte)
                await asyncio.sleep(0.02)

    dripping = asyncio.create_task(trickle())
    try:
        return await asyncio.wait_for(client.response(), 3)
    finally:
        dripping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dripping


async def health_on_a_new_connection(port: int) -> None:
    async with Client(port) as fresh:
        response = await fresh.request("GET", "/health")
        assert (response.status, response.json()) == (200, {"status": "ok"})


async def open_clients(port: int, count: int) -> list[Client]:
    clients = [Client(port) for _ in range(count)]
    for client in clients:
        await client.__aenter__()
    return clients


@pytest_asyncio.fixture
async def fast_server(tmp_path: Path, clock: FakeClock) -> AsyncIterator[ms.MessengerServer]:
    """A server with short timeouts."""
    config = make_config(tmp_path, head_timeout=0.3, body_timeout=0.3, idle_timeout=0.3)
    async with ms.MessengerServer(config, clock) as running:
        yield running


# Connections ################################################################


@pytest.mark.asyncio
async def test_keep_alive_two_requests_on_one_connection(client: Client) -> None:
    first = await client.request("POST", "/connect", LOGIN)
    assert first.status == 201
    assert "connection" not in first.headers
    token = first.json()["token"]
    second = await client.request("GET", "/status", token=token)
    assert (second.status, second.json()["user"]) == (200, "alice")


@pytest.mark.asyncio
async def test_connection_close_is_honoured(client: Client) -> None:
    response = await client.request("GET", "/health", headers={"Connection": "close"})
    assert response.status == 200
    assert response.headers["connection"].lower() == "close"
    assert await client.closed()


@pytest.mark.asyncio
async def test_http_1_0_closes_by_default(client: Client) -> None:
    await client.send_raw(head("GET /health HTTP/1.0"))
    response = await client.response()
    assert (response.status, response.json()) == (200, {"status": "ok"})
    assert await client.closed()


@pytest.mark.asyncio
async def test_http_1_0_keep_alive_on_request(client: Client) -> None:
    await client.send_raw(head("GET /health HTTP/1.0", "Connection: keep-alive"))
    response = await client.response()
    assert response.status == 200
    assert response.headers["connection"].lower() == "keep-alive"
    await client.send_raw(head("GET /health HTTP/1.0"))
    assert (await client.response()).status == 200
    assert await client.closed()


@pytest.mark.asyncio
async def test_http_1_x_minor_above_1_is_served_as_1_1(client: Client) -> None:
    await client.send_raw(head("GET /health HTTP/1.7", "Host: test"))
    assert (await client.response()).status == 200
    assert (await client.request("GET", "/health")).status == 200  # still kept alive


@pytest.mark.asyncio
async def test_absolute_form_target_is_accepted(client: Client) -> None:
    await client.send_raw(head("GET http://test/health HTTP/1.1", "Host: test"))
    response = await client.response()
    assert (response.status, response.json()) == (200, {"status": "ok"})


@pytest.mark.asyncio
async def test_pipelined_requests_answered_in_order(server: ms.MessengerServer) -> None:
    token = await connect(server.port, "alice")
    auth = f"Authorization: Bearer {token}"
    one, two = b'{"text": "one"}', b'{"text": "two"}'
    raw = (
        head("POST /send HTTP/1.1", "Host: t", auth, f"Content-Length: {len(one)}") + one
        + head("POST /send HTTP/1.1", "Host: t", auth, f"Content-Length: {len(two)}") + two
        + head("GET /messages?since=0 HTTP/1.1", "Host: t", auth)
        + head("GET /nope HTTP/1.1", "Host: t")
    )
    async with Client(server.port) as client:
        await client.send_raw(raw)
        answers = [await client.response() for _ in range(4)]
        assert [a.status for a in answers] == [201, 201, 200, 404]
        assert [a.json()["message"]["text"] for a in answers[:2]] == ["one", "two"]
        assert [m["text"] for m in answers[2].json()["messages"]] == ["one", "two"]
        assert (await client.request("GET", "/health")).status == 200


@pytest.mark.asyncio
async def test_pipelined_head_and_close(client: Client) -> None:
    get = head("GET /health HTTP/1.1", "Host: t")
    await client.send_raw(
        head("HEAD /health HTTP/1.1", "Host: t") + get
        + head("GET /health HTTP/1.1", "Host: t", "Connection: close") + get
    )
    assert (await client.response(head_only=True)).status == 200
    assert (await client.response()).json() == {"status": "ok"}
    last = await client.response()
    assert (last.status, last.headers["connection"].lower()) == (200, "close")
    assert await client.closed()  # the request after "close" is not answered


@pytest.mark.asyncio
async def test_head_health_same_headers_no_body(client: Client) -> None:
    got = await client.request("GET", "/health")
    headed = await client.request("HEAD", "/health")
    assert headed.status == 200
    assert headed.body == b""
    for name in ("content-type", "content-length"):
        assert headed.headers[name] == got.headers[name]
    assert int(headed.headers["content-length"]) == len(got.body)
    assert set(headed.headers) == set(got.headers)
    # No body followed the HEAD answer: the next answer parses cleanly.
    after = await client.request("GET", "/health")
    assert (after.status, after.json()) == (200, {"status": "ok"})


@pytest.mark.asyncio
async def test_head_works_wherever_get_does(server: ms.MessengerServer) -> None:
    token = await connect(server.port, "alice")
    async with Client(server.port) as client:
        got = await client.request("GET", "/status", token=token)
        headed = await client.request("HEAD", "/status", token=token)
        assert (headed.status, headed.body) == (200, b"")
        assert headed.headers["content-length"] == got.headers["content-length"]
        unauthorized = await client.request("HEAD", "/status")
        assert unauthorized.status == 401
        assert unauthorized.headers["www-authenticate"].startswith("Bearer")
        assert (await client.request("GET", "/health")).status == 200


# Request bodies #############################################################


@pytest.mark.asyncio
async def test_expect_100_continue_on_connect(client: Client) -> None:
    await client.send_raw(
        head("POST /connect HTTP/1.1", "Host: t", f"Content-Length: {len(LOGIN)}",
             "Expect: 100-continue")
    )
    assert await read_head(client) == b"HTTP/1.1 100 Continue\r\n\r\n"
    await client.send_raw(LOGIN)
    response = await client.response()
    assert (response.status, response.json()["user"]) == (201, "alice")
    assert (await client.request("GET", "/health")).status == 200


@pytest.mark.asyncio
async def test_expect_100_continue_missing_token_answers_401_at_once(client: Client) -> None:
    body = b'{"text": "hi"}'
    await client.send_raw(
        head("POST /send HTTP/1.1", "Host: t", f"Content-Length: {len(body)}",
             "Expect: 100-continue")
    )
    first = await read_head(client)
    assert first.startswith(b"HTTP/1.1 401 "), first
    assert b"www-authenticate: bearer" in first.lower()
    assert (await read_body(client, first))["error"] == "unauthorized"
    assert await client.closed()


@pytest.mark.asyncio
async def test_expect_100_continue_too_large_answers_413_at_once(client: Client) -> None:
    await client.send_raw(
        head("POST /connect HTTP/1.1", "Host: t", "Content-Length: 100000",
             "Expect: 100-continue")
    )
    first = await read_head(client)
    assert first.startswith(b"HTTP/1.1 413 "), first
    assert (await read_body(client, first))["error"] == "too_large"
    assert await client.closed()


@pytest.mark.asyncio
async def test_chunked_request_body(client: Client) -> None:
    half = len(LOGIN) // 2
    chunks = [LOGIN[:half], LOGIN[half:]]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    await client.send_raw(
        head("POST /connect HTTP/1.1", "Host: t", "Transfer-Encoding: chunked") + body
    )
    response = await client.response()
    assert (response.status, response.json()["user"]) == (201, "alice")
    assert (await client.request("GET", "/health")).status == 200


@pytest.mark.asyncio
async def test_chunked_body_with_extension_and_trailer(client: Client) -> None:
    body = b"%x;name=value\r\n%s\r\n0\r\nX-Trailer: yes\r\n\r\n" % (len(LOGIN), LOGIN)
    await client.send_raw(
        head("POST /connect HTTP/1.1", "Host: t", "Transfer-Encoding: chunked") + body
    )
    assert (await client.response()).status == 201
    assert (await client.request("GET", "/health")).status == 200


@pytest.mark.asyncio
async def test_unread_body_is_skipped_on_keep_alive(client: Client) -> None:
    response = await client.request("POST", "/send", b'{"text": "no token"}')
    assert_error(response, 401, "unauthorized", "this route needs Authorization: Bearer <token>")
    assert (await client.request("GET", "/health")).status == 200


# Transport errors ###########################################################

POST_CONNECT = "POST /connect HTTP/1.1"
# (raw request, status, code): each error closes the connection.
TRANSPORT_ERRORS: dict[str, tuple[bytes, int, str, str]] = {
    "cl-and-te": (
        head(POST_CONNECT, "Host: t", "Content-Length: 5", "Transfer-Encoding: chunked")
        + b"0\r\n\r\n", 400, "bad_request", "Content-Length and Transfer-Encoding together"),
    "te-and-cl": (
        head(POST_CONNECT, "Host: t", "Transfer-Encoding: chunked", "Content-Length: 5")
        + b"0\r\n\r\n", 400, "bad_request", "Content-Length and Transfer-Encoding together"),
    "chunked-not-last": (
        head(POST_CONNECT, "Host: t", "Transfer-Encoding: chunked, gzip"), 400, "bad_request",
        "chunked must be the last transfer coding, once"),
    "chunked-twice": (
        head(POST_CONNECT, "Host: t", "Transfer-Encoding: chunked, chunked"), 400,
        "bad_request", "chunked must be the last transfer coding, once"),
    "conflicting-content-length": (
        head(POST_CONNECT, "Host: t", "Content-Length: 5", "Content-Length: 6") + b"123456",
        400, "bad_request", "the content-length header appears twice"),
    "content-length-list": (
        head(POST_CONNECT, "Host: t", "Content-Length: 5, 6") + b"123456", 400,
        "bad_request", "Content-Length must be decimal digits"),
    "content-length-sign": (
        head(POST_CONNECT, "Host: t", "Content-Length: +5") + b"12345", 400, "bad_request",
        "Content-Length must be decimal digits"),
    "content-length-hex": (
        head(POST_CONNECT, "Host: t", "Content-Length: 0x5") + b"12345", 400, "bad_request",
        "Content-Length must be decimal digits"),
    "chunk-size-not-hex": (
        head(POST_CONNECT, "Host: t", "Transfer-Encoding: chunked") + b"zz\r\nab\r\n0\r\n\r\n",
        400, "bad_request", "malformed chunk size line"),
    "chunk-size-signed": (
        head(POST_CONNECT, "Host: t", "Transfer-Encoding: chunked") + b"-1\r\nab\r\n0\r\n\r\n",
        400, "bad_request", "malformed chunk size line"),
    "chunk-size-0x": (
        head(POST_CONNECT, "Host: t", "Transfer-Encoding: chunked") + b"0x2\r\nab\r\n0\r\n\r\n",
        400, "bad_request", "malformed chunk size line"),
    "cr-in-value": (head("GET /health HTTP/1.1", "Host: t", "X-A: a\rb"), 400, "bad_request",
                    "malformed header line"),
    "space-before-colon": (head("GET /health HTTP/1.1", "Host : t"), 400, "bad_request",
                           "malformed header line"),
    "folded-line": (head("GET /health HTTP/1.1", "Host: t", "X-A: b", " c"), 400,
                    "bad_request", "malformed header line"),
    "bare-lf": (b"GET /health HTTP/1.1\nHost: t\n\n", 400, "bad_request",
                "malformed request line"),
    "nul-in-value": (head("GET /health HTTP/1.1", "Host: t", "X-A: a\x00b"), 400,
                     "bad_request", "malformed header line"),
    "fragment": (head("GET /health#x HTTP/1.1", "Host: t"), 400, "bad_request",
                 "the request target must not hold a fragment (#)"),
    "no-host": (head("GET /health HTTP/1.1"), 400, "bad_request",
                "HTTP/1.1 requests need a Host header"),
    "two-hosts": (head("GET /health HTTP/1.1", "Host: a", "Host: b"), 400, "bad_request",
                  "the host header appears twice"),
    "malformed-version": (head("GET /health HTTP/1", "Host: t"), 400, "bad_request",
                          "malformed HTTP version"),
    "lowercase-version": (head("GET /health http/1.1", "Host: t"), 400, "bad_request",
                          "malformed HTTP version"),
    "gzip-chunked": (
        head(POST_CONNECT, "Host: t", "Transfer-Encoding: gzip, chunked"), 501,
        "not_implemented", "only the chunked transfer coding is supported"),
    "unknown-coding": (head(POST_CONNECT, "Host: t", "Transfer-Encoding: x-foo"), 501,
                       "not_implemented", "only the chunked transfer coding is supported"),
    "http-2": (head("GET /health HTTP/2.0", "Host: t"), 505, "http_version",
               "only HTTP/1.x is served"),
    "http-3": (head("GET /health HTTP/3.0", "Host: t"), 505, "http_version",
               "only HTTP/1.x is served"),
    "request-line-too-long": (
        head("GET /" + "a" * 9000 + " HTTP/1.1", "Host: t"), 414, "uri_too_long",
        "the request line is longer than 8192 bytes"),
    "header-line-too-long": (
        head("GET /health HTTP/1.1", "Host: t", "X-Big: " + "a" * 9000), 431,
        "headers_too_large", "a header line is longer than 8192 bytes"),
    "too-many-headers": (
        head("GET /health HTTP/1.1", "Host: t", *(f"X-{n}: v" for n in range(100))), 431,
        "headers_too_large", "more than 100 header lines"),
    "head-too-large": (
        head("GET /health HTTP/1.1", "Host: t", *(f"X-{n}: {'v' * 7000}" for n in range(5))),
        431, "headers_too_large", "the request head is larger than 32768 bytes"),
    "body-too-large": (
        head(POST_CONNECT, "Host: t", "Content-Length: 70000"), 413, "too_large",
        "the body is larger than 65536 bytes"),
    "chunked-too-large": (
        head(POST_CONNECT, "Host: t", "Transfer-Encoding: chunked") + b"10001\r\n", 413,
        "too_large", "the body is larger than 65536 bytes"),
    "chunked-too-large-whole": (
        head(POST_CONNECT, "Host: t", "Transfer-Encoding: chunked")
        + b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(70)) + b"0\r\n\r\n",
        413, "too_large", "the body is larger than 65536 bytes"),
}
TRANSPORT_ERROR_PARAMS = [pytest.param(*case, id=name) for name, case in TRANSPORT_ERRORS.items()]


@pytest.mark.asyncio
@pytest.mark.parametrize(("raw", "status", "code", "message"), TRANSPORT_ERROR_PARAMS)
async def test_transport_error_answers_and_closes(
    tmp_path: Path, clock: FakeClock, raw: bytes, status: int, code: str, message: str
) -> None:
    # A short body timeout: a server that waits for a body it should refuse answers 408 soon.
    config = make_config(tmp_path, body_timeout=1.0)
    async with ms.MessengerServer(config, clock) as server:
        await _error_answers_and_closes(server, raw, status, code, message)


async def _error_answers_and_closes(
    server: ms.MessengerServer, raw: bytes, status: int, code: str, message: str
) -> None:
    async with Client(server.port) as client:
        await client.send_raw(raw)
        assert_error(await client.response(), status, code, message)
        assert await client.closed()
    await health_on_a_new_connection(server.port)


@pytest.mark.asyncio
async def test_transport_limits_are_inclusive(server: ms.MessengerServer) -> None:
    async with Client(server.port) as client:
        target = "/health?" + "a" * (8 * 1024 - len("GET /health? HTTP/1.1"))
        await client.send_raw(head(f"GET {target} HTTP/1.1", "Host: t"))
        assert (await client.response()).status == 200
        headers = [f"X-{n}: v" for n in range(99)]
        await client.send_raw(head("GET /health HTTP/1.1", "Host: t", *headers))
        assert (await client.response()).status == 200


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["FOO", "get"])
async def test_transport_unknown_method_501(server: ms.MessengerServer, method: str) -> None:
    async with Client(server.port) as client:
        await client.send_raw(head(f"{method} /health HTTP/1.1", "Host: t"))
        unknown = f"the method {method} is not implemented"
        assert_error(await client.response(), 501, "not_implemented", unknown)
    await health_on_a_new_connection(server.port)


@pytest.mark.asyncio
async def test_transport_smuggled_request_is_never_answered(
    server: ms.MessengerServer,
) -> None:
    smuggled = head("GET /health HTTP/1.1", "Host: t")
    raw = (
        head(POST_CONNECT, "Host: t", f"Content-Length: {5 + len(smuggled)}",
             "Transfer-Encoding: chunked")
        + b"0\r\n\r\n" + smuggled
    )
    async with Client(server.port) as client:
        await client.send_raw(raw)
        assert_error(
            await client.response(), 400, "bad_request",
            "Content-Length and Transfer-Encoding together"
        )
        assert await client.closed()


# Timeouts ###################################################################


@pytest.mark.asyncio
async def test_slowloris_head_gets_408_and_close(fast_server: ms.MessengerServer) -> None:
    loop = asyncio.get_running_loop()
    async with Client(fast_server.port) as client:
        started = loop.time()
        await client.send_raw(b"GET /health HTTP/1.1\r\nHo")
        response = await client.response()
        assert_error(response, 408, "timeout", "the request head did not arrive in time")
        assert response.headers["connection"].lower() == "close"
        assert await client.closed()
        assert 0.25 <= loop.time() - started < 2
    await health_on_a_new_connection(fast_server.port)


@pytest.mark.asyncio
async def test_slow_head_deadline_is_for_the_whole_head(
    fast_server: ms.MessengerServer,
) -> None:
    """Bytes that keep trickling in do not extend the head's deadline: the 408 comes within
    response_while_trickling's 3 s, long before the 4 s the trickle would last."""
    async with Client(fast_server.port) as client:
        await client.send_raw(b"GET /health HTTP/1.1\r\n")
        response = await response_while_trickling(client, b"X")
        assert_error(response, 408, "timeout", "the request head did not arrive in time")


@pytest.mark.asyncio
async def test_stalled_body_gets_408_and_close(fast_server: ms.MessengerServer) -> None:
    async with Client(fast_server.port) as client:
        await client.send_raw(head(POST_CONNECT, "Host: t", "Content-Length: 100") + b'{"us')
        assert_error(
            await client.response(), 408, "timeout", "the request body did not arrive in time"
        )
        assert await client.closed()
    await health_on_a_new_connection(fast_server.port)


@pytest.mark.asyncio
async def test_slow_body_deadline_is_for_the_whole_body(
    fast_server: ms.MessengerServer,
) -> None:
    """A body that keeps trickling in still has to be complete within body_timeout: the 408
    comes within response_while_trickling's 3 s, long before the 4 s the trickle would last."""
    async with Client(fast_server.port) as client:
        await client.send_raw(head(POST_CONNECT, "Host: t", "Content-Length: 1000"))
        response = await response_while_trickling(client, b" ")
        assert_error(response, 408, "timeout", "the request body did not arrive in time")


@pytest.mark.asyncio
async def test_stalled_chunked_body_gets_408(fast_server: ms.MessengerServer) -> None:
    async with Client(fast_server.port) as client:
        await client.send_raw(
            head(POST_CONNECT, "Host: t", "Transfer-Encoding: chunked") + b"10\r\n{\"us"
        )
        assert_error(
            await client.response(), 408, "timeout", "the request body did not arrive in time"
        )
        assert await client.closed()


@pytest.mark.asyncio
async def test_idle_keep_alive_connection_is_closed(fast_server: ms.MessengerServer) -> None:
    loop = asyncio.get_running_loop()
    async with Client(fast_server.port) as client:
        assert (await client.request("GET", "/health")).status == 200
        assert (await client.request("GET", "/health")).status == 200
        idle_from = loop.time()
        assert await client.closed()
        assert 0.25 <= loop.time() - idle_from < 2


@pytest.mark.asyncio
async def test_a_connection_that_sends_nothing_goes_after_the_head_timeout(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Found by review: a socket that never sent a byte held its place for the idle timeout
    (75 s), so a few addresses reconnecting kept --max-connections full. Its first request
    gets as long as a head does; then a keep-alive connection idles up to the idle timeout."""
    config = make_config(tmp_path, head_timeout=0.3, idle_timeout=30.0)
    async with ms.MessengerServer(config, clock) as server:
        loop = asyncio.get_running_loop()
        async with Client(server.port) as silent, Client(server.port) as used:
            opened = loop.time()
            assert (await used.request("GET", "/health")).status == 200
            assert await silent.closed()
            assert 0.25 <= loop.time() - opened < 2
            # Past the head timeout too, the connection that made a request is still served.
            assert (await used.request("GET", "/health")).status == 200


@pytest.mark.asyncio
async def test_long_poll_is_not_idle(tmp_path: Path, clock: FakeClock) -> None:
    """A request being answered is not an idle connection, whatever the idle timeout."""
    config = make_config(tmp_path, idle_timeout=0.2)
    async with ms.MessengerServer(config, clock) as server:
        token = await connect(server.port, "alice")
        async with Client(server.port) as client:
            response = await client.request("GET", "/messages?wait=0.5", token=token)
            assert response.status == 200


# Connection cap #############################################################


@pytest.mark.asyncio
async def test_per_ip_cap_refuses_the_extra_connection(
    tmp_path: Path, clock: FakeClock
) -> None:
    config = make_config(tmp_path, max_connections_per_ip=3)
    async with ms.MessengerServer(config, clock) as server:
        clients = await open_clients(server.port, 3)
        try:
            for client in clients:
                assert (await client.request("GET", "/health")).status == 200
            async with Client(server.port) as fourth:
                response = await fourth.response()
                assert_error(
                    response, 503, "unavailable", "too many open connections from your address"
                )
                assert response.headers["connection"].lower() == "close"
                assert await fourth.closed()
            for client in clients:
                assert (await client.request("GET", "/health")).status == 200
        finally:
            for client in clients:
                await client.__aexit__(None, None, None)


@pytest.mark.asyncio
async def test_per_ip_cap_frees_a_slot_when_one_closes(tmp_path: Path, clock: FakeClock) -> None:
    config = make_config(tmp_path, max_connections_per_ip=2)
    async with ms.MessengerServer(config, clock) as server:
        clients = await open_clients(server.port, 2)
        try:
            for client in clients:
                assert (await client.request("GET", "/health")).status == 200
            await clients[0].__aexit__(None, None, None)
            # The server notices the close soon; no event says when.
            assert await settle(lambda: server._per_address.get("127.0.0.1", 0) < 2)
            await health_on_a_new_connection(server.port)
        finally:
            await clients[1].__aexit__(None, None, None)


# Found by review ############################################################


@pytest.mark.asyncio
async def test_a_refused_upload_still_being_sent_gets_its_413_and_no_reset(
    server: ms.MessengerServer,
) -> None:
    """The server stops writing, then takes in what the client still sends for a moment:
    the client can finish its write and read the answer, instead of a reset."""
    token = await connect(server.port, "alice")
    async with Client(server.port) as client:
        await client.send_raw(
            head("POST /files?name=big HTTP/1.1", "Host: t", f"Authorization: Bearer {token}",
                 f"Content-Length: {100 * 1024 * 1024}")
        )
        assert_error(
            await client.response(), 413, "too_large", "files are limited to 5242880 bytes"
        )
        for _ in range(16):  # a client busy with its upload, not yet reading the answer
            await client.send_raw(b"x" * 65536)
        assert await client.closed()


@pytest.mark.asyncio
async def test_a_client_reset_in_the_middle_of_a_body_is_no_server_error(
    server: ms.MessengerServer, caplog: pytest.LogCaptureFixture
) -> None:
    token = await connect(server.port, "alice")
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        head("POST /send HTTP/1.1", "Host: t", f"Authorization: Bearer {token}",
             "Content-Length: 100") + b'{"te'
    )
    await writer.drain()
    assert await settle(lambda: any(c.phase == ms.Phase.BODY for c in server._connections), 2)
    linger_zero = struct.pack("ii", 1, 0)  # close() then sends a reset, not a clean end
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
    writer.transport.abort()
    assert await settle(lambda: not server._connections, 2)
    async with Client(server.port) as client:  # the server lives on and answers
        assert (await client.request("GET", "/health")).status == 200
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]


@pytest.mark.asyncio
async def test_a_long_poll_followed_by_a_pipelined_request_answers_both_at_once(
    server: ms.MessengerServer,
) -> None:
    token = await connect(server.port, "alice")
    async with Client(server.port) as client:
        await client.send_raw(
            head("GET /messages?wait=30 HTTP/1.1", "Host: t", f"Authorization: Bearer {token}")
            + head("GET /health HTTP/1.1", "Host: t")
        )
        async with asyncio.timeout(5):  # not the 30 s of the wait
            polled = await client.response()
            health = await client.response()
    assert (polled.status, polled.json()["messages"], health.status) == (200, [], 200)


@pytest.mark.asyncio
@pytest.mark.parametrize("target", ["/health", "/nowhere", "/files?name=f"])
async def test_a_body_larger_than_any_route_takes_is_a_413(
    server: ms.MessengerServer, target: str
) -> None:
    """Whatever the route, and without a token: such a body could never be read."""
    too_big = server.config.largest_body + 1
    async with Client(server.port) as client:
        await client.send_raw(
            head(f"POST {target} HTTP/1.1", "Host: t", f"Content-Length: {too_big}")
        )
        too_large = "the body is larger than" if target.startswith("/files") else (
            "no route takes a body over"
        )
        assert_error(await client.response(), 413, "too_large", too_large)
        assert await client.closed()


@pytest.mark.asyncio
async def test_a_body_within_the_limits_keeps_the_order_of_checks(
    server: ms.MessengerServer,
) -> None:
    """Route, then token, then body: a 100 KiB body without a token is a 401, and the
    connection lives on, the body skipped."""
    async with Client(server.port) as client:
        response = await client.request("POST", "/send", b"x" * 100 * 1024)
        assert_error(
            response, 401, "unauthorized", "this route needs Authorization: Bearer <token>"
        )
        assert (await client.request("GET", "/health")).status == 200
