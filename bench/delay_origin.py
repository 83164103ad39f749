#!/usr/bin/env python3
"""A slow origin for the herd and slow-backend scenarios: every GET waits
DELAY_MS, then answers 1 KiB. With `cache`, the answer is cacheable for an
hour (herd); with `nocache`, it is `no-store` (slow-backend, where every
request must reach a backend). GET /_count answers how many requests it
served. asyncio, keep-alive, one process: waiting costs no thread, so the
delay, not the server, sets the latency.

    delay_origin.py PORT DELAY_MS [cache|nocache]
"""

import asyncio
import sys

PORT = int(sys.argv[1])
DELAY = int(sys.argv[2]) / 1000.0
CACHE = (sys.argv[3] if len(sys.argv) > 3 else "cache") == "cache"
BODY = b"h" * 1024
CC = b"public, max-age=3600" if CACHE else b"no-store"
count = 0


async def serve(reader, writer):
    global count
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0]
            path = line.split(b" ")[1] if line.count(b" ") >= 2 else b"/"
            if path == b"/_count":
                body = str(count).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                count += 1
                await asyncio.sleep(DELAY)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nCache-Control: %s\r\n\r\n%s"
                             % (CC, BODY))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", PORT, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
