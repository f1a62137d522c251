"""Real servers for the tests: ``messenger_server.py`` as a child process, and a
MessengerServer on its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import resource
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import messenger_server as ms

SERVER_SCRIPT = Path(ms.__file__).resolve()
# Flags that lift the per-user and per-address quotas, for load tests where a few users on
# one address stand for many.
UNLIMITED = (
    "--max-owned-chats", "1000000", "--registrations-per-ip", "1000000",
    "--flood-limit", "1000000", "--max-undelivered", "1000000", "--max-memberships", "1000000",
    "--max-scheduled", "1000000", "--upload-quota", str(2**40), "--hash-queue", "64",
    "--hash-share", "64", "--password-checks-per-ip", "1000000",
)


# A child process ############################################################


class ServerProcess:
    """``python messenger_server.py`` as a child process: its log (read as it comes), RSS and
    descriptors. ``flags`` go on its command line after the test settings; ``open_files``,
    if given, is its open-file limit (soft and hard: ``ulimit -n``)."""

    def __init__(self, state_dir: Path, *flags: str, open_files: int | None = None) -> None:
        self.state_dir = state_dir
        self.flags = flags
        self.open_files = open_files
        self.log: list[str] = []
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def process(self) -> asyncio.subprocess.Process:
        assert self._process is not None
        return self._process

    async def start(self) -> int:
        """Start it and wait for its "listening on" log line; the port it listens on."""
        limit = self.open_files

        def limit_open_files() -> None:  # in the child, before it runs Python
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        self._process = await asyncio.create_subprocess_exec(
            sys.executable, str(SERVER_SCRIPT), "--port", "0", "--state-dir", str(self.state_dir),
            "--password-cost", "4", *self.flags,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, limit=1024 * 1024, preexec_fn=limit_open_files,
        )
        stderr = self.process.stderr
        assert stderr is not None
        async with asyncio.timeout(20):
            while True:
                line = (await stderr.readline()).decode()
                assert line, f"the server exited before listening: {''.join(self.log)}"
                self.log.append(line)
                found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if found:
                    self.port = int(found[1])
                    break
        self._reader = asyncio.create_task(self._read_log(stderr))
        return self.port

    async def _read_log(self, stderr: asyncio.StreamReader) -> None:
        while line := await stderr.readline():
            self.log.append(line.decode(errors="replace"))

    def _proc(self, name: str) -> Path:
        return Path(f"/proc/{self.process.pid}/{name}")

    def rss_kib(self) -> int:
        """The resident set size, from /proc/PID/status."""
        found = re.search(r"^VmRSS:\s+(\d+) kB", self._proc("status").read_text(), re.M)
        assert found is not None
        return int(found[1])

    def open_fds(self) -> int:
        return len(os.listdir(self._proc("fd")))

    async def kill(self) -> None:
        self.process.kill()
        await self.process.wait()
        await self._finish_log()

    async def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Send ``signum`` and wait for the exit; the exit code."""
        self.process.send_signal(signum)
        async with asyncio.timeout(20):
            code = await self.process.wait()
        await self._finish_log()
        return code

    async def _finish_log(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reader, 5)

    async def ensure_dead(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def errors(self) -> list[str]:
        """Log lines that mean a bug: a traceback or an unhandled error."""
        return [line for line in self.log if "Traceback" in line or "unhandled" in line]


Spawn = Callable[..., Awaitable[ServerProcess]]


# A background thread ########################################################


class ServerThread:
    """A MessengerServer on its own event loop in a background thread.

    ``requests`` holds the (method, path) of every request answered; ``stop`` and
    ``start_again`` take the server down and bring it back on the same port.
    """

    def __init__(self, config: ms.ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.requests: list[tuple[str, str]] = []
        self.server = self._start(config)
        self.port = self.server.port
        self.config = dataclasses.replace(config, port=self.port)
        self.url = f"http://127.0.0.1:{self.port}"

    def _start(self, config: ms.ServerConfig) -> ms.MessengerServer:
        """A started server for ``config`` whose requests go into ``requests``."""
        server = ms.MessengerServer(config)
        dispatch = server.app.dispatch

        async def recording(request: ms.Request, channel: ms.Channel) -> ms.Response:
            self.requests.append((request.method, request.path))
            return await dispatch(request, channel)

        server.app.dispatch = recording  # type: ignore[method-assign]
        self.run(server.start())
        return server

    def run(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` on the server's loop and wait for it (30 s at most)."""
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def stop(self) -> None:
        self.run(self.server.stop())

    def start_again(self) -> None:
        """Serve again on the same port from the same state folder."""
        self.server = self._start(self.config)

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@contextlib.contextmanager
def thread_servers(tmp_path: Path, password_cost: int) -> Iterator[Callable[..., ServerThread]]:
    """A starter of ServerThreads with test settings (a state folder each, quick shutdown,
    scrypt at ``password_cost``) plus the ``overrides`` it is given; all closed at the end."""
    started: list[ServerThread] = []

    def start(**overrides: Any) -> ServerThread:
        config = ms.ServerConfig(
            port=0,
            state_dir=tmp_path / f"state-{len(started)}",
            password_cost=password_cost,
            shutdown_timeout=1.0,
        )
        started.append(ServerThread(dataclasses.replace(config, **overrides)))
        return started[-1]

    try:
        yield start
    finally:
        for running in started:
            running.close()
