"""Reference: a minimal aiohttp.web app answering the same small JSON (benchmarks only).

    python bench/aiohttp_server.py --port 8002

GET /health and GET /messages answer {"status": "ok"}; POST /send parses its JSON body
and answers it back in a small JSON object: the do-nothing baselines of the benchmark.
"""

from __future__ import annotations

import argparse

from aiohttp import web


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def send(request: web.Request) -> web.Response:
    body = await request.json()
    return web.json_response({"message": body}, status=201)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8002)
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/messages", health)
    app.router.add_post("/send", send)
    web.run_app(app, host="127.0.0.1", port=parser.parse_args().port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
