"""Properties of the HTTP layer, checked on generated input (hypothesis)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import messenger_server as ms
from tests.conftest import Client, FakeClock, read_response

LIMITS = ms.HttpLimits()

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=20)
values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)
paths = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~%/", max_size=30).map(lambda p: "/" + p)


@st.composite
def valid_heads(draw: st.DrawFn) -> bytes:
    """A well-formed HTTP/1.1 request head (without its final CRLF CRLF)."""
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "DELETE", "PUT", "FOO"]))
    names = draw(st.lists(tokens, max_size=8, unique_by=str.lower))
    fields = [
        f"{name}:{draw(st.sampled_from(['', ' ', chr(9)]))}{draw(values)}"
        for name in names
        if name.lower() not in ("host", "content-length", "transfer-encoding", "authorization")
    ]
    lines = [f"{method} {draw(paths)} HTTP/1.1", "Host: example.com", *fields]
    return "\r\n".join(lines).encode("latin-1")


@given(head=valid_heads())
def test_parse_head_accepts_generated_valid_heads(head: bytes) -> None:
    request = ms.parse_head(head, LIMITS)
    assert request.headers["host"] == "example.com"
    assert request.keep_alive or "close" in request.headers.get("connection", "").lower()


@given(head=valid_heads(), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_partial_heads_of_a_valid_request_are_never_refused(head: bytes, cuts: list[int]) -> None:
    """However the bytes are split on the wire, each prefix may wait for the rest."""
    wire = head + b"\r\n\r\n"
    for cut in sorted({cut % len(wire) for cut in cuts}):
        prefix = wire[:cut]
        if b"\r\n\r\n" not in prefix:
            ms.check_partial_head(prefix, LIMITS)


@given(data=st.binary(max_size=300))
def test_parse_head_answers_any_bytes_with_a_request_or_a_contract_error(data: bytes) -> None:
    try:
        ms.parse_head(data, LIMITS)
    except ms.MessengerError as exc:
        assert exc.status in {400, 414, 431, 501, 505}


@given(data=st.binary(max_size=300))
def test_check_partial_head_answers_any_bytes_with_nothing_or_a_contract_error(
    data: bytes,
) -> None:
    try:
        ms.check_partial_head(data, LIMITS)
    except ms.MessengerError as exc:
        assert exc.status in {400, 414, 431}


@given(data=st.binary(max_size=300))
def test_chunked_decoder_answers_any_bytes_with_data_or_a_contract_error(data: bytes) -> None:
    decoder = ms.ChunkedDecoder(LIMITS)
    try:
        body, used = decoder.feed(data)
    except ms.MessengerError as exc:
        assert exc.status in {400, 431}
    else:
        assert 0 <= used <= len(data) and len(body) <= used


@given(
    chunks=st.lists(st.binary(min_size=1, max_size=40), max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_chunked_decoder_any_split_gives_the_same_body(
    chunks: list[bytes], cuts: list[int]
) -> None:
    wire = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    decoder = ms.ChunkedDecoder(LIMITS)
    buffer, body = bytearray(), bytearray()
    bounds = sorted({cut % (len(wire) + 1) for cut in cuts} | {len(wire)})
    start = 0
    for end in bounds:
        buffer += wire[start:end]
        start = end
        out, used = decoder.feed(buffer)
        del buffer[:used]
        body += out
    assert decoder.done and bytes(body) == b"".join(chunks) and not buffer


@pytest.mark.asyncio
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cuts=st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=5))
async def test_server_answers_a_request_split_anywhere_the_same(
    server: ms.MessengerServer, clock: FakeClock, cuts: list[int]
) -> None:
    clock.advance(60)  # the examples share one server: each logs in a login window apart
    wire = (
        b"POST /connect HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"use\r\n1c\r\nr": "zed", "password": "pw"}\r\n0\r\n\r\n'
    )
    async with Client(server.port) as client:
        start = 0
        for end in [*sorted({cut % len(wire) for cut in cuts}), len(wire)]:
            await client.send_raw(wire[start:end])
            await asyncio.sleep(0)  # let the server take this piece alone
            start = end
        response = await read_response(client.reader)
    assert response is not None and response.status in (200, 201)
    assert response.json()["user"] == "zed"
