"""A TCP proxy on 127.0.0.1 in front of a server (the tests' moto server) that misbehaves
on demand, run in its own process: `python tests/_hostile.py UPSTREAM_PORT MODE_FILE`
prints the port it listens on.  The mode file's text, read at each new connection:

- `pass`: forward bytes both ways (a connection made now keeps forwarding);
- `stall`: accept, read the request, never answer;
- `fail N`: answer the next N connections' request with HTTP 503 (and close), then forward;
- `deny`: answer every request with HTTP 403 AccessDenied, as S3 does for a key that
  may not read the bucket.

It counts nothing the tests rely on: they see only what the client sees.
"""

from __future__ import annotations

import asyncio
import sys

UPSTREAM = int(sys.argv[1])
MODE_FILE = sys.argv[2]
failed = {"mode": "", "n": 0}  # 503s answered since the mode file last changed


def _response(method: bytes, status: str, code: str) -> bytes:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{code} (test proxy)" \
           f"</Message></Error>".encode()
    head = (f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head if method == b"HEAD" else head + body  # a HEAD's answer has no body


async def _request(reader: asyncio.StreamReader) -> bytes:
    """Read one request's head (and body, if it says how long): enough to answer it.
    Its method."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":", 1)[1]))
    return head.split(b" ", 1)[0]


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        dst.close()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with open(MODE_FILE) as f:
        mode = f.read().strip()
    try:
        if mode == "stall":
            await reader.read()  # until the client gives up and closes
            return
        if mode == "deny":
            method = await _request(reader)
            writer.write(_response(method, "403 Forbidden", "AccessDenied"))
            await writer.drain()
            return
        if mode.startswith("fail "):
            if failed["mode"] != mode:
                failed.update(mode=mode, n=0)
            if failed["n"] < int(mode.split()[1]):
                failed["n"] += 1
                method = await _request(reader)
                writer.write(_response(method, "503 Service Unavailable", "ServiceUnavailable"))
                await writer.drain()
                return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", UPSTREAM)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
