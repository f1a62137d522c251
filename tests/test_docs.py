"""The README, run against a real server, and clients nobody here wrote.

- Every ``sh`` block of README.md runs line by line with the real ``curl`` (those tests are
  skipped without it); each curl line ends with the status it documents (``# 201``) and may
  name a field of the answer to keep for the next lines (``→ TOKEN=.token``).
- The tour's ``console`` blocks run through the client (click's CliRunner; ``read --follow``
  as a real process) and their output must match, times aside.
- The flag table is checked against the server's argument parser, the command tables against
  the client's click commands, the route table against the OpenAPI document.
- curl ``-T`` with ``Expect: 100-continue``, ``urllib.request``, ``http.client`` and
  pipelined raw requests drive the server too.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import email.message
import hashlib
import http.client
import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import click
import pytest
from click.testing import CliRunner

import messenger_client as mc
import messenger_server as ms
from tests.servers import ServerThread, thread_servers

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CURL = shutil.which("curl")
DOCUMENTED_URL = "http://127.0.0.1:8000"  # the address the README shows
PASSWORD = "correct horse battery"
TIMEOUT = 10.0  # seconds any one step may take before the test fails

needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


# The README, parsed ########################################################


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block: its info string, its lines, the line number of its fence, and the
    title of the ``## `` section it is in."""

    info: str
    lines: list[str]
    line: int
    section: str


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def fenced_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    title = ""
    while index < len(lines):
        if lines[index].startswith("## "):
            title = lines[index][3:].strip()
        opening = re.fullmatch(r"```\s*(\S*)\s*", lines[index])
        if opening is None:
            index += 1
            continue
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].startswith("```"):
            body.append(lines[index])
            index += 1
        assert index < len(lines), f"README.md:{start + 1}: the code block never closes"
        blocks.append(Block(opening[1], body, start + 1, title))
        index += 1
    return blocks


def section(text: str, title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## ``."""
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert found is not None, f"README.md has no section '## {title}'"
    return found[1]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text`` (header and rule rows left out)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or re.fullmatch(r"[|\s:-]+", line):
            continue
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([cell.strip().replace("\\|", "|") for cell in cells])
    return [row for row in rows if row[0] not in ("flag", "option", "command", "method")]


# A server in a background thread ###########################################


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start servers with test settings (cheap passwords, quick shutdown) plus ``overrides``."""
    with thread_servers(tmp_path, password_cost=4) as start:
        yield start


@pytest.fixture
def server(serve: Callable[..., ServerThread]) -> ServerThread:
    return serve()


def no_proxy_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: no proxy between them and the test server, and
    no client settings but ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("MESSENGER_")
    }
    env.update(NO_PROXY="*", no_proxy="*", **extra)
    return env


def login(url: str, user: str) -> str:
    """Connect ``user`` (registering it), with the stdlib; its token."""
    status, _, body = stdlib_request(url, "POST", "/connect", {"user": user, "password": PASSWORD})
    assert status in (200, 201), body
    token: str = json.loads(body)["token"]
    return token


# The README's first lines ##################################################


def test_readme_starts_with_the_two_commands_for_a_fresh_machine() -> None:
    lines = [line for line in readme_text().splitlines()[:6] if line.startswith("    ")]
    assert len(lines) == 2, "the README must start with two indented commands"
    start, tests = (line.strip() for line in lines)
    assert "pip install -r requirements.txt" in start
    assert "python messenger_server.py" in start
    assert tests.endswith("pip install -r requirements-dev.txt && python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "-r requirements-dev.txt" in ci
    assert "\npython -m pytest -q\n" in ci, "the README's test command is no longer CI's"
    ms.parse_args(shlex.split(start.rpartition("python messenger_server.py")[2]))


def test_every_server_command_line_in_the_readme_parses() -> None:
    found = re.findall(r"python messenger_server\.py([^\n`&|]*)", readme_text())
    assert found
    for arguments in found:
        if "--help" not in arguments:
            ms.parse_args(shlex.split(arguments))


# The server flags ##########################################################


def server_parser() -> argparse.ArgumentParser:
    """The parser ``messenger_server.parse_args`` builds, caught as it parses."""
    caught: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def parse_args(
        self: argparse.ArgumentParser, args: Sequence[str] | None = None, namespace: Any = None
    ) -> Any:
        caught.append(self)
        return original(self, args, namespace)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
        ms.parse_args([])
    return caught[0]


def flag_rows() -> dict[str, tuple[str, str]]:
    """The README's flag table: flag -> (default, what)."""
    rows: dict[str, tuple[str, str]] = {}
    for row in table_rows(section(readme_text(), "Server flags")):
        flag = re.fullmatch(r"`(--[a-z0-9-]+)`", row[0])
        default = re.fullmatch(r"`([^`]*)`", row[1])
        assert flag is not None and default is not None, f"a flag row to fix: {row}"
        assert flag[1] not in rows, f"{flag[1]} is listed twice"
        rows[flag[1]] = (default[1], row[2])
    return rows


def test_the_flag_table_lists_every_flag_with_its_default() -> None:
    expected: dict[str, str] = {}
    for action in server_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = next(name for name in action.option_strings if name.startswith("--"))
        expected[flag] = str(action.default)
    documented = flag_rows()
    table = "\n".join(f"| `{flag}` | `{default}` | |" for flag, default in expected.items())
    assert {flag: row[0] for flag, row in documented.items()} == expected, (
        "the README's flag table is out of date; flags and defaults:\n" + table
    )
    assert list(documented) == list(expected), "keep the table in --help's order"


def test_the_flag_table_names_every_choice() -> None:
    documented = flag_rows()
    for action in server_parser()._actions:
        for choice in action.choices or ():
            assert f"`{choice}`" in documented[action.option_strings[0]][1], (action, choice)


# The client commands #######################################################


def test_the_command_table_lists_every_command_and_option() -> None:
    assert isinstance(mc.cli, click.Group)
    rows = table_rows(section(readme_text(), "Client commands"))
    commands = {row[0].strip("`").split()[0]: " ".join(row) for row in rows if row[0][1] != "-"}
    assert set(commands) == set(mc.cli.commands), "the README's command table is out of date"
    for name, command in mc.cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert any(opt in commands[name] for opt in param.opts), (name, param.opts)
            else:
                assert param.human_readable_name in commands[name], (name, param.name)


def test_the_option_table_lists_every_group_option() -> None:
    rows = table_rows(section(readme_text(), "Client commands"))
    options = " ".join(row[0] for row in rows)
    for param in mc.cli.params:
        for opt in param.opts:
            assert f"`{opt}" in options, opt
        if isinstance(param, click.Option) and isinstance(param.envvar, str):
            assert param.envvar in readme_text(), param.envvar


# The HTTP API: the route table #############################################


def openapi_operations() -> set[tuple[str, str]]:
    paths: dict[str, dict[str, Any]] = ms.build_openapi()["paths"]
    methods = {"get", "post", "put", "delete", "patch"}
    return {(m.upper(), path) for path, ops in paths.items() for m in ops if m in methods}


def test_the_route_table_lists_every_route() -> None:
    rows = table_rows(section(readme_text(), "HTTP API, with curl"))
    documented = {(row[0], row[1].strip("`")) for row in rows if len(row) == 5}
    assert documented == openapi_operations()


# The HTTP API: every curl example ##########################################


@dataclasses.dataclass(frozen=True)
class CurlLine:
    command: str
    status: int | None  # documented status (curl lines only)
    keep: tuple[str, str] | None  # (variable, .field.path) to keep from the JSON answer
    line: int


def curl_lines() -> list[CurlLine]:
    lines = []
    for block in fenced_blocks(readme_text()):
        if block.info != "sh":
            continue
        for offset, text in enumerate(block.lines, start=block.line + 1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            command, _, comment = text.partition("  # ")
            status = re.match(r"(\d{3})\b", comment)
            keep = re.search(r"→ ([A-Z_]+)=(\.[\w.]+)", comment)
            if command.startswith("curl "):
                assert status is not None, f"README.md:{offset}: say the status: '  # 200'"
            lines.append(
                CurlLine(
                    command,
                    int(status[1]) if status else None,
                    (keep[1], keep[2]) if keep else None,
                    offset,
                )
            )
    return lines


def field(answer: Any, path: str) -> str:
    for name in path.strip(".").split("."):
        answer = answer[name]
    return str(answer)


def run_curl_examples(url: str, folder: Path) -> None:
    """Run the README's sh lines in order in ``folder``, as a reader pastes them."""
    variables = {"URL": url}
    for example in curl_lines():
        command = example.command
        if command.startswith("curl "):  # the status goes to stderr, the answer stays as is
            command = "curl -sS -w '%{stderr}STATUS %{http_code}\\n' " + command[len("curl ") :]
        done = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + command],
            cwd=folder,
            env=no_proxy_env(**variables),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
        where = f"README.md:{example.line}: {example.command}\n{done.stdout}\n{done.stderr}"
        assert done.returncode == 0, where
        if example.status is not None:
            statuses = re.findall(r"^STATUS (\d{3})$", done.stderr, re.M)
            assert statuses == [str(example.status)], where
        if example.keep is not None:
            name, path = example.keep
            variables[name] = field(json.loads(done.stdout), path)


@needs_curl
def test_every_curl_example_runs_and_answers_its_status(
    server: ServerThread, tmp_path: Path
) -> None:
    run_curl_examples(server.url, tmp_path)
    assert (tmp_path / "copy.txt").read_bytes() == (tmp_path / "notes.txt").read_bytes()

    # Every route of the API has an example: the server saw each one.
    patterns = {
        (method, re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path))), path)
        for method, path in openapi_operations()
    }
    seen = {
        (method, path)
        for method, pattern, path in patterns
        for used_method, used_path in server.requests
        if used_method == method and pattern.fullmatch(used_path)
    }
    assert seen == openapi_operations(), "routes without a curl example in the README"


# curl -T with 100-continue, and a download #################################


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    assert CURL is not None
    return subprocess.run(
        [CURL, "-sS", *args],
        env=no_proxy_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


@needs_curl
def test_curl_upload_with_100_continue_then_download(server: ServerThread, tmp_path: Path) -> None:
    token = login(server.url, "alice")
    data = os.urandom(3000) + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"  # bytes that look like HTTP
    source = tmp_path / "blob.bin"
    source.write_bytes(data)
    auth = f"Authorization: Bearer {token}"
    upload = curl(
        "-v", "-X", "POST", "-T", str(source), "-H", "Expect: 100-continue",
        "-H", "Content-Type: application/octet-stream", "-H", auth,
        f"{server.url}/files?name=blob%20one.bin",
    )  # fmt: skip
    assert upload.returncode == 0, upload.stderr
    assert "> Expect: 100-continue" in upload.stderr
    assert "< HTTP/1.1 100 Continue" in upload.stderr
    assert "< HTTP/1.1 201 Created" in upload.stderr
    stored = json.loads(upload.stdout)["file"]
    assert stored["name"] == "blob one.bin"
    assert stored["size"] == len(data)
    assert stored["sha256"] == hashlib.sha256(data).hexdigest()

    target = tmp_path / "copy.bin"
    download = curl(
        "-D", "-", "-o", str(target), "-H", auth, f"{server.url}/files/{stored['id']}"
    )
    assert download.returncode == 0, download.stderr
    assert download.stdout.startswith("HTTP/1.1 200 OK\n")  # text mode: CRLF read as LF
    assert "Content-Disposition: attachment;" in download.stdout
    assert target.read_bytes() == data


@needs_curl
def test_curl_upload_over_the_limit_is_refused_before_its_body(
    serve: Callable[..., ServerThread], tmp_path: Path
) -> None:
    server = serve(max_file_size=1024)
    token = login(server.url, "alice")
    source = tmp_path / "big.bin"
    source.write_bytes(b"x" * 1025)
    upload = curl(
        "-v", "-X", "POST", "-T", str(source), "-H", "Expect: 100-continue",
        "-H", f"Authorization: Bearer {token}", f"{server.url}/files?name=big.bin",
    )  # fmt: skip
    assert upload.returncode == 0, upload.stderr
    assert "100 Continue" not in upload.stderr
    assert "< HTTP/1.1 413 " in upload.stderr
    assert json.loads(upload.stdout)["error"] == "too_large"


@needs_curl
def test_curl_upload_with_a_bad_token_is_refused_before_its_body(
    server: ServerThread, tmp_path: Path
) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("hello")
    upload = curl(
        "-v", "-X", "POST", "-T", str(source), "-H", "Expect: 100-continue",
        "-H", "Authorization: Bearer nope", f"{server.url}/files?name=notes.txt",
    )  # fmt: skip
    assert "100 Continue" not in upload.stderr
    assert "< HTTP/1.1 401 Unauthorized" in upload.stderr
    assert "< WWW-Authenticate: Bearer" in upload.stderr


# The standard library: urllib.request and http.client ######################


def stdlib_request(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, email.message.Message, bytes]:
    """One request with ``urllib.request`` (proxies ignored); HTTP errors are answers too."""
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url + path, data=data, headers=all_headers, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


def test_urllib_request_connects_sends_reads_uploads_and_downloads(server: ServerThread) -> None:
    url = server.url
    status, _, body = stdlib_request(url, "POST", "/connect", {"user": "alice", "password": "pw"})
    assert status == 201
    alice = json.loads(body)["token"]
    bob = login(url, "bob")

    status, headers, body = stdlib_request(url, "POST", "/send", {"text": "hi"}, token=alice)
    assert status == 201
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["X-RateLimit-Remaining"] == "19"
    sent = json.loads(body)["message"]
    assert (sent["chat"], sent["from"], sent["text"]) == ("general", "alice", "hi")

    data = "héllo, wörld\n".encode() * 100
    status, _, body = stdlib_request(
        url, "POST", "/files?name=h%C3%A9llo.txt", token=alice, data=data,
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )  # fmt: skip
    assert status == 201
    stored = json.loads(body)["file"]
    assert (stored["name"], stored["size"]) == ("héllo.txt", len(data))
    assert stored["sha256"] == hashlib.sha256(data).hexdigest()

    status, _, _ = stdlib_request(url, "GET", f"/files/{stored['id']}", token=bob)
    assert status == 404  # bob sees no message carrying it yet
    send = {"to": "bob", "text": "", "file": stored["id"]}
    assert stdlib_request(url, "POST", "/send", send, token=alice)[0] == 201

    status, _, body = stdlib_request(url, "GET", "/messages?since=0&wait=5", token=bob)
    assert status == 200
    page = json.loads(body)
    assert [m["text"] for m in page["messages"]] == ["hi", ""]
    assert page["messages"][1]["file"]["id"] == stored["id"]
    assert page["next"] == page["messages"][-1]["id"]

    status, headers, body = stdlib_request(url, "GET", f"/files/{stored['id']}", token=bob)
    assert status == 200
    assert body == data
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["Content-Disposition"].startswith("attachment;")
    assert "filename*=UTF-8''h%C3%A9llo.txt" in headers["Content-Disposition"]

    status, headers, body = stdlib_request(url, "GET", "/status", token="revoked")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(body)["error"] == "unauthorized"


def test_http_client_keeps_one_connection_for_many_requests(server: ServerThread) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)

    def call(
        method: str,
        path: str,
        body: bytes | Iterator[bytes] | None = None,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        connection.request(method, path, body=body, headers=headers or {}, **options)
        response = connection.getresponse()
        return response.status, response, response.read()

    try:
        status, _, body = call("POST", "/connect", b'{"user": "alice", "password": "pw"}')
        assert status == 201
        first_socket = connection.sock
        auth = {"Authorization": f"Bearer {json.loads(body)['token']}"}

        status, _, body = call("POST", "/send", b'{"text": "one"}', auth)
        assert status == 201
        first_id = json.loads(body)["message"]["id"]
        # A JSON body sent chunked, as http.client does for an iterable.
        chunks = iter([b'{"text": ', b'"two"}'])
        status, _, body = call("POST", "/send", chunks, auth, encode_chunked=True)
        assert status == 201, body
        assert json.loads(body)["message"]["text"] == "two"

        status, _, body = call("GET", f"/messages?since={first_id}&wait=5", None, auth)
        assert [m["text"] for m in json.loads(body)["messages"]] == ["two"]

        # An upload announcing 100-continue: http.client sends the body at once anyway,
        # and skips the server's 100 Continue before the final answer.
        data = bytes(range(256)) * 40
        headers = {**auth, "Expect": "100-continue", "Content-Type": "application/octet-stream"}
        status, _, body = call("POST", "/files?name=bytes.bin", data, headers)
        assert status == 201, body
        file_id = json.loads(body)["file"]["id"]

        status, response, body = call("HEAD", f"/files/{file_id}", None, auth)
        assert (status, body) == (200, b"")
        assert response.headers["Content-Length"] == str(len(data))
        status, response, body = call("GET", f"/files/{file_id}", None, auth)
        assert (status, body) == (200, data)

        # A chunked upload has no Content-Length: it is counted as it comes.
        chunks = iter([data[:100], data[100:]])
        status, _, body = call("POST", "/files?name=x", chunks, auth, encode_chunked=True)
        assert status == 201
        assert json.loads(body)["file"]["size"] == len(data)
        status, _, body = call("GET", "/health")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert connection.sock is first_socket, "every request went over one connection"
    finally:
        connection.close()


# Pipelined raw requests ####################################################


def raw_request(method: str, path: str, body: bytes = b"", headers: Sequence[str] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_raw_response(
    stream: BinaryIO, *, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := stream.readline()) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.lower()] = value.strip()
    length = 0 if head_only else int(headers.get("content-length", "0"))
    return int(status_line.split()[1]), headers, stream.read(length)


def test_pipelined_requests_are_answered_in_order(server: ServerThread) -> None:
    requests = [
        raw_request("POST", "/connect", b'{"user": "alice", "password": "pw"}'),
        raw_request("GET", "/health"),
        raw_request("HEAD", "/health"),
        raw_request("GET", "/no/such/route"),
        raw_request("DELETE", "/health"),
        raw_request("POST", "/send", b'{"text": "no token"}'),
        raw_request("GET", "/health", headers=["Connection: close"]),
    ]
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"".join(requests))  # all at once: one write, one segment
        stream = sock.makefile("rb")
        answers = [
            read_raw_response(stream, head_only=index == 2) for index in range(len(requests))
        ]
        assert stream.read() == b"", "the server closes after Connection: close"
    assert [status for status, _, _ in answers] == [201, 200, 200, 404, 405, 401, 200]
    assert json.loads(answers[0][2])["user"] == "alice"
    assert answers[2][1]["content-length"] == str(len(answers[1][2]))  # HEAD: same headers
    assert answers[2][2] == b""
    assert answers[4][1]["allow"] == "GET, HEAD"
    assert answers[6][1]["connection"] == "close"


def test_pipelined_sends_keep_their_order(server: ServerThread) -> None:
    token = login(server.url, "alice")
    auth = [f"Authorization: Bearer {token}"]
    texts = [f"message {n}" for n in range(5)]
    requests = [raw_request("POST", "/send", json.dumps({"text": t}).encode(), auth) for t in texts]
    requests.append(raw_request("GET", "/messages?since=0", headers=auth))
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"".join(requests))
        stream = sock.makefile("rb")
        answers = [read_raw_response(stream) for _ in requests]
    sent = [json.loads(body)["message"] for _, _, body in answers[:-1]]
    assert [status for status, _, _ in answers] == [201] * len(texts) + [200]
    assert [m["text"] for m in sent] == texts
    assert [m["id"] for m in sent] == sorted(m["id"] for m in sent)
    assert json.loads(answers[-1][2])["messages"] == sent


# The tour, through the client ##############################################


class Follower:
    """``read --follow`` as a real process: the tour's other terminals go on meanwhile."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "messenger_client.py"), *args],
            cwd=ROOT,
            env=no_proxy_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.expected: list[str] = []

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def stop(self) -> tuple[list[str], str]:
        """Its output, once it has printed the lines expected; then Ctrl-C."""
        printed = []
        try:
            for _ in self.expected:
                printed.append(self.lines.get(timeout=TIMEOUT).rstrip("\n"))
        except queue.Empty:
            pass
        self.process.send_signal(signal.SIGINT)
        _, stderr = self.process.communicate(timeout=TIMEOUT)
        self.reader.join(timeout=TIMEOUT)
        while not self.lines.empty():
            printed.append(self.lines.get().rstrip("\n"))
        assert self.process.returncode == mc.INTERRUPTED, stderr
        return printed, stderr

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


class Tour:
    """Runs the README's console blocks: ``name$ command`` lines and the output they show."""

    def __init__(
        self, server: ServerThread, config_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.server = server
        self.runner = CliRunner()
        self.base_env = {
            "MESSENGER_SERVER": server.url,
            "MESSENGER_CONFIG_DIR": str(config_dir),
        }
        self.terminals: dict[str, dict[str, str]] = {}
        self.tokens: dict[str, str] = {}  # join token in the README -> the real one
        self.follower: Follower | None = None
        self.commands = 0  # client commands run
        self.followed = 0  # read --follow runs stopped with ^C
        self.parked = threading.Event()  # a long-poll waits in the server
        waiters = server.server.app.waiters
        wait = waiters.wait

        async def parking(user: str, seconds: float, client: asyncio.Future[bytes]) -> None:
            self.parked.set()  # the waiter is registered before the loop runs anything else
            await wait(user, seconds, client)

        monkeypatch.setattr(waiters, "wait", parking)

    def actual(self, line: str) -> str:
        """A line of real output as the README would show it."""
        line = line.rstrip().replace(self.server.url, DOCUMENTED_URL)
        for documented, real in self.tokens.items():
            line = line.replace(real, documented)
        return re.sub(r"\b\d\d:\d\d\b", "HH:MM", line)

    @staticmethod
    def documented(line: str) -> str:
        return re.sub(r"\b\d\d:\d\d\b", "HH:MM", line.rstrip())

    def learn_tokens(self, expected: list[str], printed: list[str]) -> None:
        for want, got in zip(expected, printed, strict=False):
            documented = re.search(r"/join/(\S+)", want)
            real = re.search(r"/join/(\S+)", got)
            if documented and real:
                self.tokens[documented[1]] = real[1]

    def run_block(self, block: Block) -> None:
        steps: list[tuple[str, str, list[str]]] = []  # (terminal, command, expected output)
        orphan: list[str] = []  # output before any command: the follower's
        for text in block.lines:
            prompt = re.fullmatch(r"(\w*)\$ (.*)", text)
            if prompt is not None:
                steps.append((prompt[1], prompt[2], []))
            elif steps:
                steps[-1][2].append(text)
            else:
                orphan.append(text)
        if orphan:
            self.follower_output(orphan, block)
        for terminal, command, expected in steps:
            self.run_step(terminal, command, expected, block)

    def follower_output(self, lines: list[str], block: Block) -> None:
        follower = self.follower
        assert follower is not None, f"README.md:{block.line}: output of no command"
        follower.expected += [line for line in lines if line != "^C"]
        if lines[-1] == "^C":
            printed, _ = follower.stop()
            self.follower = None
            self.followed += 1
            assert [self.actual(line) for line in printed] == [
                self.documented(line) for line in follower.expected
            ], f"README.md:{block.line}: read --follow printed otherwise"

    def run_step(self, terminal: str, command: str, expected: list[str], block: Block) -> None:
        where = f"README.md:{block.line}: {terminal}$ {command}"
        words = shlex.split(command)
        if not terminal:  # the server's terminal: the test runs its own server
            assert words[:2] == ["python", "messenger_server.py"], where
            ms.parse_args(words[2:])
            return
        env = self.terminals.setdefault(terminal, dict(self.base_env))
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = value
            return
        assert words[:2] == ["python", "messenger_client.py"], where
        args = [self.real(word) for word in words[2:]]
        if "--follow" in args or "-f" in args:
            assert self.follower is None, where
            self.parked.clear()
            self.follower = Follower(args, env)
            self.follower.expected += expected
            assert self.parked.wait(TIMEOUT), f"{where}: never started waiting"
            return
        unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("MESSENGER_")}
        self.commands += 1
        result = self.runner.invoke(
            mc.cli,
            args,
            env={**unset, **env},
            input=f"{PASSWORD}\n" if args[0] == "connect" else None,
            catch_exceptions=False,
        )
        assert result.exit_code == 0, f"{where}\n{result.output}"
        printed = result.output.splitlines()
        self.learn_tokens(expected, printed)
        assert [self.actual(line) for line in printed] == [
            self.documented(line) for line in expected
        ], where

    def real(self, word: str) -> str:
        word = word.replace(DOCUMENTED_URL, self.server.url)
        for documented, real in self.tokens.items():
            word = word.replace(documented, real)
        return word


def test_the_tour_runs_as_written(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tour = Tour(server, tmp_path / "config", monkeypatch)
    blocks = [b for b in fenced_blocks(readme_text()) if b.section == "Five-minute tour"]
    assert blocks and all(block.info == "console" for block in blocks)
    try:
        for block in blocks:
            tour.run_block(block)
        assert tour.follower is None, "read --follow was never stopped (^C)"
        assert set(tour.terminals) == {"alice", "bob"}
        assert tour.commands >= 20
        assert tour.followed == 1
    finally:
        if tour.follower is not None:
            tour.follower.kill()


def test_every_code_block_is_run_or_plain_text() -> None:
    """Commands live in sh (curl) or console (tour) blocks, which the tests above run; the
    nginx block is the configuration tests/proxy.py runs nginx with."""
    for block in fenced_blocks(readme_text()):
        where = f"README.md:{block.line}: a {block.info!r} block"
        assert block.info in ("sh", "console", "text", "nginx"), where
        assert (block.info == "nginx") == (block.section == "Behind a reverse proxy"), where
        assert (block.info == "console") == (block.section == "Five-minute tour"), where
        if block.info == "text":
            assert not any("curl" in line or "$ " in line for line in block.lines), where


# Benchmarks ################################################################


def test_the_benchmark_figures_are_quoted_once_measured() -> None:
    """bench/README.md's results table, once filled, is copied into the README."""
    results = section((ROOT / "bench" / "README.md").read_text(encoding="utf-8"), "Results")
    table = [line for line in results.splitlines() if line.startswith("|")]
    placeholder = re.compile(r"(?:^|[\s|])_+(?:$|[\s|/])")  # an unfilled cell: _, _ / 20,000
    benchmarks = section(readme_text(), "Benchmarks")
    assert "bench/README.md" in benchmarks
    if table and not any(placeholder.search(line) for line in table):
        missing = [line for line in table if line not in benchmarks]
        assert not missing, "copy bench/README.md's results table into the README"
    else:
        assert "not filled yet" in benchmarks, "the README must not claim figures"
