#!/usr/bin/env python3
"""Opens N keep-alive connections to HOST:PORT, sends one GET of PATH on each
and reads its answer, then holds them all open, idle, until stdin closes.

    idle_clients.py HOST PORT PATH N

Prints "ready N" on stdout once every connection has had its answer (or
"failed ..." and exits 1). Used by scripts/bench's idle scenario."""

import resource
import socket
import sys


def read_response(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed before the head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed mid-body")
        body += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(head.split(b"\r\n")[0].decode(errors="replace"))


def main():
    host, port, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    conns = []
    try:
        for _ in range(n):
            # Bounded: a proxy that stops answering fails the run.
            s = socket.create_connection((host, port), timeout=10)
            s.sendall(req)
            read_response(s)
            conns.append(s)
    except OSError as e:
        print(f"failed after {len(conns)} connections: {e}", flush=True)
        sys.exit(1)
    print(f"ready {len(conns)}", flush=True)
    sys.stdin.read()
    for s in conns:
        s.close()


if __name__ == "__main__":
    main()
