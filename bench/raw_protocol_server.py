"""Reference: a bare asyncio.Protocol answering every request with one small JSON body.

The pure-Python limit for the benchmarks: no parsing beyond finding the end of the head and
the Content-Length of a body. Not a server anyone should run; a yardstick.

    python bench/raw_protocol_server.py --port 8001
"""

from __future__ import annotations

import argparse
import asyncio

BODY = b'{"status":"ok"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


class RawProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answers = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end == -1:
                break
            head = self.buffer[:end]
            length = 0
            marker = head.lower().find(b"content-length:")
            if marker != -1:
                length = int(head[marker + 15 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                break
            self.buffer = self.buffer[end + 4 + length :]
            answers.append(RESPONSE)
        if answers and self.transport is not None:
            self.transport.write(b"".join(answers))


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawProtocol, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8001)
    asyncio.run(main(parser.parse_args().port))
