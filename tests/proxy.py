"""nginx in front of a test server, configured with the README's own nginx block: tests that
use it are skipped where nginx is not installed."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
START_TIMEOUT = 10.0  # seconds nginx may take to listen
DOCUMENTED_UPSTREAM = "127.0.0.1:8000"  # the server's address in the README's block
DOCUMENTED_LISTEN = "listen 80;"

needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")

# The README's block goes inside this: everything nginx writes stays in the test's folder.
MAIN_CONFIG = """\
daemon off;
worker_processes 1;
user root root;  # ignored unless run as root: workers then keep write access to {folder}
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{site}
}}
"""


def readme_site() -> str:
    """The README's nginx block (the ``server { ... }`` a reader puts in their site)."""
    blocks = re.findall(r"^```nginx\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)
    assert len(blocks) == 1, "the README must show one nginx block"
    site: str = blocks[0]
    assert DOCUMENTED_UPSTREAM in site and DOCUMENTED_LISTEN in site, site
    return site


def free_port() -> int:
    """A port nothing listens on now (nginx takes it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Nginx:
    """nginx as a child process on 127.0.0.1:``port``, in front of 127.0.0.1:``upstream``."""

    def __init__(self, upstream: int, folder: Path, **directives: str) -> None:
        """``directives`` replace the README's value of each one named (``client_max_body_size
        ="1m"``, as if it were left at nginx's default)."""
        assert NGINX is not None
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        site = readme_site().replace(DOCUMENTED_UPSTREAM, f"127.0.0.1:{upstream}")
        site = site.replace(DOCUMENTED_LISTEN, f"listen 127.0.0.1:{self.port};")
        for name, value in directives.items():
            site, count = re.subn(rf"^(\s*{name}) [^;]*;", rf"\1 {value};", site, flags=re.M)
            assert count == 1, f"the README's block has no {name}"
        self.config = folder / "nginx.conf"
        self.config.write_text(MAIN_CONFIG.format(folder=folder, site=site), encoding="utf-8")
        self.process = subprocess.Popen(
            [NGINX, "-p", str(folder), "-c", str(self.config), "-e", str(folder / "error.log")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        """nginx offers no event for "listening": try to connect until it accepts."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                _, stderr = self.process.communicate()
                raise AssertionError(f"nginx did not start: {stderr}{self.error_log()}")
            with contextlib.suppress(ConnectionRefusedError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ):
                return
            assert time.monotonic() < deadline, f"nginx is not listening: {self.error_log()}"
            time.sleep(0.01)

    def access_log(self) -> list[str]:
        """The requests nginx has answered, one line each (its "combined" format)."""
        path = self.folder / "access.log"
        return path.read_text(encoding="utf-8").splitlines() if path.exists() else []

    def statuses(self, path_prefix: str) -> list[int]:
        """The statuses nginx answered to requests whose path starts with ``path_prefix``."""
        found = re.finditer(r'"[A-Z]+ (\S+) HTTP/[\d.]+" (\d{3}) ', "\n".join(self.access_log()))
        return [int(match[2]) for match in found if match[1].startswith(path_prefix)]

    def error_log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(encoding="utf-8") if path.exists() else ""

    def stop(self) -> None:
        """Stop at once (SIGTERM), waiting for the exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=START_TIMEOUT)


@contextlib.contextmanager
def nginx_in_front(upstream: int, folder: Path, **directives: str) -> Iterator[Nginx]:
    """nginx in front of the server on port ``upstream`` while the block runs."""
    proxy = Nginx(upstream, folder, **directives)
    try:
        yield proxy
    finally:
        proxy.stop()
