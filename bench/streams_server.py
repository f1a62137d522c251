"""Reference: a bare hand-written asyncio.streams server (the ceiling for this design).

Reads each head with readuntil, skips a Content-Length body, answers one small JSON body.

    python bench/streams_server.py --port 8004
"""

from __future__ import annotations

import argparse
import asyncio

BODY = b'{"status":"ok"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            marker = head.lower().find(b"content-length:")
            if marker != -1:
                await reader.readexactly(int(head[marker + 15 :].split(b"\r\n", 1)[0]))
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8004)
    asyncio.run(main(parser.parse_args().port))
