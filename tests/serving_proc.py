"""Parent-side handle of a test server subprocess (expert server, blob server).

The child prints one JSON line with at least ``port`` and ``fingerprint`` once listening, then serves until its
stdin closes. ``ServingProc`` starts it, reads that line with a deadline (``ready``), and stops it gently
(``close``: stdin closed) or not (``kill``: SIGKILL, no goodbye on any socket).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def allow_args(allow: dict[str, bytes]) -> list[str]:
    """``--allow PEER=HEXFP`` arguments for the clients a child server must accept."""
    return [x for p, fp in allow.items() for x in ("--allow", f"{p}={fp.hex()}")]


def parse_allow(values: list[str]) -> dict[str, bytes]:
    """The child's side of ``allow_args``: peer id -> pinned certificate fingerprint."""
    return {p: bytes.fromhex(h) for p, h in (a.split("=", 1) for a in values)}


class ServingProc:
    what = "server"

    def __init__(self, module: str, args: list[str], peer_id: str, timeout: float) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.peer_id = peer_id
        self.info: dict[str, Any] = {}
        self._timeout = timeout
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ready(self) -> Any:
        """Waits (with the deadline) for the hello line; returns self."""
        q: queue.Queue[str] = queue.Queue()
        out = self.proc.stdout
        assert out is not None
        threading.Thread(target=lambda: q.put(out.readline()), daemon=True).start()
        try:
            line = q.get(timeout=self._timeout)
        except queue.Empty as exc:
            self.kill()
            raise TimeoutError(f"{self.what} {self.peer_id} did not start in {self._timeout} s") from exc
        if not line:
            raise RuntimeError(f"{self.what} {self.peer_id} exited with {self.proc.wait(5)}")
        self.info = json.loads(line)
        return self

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", int(self.info["port"]))

    @property
    def fingerprint(self) -> bytes:
        return bytes.fromhex(self.info["fingerprint"])

    def kill(self) -> None:
        """SIGKILL: no goodbye on any socket."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
