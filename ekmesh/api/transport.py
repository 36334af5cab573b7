"""The API's HTTP transport: a threaded HTTP/1.1 server whose every resource is bounded, and a request handler whose
every answer, ``http.server``'s own errors included, is JSON in OpenAI's error shape
``{"error": {"message", "type", "code"}}`` (and ``param`` where a request field is at fault).

Role: accept connections, bound what each one may hold, read each request's head and body within a deadline, and
give handlers JSON answers. Not responsible for OpenAI's requests, models or generation (``api.server`` builds on
this); nothing here imports a domain type.

Invariants:
- The listen backlog is ``LISTEN_BACKLOG`` (a burst of clients waits in the kernel instead of being reset).
- At most ``max_connections`` connections are served at once, and at most ``max_per_address`` from one source
  address; they are counted when accepted, before a byte is read. Each served connection is one thread, so the
  server holds at most ``max_connections + 1`` threads (with the accepting one). A connection beyond a cap is
  answered ``429 too_many_connections`` with ``Retry-After`` by the accepting thread itself (no thread is started),
  then closed; refusals are logged at most once per ``REFUSAL_LOG_INTERVAL_S``.
- A request's head and body are read within ``request_deadline_s`` (``REQUEST_DEADLINE_S``) from the moment the
  server waits for it, and each single read within the handler's ``timeout`` (``SOCKET_TIMEOUT_S``), which alone
  bounds the writes of an answer (a stream). A request partly read at its deadline is answered ``408``; a
  keep-alive connection idle at it is closed without an answer; a client silent for a whole per-read timeout is
  dropped without one.
- A ``Content-Length`` over ``max_body`` is answered ``413`` from the head, before any of the body is read (and
  instead of a ``100 Continue``).
- Every error of the HTTP layer is JSON with its own status (400 malformed request line or header, 408, 413, 414
  request line over 64 KiB, 431 header line over 64 KiB or over 100 headers, 501 unknown method, 505 HTTP version)
  and closes the connection. A connection closed while part of a request may be unread is shut for writing and its
  input drained for up to ``LINGER_S`` first, so the client reads the answer rather than a reset.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from ekmesh.core.errors import BadRequestError, ConfigError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 128
MAX_CONNECTIONS = 64  # connections (= threads) at once; more are answered 429 by the accepting thread
# The API listens on loopback, where every client has the same address: there the global cap is the bound. A server
# bound to another interface passes a lower ``max_per_address`` so that one address cannot take every connection.
MAX_CONNECTIONS_PER_ADDRESS = MAX_CONNECTIONS
REQUEST_DEADLINE_S = 15.0  # to send a request's head and body, from the moment the server waits for it
SOCKET_TIMEOUT_S = 60.0  # one read or write; a client that stops reading its stream is dropped after it
MAX_BODY = 4 << 20
LINGER_S = 2.0  # how long a closed connection's unread input is drained, so its client can read the answer
MAX_LINGERING = 256  # refused connections drained at once by the accepting thread; beyond, closed at once
RETRY_AFTER_S = 1
REFUSAL_LOG_INTERVAL_S = 60.0

# the ``code`` of each error status the HTTP layer answers itself
HTTP_ERROR_CODES = {400: "bad_request", 408: "request_timeout", 413: "body_too_large", 414: "request_line_too_long",
                    431: "header_too_large", 501: "unsupported_method", 505: "unsupported_http_version"}


def error_body(status: int, message: str, code: str | None, kind: str | None = None,
               param: str | None = None) -> bytes:
    """OpenAI's error shape; ``kind`` (the ``type``) follows from the status unless given; ``param`` (the request
    field at fault) only when there is one."""
    kind = kind or ("rate_limit_error" if status == 429 else "invalid_request_error" if status < 500
                    else "server_error")
    err: dict[str, Any] = {"message": message, "type": kind, "code": code}
    if param is not None:
        err["param"] = param
    return json.dumps({"error": err}).encode()


def _linger(sock: socket.socket, seconds: float) -> None:
    """Shut ``sock`` for writing and drain its input until EOF or ``seconds``: closing a socket with unread input
    resets the connection, and a client can lose the answer it has not read yet."""
    try:
        sock.shutdown(socket.SHUT_WR)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return
    except OSError:  # reset, or the drain's deadline: the socket is closed next either way
        return


def _drain_nonblocking(sock: socket.socket) -> bool:
    """Read what has arrived on a non-blocking ``sock`` (a bounded amount); whether it is still open."""
    for _ in range(16):
        try:
            if not sock.recv(65536):
                return False
        except BlockingIOError:
            return True
        except OSError:
            return False
    return True


class BoundedHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` with a real backlog, connection caps (in all and per source address) counted at
    accept, a request deadline for its handlers, and JSON 429 refusals that cost no thread."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], handler: type[JsonRequestHandler], *,
                 max_connections: int = MAX_CONNECTIONS, max_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
                 request_deadline_s: float = REQUEST_DEADLINE_S, max_body: int = MAX_BODY) -> None:
        if max_connections < 1 or max_per_address < 1 or not request_deadline_s > 0 or max_body < 0:
            raise ConfigError(f"API bounds must be positive (max_connections={max_connections}, max_per_address="
                              f"{max_per_address}, request_deadline_s={request_deadline_s}, max_body={max_body})")
        self.max_connections, self.max_per_address = max_connections, max_per_address
        self.request_deadline_s, self.max_body = request_deadline_s, max_body
        self._count_lock = threading.Lock()
        self._open = 0
        self._per_address: dict[str, int] = {}
        # refused sockets being drained; touched only by the accepting thread (and by server_close after it ended)
        self._lingering: list[tuple[socket.socket, float]] = []
        self._refused = 0
        self._refusal_logged = -REFUSAL_LOG_INTERVAL_S
        super().__init__(address, handler)

    @property
    def connections(self) -> int:
        """Connections served now (each holds one thread)."""
        with self._count_lock:
            return self._open

    def process_request(self, request: Any, client_address: Any) -> None:  # typeshed's types: a socket, an address
        addr = str(client_address[0])
        with self._count_lock:
            full = self._open >= self.max_connections or self._per_address.get(addr, 0) >= self.max_per_address
            if not full:
                self._open += 1
                self._per_address[addr] = self._per_address.get(addr, 0) + 1
        if full:
            self._refuse(request, addr)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._release(addr)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(str(client_address[0]))

    def _release(self, addr: str) -> None:
        with self._count_lock:
            self._open -= 1
            n = self._per_address[addr] - 1
            if n:
                self._per_address[addr] = n
            else:
                del self._per_address[addr]

    def _refuse(self, request: socket.socket, addr: str) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL_S:
            log.warning("API connection cap reached (%d in all, %d per address): refused %d connection(s) since the "
                        "last report, the latest from %s", self.max_connections, self.max_per_address, self._refused,
                        addr)
            self._refused, self._refusal_logged = 0, now
        body = error_body(429, f"this node serves {self.max_connections} API connections already (at most "
                               f"{self.max_per_address} from one address); try again shortly", "too_many_connections")
        answer = (f"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                  f"\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n").encode() + body
        try:
            request.setblocking(False)
            sent = request.send(answer)  # a few hundred bytes into an empty send buffer: taken whole, at once
            request.shutdown(socket.SHUT_WR)
        except OSError:
            sent = 0
        if sent != len(answer) or len(self._lingering) >= MAX_LINGERING:
            self.close_request(request)
        else:
            self._lingering.append((request, now + LINGER_S))

    def service_actions(self) -> None:
        """Between two accepts (at least every poll interval): drain the refused sockets, close those done."""
        super().service_actions()
        if not self._lingering:
            return
        now, keep = time.monotonic(), []
        for sock, until in self._lingering:
            if now < until and _drain_nonblocking(sock):
                keep.append((sock, until))
            else:
                self.close_request(sock)
        self._lingering = keep

    def server_close(self) -> None:
        for sock, _ in self._lingering:
            self.close_request(sock)
        self._lingering = []
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """The supervisor of every connection's thread: a client that went away is routine; anything else is logged
        with its traceback (never printed to stderr as ``socketserver`` does)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.debug("API connection from %s ended: %r", client_address[0], exc)
        else:
            log.exception("API connection from %s failed", client_address[0])


class _DeadlineSocketIO(socket.SocketIO):
    """The handler's raw reads: each within the per-read timeout and, while a request is read, within what is left
    of its deadline."""

    def __init__(self, sock: socket.socket, per_read_s: float | None) -> None:
        super().__init__(sock, "rb")
        self.sock = sock
        self.per_read_s = per_read_s
        self.deadline: float | None = None
        self.expired = False  # the request deadline (not the per-read timeout) ended a read
        self.received = 0  # bytes read since the deadline was set

    def start(self, seconds: float) -> None:
        self.deadline, self.expired, self.received = time.monotonic() + seconds, False, 0

    def readinto(self, b: WriteableBuffer) -> int | None:
        timeout, by_deadline = self.per_read_s, False
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.expired = True
                raise TimeoutError("the request deadline passed")
            if timeout is None or left < timeout:
                timeout, by_deadline = left, True
        self.sock.settimeout(timeout)
        try:
            n = super().readinto(b)
        except TimeoutError:
            self.expired = by_deadline
            raise
        self.received += n or 0
        return n


class JsonRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with a request deadline, 413 from the head, and JSON for every error (``_error``, ``send_error``).
    Subclasses add ``do_GET`` / ``do_POST`` and read a body with ``json_body()``."""

    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S
    server: BoundedHTTPServer

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stock reader, replaced by one that keeps the request deadline
        self._reader = _DeadlineSocketIO(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader)
        self._linger = False  # part of a request may be unread when the connection closes: drain it first

    def finish(self) -> None:
        super().finish()
        if self._linger:
            _linger(self.connection, LINGER_S)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("api %s: " + format, self.client_address[0], *args)

    # -- one request: deadline, head checks
    def handle_one_request(self) -> None:
        self._answered = False
        self._body_pending = False  # the request has a body not read yet
        self.requestline, self.request_version, self.command = "", self.protocol_version, ""
        self._reader.start(self.server.request_deadline_s)
        super().handle_one_request()  # a read past a deadline ends in its ``except TimeoutError``: closes
        if self._reader.expired and self._reader.received and not self._answered:
            self.send_error(408, f"the request was not received within {self.server.request_deadline_s:g} s")

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(505, "HTTP/0.9 is not supported")
            return False
        self._body_pending = "Content-Length" in self.headers or "Transfer-Encoding" in self.headers
        return self._length_ok()

    def handle_expect_100(self) -> bool:
        return self._length_ok() and super().handle_expect_100()

    def _length_ok(self) -> bool:
        length = (self.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) > self.server.max_body:
            self.send_error(413, f"the body is {int(length)} bytes; at most {self.server.max_body} are accepted")
            return False
        return True

    def json_body(self) -> dict[str, Any]:
        """The request's body: a JSON object of at most ``max_body`` bytes (checked with the head)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequestError("a JSON body with a Content-Length is required")
        n = int(length)
        data = self.rfile.read(n)
        if len(data) < n:
            raise BadRequestError(f"the body ended after {len(data)} of {n} bytes")
        self._body_pending = False
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise BadRequestError(f"the body is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise BadRequestError("the body must be a JSON object")
        return obj

    # -- answers
    def send_response(self, code: int, message: str | None = None) -> None:
        self._reader.deadline = None  # reading is over: the writes have the per-read timeout
        self.connection.settimeout(self.timeout)
        self._answered = True
        if self._body_pending:  # answered without reading the body: it must not be taken for the next request
            self.close_connection, self._linger = True, True
        super().send_response(code, message)
        if self.close_connection:
            self.send_header("Connection", "close")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """``http.server``'s errors (and ours of the HTTP layer) as JSON; the connection is closed after."""
        short, long = self.responses.get(code, ("error", ""))
        text = message or short
        if explain and explain != long:
            text = f"{text}: {explain}"
        if self.request_version == "HTTP/0.9":  # http.server's guess for a malformed request line: it would
            self.request_version = self.protocol_version  # answer without a status line
        self.close_connection, self._linger = True, True
        self._error(code, text, None, HTTP_ERROR_CODES.get(code, "http_error"))

    def _send_json(self, status: int, obj: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(obj).encode(), headers)

    def _send_bytes(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str | None, code: str | None = None,
               retry_after: int | None = None, param: str | None = None) -> None:
        self._send_bytes(status, error_body(status, message, code, kind, param),
                         {"Retry-After": str(retry_after)} if retry_after is not None else None)
