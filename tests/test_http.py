"""The HTTP/1.1 layer without sockets: parser, chunked decoder, serializer, router."""

from __future__ import annotations

import re
from http import HTTPStatus

import pytest

import messenger_server as ms

FRAGMENT = "the request target must not hold a fragment (#)"
LIMITS = ms.HttpLimits()


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1")


# Request line and headers ###################################################


def test_parse_head_simple_get() -> None:
    request = ms.parse_head(head("GET /health?x=1 HTTP/1.1", "Host: a"), LIMITS)
    assert (request.method, request.path, request.query, request.minor) == (
        "GET",
        "/health",
        "x=1",
        1,
    )
    assert request.keep_alive and not request.has_body


def test_parse_head_lowercases_names_and_keeps_obs_text() -> None:
    request = ms.parse_head(head("GET / HTTP/1.1", "Host: a", "X-Name: D\xfcsseldorf "), LIMITS)
    assert request.headers["x-name"] == "D\xfcsseldorf"


def test_parse_head_joins_repeated_list_fields() -> None:
    request = ms.parse_head(head("GET / HTTP/1.1", "Host: a", "Accept: a", "Accept: b"), LIMITS)
    assert request.headers["accept"] == "a, b"


@pytest.mark.parametrize(
    ("lines", "keep_alive"),
    [
        (["GET / HTTP/1.1", "Host: a"], True),
        (["GET / HTTP/1.1", "Host: a", "Connection: close"], False),
        (["GET / HTTP/1.1", "Host: a", "Connection: keep-alive, CLOSE"], False),
        (["GET / HTTP/1.0"], False),
        (["GET / HTTP/1.0", "Connection: keep-alive"], True),
        (["GET / HTTP/1.9", "Host: a"], True),
    ],
)
def test_parse_head_keep_alive(lines: list[str], keep_alive: bool) -> None:
    assert ms.parse_head(head(*lines), LIMITS).keep_alive is keep_alive


def test_parse_head_higher_minor_version_is_served_as_1_1() -> None:
    assert ms.parse_head(head("GET / HTTP/1.7", "Host: a"), LIMITS).minor == 1


@pytest.mark.parametrize(
    "target",
    ["http://example.com/health?x=1", "HTTP://example.com:80/health?x=1", "https://h/health?x=1"],
)
def test_parse_head_absolute_form(target: str) -> None:
    request = ms.parse_head(head(f"GET {target} HTTP/1.1", "Host: other"), LIMITS)
    assert (request.path, request.query) == ("/health", "x=1")


def test_parse_head_absolute_form_without_path_is_root() -> None:
    assert ms.parse_head(head("GET http://h?q HTTP/1.1", "Host: h"), LIMITS).path == "/"


@pytest.mark.parametrize(
    "target", ["/a#frag", "/health#", "/a?q=1#f", "#", "http://h/a#f", "https://h#f"]
)
def test_parse_head_refuses_a_fragment(target: str) -> None:
    """Found by review: /health#x was served. Neither origin-form nor absolute-form has a
    fragment (RFC 9112 §3.2.1, §3.2.2): a client never sends one."""
    with pytest.raises(ms.BadRequest, match=re.escape(FRAGMENT)):
        ms.parse_head(head(f"GET {target} HTTP/1.1", "Host: h"), LIMITS)


def test_parse_head_options_asterisk() -> None:
    assert ms.parse_head(head("OPTIONS * HTTP/1.1", "Host: h"), LIMITS).path == "*"


def test_parse_head_expect_continue_only_for_1_1() -> None:
    lines = ["POST / HTTP/1.1", "Host: h", "Expect: 100-Continue", "Content-Length: 3"]
    assert ms.parse_head(head(*lines), LIMITS).expect_continue
    lines = ["POST / HTTP/1.0", "Expect: 100-continue", "Content-Length: 3"]
    assert not ms.parse_head(head(*lines), LIMITS).expect_continue


@pytest.mark.parametrize(
    ("value", "length"), [("0", 0), ("003", 3), ("  42 ", 42), ("\t5\t", 5), ("00", 0)]
)
def test_parse_head_content_length(value: str, length: int) -> None:
    request = ms.parse_head(head("POST / HTTP/1.1", "Host: h", f"Content-Length:{value}"), LIMITS)
    assert request.content_length == length and not request.chunked


def test_parse_head_huge_content_length_is_kept_for_the_413() -> None:
    request = ms.parse_head(
        head("POST / HTTP/1.1", "Host: h", "Content-Length: " + "9" * 40), LIMITS
    )
    assert request.content_length is not None and request.content_length > 2**60


@pytest.mark.parametrize("coding", ["chunked", "CHUNKED", ",chunked", "chunked , "])
def test_parse_head_chunked(coding: str) -> None:
    request = ms.parse_head(
        head("POST / HTTP/1.1", "Host: h", f"Transfer-Encoding: {coding}"), LIMITS
    )
    assert request.chunked and request.content_length is None and request.has_body


BAD_HEADS: list[tuple[str, list[str], type[ms.MessengerError], str]] = [
    ("missing host", ["GET / HTTP/1.1"], ms.BadRequest, "HTTP/1.1 requests need a Host header"),
    ("two hosts", ["GET / HTTP/1.1", "Host: a", "Host: a"], ms.BadRequest,
     "the host header appears twice"),
    ("host list", ["GET / HTTP/1.1", "Host: a, b"], ms.BadRequest,
     "the Host header is not a valid host[:port]"),
    ("host userinfo", ["GET / HTTP/1.1", "Host: u@a"], ms.BadRequest,
     "the Host header is not a valid host[:port]"),
    ("host path", ["GET / HTTP/1.1", "Host: a/b"], ms.BadRequest,
     "the Host header is not a valid host[:port]"),
    ("empty host", ["GET / HTTP/1.1", "Host: "], ms.BadRequest,
     "the Host header is not a valid host[:port]"),
    (
        "two authorizations",
        ["GET / HTTP/1.1", "Host: a", "Authorization: a", "Authorization: b"],
        ms.BadRequest,
        "the authorization header appears twice",
    ),
    ("double space", ["GET  / HTTP/1.1", "Host: a"], ms.BadRequest,
     "the request line must be: method SP target SP version"),
    ("tab separator", ["GET\t/ HTTP/1.1", "Host: a"], ms.BadRequest,
     "the request line must be: method SP target SP version"),
    ("leading space", [" GET / HTTP/1.1", "Host: a"], ms.BadRequest,
     "the request line must be: method SP target SP version"),
    ("no target", ["GET HTTP/1.1", "Host: a"], ms.BadRequest,
     "the request line must be: method SP target SP version"),
    ("space in target", ["GET /a b HTTP/1.1", "Host: a"], ms.BadRequest,
     "the request line must be: method SP target SP version"),
    ("DEL in target", ["GET /a\x7fb HTTP/1.1", "Host: a"], ms.BadRequest,
     "the request target is empty or holds a forbidden byte"),
    ("empty target", ["GET  HTTP/1.1", "Host: a"], ms.BadRequest,
     "the request target is empty or holds a forbidden byte"),
    ("non-token method", ['G"T / HTTP/1.1', "Host: a"], ms.BadRequest, "the method is not a token"),
    ("lowercase version", ["GET / http/1.1", "Host: a"], ms.BadRequest, "malformed HTTP version"),
    ("version without minor", ["GET / HTTP/1", "Host: a"], ms.BadRequest, "malformed HTTP version"),
    ("version two digits", ["GET / HTTP/1.10", "Host: a"], ms.BadRequest, "malformed HTTP version"),
    ("version leading zero", ["GET / HTTP/01.1", "Host: a"], ms.BadRequest,
     "malformed HTTP version"),
    ("garbage after version", ["GET / HTTP/1.1 x", "Host: a"], ms.BadRequest,
     "the request line must be: method SP target SP version"),
    ("http 2", ["GET / HTTP/2.0", "Host: a"], ms.VersionNotSupported, "only HTTP/1.x is served"),
    ("http 0.9 shape", ["GET / HTTP/0.9"], ms.VersionNotSupported, "only HTTP/1.x is served"),
    ("asterisk with get", ["GET * HTTP/1.1", "Host: a"], ms.BadRequest,
     "the asterisk form is for OPTIONS only"),
    ("absolute userinfo", ["GET http://u:p@a/ HTTP/1.1", "Host: a"], ms.BadRequest,
     "the request target must be a path or an absolute http URI"),
    ("relative target", ["GET health HTTP/1.1", "Host: a"], ms.BadRequest,
     "the request target must be a path or an absolute http URI"),
    ("space before colon", ["GET / HTTP/1.1", "Host: a", "X-A : 1"], ms.BadRequest,
     "malformed header line"),
    ("tab before colon", ["GET / HTTP/1.1", "Host: a", "X-A\t: 1"], ms.BadRequest,
     "malformed header line"),
    ("obs-fold", ["GET / HTTP/1.1", "Host: a", "X-A: 1", " 2"], ms.BadRequest,
     "malformed header line"),
    ("no colon", ["GET / HTTP/1.1", "Host: a", "X-A"], ms.BadRequest, "malformed header line"),
    ("empty name", ["GET / HTTP/1.1", "Host: a", ": v"], ms.BadRequest, "malformed header line"),
    ("bad name byte", ["GET / HTTP/1.1", "Host: a", "X[A]: v"], ms.BadRequest,
     "malformed header line"),
    ("NUL in value", ["GET / HTTP/1.1", "Host: a", "X-A: a\x00b"], ms.BadRequest,
     "malformed header line"),
    ("CR in value", ["GET / HTTP/1.1", "Host: a", "X-A: a\rb"], ms.BadRequest,
     "malformed header line"),
    ("LF in value", ["GET / HTTP/1.1", "Host: a", "X-A: a\nB: c"], ms.BadRequest,
     "malformed header line"),
    ("form feed in value", ["GET / HTTP/1.1", "Host: a", "X-A: a\x0cb"], ms.BadRequest,
     "malformed header line"),
    ("DEL in name", ["GET / HTTP/1.1", "Host: a", "X\x7fA: 1"], ms.BadRequest,
     "malformed header line"),
    (
        "CL and TE",
        ["POST / HTTP/1.1", "Host: a", "Content-Length: 3", "Transfer-Encoding: chunked"],
        ms.BadRequest,
        "Content-Length and Transfer-Encoding together",
    ),
    (
        "two CLs",
        ["POST / HTTP/1.1", "Host: a", "Content-Length: 3", "Content-Length: 3"],
        ms.BadRequest,
        "the content-length header appears twice",
    ),
    ("CL list", ["POST / HTTP/1.1", "Host: a", "Content-Length: 3, 3"], ms.BadRequest,
     "Content-Length must be decimal digits"),
    ("CL sign", ["POST / HTTP/1.1", "Host: a", "Content-Length: +3"], ms.BadRequest,
     "Content-Length must be decimal digits"),
    ("CL negative", ["POST / HTTP/1.1", "Host: a", "Content-Length: -1"], ms.BadRequest,
     "Content-Length must be decimal digits"),
    ("CL hex", ["POST / HTTP/1.1", "Host: a", "Content-Length: 0x5"], ms.BadRequest,
     "Content-Length must be decimal digits"),
    ("CL underscore", ["POST / HTTP/1.1", "Host: a", "Content-Length: 1_0"], ms.BadRequest,
     "Content-Length must be decimal digits"),
    ("CL empty", ["POST / HTTP/1.1", "Host: a", "Content-Length: "], ms.BadRequest,
     "Content-Length must be decimal digits"),
    ("CL inner space", ["POST / HTTP/1.1", "Host: a", "Content-Length: 1 0"], ms.BadRequest,
     "Content-Length must be decimal digits"),
    ("CL unicode digit", ["POST / HTTP/1.1", "Host: a", "Content-Length: \xb2"], ms.BadRequest,
     "Content-Length must be decimal digits"),
    (
        "chunked not last",
        ["POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked, gzip"],
        ms.BadRequest,
        "chunked must be the last transfer coding, once",
    ),
    (
        "chunked twice",
        ["POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked, chunked"],
        ms.BadRequest,
        "chunked must be the last transfer coding, once",
    ),
    ("empty TE", ["POST / HTTP/1.1", "Host: a", "Transfer-Encoding: "], ms.BadRequest,
     "an empty Transfer-Encoding"),
    ("TE in 1.0", ["POST / HTTP/1.0", "Transfer-Encoding: chunked"], ms.BadRequest,
     "Transfer-Encoding in an HTTP/1.0 request"),
    (
        "gzip then chunked",
        ["POST / HTTP/1.1", "Host: a", "Transfer-Encoding: gzip, chunked"],
        ms.NotImplementedByServer,
        "only the chunked transfer coding is supported",
    ),
    (
        "unknown coding",
        ["POST / HTTP/1.1", "Host: a", "Transfer-Encoding: x-foo"],
        ms.NotImplementedByServer,
        "only the chunked transfer coding is supported",
    ),
    (
        "identity",
        ["POST / HTTP/1.1", "Host: a", "Transfer-Encoding: identity"],
        ms.NotImplementedByServer,
        "only the chunked transfer coding is supported",
    ),
    (
        "nbsp around chunked",
        ["POST / HTTP/1.1", "Host: a", "Transfer-Encoding: \xa0chunked\xa0"],
        ms.NotImplementedByServer,
        "only the chunked transfer coding is supported",
    ),
]


@pytest.mark.parametrize(
    ("name", "lines", "error", "message"), BAD_HEADS, ids=[case[0] for case in BAD_HEADS]
)
def test_parse_head_rejects(
    name: str, lines: list[str], error: type[ms.MessengerError], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)) as caught:
        ms.parse_head(head(*lines), LIMITS)
    assert type(caught.value) is error


def test_parse_head_limits() -> None:
    limits = ms.HttpLimits(max_request_line=20, max_header_line=10, max_headers=2, max_head=60)
    with pytest.raises(ms.UriTooLong, match="the request line is longer than 20 bytes"):
        ms.parse_head(head("GET /" + "a" * 20 + " HTTP/1.1", "Host: a"), limits)
    with pytest.raises(ms.HeadersTooLarge, match="a header line is longer than 10 bytes"):
        ms.parse_head(head("GET / HTTP/1.1", "Host: a", "X-Long: 12345"), limits)
    with pytest.raises(ms.HeadersTooLarge, match="more than 2 header lines"):
        ms.parse_head(head("GET / HTTP/1.1", "Host: a", "A: 1", "B: 2"), limits)
    with pytest.raises(ms.HeadersTooLarge, match="the request head is larger than 60 bytes"):
        ms.parse_head(head("GET / HTTP/1.1", *["A: 1234"] * 2, "Host: abcdefghi" * 3), limits)


PARTIAL_HEADS: list[tuple[str, bytes, type[ms.MessengerError], str]] = [
    ("bare LF ending the request line", b"GET / HTTP/1.1\nHost: a", ms.BadRequest,
     "malformed request line"),
    ("bare LF ending a header line", b"GET / HTTP/1.1\r\nHost: a\nX", ms.BadRequest,
     "lines must end with CRLF"),
    ("bare CR", b"GET / HTTP/1.1\r\nHost: a\rX", ms.BadRequest, "lines must end with CRLF"),
    ("NUL first", b"\x00GET", ms.BadRequest, "malformed request line"),
    ("DEL in target", b"GET /\x7f", ms.BadRequest, "malformed request line"),
    ("space after version", b"GET / HTTP/1.1 ", ms.BadRequest, "malformed request line"),
    ("long request line", b"GET /" + b"a" * 9000, ms.UriTooLong,
     "the request line is longer than 8192 bytes"),
    ("long header line", b"GET / HTTP/1.1\r\nX: " + b"a" * 9000, ms.HeadersTooLarge,
     "a header line is longer than 8192 bytes"),
    ("large head", b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 6000, ms.HeadersTooLarge,
     "the request head is larger than 32768 bytes"),
]


@pytest.mark.parametrize(
    ("partial", "error", "message"),
    [case[1:] for case in PARTIAL_HEADS],
    ids=[case[0] for case in PARTIAL_HEADS],
)
def test_check_partial_head_refuses_early(
    partial: bytes, error: type[ms.MessengerError], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        ms.check_partial_head(partial, LIMITS)


@pytest.mark.parametrize(
    "partial",
    [b"", b"GE", b"GET /a", b"GET / HTTP/1.", b"GET / HTTP/1.1\r", b"GET / HTTP/1.1\r\nHo"],
)
def test_check_partial_head_lets_a_good_start_wait(partial: bytes) -> None:
    ms.check_partial_head(partial, LIMITS)


def test_check_partial_head_lets_the_cr_of_an_empty_line_wait() -> None:
    ms.check_partial_head(b"\r", LIMITS)


@pytest.mark.parametrize(("checked", "refused"), [(0, True), (16, True), (24, True), (25, False)])
def test_check_partial_head_finds_a_bare_lf_in_the_new_bytes(checked: int, refused: bool) -> None:
    """The bare LF is byte 23: found while it is among the bytes not checked before
    (from ``checked - 1``, which may end a CRLF), not once an earlier call judged it."""
    head = b"GET / HTTP/1.1\r\nHost: a\nX"
    if refused:
        with pytest.raises(ms.BadRequest, match="lines must end with CRLF"):
            ms.check_partial_head(head, LIMITS, checked)
    else:
        ms.check_partial_head(head, LIMITS, checked)


# Chunked bodies ############################################################


def decode_all(data: bytes, pieces: int = 1) -> tuple[bytes, bytes]:
    """Feed ``data`` in ``pieces`` parts; return the body and what was left unused."""
    decoder = ms.ChunkedDecoder(LIMITS)
    buffer = bytearray()
    body = []
    step = max(1, len(data) // pieces)
    for start in range(0, len(data), step):
        buffer += data[start : start + step]
        out, used = decoder.feed(buffer)
        del buffer[:used]
        body.append(out)
    assert decoder.done
    return b"".join(body), bytes(buffer)


@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_chunked_decoder_any_split(pieces: int) -> None:
    data = b'5\r\nhello\r\n6;ext="q\\"x"\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT'
    assert decode_all(data, pieces) == (b"hello world", b"NEXT")


def chunked(data: bytes, size: int, extension: bytes = b"") -> bytes:
    """``data`` as a chunked body of chunks of ``size`` bytes (each with ``extension``)."""
    pieces = [data[start : start + size] for start in range(0, len(data), size)]
    framed = b"".join(b"%x%s\r\n%s\r\n" % (len(p), extension, p) for p in pieces)
    return framed + b"0\r\n\r\n"


@pytest.mark.parametrize("size", [1, 127, 128, 65536])
def test_chunked_decoder_takes_chunks_of_128_bytes_or_small_bodies_of_any(size: int) -> None:
    """Chunk framing may take CHUNK_FRAMING_FREE bytes, then one per CHUNK_FRAMING_SHARE
    bytes of data: any body in chunks of 128 bytes or more, small bodies in any chunks."""
    data = bytes(range(256)) * (4096 if size >= 128 else 32)  # 1 MiB, or 8 KiB
    assert decode_all(chunked(data, size), 7) == (data, b"")


@pytest.mark.parametrize(
    ("size", "extension"), [(1, b""), (16, b""), (4096, b";x=" + b"y" * 8000)],
    ids=["1-byte chunks", "16-byte chunks", "8 KB extensions"],
)
def test_chunked_decoder_refuses_chunks_whose_framing_outweighs_them(
    size: int, extension: bytes
) -> None:
    """Found by review: 1 MiB in 1-byte chunks took 3.3 s of the server's CPU (6 MiB sent)."""
    data = b"x" * (2 * 1024 * 1024)
    decoder = ms.ChunkedDecoder(LIMITS)
    with pytest.raises(ms.BadRequest, match="too small"):
        decoder.feed(chunked(data, size, extension))
    assert decoder.declared < 1024 * 1024, "refused early"


@pytest.mark.parametrize(
    "line", [b"0", b"A", b"ff", b"5;a", b"5; a=b", b"5 ;a=b", b'5;a="x y"', b"0000000000000001"]
)
def test_parse_chunk_size_accepts(line: bytes) -> None:
    assert ms.parse_chunk_size(line) == int(line.split(b";")[0].strip(), 16)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b" 5",
        b"5 ",
        b"+5",
        b"-1",
        b"0x5",
        b"1_0",
        b"5;",
        b"5;a=",
        b"5;[=x",
        b'5;a="x',
        b"5\x00",
        b"FFFFFFFFFFFFFFFF0",
        b"Z",
    ],
)
def test_parse_chunk_size_rejects(line: bytes) -> None:
    with pytest.raises(ms.BadRequest, match="malformed chunk size line"):
        ms.parse_chunk_size(line)


CHUNK_END = "a chunk's data must end with CRLF right at its size"
BAD_CHUNKED: list[tuple[str, bytes, str]] = [
    ("data longer than its size", b"5\r\nhelloX\r\n", CHUNK_END),
    ("bare LF after the data", b"5\r\nhello\n0\r\n\r\n", CHUNK_END),
    ("bare LF after the size", b"3\nabc", "lines must end with CRLF"),
    ("trailer without a colon", b"0\r\nBad Trailer\r\n\r\n", "malformed header line"),
    ("trailer without a name", b"0\r\n : x\r\n\r\n", "malformed header line"),
]


@pytest.mark.parametrize(
    ("data", "message"), [case[1:] for case in BAD_CHUNKED], ids=[case[0] for case in BAD_CHUNKED]
)
def test_chunked_decoder_rejects(data: bytes, message: str) -> None:
    with pytest.raises(ms.BadRequest, match=re.escape(message)):
        ms.ChunkedDecoder(LIMITS).feed(data)


def test_chunked_decoder_counts_declared_sizes_before_the_data() -> None:
    decoder = ms.ChunkedDecoder(LIMITS)
    decoder.feed(b"500001\r\n")
    assert decoder.declared == 0x500001 and not decoder.done


def feed_in_pieces(decoder: ms.ChunkedDecoder, data: bytes, size: int) -> int:
    """Feed ``data`` ``size`` bytes at a time, as ``Connection.stream`` does (what was used
    is dropped, the rest fed again with what follows); how many bytes had arrived when the
    decoder refused them (BadRequest), or -1."""
    buffer = bytearray()
    for start in range(0, len(data), size):
        buffer += data[start : start + size]
        try:
            _, used = decoder.feed(buffer)
        except ms.BadRequest:
            return min(len(data), start + size)
        del buffer[:used]
    return -1


BEFORE_THE_LINE = b"3\r\nabc\r\n"  # a chunk: the line looked at then is a new one


@pytest.mark.parametrize("size", [1, 2, 7, 10_000])
@pytest.mark.parametrize("where", [0, 1, 2, 100, 4000])
@pytest.mark.parametrize("bad", [b"\n", b"\rx"], ids=["bare LF", "bare CR"])
def test_chunked_decoder_finds_a_bare_line_end_wherever_it_is(
    size: int, where: int, bad: bytes
) -> None:
    """Wherever the bare LF (or CR) is in a size line, and however the line arrives, it is
    refused as soon as its byte (for a CR, the byte after it) has come."""
    line = (b"5;x=" + b"y" * 4000)[:where] + bad + b"y" * 100
    data = BEFORE_THE_LINE + line
    arrived = feed_in_pieces(ms.ChunkedDecoder(LIMITS), data, size)
    found_at = len(BEFORE_THE_LINE) + where + len(bad)  # bytes needed to see it
    assert arrived == min(len(data), -(-found_at // size) * size)


def test_chunked_decoder_looks_at_each_byte_of_a_line_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: the whole pending size line was searched again for each new byte (an
    8 KiB line sent a byte at a time cost about 0.7 s of CPU). The search now starts where
    the last one ended (one byte back, for a CR that a LF may follow)."""
    searched: list[int] = []
    pattern = ms._BARE_EOL_RE

    class Spy:
        def search(self, data: bytes | bytearray, pos: int = 0) -> re.Match[bytes] | None:
            searched.append(len(data) - pos)
            return pattern.search(data, pos)

    monkeypatch.setattr(ms, "_BARE_EOL_RE", Spy())
    line = BEFORE_THE_LINE + b"5;x=" + b"y" * (LIMITS.max_header_line - 4)
    assert feed_in_pieces(ms.ChunkedDecoder(LIMITS), line, 1) == -1
    assert len(searched) >= LIMITS.max_header_line - 1
    assert sum(searched) <= 2 * len(line)


def test_chunked_decoder_refuses_long_lines() -> None:
    with pytest.raises(ms.HeadersTooLarge, match="a chunk size or trailer line is too long"):
        ms.ChunkedDecoder(LIMITS).feed(b"5;x=" + b"y" * 9000 + b"\r\n")


# Responses #################################################################


def test_response_serialize_head_json() -> None:
    response = ms.Response.json({"a": "é"}, HTTPStatus.CREATED, [("X-A", "1")])
    wire = response.serialize_head(close=True).decode()
    assert wire.startswith("HTTP/1.1 201 Created\r\n")
    assert "Content-Type: application/json; charset=utf-8\r\n" in wire
    assert f"Content-Length: {len(response.body)}\r\n" in wire
    assert "X-A: 1\r\nConnection: close\r\n\r\n" in wire
    assert response.body == '{"a":"é"}'.encode()


def test_response_204_has_no_length() -> None:
    wire = ms.Response(HTTPStatus.NO_CONTENT).serialize_head(close=False).decode()
    assert "Content-Length" not in wire and "Content-Type" not in wire


def test_response_keep_alive_for_http_1_0() -> None:
    wire = ms.Response().serialize_head(close=False, keep_alive_1_0=True).decode()
    assert "Connection: keep-alive\r\n" in wire


def test_error_response_is_the_contract_json() -> None:
    response = ms.Response.error(ms.MethodNotAllowed("no", ["GET", "HEAD"]))
    assert response.status == 405
    assert response.headers == [("Allow", "GET, HEAD")]
    assert response.body == b'{"error":"method_not_allowed","message":"no"}'


# After the answer: keep, skip the body, or close ###########################

LARGEST = 2 * ms.SKIP_LIMIT  # the largest body any route takes
GET, GET_1_0 = ["GET / HTTP/1.1", "Host: a"], ["GET / HTTP/1.0"]
GET_1_0_KEEP, GET_CLOSE = [*GET_1_0, "Connection: keep-alive"], [*GET, "Connection: close"]
POST = ["POST /send HTTP/1.1", "Host: a"]
SMALL, CHUNKED = ["Content-Length: 9"], ["Transfer-Encoding: chunked"]
LARGE, HUGE = [f"Content-Length: {ms.SKIP_LIMIT + 1}"], [f"Content-Length: {LARGEST + 1}"]
EXPECT = ["Expect: 100-continue"]
NONE, UNREAD, READING, REFUSED = ms.Body.NONE, ms.Body.UNREAD, ms.Body.READING, ms.Body.REFUSED
KEEP, CLOSE, SKIP = ms.NextStep.KEEP_ALIVE, ms.NextStep.CLOSE, ms.NextStep.SKIP_BODY
LINGER, TOO_LARGE = ms.NextStep.LINGER, ms.NextStep.TOO_LARGE

NEXT_STEPS = [
    # rule                              request head           body     answer closing next
    ("no body: keep alive",             GET,                   NONE,    200,   False,  KEEP),
    ("body read: keep alive",           POST + SMALL,          NONE,    200,   False,  KEEP),
    ("HTTP/1.0 closes",                 GET_1_0,               NONE,    200,   False,  CLOSE),
    ("HTTP/1.0 keep-alive",             GET_1_0_KEEP,          NONE,    200,   False,  KEEP),
    ("Connection: close",               GET_CLOSE,             NONE,    200,   False,  CLOSE),
    ("shutdown closes",                 GET,                   NONE,    200,   True,   CLOSE),
    ("unread body: skip it",            POST + SMALL,          UNREAD,  401,   False,  SKIP),
    ("unread chunked body: skip it",    POST + CHUNKED,        UNREAD,  401,   False,  SKIP),
    ("skip it, closing after",          POST + SMALL,          UNREAD,  401,   True,   SKIP),
    ("no 100 Continue sent: close",     POST + SMALL + EXPECT, UNREAD,  401,   False,  LINGER),
    ("100 Continue sent, body read",    POST + SMALL + EXPECT, NONE,    201,   False,  KEEP),
    ("large unread body: answer now",   POST + LARGE,          UNREAD,  401,   False,  LINGER),
    ("body no route takes: 413",        POST + HUGE,           UNREAD,  404,   False,  TOO_LARGE),
    ("body no route takes, was a 413",  POST + HUGE,           UNREAD,  413,   False,  LINGER),
    ("body partly read",                POST + SMALL,          READING, 400,   False,  LINGER),
    ("body refused unread",             POST + SMALL,          REFUSED, 413,   False,  LINGER),
]  # fmt: skip


@pytest.mark.parametrize(
    ("rule", "lines", "body", "status", "closing", "step"),
    NEXT_STEPS,
    ids=[case[0] for case in NEXT_STEPS],
)
def test_next_step(
    rule: str, lines: list[str], body: ms.Body, status: int, closing: bool, step: ms.NextStep
) -> None:
    request = ms.parse_head(head(*lines), LIMITS)
    found = ms.next_step(
        request, body, HTTPStatus(status), closing=closing, largest_body=LARGEST
    )
    assert found is step


# Router ####################################################################


async def _handler(call: ms.Call) -> ms.Response:
    return ms.Response()


def make_router() -> ms.Router:
    router = ms.Router()
    router.add("GET", "/chat", _handler, auth=True, body=False)
    router.add("POST", "/chat", _handler, auth=True, body=True)
    router.add("POST", "/chat/{name}/requests/{user}", _handler, auth=True, body=True)
    return router


def test_router_matches_static_and_params() -> None:
    router = make_router()
    assert router.match("GET", "/chat")[1] == ()
    assert router.match("POST", "/chat/my%20chat/requests/bob")[1] == ("my chat", "bob")


def test_router_head_goes_where_get_goes() -> None:
    assert make_router().match("HEAD", "/chat")[0].handler is _handler


def test_router_unknown_path_404() -> None:
    with pytest.raises(ms.NotFound, match="no such resource: /chat/x"):
        make_router().match("GET", "/chat/x")


def test_router_wrong_method_405_with_allow() -> None:
    with pytest.raises(ms.MethodNotAllowed, match="/chat does not take DELETE") as caught:
        make_router().match("DELETE", "/chat")
    assert caught.value.allow == ["GET", "HEAD", "POST"]


def test_router_param_does_not_cross_slashes() -> None:
    with pytest.raises(ms.NotFound, match="no such resource: /chat/a/b/requests/bob"):
        make_router().match("POST", "/chat/a/b/requests/bob")
