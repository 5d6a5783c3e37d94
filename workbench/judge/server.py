"""The local web server of `wb judge`, on the standard library's ThreadingHTTPServer.

Why the standard library: the server has five routes, a few requests a second from one person,
and must work offline; http.server needs no new dependency, starts instantly, and its threads
let a slow image never block a vote. What it lacks (routing, JSON bodies, limits) is a few lines
here. Safety, because a page on the internet could otherwise reach a local server:
- it binds 127.0.0.1 unless told otherwise, and then answers only requests whose Host header
  names this machine's loopback (no DNS rebinding);
- votes must be `Content-Type: application/json` (a cross-site form cannot send that without the
  browser asking first, and nothing here says yes), and bodies are capped at 64 KiB;
- files come only from a grid's folder: `..`, absolute paths, links out of the folder and anything
  but images are refused (404), and the pages forbid any script or image from elsewhere (CSP).
"""

from __future__ import annotations

import json
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import unquote, urlsplit

from workbench.judge import stats
from workbench.judge.session import BadVote, Judge, safe_path

MAX_BODY = 64 * 1024
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
STATIC = {
    "/": ("judge.html", "text/html; charset=utf-8"),
    "/ranking": ("ranking.html", "text/html; charset=utf-8"),
    "/static/judge.js": ("judge.js", "text/javascript; charset=utf-8"),
    "/static/ranking.js": ("ranking.js", "text/javascript; charset=utf-8"),
    "/static/judge.css": ("judge.css", "text/css; charset=utf-8"),
}
CSP = "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def static_text(name: str) -> bytes:
    return resources.files("workbench.judge").joinpath("static", name).read_bytes()


class JudgeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, judge: Judge, host: str = "127.0.0.1", port: int = 8765, log=None):
        self.judge = judge
        self.log = log  # called with one line per request when given
        self.ranking_reps = stats.BOOTSTRAP  # the same numbers as ranking.json
        self._ranking_lock = threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def allowed_host(self, header: str | None) -> bool:
        """When bound to loopback, only Host: localhost / 127.0.0.1 / [::1] (with this port)."""
        bound = self.server_address[0]
        if bound not in LOOPBACK:
            return True
        if not header:
            return False
        host = header.rsplit(":", 1)[0] if not header.endswith("]") else header
        return host.strip("[]").lower() in LOOPBACK


class Handler(BaseHTTPRequestHandler):
    server: JudgeServer
    protocol_version = "HTTP/1.1"
    server_version = "wb-judge"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if self.server.log:
            self.server.log(format % args)

    # -- responses -----------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"ok": False, "error": message})

    def _guard(self) -> bool:
        if not self.server.allowed_host(self.headers.get("Host")):
            self._error(HTTPStatus.FORBIDDEN, "Host not allowed: open the page at 127.0.0.1 or localhost")
            return False
        return True

    # -- GET -----------------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._safely(self._get)

    def do_POST(self) -> None:
        self._safely(self._post)

    def _safely(self, handle) -> None:
        """Any unexpected error is a 500 with its one line, not a dropped connection."""
        try:
            handle()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 - the server must keep serving
            self.close_connection = True
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")

    def _get(self) -> None:
        if not self._guard():
            return
        path = urlsplit(self.path).path
        if path in STATIC:
            name, content_type = STATIC[path]
            self._send(HTTPStatus.OK, static_text(name), content_type)
        elif path == "/api/pair":
            self._json(HTTPStatus.OK, self.server.judge.next_pair())
        elif path == "/api/ranking":
            with self.server._ranking_lock:
                data = self.server.judge.ranking(reps=self.server.ranking_reps)
            self._json(HTTPStatus.OK, data)
        elif path.startswith("/g/"):
            self._image(path)
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found")

    def _image(self, raw: str) -> None:
        key, _, relative = raw[len("/g/"):].partition("/")
        grid = self.server.judge.grids.get(key)
        relative = unquote(relative)
        target = safe_path(grid.root, relative) if grid else None
        kind = IMAGE_TYPES.get(target.suffix.lower()) if target else None
        if target is None or kind is None or not target.is_file():
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        self._send(HTTPStatus.OK, target.read_bytes(), kind, cache=True)

    # -- POST ----------------------------------------------------------------------------------

    def _post(self) -> None:
        if not self._guard():
            return
        path = urlsplit(self.path).path
        actions = {"/api/vote": self.server.judge.vote, "/api/undo": self.server.judge.undo}
        if path not in actions:
            self._error(HTTPStatus.NOT_FOUND, "not found")
            return
        if self.headers.get_content_type() != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the vote as application/json")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._error(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
            return
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a vote is at most {MAX_BODY} bytes")
            return
        try:
            payload = json.loads(self.rfile.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._error(HTTPStatus.BAD_REQUEST, f"not JSON: {e}")
            return
        try:
            result = actions[path](payload)
        except BadVote as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        except OSError as e:  # the disk is full or gone: say so, acknowledge nothing
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"the vote was NOT saved: {e}")
            return
        self._json(HTTPStatus.OK, result)


def make_server(judge: Judge, host: str = "127.0.0.1", port: int = 8765, log=None) -> JudgeServer:
    """A server ready to `serve_forever()` (port 0 picks a free one: see `.url`)."""
    return JudgeServer(judge, host, port, log)
