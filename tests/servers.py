"""A loopback HTTP server for tests: serves in-memory files on 127.0.0.1 (port chosen by the OS).

    with serve({"/a.zip": data}) as srv:
        url = srv.url("/a.zip")
        ...
        assert srv.hits["/a.zip"] == 1

``truncate={"/a.zip": n}`` announces the full Content-Length but sends only the first n bytes and
closes, as a dropped connection does. ``closed_port_url()`` is a URL nothing listens on (offline).
"""
import contextlib
import http.server
import socket
import threading
from collections import Counter


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _serve(self, body):
        srv = self.server
        path = self.path.split("?")[0] if self.path.split("?")[0] in srv.files else self.path
        srv.hits[path] += 1
        if path not in srv.files:
            self.send_error(404)
            return
        data = srv.files[path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            cut = srv.truncate.get(path)
            self.wfile.write(data if cut is None else data[:cut])
            if cut is not None:
                self.close_connection = True

    def do_GET(self):
        self._serve(body=True)

    def do_HEAD(self):
        self._serve(body=False)


class LoopbackServer:
    def __init__(self, files, truncate=None):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.files = dict(files)
        self.httpd.truncate = dict(truncate or {})
        self.httpd.hits = Counter()
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def files(self):
        return self.httpd.files

    @property
    def hits(self):
        return self.httpd.hits

    @property
    def port(self):
        return self.httpd.server_address[1]

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.contextmanager
def serve(files, truncate=None):
    srv = LoopbackServer(files, truncate)
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def closed_port_url(path="/file"):
    """A loopback URL on a port that was just free: connecting is refused, as with no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"
