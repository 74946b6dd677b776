"""A loopback HTTP proxy in front of an S3 endpoint that injects faults by rule.

Workers reach S3 through it (``COMPACTOR_S3_ENDPOINT_URL`` = :attr:`FaultProxy.url`); the
test adds rules while they run:

    proxy = FaultProxy(lambda: moto_url).start()
    proxy.add(Rule("error", method="GET", path="/layers/", status=503, code="SlowDown", times=2))
    proxy.add(Rule("reset", method="PUT", path="/manifests/", times=1))
    proxy.add(Rule("lost_response", method="PUT", path="/manifests/", times=1))  # landed, answer lost

Actions:

- ``error``: answer ``status`` with an S3 XML error (``code``), without forwarding;
- ``reset``: drop the connection with a TCP reset, without forwarding;
- ``timeout``: hold the request ``delay_s`` (longer than the client's read timeout), then drop it;
- ``slow``: forward, but hold the answer back ``delay_s`` first (and send the body in small
  pieces with ``trickle_s`` between them);
- ``lost_response``: forward (so the request takes effect), then reset instead of answering:
  the ambiguous outcome every conditional write must resolve;
- ``truncate``: forward, send the headers and half the body, then reset (a download cut off
  in the middle).

A rule matches by method and a regular expression searched in the request path (query
included); ``after`` lets that many matching requests through first, ``times`` caps how many it
injects, ``probability`` draws from the proxy's seeded random generator. Rules are tried in the
order they were added; the first that injects wins. The proxy runs on threads of the test
process; every counter is guarded by one lock.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

ACTIONS = frozenset({"error", "reset", "timeout", "slow", "lost_response", "truncate"})
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect"}
)


@dataclass
class Rule:
    action: str
    method: str | None = None
    path: str | None = None
    status: int = 503
    code: str = "SlowDown"
    message: str = "injected by faultproxy"
    delay_s: float = 0.0
    trickle_s: float = 0.0
    after: int = 0
    times: int | None = None
    probability: float = 1.0
    matched: int = 0
    injected: int = 0
    _path_re: re.Pattern[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; one of {sorted(ACTIONS)}")
        self._path_re = re.compile(self.path) if self.path else None

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and method.upper() != self.method.upper():
            return False
        return self._path_re is None or self._path_re.search(path) is not None

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.injected >= self.times


class FaultProxy:
    def __init__(self, upstream: str | Callable[[], str], *, seed: int = 0, upstream_timeout_s: float = 30.0) -> None:
        # The upstream may be known only later (the embedded stack starts its S3 server after
        # the environment that names this proxy was fixed).
        self._upstream = upstream if callable(upstream) else (lambda: upstream)
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.upstream_timeout_s = upstream_timeout_s
        self.requests: Counter[str] = Counter()  # method -> requests seen
        self.paths: deque[str] = deque(maxlen=100_000)  # "METHOD /path?query" of recent requests
        self.injected: Counter[str] = Counter()  # action -> faults injected

    # ------------------------------------------------------------------ control

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def total_injected(self) -> int:
        with self._lock:
            return sum(self.injected.values())

    # ------------------------------------------------------------------ per request

    def _choose(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.requests[method] += 1
            self.paths.append(f"{method} {path}")
            for rule in self._rules:
                if rule.exhausted or not rule.matches(method, path):
                    continue
                rule.matched += 1
                if rule.matched <= rule.after:
                    continue
                if rule.probability < 1.0 and self._random.random() >= rule.probability:
                    continue
                rule.injected += 1
                self.injected[rule.action] += 1
                return rule
        return None

    def _upstream_address(self) -> tuple[str, int]:
        parts = urlsplit(self._upstream())
        return parts.hostname or "127.0.0.1", parts.port or 80


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        rule = self.owner._choose(self.command, self.path)
        action = rule.action if rule is not None else None
        if rule is not None and action == "error":
            self._send_error_xml(rule)
            return
        if action == "reset":
            self._reset()
            return
        if rule is not None and action == "timeout":
            time.sleep(rule.delay_s)
            self._reset()
            return
        try:
            status, reason, headers, payload = self._forward(body)
        except OSError as err:
            self._send_plain(502, f"upstream failed: {err}")
            return
        if action == "lost_response":
            self._reset()
            return
        if action == "truncate" and self.command != "HEAD" and len(payload) > 1:
            self._send(status, reason, headers, payload, cut_at=len(payload) // 2)
            self._reset()
            return
        if rule is not None and action == "slow":
            time.sleep(rule.delay_s)
        self._send(status, reason, headers, payload, trickle_s=rule.trickle_s if rule is not None else 0.0)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        host, port = self.owner._upstream_address()
        conn = http.client.HTTPConnection(host, port, timeout=self.owner.upstream_timeout_s)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            if self.command in ("GET", "HEAD", "DELETE") and not body:
                headers.pop("Content-Length")
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, resp.reason, resp.getheaders(), payload
        finally:
            conn.close()

    def _send(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        payload: bytes,
        *,
        trickle_s: float = 0.0,
        cut_at: int | None = None,
    ) -> None:
        self.send_response_only(status, reason)
        length_sent = False
        for key, value in headers:
            lower = key.lower()
            if lower in _HOP_BY_HOP:
                continue
            if lower == "content-length":
                # HEAD answers carry the object's length without a body.
                value = value if self.command == "HEAD" else str(len(payload))
                length_sent = True
            self.send_header(key, value)
        if not length_sent:
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        self.end_headers()
        if self.command == "HEAD" or not payload:
            return
        if cut_at is not None:
            self.wfile.write(payload[:cut_at])
            self.wfile.flush()
            return
        if trickle_s <= 0:
            self.wfile.write(payload)
            return
        for start in range(0, len(payload), 16 * 1024):
            self.wfile.write(payload[start : start + 16 * 1024])
            self.wfile.flush()
            time.sleep(trickle_s)

    def _send_error_xml(self, rule: Rule) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{rule.code}</Code><Message>{rule.message}</Message>"
            f"<RequestId>{uuid.uuid4().hex}</RequestId></Error>"
        ).encode()
        reason = http.client.responses.get(rule.status, "Error")
        self._send(rule.status, reason, [("Content-Type", "application/xml")], body)

    def _send_plain(self, status: int, text: str) -> None:
        self._send(status, http.client.responses.get(status, "Error"), [("Content-Type", "text/plain")], text.encode())

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout turns close() into a TCP reset, as a dying server or a
        # middlebox would send; the client sees "connection reset", not a clean end of stream.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        self.close_connection = True

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()
