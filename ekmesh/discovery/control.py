"""The local control endpoint: how ``ekmesh status`` (and later ``chat`` and the OpenAI API) reach the node.

A minimal HTTP/1.1 server on ``127.0.0.1`` (port 0), run in the node's trio loop. The node writes
``<EKMESH_HOME>/node.json`` (mode 0600) with its pid, peer id, URL and a random bearer token; clients read it.
Requests without the token get 401, so other local users cannot query the node. One request per connection;
request heads and bodies are bounded; every read has a deadline.

A node holds an exclusive lock on ``<EKMESH_HOME>/node.lock`` while it runs, so two nodes never share one home
(and one identity). The client part (``read_control_file``, ``get_json``) uses only the standard library.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ekmesh.core.errors import NodeAlreadyRunningError, NodeNotRunningError

log = logging.getLogger(__name__)

CONTROL_FILE = "node.json"
LOCK_FILE = "node.lock"
MAX_HEAD = 16 * 1024
Handler = Callable[[str, str, bytes], Awaitable[tuple[int, dict[str, Any]]]]


def acquire_home_lock(home: Path) -> int:
    """Lock ``home`` for this process; ``NodeAlreadyRunningError`` if another node holds it. Returns the fd."""
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        info = _read_json(home / CONTROL_FILE) or {}
        raise NodeAlreadyRunningError(
            f"a node is already running for {home} (pid {info.get('pid', '?')}, peer {info.get('peer_id', '?')});"
            " stop it first, or set EKMESH_HOME to another directory to run a second node"
        ) from exc
    return fd


class ControlServer:
    def __init__(self, home: Path, peer_id: str, handler: Handler, timeout: float,
                 extra: dict[str, Any] | None = None) -> None:
        """``extra``: more fields for node.json (e.g. the node's ``api_url``)."""
        self.extra = dict(extra or {})
        self.home = home
        self.peer_id = peer_id
        self.handler = handler
        self.timeout = timeout
        self.token = secrets.token_urlsafe(24)
        self.url = ""

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        path = self.home / CONTROL_FILE
        _write_private(path, {**self.extra, "pid": os.getpid(), "peer_id": self.peer_id, "url": self.url,
                              "token": self.token})
        task_status.started()
        try:
            await trio.serve_listeners(self._serve, listeners)
        finally:
            info = _read_json(path)
            if info is not None and info.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    async def _serve(self, conn: trio.SocketStream) -> None:
        try:
            with trio.fail_after(self.timeout):
                status, body = await self._one_request(conn)
                payload = json.dumps(body).encode()
                head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
                await conn.send_all(head.encode() + payload)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("control request failed: %s", exc)
        finally:
            await conn.aclose()

    async def _one_request(self, conn: trio.SocketStream) -> tuple[int, dict[str, Any]]:
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            chunk = await conn.receive_some(4096)
            if not chunk:
                return 400, {"error": "incomplete request"}
            buf += chunk
            if len(buf) > MAX_HEAD:
                return 431, {"error": "request head too large"}
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return 400, {"error": "bad request line"}
        method, target, _version = parts
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if not secrets.compare_digest(headers.get("authorization", ""), f"Bearer {self.token}"):
            return 401, {"error": "missing or wrong token (see node.json in EKMESH_HOME)"}
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            return 400, {"error": "bad Content-Length"}
        if not 0 <= length <= MAX_HEAD:
            return 413, {"error": "body too large"}
        body = bytearray(rest)
        while len(body) < length:
            chunk = await conn.receive_some(length - len(body))
            if not chunk:
                return 400, {"error": "incomplete body"}
            body += chunk
        return await self.handler(method, target, bytes(body[:length]))


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 413: "Payload Too Large",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def _write_private(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def read_control_file(home: Path) -> dict[str, Any]:
    """The running node's control info; ``NodeNotRunningError`` if there is none."""
    info = _read_json(home / CONTROL_FILE)
    if info is None or not isinstance(info.get("url"), str) or not isinstance(info.get("token"), str):
        raise NodeNotRunningError(f"no ekmesh node is running for {home} (start one with `ekmesh join`)")
    return info


def get_json(home: Path, path: str, timeout: float) -> dict[str, Any]:
    """GET ``path`` from the node of ``home``; ``NodeNotRunningError`` if it does not answer."""
    info = read_control_file(home)
    req = urllib.request.Request(info["url"] + path, headers={"Authorization": f"Bearer {info['token']}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            obj = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise NodeNotRunningError(
            f"no ekmesh node answers for {home} (pid {info.get('pid', '?')} at {info['url']}: {exc}); "
            "start one with `ekmesh join`"
        ) from exc
    if not isinstance(obj, dict):
        raise NodeNotRunningError(f"the node for {home} answered with something other than a JSON object")
    return obj
