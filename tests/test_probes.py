"""The HTTP/1.1 probes of tests/data/http-probes: each raw request, sent in one write.

An accepted case gets its normal answers in order; a rejected one gets one error answer
(its status among those the case allows) and a closed connection. After every case the
server still answers ``GET /health`` on a new connection.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

import messenger_server as ms
from tests.conftest import Client, at_eof, read_response

CASES_FILE = Path(__file__).resolve().parent / "data" / "http-probes" / "cases.json"
CASES: list[dict[str, Any]] = json.loads(CASES_FILE.read_text())

# Answers that mean "the request was well-formed": found, or refused by routing.
NORMAL = {200, 201, 204, 401, 404, 405, 501}
_FIRST_LINE = re.compile(rb"((?:\r\n)*[!-~]+ )/[\x21\x22\x24-\x3e\x40-\x7e]{0,64}(?=[ ?#])")
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)([A-Z]+) \S+ HTTP/")


def rewrite_first_target(raw: bytes) -> bytes:
    """Point the first request at /health (keeping method and query): bodies stay intact."""
    return _FIRST_LINE.sub(rb"\1/health", raw, count=1)


def methods_in(raw: bytes) -> list[bytes]:
    return [match[1] for match in _REQUEST_LINE.finditer(raw)]


def expected_statuses(case: dict[str, Any]) -> set[int]:
    return {status for status in case["expected_status"] if isinstance(status, int)}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
async def test_probe_verdict(server: ms.MessengerServer, case: dict[str, Any]) -> None:
    raw = rewrite_first_target(base64.b64decode(case["raw_b64"]))
    methods = methods_in(raw)
    responses = case["responses"] if isinstance(case["responses"], int) else 1
    async with Client(server.port) as client:
        await client.send_raw(raw)
        answers = []
        for index in range(responses + (case["expected"] == "reject")):
            # A rejected head is answered with a body: the server may not know it was HEAD.
            head_only = index < min(responses, len(methods)) and methods[index] == b"HEAD"
            answer = await read_response(client.reader, head_only=head_only)
            if answer is None:
                break
            answers.append(answer)
        verdict = _verdict(case, answers, responses)
        if case["expected"] == "reject" or case["close_after"] is True:
            closed = await at_eof(client.reader)
            assert closed or verdict == "accept", "the connection stayed open after an error"
    allowed = {case["expected"], case.get("also_ok") or case["expected"]}
    assert verdict in allowed, f"got {verdict}: {[(a.status, a.body) for a in answers]}"
    async with Client(server.port) as fresh:
        assert (await fresh.request("GET", "/health")).status == 200


def _verdict(case: dict[str, Any], answers: list[Any], responses: int) -> str:
    """'accept' if the normal answers came, 'reject' if an allowed error ended them."""
    normal = [answer for answer in answers[:responses] if answer.status in NORMAL]
    if case["expected"] == "accept" and len(normal) == responses == len(answers):
        return "accept"
    if len(answers) == len(normal) + 1 and answers[-1].status in expected_statuses(case):
        error = answers[-1].json()
        assert set(error) >= {"error", "message"}
        return "reject"
    if case["expected"] == "reject" and len(answers) == len(normal) == responses:
        return "reject"  # closed without a word: allowed when the request never completed
    return f"unexpected answers {[(a.status, a.body[:80]) for a in answers]}"
