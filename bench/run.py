"""The messenger's benchmark suite: one command runs every scenario and prints a table.

    python bench/run.py [--quick] [--rounds 3] [--duration 5] [--only NAME] [--ref-python PY]
    python bench/run.py --baseline OLD/messenger_server.py --rounds 7   # this code vs OLD

Servers run as subprocesses pinned to CPU 0 (``taskset -c 0``); wrk and this script's own
asyncio clients run on CPU 1. Throughput scenarios interleave the messenger and the reference
servers (A B A B …) and report medians and ratios. ``bench/README.md`` says what each scenario
measures and how. Standard library only: the aiohttp reference runs under ``--ref-python``,
an interpreter that has ``bench/requirements-bench.txt`` installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

import messenger_server  # noqa: E402  (the 1M-message state is built with the server's code)

T = TypeVar("T")

HOST = "127.0.0.1"
SERVER_CPU = 0
CLIENT_CPU = 1
PASSWORD = "benchmark-password"
BENCH_USERS = 100_000  # registrations per address the servers allow the load
BENCH_FLOOD = 1_000_000_000  # messages per user per flood window: wrk sends thousands a second
HASHES_AT_ONCE = 2  # connects at a time: a one-core server answers 503 to more per address
PER_ADDRESS = 200  # client connections per source address (127.0.0.2, …): the server allows 256
WRK_CONNECTIONS = 50
WARMUP = 1  # seconds of wrk per contender before the measured rounds
ROOM = "room100"
ROOM_MEMBERS = 100
SEND_BODY = json.dumps({"chat": ROOM, "text": "a benchmark message of ordinary length"})
FANOUT_CHAT = "fanout"
FANOUT_SENDS = 20
ANSWER_TIMEOUT = 10.0  # seconds a long-poll may take to answer a send before it counts as lost
PROBE_INTERVAL = 0.002  # seconds between two loop-lag probes
STATE_CHATS = 10  # the stored messages are spread over this many chats
FEW_CHATS, MANY_CHATS = 5, 500  # memberships of the two readers of "conversations", general too
CONVERSATION_POLLERS = 10  # keep-alive connections polling at once in "conversations"
CONVERSATION_NEWS = 3  # chats with an unread message for the readers of "conversations"
BASELINE_UNREAD = 10  # messages the reader of "baseline" has not read
STATE_MEMBERS = 10  # users per chat
SERVER_START_TIMEOUT = 60.0  # seconds a server gets to answer its first /health
SERVER_STOP_TIMEOUT = 120.0  # seconds a server gets to save and exit after SIGTERM
LOG_TIMEOUT = 120.0  # seconds to wait for an expected server log line
ROUTINE_LOG = re.compile(r"^\S+ \S+ (?:DEBUG|INFO) ")  # other server output is a problem
REFERENCES = {
    "raw-protocol": "raw_protocol_server.py",
    "aiohttp": "aiohttp_server.py",
    "streams": "streams_server.py",
}


class BenchError(Exception):
    """A scenario could not be measured: a server did not answer as expected."""


@dataclass(frozen=True)
class Sizes:
    rounds: int
    duration: int  # seconds per measured wrk run
    fanout_sessions: int
    fanout_spacing: float  # seconds between the polls going out and the send
    idle_connections: int
    stored_messages: int


FULL = Sizes(3, 5, 1000, 0.5, 10_000, 1_000_000)
QUICK = Sizes(1, 1, 100, 0.2, 500, 50_000)


# A minimal HTTP/1.1 client ##################################################


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    arrived: float  # time.perf_counter() when its first byte arrived

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class HttpConnection(asyncio.Protocol):
    """One keep-alive client connection, one request at a time; answers carry Content-Length.

    A Protocol rather than streams: the arrival time of each answer is taken as its first
    bytes are handed over, so a thousand answers at once are timed without client queueing.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._arrived = 0.0
        self._waiter: asyncio.Future[Reply] | None = None

    @classmethod
    async def open(cls, port: int, source: str = HOST) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(cls, HOST, port, local_addr=(source, 0))
        return connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if not self._buffer:
            self._arrived = time.perf_counter()
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end == -1:
            return
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if len(self._buffer) < end + 4 + length:
            return
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(Reply(int(lines[0].split()[1]), body, self._arrived))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("the server closed the connection"))

    async def request(
        self, method: str, path: str, body: object = None, token: str | None = None
    ) -> Reply:
        assert self._transport is not None
        if self._transport.is_closing():  # asyncio would drop the write and never answer
            raise ConnectionResetError("the connection is closed")
        head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}"]
        payload = b"" if body is None else json.dumps(body).encode()
        if payload:
            head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        if token is not None:
            head.append(f"Authorization: Bearer {token}")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    async def call(
        self, method: str, path: str, body: object = None, token: str | None = None
    ) -> Any:
        """The JSON answer of a request that must succeed (2xx)."""
        reply = await self.request(method, path, body, token)
        if not 200 <= reply.status < 300:
            raise BenchError(f"{method} {path} -> {reply.status} {reply.body[:200]!r}")
        return reply.json()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


async def get_once(port: int, path: str) -> Reply:
    connection = await HttpConnection.open(port)
    try:
        return await connection.request("GET", path)
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def source_address(index: int) -> str:
    """The client address of the index-th connection: PER_ADDRESS connections per address."""
    return f"127.0.0.{2 + index // PER_ADDRESS}"


async def bounded(job: Callable[[int], Awaitable[T]], count: int, limit: int = 100) -> list[T]:
    """``job(0)`` … ``job(count - 1)``, at most ``limit`` at a time; the results in order."""
    gate = asyncio.Semaphore(limit)

    async def run(index: int) -> T:
        async with gate:
            return await job(index)

    return await asyncio.gather(*(run(index) for index in range(count)))


@dataclass(frozen=True)
class Session:
    name: str
    token: str
    connection: HttpConnection


async def open_sessions(port: int, names: Sequence[str], chat: str | None) -> list[Session]:
    """Register each name through POST /connect on its own connection, and join ``chat``."""

    async def one(index: int) -> Session:
        connection = await HttpConnection.open(port, source_address(index))
        answer = await connection.call(
            "POST", "/connect", {"user": names[index], "password": PASSWORD}
        )
        if chat is not None:
            await connection.call("POST", "/chat", {"chat_name": chat}, answer["token"])
        return Session(names[index], answer["token"], connection)

    return await bounded(one, len(names), HASHES_AT_ONCE)


def close_all(sessions: Sequence[Session]) -> None:
    for session in sessions:
        session.connection.close()


async def make_room(port: int) -> tuple[str, int]:
    """A chat of ROOM_MEMBERS members with one message; a member's token and that message's id."""
    members = await open_sessions(port, [f"member{i}" for i in range(ROOM_MEMBERS)], ROOM)
    sender = members[0]
    answer = await sender.connection.call("POST", "/send", json.loads(SEND_BODY), sender.token)
    close_all(members)
    return sender.token, int(answer["message"]["id"])


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile (``share`` in 0–100) of non-empty ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * share / 100) - 1)]


# Servers ####################################################################


@functools.cache
def known_flags(script: Path) -> set[str]:
    """The command-line flags a server script accepts (from its ``--help``)."""
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                           text=True, check=True).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", shown))


def cpu_seconds(server: Server) -> float:
    """The CPU time (user + system) a server process has used so far."""
    stat = Path(f"/proc/{server.process.pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """A server subprocess; its stderr is kept line by line for waiting and for problems."""

    def __init__(
        self, name: str, process: asyncio.subprocess.Process, port: int, spawned: float, *,
        clean_exit: bool,
    ) -> None:
        self.name = name
        self.process = process
        self.port = port
        self.clean_exit = clean_exit  # a non-zero exit is a problem (references may just die)
        self.lines: list[str] = []
        self.ready_after = 0.0  # seconds from spawn to the first /health answer
        self._spawned = spawned  # time.perf_counter() just before the spawn
        self._logged = asyncio.Condition()
        self._reader = asyncio.create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            async with self._logged:
                self.lines.append(raw.decode(errors="replace").rstrip())
                self._logged.notify_all()
        async with self._logged:
            self._logged.notify_all()

    async def wait_healthy(self) -> None:
        """Until GET /health answers 200 (no fixed sleep: a retry every 10 ms)."""
        try:
            async with asyncio.timeout(SERVER_START_TIMEOUT):
                while self.process.returncode is None:
                    with contextlib.suppress(OSError):
                        if (await get_once(self.port, "/health")).status == 200:
                            self.ready_after = time.perf_counter() - self._spawned
                            return
                    await asyncio.sleep(0.01)
        except TimeoutError:
            raise BenchError(
                f"{self.name} did not answer /health within {SERVER_START_TIMEOUT:.0f} s"
            ) from None
        await self._reader
        tail = " | ".join(self.lines[-5:])
        raise BenchError(f"{self.name} exited with {self.process.returncode}: {tail}")

    async def wait_for_log(self, pattern: re.Pattern[str], start: int) -> re.Match[str]:
        """The first line from index ``start`` on that matches ``pattern``, when it comes."""
        async with asyncio.timeout(LOG_TIMEOUT), self._logged:
            while True:
                for line in self.lines[start:]:
                    if match := pattern.search(line):
                        return match
                start = len(self.lines)
                if self._reader.done():
                    raise BenchError(f"{self.name} exited before logging {pattern.pattern!r}")
                await self._logged.wait()

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None
        return int(match[1])

    async def stop(self) -> list[str]:
        """SIGTERM, then the problems seen: unexpected output, a bad exit, a hang."""
        problems = []
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), SERVER_STOP_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
                problems.append(f"did not exit within {SERVER_STOP_TIMEOUT:.0f} s of SIGTERM")
        await self._reader
        problems += [line for line in self.lines if not ROUTINE_LOG.search(line)]
        if self.clean_exit and self.process.returncode != 0:
            problems.append(f"exited with {self.process.returncode}")
        return [f"{self.name}: {problem}" for problem in problems]


# Measuring ##################################################################


@dataclass(frozen=True)
class WrkTarget:
    path: str
    method: str = "GET"
    body: str = ""
    token: str = ""


@dataclass(frozen=True)
class WrkRun:
    rps: float
    p99_ms: float
    errors: dict[str, int]
    cpu_us: float  # the server's CPU time (user + system) per request, in microseconds


@dataclass(frozen=True)
class Summary:
    """A contender's interleaved runs: medians of req/s and p99, errors added up."""

    runs: list[WrkRun]

    @property
    def rps(self) -> float:
        return statistics.median(run.rps for run in self.runs)

    @property
    def p99_ms(self) -> float:
        return statistics.median(run.p99_ms for run in self.runs)

    @property
    def errors(self) -> dict[str, int]:
        return {kind: sum(run.errors[kind] for run in self.runs) for kind in self.runs[0].errors}

    @property
    def cpu_us(self) -> float:
        return statistics.median(run.cpu_us for run in self.runs)


@dataclass(frozen=True)
class Figure:
    scenario: str
    name: str
    value: str
    goal: str = ""
    met: bool | None = None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "MISSED", None: ""}[self.met]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [headers, ["-" * width for width in widths], *rows]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in lines
    )


class Bench:
    """What the scenarios share: the sizes, the servers they start, the figures they report."""

    def __init__(
        self, sizes: Sizes, ref_python: str, workdir: Path, pin: bool,
        baseline: Path | None = None,
    ) -> None:
        self.sizes = sizes
        self.baseline = baseline  # another commit's messenger_server.py, for "baseline"
        self.ref_python = ref_python
        self.workdir = workdir
        self.pin = pin
        self.figures: list[Figure] = []
        self.problems: list[str] = []
        self._servers: list[Server] = []

    def pinned(self, cpu: int, argv: list[str]) -> list[str]:
        return ["taskset", "-c", str(cpu), *argv] if self.pin else argv

    async def _start(self, name: str, argv: list[str], port: int, *, clean_exit: bool) -> Server:
        spawned = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *self.pinned(SERVER_CPU, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        server = Server(name, process, port, spawned, clean_exit=clean_exit)
        self._servers.append(server)
        await server.wait_healthy()
        return server

    async def messenger(
        self, name: str, *flags: str, state_dir: Path | None = None, log_level: str = "WARNING",
        script: Path = ROOT / "messenger_server.py",
    ) -> Server:
        """A messenger server: this checkout's, or ``script`` (another commit's, whose
        limits it does not know are left out: an older server may not have them)."""
        state_dir = state_dir or Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        port = free_port()
        limits = [
            "--registrations-per-ip", str(BENCH_USERS), "--flood-limit", str(BENCH_FLOOD),
            "--password-checks-per-ip", str(BENCH_USERS), "--hash-share", "64",
            "--max-kept-text", str(2**40), "--max-total-text", str(2**40),
        ]
        known = known_flags(script)
        limits = [
            part for flag, value in zip(limits[::2], limits[1::2], strict=True)
            if flag in known for part in (flag, value)
        ]
        argv = [
            sys.executable, str(script), "--port", str(port), "--state-dir", str(state_dir),
            "--password-cost", "4", "--log-level", log_level, *limits, *flags,
        ]
        return await self._start(name, argv, port, clean_exit=True)

    async def reference(self, name: str) -> Server:
        python = self.ref_python if name == "aiohttp" else sys.executable
        port = free_port()
        argv = [python, str(BENCH / REFERENCES[name]), "--port", str(port)]
        return await self._start(name, argv, port, clean_exit=False)

    async def stop(self, server: Server) -> None:
        self._servers.remove(server)
        self.problems += await server.stop()

    async def stop_servers(self) -> None:
        for server in list(self._servers):
            await self.stop(server)

    def figure(
        self, scenario: str, name: str, value: str, goal: str = "", met: bool | None = None
    ) -> None:
        found = Figure(scenario, name, value, goal, met)
        self.figures.append(found)
        print(f"  {name}: {value}" + (f"  (goal {goal}: {found.verdict})" if goal else ""))

    async def wrk(self, server: Server, target: WrkTarget, duration: int) -> WrkRun:
        argv = [
            "wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{duration}s", "--timeout", "5s",
            "-s", str(BENCH / "wrk_report.lua"), f"http://{HOST}:{server.port}{target.path}",
        ]
        env = {
            **os.environ,
            "BENCH_METHOD": target.method,
            "BENCH_BODY": target.body,
            "BENCH_TOKEN": target.token,
        }
        cpu_before = cpu_seconds(server)
        process = await asyncio.create_subprocess_exec(
            *self.pinned(CLIENT_CPU, argv), env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await process.communicate()
        cpu = cpu_seconds(server) - cpu_before
        found = re.search(r"^BENCH_RESULT (\{.*\})$", out.decode(), re.MULTILINE)
        if process.returncode != 0 or found is None:
            raise BenchError(f"wrk failed ({process.returncode}): {err.decode().strip()}")
        result = json.loads(found[1])
        errors = {k: result[k] for k in ("connect", "read", "write", "status", "timeout")}
        rps = result["requests"] / (result["duration_us"] / 1e6)
        cpu_us = cpu * 1e6 / max(1, result["requests"])
        return WrkRun(rps, result["p99_us"] / 1000, errors, cpu_us)

    async def interleave(
        self, title: str, contenders: Sequence[tuple[Server, WrkTarget]]
    ) -> dict[str, Summary]:
        """Warm each contender up, then run them A B A B … for the rounds; one row each."""
        rounds, duration = self.sizes.rounds, self.sizes.duration
        print(f"\n== {title}: {rounds} interleaved round(s) × {duration} s, "
              f"{WRK_CONNECTIONS} connections")
        for server, target in contenders:
            await self.wrk(server, target, WARMUP)
        runs: dict[str, list[WrkRun]] = {server.name: [] for server, _ in contenders}
        for _ in range(rounds):
            for server, target in contenders:
                runs[server.name].append(await self.wrk(server, target, duration))
        summaries = {name: Summary(results) for name, results in runs.items()}
        rows = []
        for name, summary in summaries.items():
            errors = {kind: count for kind, count in summary.errors.items() if count}
            if errors:
                self.problems.append(f"{name}, {title}: wrk counted errors {errors}")
            rounds_text = " ".join(f"{run.rps:,.0f}" for run in summary.runs)
            rows.append([name, f"{summary.rps:,.0f}", f"{summary.p99_ms:.2f}",
                         str(sum(errors.values())), rounds_text])
        print(table(["contender", "req/s (median)", "p99 ms", "errors", "req/s by round"], rows))
        return summaries

    def compare(
        self, scenario: str, summaries: dict[str, Summary], subject: str,
        goals: dict[str, float | None],
    ) -> None:
        """The subject's figures, and its ratio to each reference (with the goal, if any)."""
        mine = summaries[subject]
        self.figure(scenario, f"{subject} req/s", f"{mine.rps:,.0f} (p99 {mine.p99_ms:.2f} ms)")
        for reference, goal in goals.items():
            theirs = summaries[reference]
            ratio = mine.rps / theirs.rps
            value = f"{ratio:.2f}× ({theirs.rps:,.0f} req/s, p99 {theirs.p99_ms:.2f} ms)"
            if goal is None:
                self.figure(scenario, f"ratio to {reference}", value)
            else:
                self.figure(scenario, f"ratio to {reference}", value, f"≥ {goal}×", ratio >= goal)


# Scenarios ##################################################################


async def scenario_health(bench: Bench) -> None:
    """GET /health over 50 connections: the messenger against every reference."""
    servers = [await bench.messenger("messenger")]
    servers += [await bench.reference(name) for name in ("aiohttp", "raw-protocol", "streams")]
    summaries = await bench.interleave(
        "GET /health", [(server, WrkTarget("/health")) for server in servers]
    )
    goals = {"aiohttp": 2.0, "raw-protocol": 0.7, "streams": None}
    bench.compare("GET /health", summaries, "messenger", goals)


async def scenario_send(bench: Bench) -> None:
    """Authenticated POST /send to a chat of 100 members against do-nothing JSON POSTs."""
    messenger = await bench.messenger("messenger", "--fsync", "everysec")
    token, _ = await make_room(messenger.port)
    target = WrkTarget("/send", "POST", SEND_BODY, token)  # the references get the same bytes
    servers = [messenger, await bench.reference("aiohttp"), await bench.reference("raw-protocol")]
    summaries = await bench.interleave(
        "POST /send, chat of 100 members, --fsync everysec",
        [(server, target) for server in servers],
    )
    bench.compare("POST /send", summaries, "messenger", {"aiohttp": 1.0, "raw-protocol": None})


async def scenario_messages(bench: Bench) -> None:
    """Authenticated GET /messages with nothing new against do-nothing GETs."""
    messenger = await bench.messenger("messenger")
    token, last_id = await make_room(messenger.port)
    target = WrkTarget(f"/messages?since={last_id}", token=token)
    servers = [messenger, await bench.reference("aiohttp"), await bench.reference("raw-protocol")]
    summaries = await bench.interleave(
        "GET /messages, nothing new", [(server, target) for server in servers]
    )
    goals = {"aiohttp": 1.5, "raw-protocol": None}
    bench.compare("GET /messages", summaries, "messenger", goals)


async def scenario_fsync(bench: Bench) -> None:
    """POST /send with the journal fsynced before each answer, against once a second."""
    contenders = []
    for mode in ("always", "everysec"):
        server = await bench.messenger(f"fsync-{mode}", "--fsync", mode)
        token, _ = await make_room(server.port)
        contenders.append((server, WrkTarget("/send", "POST", SEND_BODY, token)))
    summaries = await bench.interleave("POST /send, --fsync always vs everysec", contenders)
    bench.compare("fsync", summaries, "fsync-always", {"fsync-everysec": None})


async def scenario_fanout(bench: Bench) -> None:
    """N sessions long-poll one chat; each send must reach every one of them, fast."""
    count = bench.sizes.fanout_sessions
    print(f"\n== fan-out: {count} long-polling sessions, {FANOUT_SENDS} sends")
    server = await bench.messenger("messenger")
    names = [f"poller{i}" for i in range(count)] + ["sender"]
    *pollers, sender = await open_sessions(server.port, names, FANOUT_CHAT)
    latencies, _ = await fan_out(bench, pollers, sender, 0)
    close_all([*pollers, sender])
    expected = count * FANOUT_SENDS
    scenario = f"fan-out {count}"
    bench.figure(scenario, "polls answered", f"{len(latencies)}/{expected}",
                 "all", len(latencies) == expected)
    if latencies:
        bench.figure(scenario, "p50 ms", f"{percentile(latencies, 50) * 1000:.1f}")
        p99 = percentile(latencies, 99) * 1000
        bench.figure(scenario, "p99 ms", f"{p99:.1f}", "≤ 50 ms", p99 <= 50)
        bench.figure(scenario, "max ms", f"{max(latencies) * 1000:.1f}")


async def fan_out(
    bench: Bench, pollers: Sequence[Session], sender: Session, since: int
) -> tuple[list[float], int]:
    """FANOUT_SENDS sends, each awaited by a long-poll of every poller (from ``since``, the
    id of the chat's last message): the latency of each answer, and the new last id."""
    spacing = bench.sizes.fanout_spacing
    latencies: list[float] = []
    for number in range(FANOUT_SENDS):
        path = f"/messages?chat={FANOUT_CHAT}&since={since}&wait=30"
        polls = [
            asyncio.create_task(poller.connection.request("GET", path, token=poller.token))
            for poller in pollers
        ]
        await asyncio.sleep(spacing)  # the spacing between sends: every poll is parked by now
        if early := sum(poll.done() for poll in polls):
            bench.problems.append(f"fan-out send {number}: {early} polls answered before it")
        sent = await sender.connection.request(
            "POST", "/send", {"chat": FANOUT_CHAT, "text": f"fan-out {number}"}, sender.token
        )
        since = int(sent.json()["message"]["id"])
        done, lost = await asyncio.wait(polls, timeout=ANSWER_TIMEOUT)
        for poll in done:
            if (failure := poll.exception()) is not None:
                bench.problems.append(f"fan-out send {number}: a poll failed: {failure!r}")
                continue
            reply = poll.result()
            if reply.status != 200 or [m["id"] for m in reply.json()["messages"]] != [since]:
                bench.problems.append(f"fan-out send {number}: {reply.status} {reply.body[:200]!r}")
            latencies.append(max(0.0, reply.arrived - sent.arrived))
        if lost:
            bench.problems.append(f"fan-out send {number}: {len(lost)} polls unanswered")
            for poll in lost:
                poll.cancel()
            break
    return latencies, since


async def poll_rate(port: int, token: str, path: str, seconds: float) -> float:
    """GET ``path`` over CONVERSATION_POLLERS keep-alive connections for ``seconds``: req/s."""
    deadline = time.perf_counter() + seconds
    counts = []

    async def poller(_: int) -> None:
        connection = await HttpConnection.open(port)
        done = 0
        try:
            while time.perf_counter() < deadline:
                reply = await connection.request("GET", path, token=token)
                if reply.status != 200:
                    raise BenchError(f"GET {path} -> {reply.status} {reply.body[:200]!r}")
                done += 1
        finally:
            connection.close()
        counts.append(done)

    started = time.perf_counter()
    await bounded(poller, CONVERSATION_POLLERS)
    return sum(counts) / (time.perf_counter() - started)


async def scenario_conversations(bench: Bench) -> None:
    """GET /messages for a user in 5 chats and one in 500, a few with unread messages: the
    cost of a poll must not grow with the chats a user is in."""
    rounds, duration = bench.sizes.rounds, bench.sizes.duration
    print(f"\n== conversations: GET /messages, a user in {FEW_CHATS} chats vs {MANY_CHATS}, "
          f"{CONVERSATION_POLLERS} connections, {rounds} interleaved round(s) × {duration} s")
    server = await bench.messenger("messenger", "--max-owned-chats", str(MANY_CHATS))
    writer, few, many = [(await open_sessions(server.port, [name], None))[0]
                         for name in ("writer", "few", "many")]  # one hash at a time
    for number in range(1, MANY_CHATS):  # and general: MANY_CHATS memberships
        room = {"chat_name": f"room{number}"}
        await writer.connection.call("POST", "/chat", room, writer.token)
        await many.connection.call("POST", "/chat", room, many.token)
        if number < FEW_CHATS:
            await few.connection.call("POST", "/chat", room, few.token)
    last = 0
    for number in range(1, CONVERSATION_NEWS + 1):
        body = {"chat": f"room{number}", "text": "news"}
        last = (await writer.connection.call("POST", "/send", body, writer.token))["message"]["id"]
    # News in a chat the readers are not in: the server is not quiet, they are caught up.
    await writer.connection.call("POST", "/chat", {"chat_name": "elsewhere"}, writer.token)
    await writer.connection.call("POST", "/send", {"text": "elsewhere"}, writer.token)
    close_all([writer, few, many])
    polls = {  # what the client polls: read --follow --all; read --all; read --follow
        "since (caught up), every chat": f"/messages?since={last}",
        "unread, every chat": "/messages",
        "since, active chat and @": f"/messages?since={last}&chat=general&chat=%40",
    }
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for kind, path in polls.items():
            for reader in (few, many):
                rate = await poll_rate(server.port, reader.token, path, duration)
                rates.setdefault((kind, reader.name), []).append(rate)
    rows = []
    for kind in polls:
        few_rate = statistics.median(rates[kind, "few"])
        many_rate = statistics.median(rates[kind, "many"])
        ratio = many_rate / few_rate
        rows.append([kind, f"{few_rate:,.0f}", f"{many_rate:,.0f}", f"{ratio:.2f}"])
        bench.figure("conversations", f"{kind}: {MANY_CHATS} chats / {FEW_CHATS}",
                     f"{ratio:.2f}× ({many_rate:,.0f} vs {few_rate:,.0f} req/s)",
                     "≥ 0.9×", ratio >= 0.9)
    print(table(["poll", f"{FEW_CHATS} chats req/s", f"{MANY_CHATS} chats req/s", "ratio"],
                rows))


async def reading_targets(port: int) -> dict[str, WrkTarget]:
    """What ``baseline`` reads on a server: a chat of ROOM_MEMBERS with one message and,
    after it, BASELINE_UNREAD from another member; one reader caught up, one behind."""
    members = await open_sessions(port, [f"member{i}" for i in range(ROOM_MEMBERS)], ROOM)
    caught_up, behind, writer = members[:3]
    body = json.loads(SEND_BODY)
    sent = await caught_up.connection.call("POST", "/send", body, caught_up.token)
    read_to = newest = int(sent["message"]["id"])
    for _ in range(BASELINE_UNREAD):
        sent = await writer.connection.call("POST", "/send", body, writer.token)
        newest = int(sent["message"]["id"])
    close_all(members)
    return {
        "GET /health": WrkTarget("/health"),
        "GET /messages, caught up": WrkTarget(f"/messages?since={newest}", token=caught_up.token),
        f"GET /messages, {BASELINE_UNREAD} unread": WrkTarget(
            f"/messages?since={read_to}", token=behind.token
        ),
    }


async def scenario_baseline(bench: Bench) -> None:
    """This checkout's messenger against ``--baseline`` (another commit's server), round by
    round: the reads and sends by wrk, then fan-out; the ratio of every round."""
    if bench.baseline is None:
        raise BenchError("the baseline scenario needs --baseline OLD/messenger_server.py")
    scripts = {"messenger": ROOT / "messenger_server.py", "baseline": bench.baseline}
    readers = {name: await bench.messenger(name, script=script) for name, script in scripts.items()}
    targets = {name: await reading_targets(server.port) for name, server in readers.items()}
    for title in targets["messenger"]:
        contenders = [(server, targets[name][title]) for name, server in readers.items()]
        compare_baseline(bench, title, await bench.interleave(title, contenders))
    for server in readers.values():
        await bench.stop(server)
    title = f"POST /send, chat of {ROOM_MEMBERS}"
    contenders = []
    for name, script in scripts.items():
        server = await bench.messenger(name, script=script)
        token, _ = await make_room(server.port)
        contenders.append((server, WrkTarget("/send", "POST", SEND_BODY, token)))
    compare_baseline(bench, title, await bench.interleave(title, contenders))
    for server, _ in contenders:
        await bench.stop(server)
    await fan_out_against_baseline(bench, scripts)


def compare_baseline(bench: Bench, title: str, summaries: dict[str, Summary]) -> None:
    mine, theirs = summaries["messenger"], summaries["baseline"]
    ratios = [a.rps / b.rps for a, b in zip(mine.runs, theirs.runs, strict=True)]
    bench.figure(title, "req/s messenger / baseline",
                 f"{mine.rps / theirs.rps:.3f}× ({mine.rps:,.0f} vs {theirs.rps:,.0f}); "
                 f"by round {' '.join(f'{ratio:.2f}' for ratio in ratios)}")
    bench.figure(title, "server CPU µs per request",
                 f"{mine.cpu_us:.1f} vs {theirs.cpu_us:.1f} "
                 f"({theirs.cpu_us / mine.cpu_us:.3f}× as fast)")


async def fan_out_against_baseline(bench: Bench, scripts: dict[str, Path]) -> None:
    """Fan-out to the same number of sessions on both servers, A B A B … by round."""
    count, rounds = bench.sizes.fanout_sessions, bench.sizes.rounds
    print(f"\n== fan-out against the baseline: {count} sessions, {FANOUT_SENDS} sends, "
          f"{rounds} interleaved round(s)")
    names = [f"poller{i}" for i in range(count)] + ["sender"]
    sessions, since = {}, {}
    for name, script in scripts.items():
        server = await bench.messenger(name, script=script)
        sessions[name] = await open_sessions(server.port, names, FANOUT_CHAT)
        since[name] = 0
    p50: dict[str, list[float]] = {name: [] for name in scripts}
    p99: dict[str, list[float]] = {name: [] for name in scripts}
    for _ in range(rounds):
        for name in scripts:
            *pollers, sender = sessions[name]
            latencies, since[name] = await fan_out(bench, pollers, sender, since[name])
            if len(latencies) != count * FANOUT_SENDS:
                raise BenchError(f"{name}: {len(latencies)} of {count * FANOUT_SENDS} answered")
            p50[name].append(percentile(latencies, 50) * 1000)
            p99[name].append(percentile(latencies, 99) * 1000)
    for name in scripts:
        close_all(sessions[name])
    rows = [[name, " ".join(f"{ms:.1f}" for ms in p50[name]),
             " ".join(f"{ms:.1f}" for ms in p99[name])] for name in scripts]
    print(table(["server", "p50 ms by round", "p99 ms by round"], rows))
    title = f"fan-out {count}"
    for label, figures in (("p50", p50), ("p99", p99)):
        mine = statistics.median(figures["messenger"])
        theirs = statistics.median(figures["baseline"])
        ratios = [b / a for a, b in zip(figures["messenger"], figures["baseline"], strict=True)]
        bench.figure(title, f"{label} ms messenger vs baseline",
                     f"{mine:.1f} vs {theirs:.1f} (baseline / messenger {theirs / mine:.3f}); "
                     f"by round {' '.join(f'{ratio:.2f}' for ratio in ratios)}")


async def scenario_idle(bench: Bench) -> None:
    """N keep-alive connections each served once, held, then each served again; RSS cost."""
    count = bench.sizes.idle_connections
    print(f"\n== {count} idle keep-alive connections")
    server = await bench.messenger("messenger")
    before = server.rss_kib()

    async def connect(index: int) -> HttpConnection | None:
        with contextlib.suppress(OSError):
            connection = await HttpConnection.open(server.port, source_address(index))
            if (await connection.request("GET", "/health")).status == 200:
                return connection
        return None

    connections = [c for c in await bounded(connect, count) if c is not None]
    after = server.rss_kib()

    async def again(index: int) -> bool:
        with contextlib.suppress(OSError):
            return (await connections[index].request("GET", "/health")).status == 200
        return False

    served = sum(await bounded(again, len(connections)))
    for connection in connections:
        connection.close()
    scenario = f"{count} idle connections"
    bench.figure(scenario, "opened and served", f"{len(connections)}/{count}", "all",
                 len(connections) == count)
    bench.figure(scenario, "held and served again", f"{served}/{count}", "all", served == count)
    bench.figure(scenario, "server RSS before / after", f"{before:,} / {after:,} KiB")
    per_connection = (after - before) / max(len(connections), 1)
    bench.figure(scenario, "RSS per connection", f"{per_connection:.1f} KiB", "≤ 20 KiB",
                 per_connection <= 20)


async def build_state(folder: Path, count: int) -> None:
    """Snapshot 1 of a state holding ``count`` chat messages, made by the server's own code.

    A ``Messenger`` (no journal) is filled through its own ``register``, ``join`` and
    ``send``, exported, and written by ``StateStore.write_snapshot``, as the server saves.
    """
    ms = messenger_server
    messenger = ms.Messenger(ms.Rules(flood_limit=count))
    users = [f"user{i}" for i in range(STATE_CHATS * STATE_MEMBERS)]
    for index, name in enumerate(users):
        # One address per user: the registration limit is per address.
        messenger.accounts.register(name, bytes(32), bytes(16), 4, f"token-{name}", name)
        messenger.membership.join(name, f"chat{index // STATE_MEMBERS}", False)
    for number in range(1, count + 1):
        chat = number % STATE_CHATS
        sender = users[chat * STATE_MEMBERS + number // STATE_CHATS % STATE_MEMBERS]
        text = f"stored message number {number:07d}, of ordinary length"
        messenger.send(sender, ms.Draft(text=text, chat=f"chat{chat}"))
    state, messages = messenger.export()
    await ms.StateStore(folder).write_snapshot(1, state, messages)


async def probe(port: int, stop: asyncio.Event) -> list[float]:
    """GET /health round-trips, one every PROBE_INTERVAL, until ``stop``: the loop's lag."""
    connection = await HttpConnection.open(port)
    round_trips = []
    while not stop.is_set():
        started = time.perf_counter()
        reply = await connection.request("GET", "/health")
        round_trips.append(reply.arrived - started)
        await asyncio.sleep(PROBE_INTERVAL)
    connection.close()
    return round_trips


async def snapshot_stall(server: Server, stored: int) -> tuple[list[float], float]:
    """The probe's round-trips over one snapshot, and the snapshot's duration from the log.

    The server runs with --snapshot-interval 2: after its first snapshot, one new message
    makes the state change, and the next snapshot (stored + 1 messages) is the one probed.
    """
    any_snapshot = re.compile(r"snapshot \d+: ")
    (user,) = await open_sessions(server.port, ["snapshot-prober"], None)
    await server.wait_for_log(any_snapshot, 0)
    mark = len(server.lines)
    stop = asyncio.Event()
    probing = asyncio.create_task(probe(server.port, stop))
    ours = re.compile(rf"snapshot \d+: {stored + 1} messages, \d+ bytes, (?P<s>[\d.]+) s")
    try:
        await user.connection.call("POST", "/send", {"text": "a change to save"}, user.token)
        match = await server.wait_for_log(ours, mark)
    except BaseException:
        probing.cancel()
        raise
    stop.set()
    round_trips = await probing
    user.connection.close()
    return round_trips, float(match["s"])


async def scenario_million(bench: Bench) -> None:
    """N stored messages: memory per message, restart to serving, the loop stall of a snapshot."""
    count = bench.sizes.stored_messages
    print(f"\n== {count:,} stored messages")
    folder = bench.workdir / "stored"
    started = time.perf_counter()
    await build_state(folder, count)
    print(f"  (state built with the server's code in {time.perf_counter() - started:.1f} s)")
    empty = await bench.messenger("empty")
    empty_rss = empty.rss_kib()
    await bench.stop(empty)
    full = await bench.messenger(
        "stored", "--snapshot-interval", "2", state_dir=folder, log_level="INFO"
    )
    scenario = f"{count:,} messages"
    bench.figure(scenario, "restart to serving", f"{full.ready_after:.2f} s", "≤ 10 s",
                 full.ready_after <= 10)
    full_rss = full.rss_kib()
    per_message = (full_rss - empty_rss) * 1024 / count
    bench.figure(scenario, "server RSS empty / full", f"{empty_rss:,} / {full_rss:,} KiB")
    bench.figure(scenario, "RSS per message", f"{per_message:.0f} B", "≤ 500 B",
                 per_message <= 500)
    round_trips, duration = await snapshot_stall(full, count)
    longest = max(round_trips) * 1000
    bench.figure(scenario, "snapshot duration (server log)", f"{duration:.3f} s")
    bench.figure(scenario, "longest /health round-trip in the snapshot window",
                 f"{longest:.1f} ms ({len(round_trips)} probes, median "
                 f"{statistics.median(round_trips) * 1000:.2f} ms)", "≤ 50 ms", longest <= 50)


SCENARIOS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "health": scenario_health,
    "send": scenario_send,
    "messages": scenario_messages,
    "fsync": scenario_fsync,
    "fanout": scenario_fanout,
    "conversations": scenario_conversations,
    "idle": scenario_idle,
    "million": scenario_million,
    "baseline": scenario_baseline,
}
NEED_WRK = {"health", "send", "messages", "fsync", "baseline"}
NEED_AIOHTTP = {"health", "send", "messages"}
SHOW_AIOHTTP = "import aiohttp, sys; print(sys.version.split()[0], 'aiohttp', aiohttp.__version__)"


# The command ################################################################


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true",
        help="a smoke test: 1 round of 1 s, 100 fan-out sessions, 500 idle connections, "
             "50k stored messages")
    add("--rounds", type=int, help=f"interleaved rounds (default {FULL.rounds})")
    add("--duration", type=int, help=f"seconds per wrk run (default {FULL.duration})")
    add("--only", action="append", choices=list(SCENARIOS), metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    add("--ref-python", default=sys.executable,
        help="the interpreter with aiohttp for the aiohttp reference (default: this one)")
    add("--baseline", type=Path, metavar="FILE",
        help="another commit's messenger_server.py: runs only the baseline scenario, this "
             "checkout's server against it (git show COMMIT:messenger_server.py > FILE)")
    return parser.parse_args()


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit, for this process and the servers it starts."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding ``path`` (fsync means little on tmpfs)."""
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    found = max((m for m in mounts if path.is_relative_to(m[0])), key=lambda m: len(m[0]))
    return f"{found[1]} ({found[0]})"


def wrk_version() -> str:
    try:
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return "missing"
    return done.stdout.split(" [")[0]


def reference_versions(python: str) -> str | None:
    """The Python and aiohttp versions of the reference interpreter; None without aiohttp."""
    try:
        done = subprocess.run([python, "-c", SHOW_AIOHTTP], capture_output=True, text=True,
                              check=False)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine(workdir: Path, ref_python: str, pin: bool, fd_limit: int) -> list[list[str]]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    memory = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return [
        ["cores (nproc)", str(os.cpu_count())],
        ["CPU", model[1] if model else platform.processor()],
        ["memory", f"{int(memory[1]) / 2**20:.1f} GiB" if memory else "?"],
        ["kernel", platform.release()],
        ["Python", platform.python_version()],
        ["reference Python", reference_versions(ref_python) or "aiohttp missing"],
        ["wrk", wrk_version()],
        ["pinning", "servers on CPU 0, load on CPU 1" if pin else "off (fewer than 2 cores)"],
        ["open files limit", str(fd_limit)],
        ["state filesystem", filesystem_of(workdir)],
        ["load average", " ".join(f"{load:.2f}" for load in os.getloadavg())],
    ]


async def run(chosen: list[str], bench: Bench) -> None:
    for name in chosen:
        try:
            await SCENARIOS[name](bench)
        except Exception as exc:
            bench.problems.append(f"{name}: not measured: {type(exc).__name__}: {exc}")
        finally:
            await bench.stop_servers()


def main() -> int:
    args = parse_args()
    preset = QUICK if args.quick else FULL
    sizes = Sizes(
        args.rounds or preset.rounds, args.duration or preset.duration, preset.fanout_sessions,
        preset.fanout_spacing, preset.idle_connections, preset.stored_messages,
    )
    if args.baseline is not None:
        chosen = ["baseline"]
    else:
        chosen = args.only or [name for name in SCENARIOS if name != "baseline"]
    if NEED_WRK & set(chosen) and shutil.which("wrk") is None:
        print("wrk is missing: apt-get install wrk  (Debian package wrk)", file=sys.stderr)
        return 2
    if NEED_AIOHTTP & set(chosen) and reference_versions(args.ref_python) is None:
        print(f"{args.ref_python} has no aiohttp: pip install -r bench/requirements-bench.txt "
              "into it, or give --ref-python", file=sys.stderr)
        return 2
    fd_limit = raise_fd_limit()
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    with tempfile.TemporaryDirectory(prefix="messenger-bench-") as folder:
        workdir = Path(folder)
        print(table(["machine", ""], machine(workdir, args.ref_python, pin, fd_limit)))
        if args.quick:
            print("\n--quick: a smoke test with small sizes; its figures are not results")
        baseline = None if args.baseline is None else args.baseline.resolve()
        bench = Bench(sizes, args.ref_python, workdir, pin, baseline)
        asyncio.run(run(chosen, bench))
    print("\n== summary\n")
    rows = [[f.scenario, f.name, f.value, f.goal, f.verdict] for f in bench.figures]
    print(table(["scenario", "figure", "value", "goal", ""], rows))
    if bench.problems:
        print("\n== problems\n" + "\n".join(f"- {problem}" for problem in bench.problems))
    return 1 if bench.problems else 0


if __name__ == "__main__":
    sys.exit(main())
