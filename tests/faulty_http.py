"""A loopback HTTP server for fault-injection tests (127.0.0.1 only, bounded in requests and time).

Each path serves fixed bytes. Faults are scripted per path and used up one per request, in order
(after the script, requests are served normally): ``('status', 500)``, ``('reset', n)`` (send n body
bytes, then a TCP reset), ``('truncate', n)`` (n bytes, then a clean close before Content-Length),
``('stall', seconds, n)`` (n bytes, then silence), ``('late', seconds)`` (silence before the
response). ``flip`` holds (path, offset) pairs whose byte is always served inverted;
``ranges=False`` ignores ``Range`` headers (answers 200 with every byte); ``etags`` are the ETags
of the next responses (an object replaced while it is read).
``requests`` logs (path, range start or None, status) of every request.
"""
from __future__ import annotations

import http.server
import socket
import struct
import threading


class FaultyServer:
    def __init__(self, files: dict[str, bytes], ranges: bool = True, max_requests: int = 200):
        self.files, self.ranges, self.max_requests = dict(files), ranges, max_requests
        self.faults: dict[str, list[tuple]] = {}
        self.flip: set[tuple[str, int]] = set()
        self.etags: list[str] = []  # ETag of each next response (then '"v1"')
        self.requests: list[tuple[str, int | None, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # clients that time out or reset
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> 'FaultyServer':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # wakes stalled handlers
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def url(self, path: str) -> str:
        return f'http://127.0.0.1:{self.port}/{path}'

    def count(self, path: str) -> int:
        return sum(1 for p, _, _ in self.requests if p == path)

    def _next(self, path: str, start: int | None) -> tuple[tuple | None, bool]:
        with self._lock:
            over = len(self.requests) >= self.max_requests
            script = self.faults.get(path)
            fault = script.pop(0) if script and not over else None
            status = (503 if over else fault[1] if fault and fault[0] == 'status' else
                      404 if path not in self.files else 206 if start is not None else 200)
            self.requests.append((path, start, status))
        return fault, over

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a client that goes away never holds a server thread longer

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.lstrip('/')
                start = None
                rng = self.headers.get('Range')
                if server.ranges and rng and rng.startswith('bytes=') and rng.endswith('-'):
                    start = int(rng[6:-1])
                fault, over = server._next(path, start)
                if fault and fault[0] == 'late':
                    server._stop.wait(fault[1])
                    fault = None
                if over or (fault and fault[0] == 'status') or path not in server.files:
                    code = 503 if over else fault[1] if fault else 404
                    self.send_response(code)
                    self.send_header('Content-Length', '0')
                    self.end_headers()
                    return
                body = bytearray(server.files[path])
                for p, offset in server.flip:
                    if p == path:
                        body[offset] ^= 0xFF
                self.send_response(206 if start is not None else 200)
                if server.ranges:
                    self.send_header('Accept-Ranges', 'bytes')
                if start is not None:
                    self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
                    body = body[start:]
                self.send_header('Content-Length', str(len(body)))
                with server._lock:
                    etag = server.etags.pop(0) if server.etags else '"v1"'
                self.send_header('ETag', etag)
                self.end_headers()
                if fault is None:
                    self.wfile.write(body)
                    return
                kind, n = fault[0], fault[-1]
                self.wfile.write(body[:n])
                self.wfile.flush()
                if kind == 'reset':  # linger 0: close() sends RST instead of FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack('ii', 1, 0))
                    self.connection.close()
                elif kind == 'stall':
                    server._stop.wait(fault[1])
                self.close_connection = True

        return Handler
