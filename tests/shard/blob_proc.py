"""A real blob-exchange server process for tests: serves a store over pinned TLS until its stdin closes.

    python -m tests.shard.blob_proc --store DIR --peer-id ID --allow PEER=HEXFP [--allow ...]

Prints one JSON line ``{"port", "fingerprint"}`` once listening. ``BlobProc`` starts one and reads that line with
a deadline; ``kill()`` is a SIGKILL (no goodbye on any socket).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--peer-id", required=True)
    ap.add_argument("--allow", action="append", default=[], help="PEER=HEX fingerprint of an allowed client")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from ekmesh.core.tls import TlsIdentity, make_context
    from ekmesh.shard.exchange import BlobListener, BlobServer
    from ekmesh.shard.store import Store

    identity = TlsIdentity.generate(args.peer_id)
    pins = {p: bytes.fromhex(h) for p, h in (a.split("=", 1) for a in args.allow)}
    listener = BlobListener(BlobServer(Store(args.store)), make_context(identity, server=True), pins.get)
    print(json.dumps({"port": listener.address[1], "fingerprint": identity.fingerprint.hex()}), flush=True)
    sys.stdin.read()
    listener.stop()


class BlobProc:
    """Parent-side handle of one blob_proc subprocess."""

    def __init__(self, store: Path, peer_id: str, allow: dict[str, bytes], timeout: float = 30.0) -> None:
        argv = [sys.executable, "-m", "tests.shard.blob_proc", "--store", str(store), "--peer-id", peer_id]
        argv += [x for p, fp in allow.items() for x in ("--allow", f"{p}={fp.hex()}")]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.peer_id = peer_id
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        q: queue.Queue[str] = queue.Queue()
        out = self.proc.stdout
        assert out is not None
        threading.Thread(target=lambda: q.put(out.readline()), daemon=True).start()
        try:
            line = q.get(timeout=timeout)
        except queue.Empty as exc:
            self.kill()
            raise TimeoutError(f"blob server {peer_id} did not start in {timeout} s") from exc
        if not line:
            raise RuntimeError(f"blob server {peer_id} exited with {self.proc.wait(5)}")
        self.info: dict[str, Any] = json.loads(line)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", int(self.info["port"]))

    @property
    def fingerprint(self) -> bytes:
        return bytes.fromhex(self.info["fingerprint"])

    def kill(self) -> None:
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


if __name__ == "__main__":
    main()
