"""A stand-in for the Hugging Face hub: a ThreadingHTTPServer on 127.0.0.1 port 0 serving local directories.

Serves what huggingface_hub asks for: ``GET /api/models/<repo>[/revision/<rev>]`` (id, commit sha, file list),
``GET /api/models/<repo>/tree/<rev>`` (snapshot_download's listing) and
``GET``/``HEAD /<repo>/resolve/<rev>/<file>`` with single-range ``Range: bytes=a-b`` support (206). It counts the
body bytes it sends (``file_bytes`` for files, ``api_bytes`` for the API) so tests can assert what a client fetched.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class HubStub:
    def __init__(self, repos: dict[str, Path], sha: str = "c0ffee" * 6 + "abcd") -> None:
        self.repos = repos
        self.sha = sha
        self.file_bytes = 0
        self.api_bytes = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                stub._serve(self, body=False)

            def do_GET(self) -> None:
                stub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.file_bytes = self.api_bytes = 0
            self.requests.clear()

    def _send(self, h: BaseHTTPRequestHandler, code: int, data: bytes, headers: dict[str, str], body: bool,
              api: bool) -> None:
        h.send_response(code)
        for k, v in {"Content-Length": str(len(data)), **headers}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)
            with self._lock:
                if api:
                    self.api_bytes += len(data)
                else:
                    self.file_bytes += len(data)

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            if "/tree/" in rest:  # snapshot_download's file listing
                repo, _, rev = rest.partition("/tree/")
                if repo not in self.repos:
                    return self._send(h, 404, b'{"error":"not found"}', {}, body, api=True)
                root = self.repos[repo]
                tree = [{"type": "file", "path": p.relative_to(root).as_posix(), "size": p.stat().st_size,
                         "oid": f"{p.stat().st_size:040x}"} for p in sorted(root.rglob("*")) if p.is_file()]
                return self._send(h, 200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, body,
                                  True)
            repo, _, rev = rest.partition("/revision/")
            if repo not in self.repos or rev not in ("", "main", self.sha):
                return self._send(h, 404, b'{"error":"not found"}', {}, body, api=True)
            root = self.repos[repo]
            files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            info = {"id": repo, "sha": self.sha, "siblings": [{"rfilename": f} for f in files]}
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body, True)
        repo, sep, rest = path.lstrip("/").partition("/resolve/")
        rev, _, fname = rest.partition("/")
        file = self.repos[repo] / fname if sep and repo in self.repos else None
        if file is None or rev not in ("main", self.sha) or not file.is_file():
            return self._send(h, 404, b"not found", {}, body, api=False)
        size = file.stat().st_size
        headers = {"Accept-Ranges": "bytes", "ETag": f'"{size}"', "X-Repo-Commit": self.sha}
        rng = h.headers.get("Range")
        if rng:
            m = _RANGE.match(rng.strip())
            if not m:
                return self._send(h, 416, b"", {}, body, api=False)
            a, b = int(m.group(1)), int(m.group(2)) if m.group(2) else size - 1
            b = min(b, size - 1)
            headers["Content-Range"] = f"bytes {a}-{b}/{size}"
            with open(file, "rb") as f:
                f.seek(a)
                return self._send(h, 206, f.read(b + 1 - a), headers, body, api=False)
        return self._send(h, 200, file.read_bytes(), headers, body, api=False)
