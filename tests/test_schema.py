"""schemathesis (a dev-only tool) against the server's own ``/openapi.json``.

One run per session, on a server in a child process: every phase (coverage, fuzzing,
stateful) and every check, but positive_data_acceptance and the coverage phase's QUERY and
PATCH probes, which cannot hold for the reasons given at CONFIG. Its findings are read from
its JSON report. What it found in the OpenAPI document is pinned below by plain tests: the
fixed findings as regression tests, the open one as an xfail naming the server's bug.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import messenger_server as ms
from tests.conftest import Client, connect

SERVER_SCRIPT = Path(ms.__file__).resolve()
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
EXAMPLES = 75  # per operation and phase: about 2,000 cases, 15 s on two cores

CONFIG = """
# Each case gets a token of the user "fuzzer"; a 401 (after the fuzzer called /disconnect)
# makes schemathesis connect again and replay the request.
[auth.dynamic.openapi.bearer]
path = "/connect"
payload = { user = "fuzzer", password = "fuzz" }
extract_selector = "/token"

[phases.coverage]
# The contract answers a method that RFC 9110 does not define (PATCH) with 501, and only a
# standard method (or QUERY) a path does not take with 405; schemathesis expects 405 for all.
unexpected-methods = ["get", "put", "post", "delete", "options", "trace"]
"""
# positive_data_acceptance expects a 2xx for every schema-valid request, but the contract
# refuses (400) schema-valid requests on rules a JSON schema cannot state: a send with both
# `chat` and `to`, a `send_at` in the past, reporting oneself, leaving `general`.
EXCLUDED_CHECKS = "positive_data_acceptance"

# Findings that are not bugs, each for a reason no config switch of schemathesis 4.32 states
# (its per-operation check settings do not reach the stateful phase):
# - ST110 on a download: a file is served with the Content-Type its uploader declared, and
#   schemathesis parses a body by its Content-Type, so random bytes it uploaded as text/yaml
#   come back as text/yaml that no YAML parser reads. The bytes are the user's; the document
#   rightly says "*/*, binary".
# - ST302 after POST /chat: inviting an unknown user, or deciding on a request nobody made,
#   answers 404 about that *user* (API.md); schemathesis takes it for the chat just created.
EXPLAINED = {("ST110", "GET /files/{id}"), ("ST302", "Stateful tests")}
ST302_EXPLAINED = {"POST /chat/{name}/invite", "POST /chat/{name}/requests/{user}"}


SERVER_FLAGS = (
    "--password-cost", "4",
    # Limits that would turn the fuzzer's later requests into 429s and hide their answers:
    "--rate-limit", "1000000", "--report-limit", "1000000", "--login-failures", "1000000",
    "--password-checks-per-ip", "1000000", "--hash-share", "64",
    "--max-wait", "0.2",  # a generated wait=60 would stall the run for a minute
)


def start_server(state: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The server in a child process, logging to a file (a pipe nobody reads would fill up)."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(SERVER_SCRIPT), "--port", "0", "--state-dir", str(state),
             *SERVER_FLAGS],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return process, int(found[1])
        assert process.poll() is None, log.read_text()
        time.sleep(0.05)  # a child's log file offers no event to wait on
    process.kill()
    raise AssertionError(f"the server did not start: {log.read_text()}")


@pytest.fixture(scope="module")
def schemathesis_report(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Run schemathesis once against a fresh server; its JSON report, and the server's log."""
    if not SCHEMATHESIS.exists():
        pytest.fail("schemathesis is missing: pip install -r requirements-dev.txt")
    folder = tmp_path_factory.mktemp("schemathesis")
    process, port = start_server(folder / "state", folder / "server.log")
    try:
        (folder / "schemathesis.toml").write_text(CONFIG)
        report_path = folder / "report.json"
        run = subprocess.run(
            [str(SCHEMATHESIS), "--config-file", str(folder / "schemathesis.toml"), "--no-color",
             "run", f"http://127.0.0.1:{port}/openapi.json", "--checks", "all",
             "--exclude-checks", EXCLUDED_CHECKS, "--max-examples", str(EXAMPLES),
             "--seed", "20261127", "--report", "json", "--report-json-path", str(report_path)],
            cwd=folder, capture_output=True, text=True, timeout=300, check=False,
        )
        assert report_path.exists(), run.stdout + run.stderr
        report: dict[str, Any] = json.loads(report_path.read_text())
        report["console"] = run.stdout
    finally:
        process.terminate()
        process.wait(20)
    report["server_log"] = (folder / "server.log").read_text()
    yield report


@pytest.mark.slow
def test_schema_fuzzing_finds_no_server_error(schemathesis_report: dict[str, Any]) -> None:
    report = schemathesis_report
    print(f"schemathesis: {report['test_cases']['generated']} cases over "
          f"{report['operations']['tested']} operations, phases "
          f"{ {name: phase['status'] for name, phase in report['phases'].items()} }")
    assert report["complete"], report["console"][-3000:]
    assert report["operations"]["tested"] == report["operations"]["total"] >= 21
    assert report["test_cases"]["generated"] > 1000
    assert report["errors"] == [], report["console"][-3000:]
    server_errors = [f for f in report["failures"] if f["code"] == "ST101"]
    assert server_errors == [], report["console"][-5000:]
    assert "Traceback" not in report["server_log"]


@pytest.mark.slow
def test_schema_fuzzing_answers_match_the_document(schemathesis_report: dict[str, Any]) -> None:
    """Every check passes, but for the findings explained above."""
    console = schemathesis_report["console"]
    found = {(f["code"], operation) for f in schemathesis_report["failures"]
             for operation in f["operations"]}
    assert found - EXPLAINED == set(), f"{sorted(found - EXPLAINED)}\n{console[-8000:]}"
    not_found_after_create = set(re.findall(r"Not available with: `([^`]+)`", console))
    assert not_found_after_create <= ST302_EXPLAINED, console[-8000:]


# What schemathesis found in the document, as plain tests ######################


def test_openapi_connect_documents_its_401() -> None:
    """schemathesis found it undocumented (ST103); fixed in build_openapi() meanwhile."""
    assert "401" in ms.build_openapi()["paths"]["/connect"]["post"]["responses"]


def _parameter_minimum(path: str, name: str) -> Any:
    parameters = ms.build_openapi()["paths"][path]["get"]["parameters"]
    return next(p["schema"].get("minimum") for p in parameters if p["name"] == name)


def test_openapi_documents_the_query_minimums() -> None:
    assert _parameter_minimum("/messages", "since") == 0
    assert _parameter_minimum("/messages", "wait") == 0
    assert _parameter_minimum("/messages", "limit") == 1
    assert _parameter_minimum("/history", "limit") == 1
    assert _parameter_minimum("/history", "before") == 1
    send = ms.build_openapi()["paths"]["/send"]["post"]["requestBody"]
    assert send["content"]["application/json"]["schema"]["properties"]["reply_to"]["minimum"] == 1


def _allows_null(schema: dict[str, Any]) -> bool:
    if "oneOf" in schema:
        return any(_allows_null(option) for option in schema["oneOf"])
    kind = schema.get("type")
    return kind == "null" or (isinstance(kind, list) and "null" in kind)


NULLABLE_CASES = [
    ("/chat", "private", {"chat_name": "club", "private": None}),
    ("/report", "reason", {"user": "bob", "reason": None}),
    ("/send", "chat", {"text": "hi", "chat": None}),
    ("/send", "reply_to", {"text": "hi", "reply_to": None}),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "field", "body"), NULLABLE_CASES,
                         ids=[f"{p}-{f}" for p, f, _ in NULLABLE_CASES])
async def test_openapi_and_server_agree_on_null_for_optional_fields(
    server: ms.MessengerServer, path: str, field: str, body: dict[str, Any]
) -> None:
    """schemathesis found null accepted where the document said boolean or string (ST201);
    the document now says nullable, as the server has always read null as absent."""
    alice = await connect(server.port, "alice")
    bob = await connect(server.port, "bob")
    async with Client(server.port) as client:
        said = await client.request("POST", "/send", {"text": "something to report"}, token=bob)
        assert said.status == 201
        answer = await client.request("POST", path, body, token=alice)
    operation = ms.build_openapi()["paths"][path]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    documented = _allows_null(schema["properties"][field])
    assert (answer.status < 400) == documented, (answer.status, answer.body)
