#!/usr/bin/env python3
"""The herd scenario's origin: every GET waits DELAY_MS, then answers 1 KiB,
cacheable for an hour. GET /_count answers how many requests it served."""

import http.server
import sys
import threading
import time

PORT = int(sys.argv[1])
DELAY = int(sys.argv[2]) / 1000.0
count = 0
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        global count
        if self.path == "/_count":
            body = str(count).encode()
        else:
            with lock:
                count += 1
            time.sleep(DELAY)
            body = b"h" * 1024
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if self.path != "/_count":
            self.send_header("Cache-Control", "public, max-age=3600")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 4096
    daemon_threads = True


Server(("127.0.0.1", PORT), Handler).serve_forever()
