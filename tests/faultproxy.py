"""A fault-injecting HTTP proxy on loopback, in front of the S3 server the tests start.

Clients (pyarrow, boto3, Ray workers) are pointed at the proxy through ``AWS_ENDPOINT_URL``; it
forwards every request to the real server unchanged (the Host header too, so SigV4 signatures
still verify) and, when a rule matches, answers with a fault instead:

- ``slowdown``: ``503 SlowDown`` with S3's XML error body (throttling);
- ``error500``: ``500 InternalError`` XML;
- ``drop``: close the connection after reading the request, before any answer;
- ``truncate``: forward the status line and headers, then half the body, then close;
- ``delay``: wait ``delay_s`` and then forward normally.

A rule faults the first ``times`` matching requests *per object key* (``times=-1``: forever),
so "this object failed 6 times in a row, then worked" is one rule. Every fault is logged in
``FaultProxy.injected`` so a test can show the faults really happened.
"""

from __future__ import annotations

import http.client
import re
import socket
import socketserver
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

FAULTS = ("slowdown", "error500", "drop", "truncate", "delay")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade"}


@dataclass
class Rule:
    """Which requests to fault and how."""

    fault: str
    """One of FAULTS."""
    key: str = ""
    """Regex searched in the request path (``/bucket/key``); '' matches every path."""
    method: str = ""
    """HTTP method to match ('' = any)."""
    times: int = 1
    """Faulted requests per distinct path before it passes (-1 = never passes)."""
    delay_s: float = 0.0
    """For ``delay``: seconds to wait before forwarding."""
    seen: Counter[str] = field(default_factory=Counter)
    """Faults injected so far, per path."""

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {FAULTS}")

    def claims(self, method: str, path: str) -> bool:
        """Whether this request gets the fault (counts it if so)."""
        if self.method and method != self.method:
            return False
        key = path.split("?", 1)[0]
        if self.key and not re.search(self.key, key):
            return False
        if self.times >= 0 and self.seen[key] >= self.times:
            return False
        self.seen[key] += 1
        return True


def _error_xml(code: str, message: str, resource: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{uuid.uuid4().hex}</RequestId></Error>"
    ).encode()


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        self.server.track(sock, add=True)
        reader = sock.makefile("rb")
        try:
            while self._one(sock, reader):
                pass
        except (OSError, ValueError):
            pass  # the client went away, or we dropped it on purpose
        finally:
            self.server.track(sock, add=False)
            reader.close()

    def _one(self, sock: socket.socket, reader: socket.SocketIO) -> bool:
        """Serve one request; False when the connection is finished."""
        line = reader.readline(65537)
        if not line:
            return False
        method, path, _ = line.decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            h = reader.readline(65537)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        lower = {k.lower(): v for k, v in headers}
        body = self._read_body(reader, lower)
        proxy = self.server.proxy
        rule = proxy.match(method, path)
        if rule is not None and rule.fault != "delay":
            proxy.record(rule.fault, method, path)
            if rule.fault == "drop":
                _abort(sock)
                return False
            if rule.fault in ("slowdown", "error500"):
                status, code, msg = (
                    (503, "SlowDown", "Please reduce your request rate.")
                    if rule.fault == "slowdown"
                    else (500, "InternalError", "We encountered an internal error.")
                )
                xml = _error_xml(code, msg, path)
                payload = b"" if method == "HEAD" else xml
                head = (
                    f"HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(xml)}\r\n"
                    f"x-amz-request-id: {uuid.uuid4().hex[:16]}\r\n\r\n"
                )
                sock.sendall(head.encode() + payload)
                return True
        if rule is not None:  # delay
            proxy.record("delay", method, path)
            time.sleep(rule.delay_s)
        status, reason, out_headers, payload = proxy.forward(method, path, headers, body)
        lines = [f"HTTP/1.1 {status} {reason}"]
        lines += [f"{k}: {v}" for k, v in out_headers if k.lower() not in HOP_BY_HOP]
        if method != "HEAD" and not any(k.lower() == "content-length" for k, _ in out_headers):
            lines.append(f"Content-Length: {len(payload)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if rule is None and proxy.match_truncate(method, path) and len(payload) > 1:
            sock.sendall(head + payload[: len(payload) // 2])
            _abort(sock)
            return False
        sock.sendall(head + payload)
        return lower.get("connection", "").lower() != "close"

    @staticmethod
    def _read_body(reader: socket.SocketIO, lower: dict[str, str]) -> bytes:
        """The raw request body (chunked bodies are kept chunked, as they were signed)."""
        if "chunked" in lower.get("transfer-encoding", "").lower():
            raw = bytearray()
            while True:
                size_line = reader.readline(65537)
                raw += size_line
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while True:  # trailers, then the blank line
                        t = reader.readline(65537)
                        raw += t
                        if t in (b"\r\n", b"\n", b""):
                            return bytes(raw)
                raw += reader.read(size + 2)
        n = int(lower.get("content-length", "0") or 0)
        return reader.read(n) if n else b""


def _abort(sock: socket.socket) -> None:
    """Close with a TCP reset, as a crashed server or a load balancer cutting in would."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy: FaultProxy) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.proxy = proxy
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._open.add if add else self._open.discard)(sock)

    def close_clients(self) -> None:
        with self._lock:
            for s in list(self._open):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class FaultProxy:
    """A threaded loopback proxy to ``upstream`` (``http://host:port``) that injects faults."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.removeprefix("http://").rstrip("/").partition(":")
        self.upstream = (host, int(port or 80))
        self.rules: list[Rule] = []
        self.injected: list[tuple[str, str, str]] = []
        """(fault, method, path) of every fault injected, in order."""
        self.requests = 0
        self._lock = threading.Lock()
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: what clients use as AWS_ENDPOINT_URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def set_rules(self, *rules: Rule) -> None:
        """Replace the rule set (and forget previous faults)."""
        with self._lock:
            self.rules = list(rules)
            self.injected = []

    def match(self, method: str, path: str) -> Rule | None:
        """The first rule (other than ``truncate``) claiming this request."""
        with self._lock:
            self.requests += 1
            for r in self.rules:
                if r.fault != "truncate" and r.claims(method, path):
                    return r
        return None

    def match_truncate(self, method: str, path: str) -> bool:
        """Whether a ``truncate`` rule claims this request (decided once the answer is known)."""
        with self._lock:
            for r in self.rules:
                if r.fault == "truncate" and r.claims(method, path):
                    self.injected.append(("truncate", method, path))
                    return True
        return False

    def record(self, fault: str, method: str, path: str) -> None:
        """Log an injected fault."""
        with self._lock:
            self.injected.append((fault, method, path))

    def faults(self, fault: str = "", key: str = "") -> int:
        """How many faults (of this kind, on paths containing ``key``) were injected."""
        with self._lock:
            return sum(1 for f, _, p in self.injected if (not fault or f == fault) and key in p)

    def forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request upstream as received; the whole answer (status, headers, body)."""
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                if k.lower() not in ("connection", "proxy-connection", "keep-alive"):
                    conn.putheader(k, v)
            conn.putheader("Connection", "close")
            conn.endheaders(body if body else None)
            resp = conn.getresponse()
            payload = resp.read()
            out = [(k, v) for k, v in resp.getheaders()]
            if "chunked" in (resp.getheader("transfer-encoding") or "").lower():
                out = [(k, v) for k, v in out if k.lower() != "content-length"]
            return resp.status, resp.reason, out, payload
        finally:
            conn.close()

    def close(self) -> None:
        """Stop serving and cut every open client connection."""
        self._server.shutdown()
        self._server.close_clients()
        self._server.server_close()
        self._thread.join(timeout=10)
