"""A real expert-server process for data-plane tests: loads chosen experts of a checkpoint and serves them.

    python -m tests.infer.dataplane.expert_proc --ckpt DIR --peer-id ID --experts '[[layer, expert], ...]' \
        --allow PEER=HEXFP [--allow ...]

Prints one JSON line ``{"peer_id", "port", "fingerprint"}`` on stdout once listening, then serves until its stdin
closes (or it is killed). ``ServerProc`` starts one and reads that line with a deadline.
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

REPO = Path(__file__).resolve().parents[3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--peer-id", required=True)
    ap.add_argument("--experts", required=True, help="JSON list of [layer, expert]")
    ap.add_argument("--allow", action="append", default=[], help="PEER=HEX fingerprint of an allowed client")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from ekmesh.infer.dataplane.channel import TlsIdentity
    from ekmesh.infer.dataplane.frames import ModelLimits
    from ekmesh.infer.dataplane.server import ExpertServer
    from ekmesh.infer.experts import LocalExperts
    from ekmesh.infer.loader import Checkpoint, load_experts

    ckpt = Checkpoint.open(args.ckpt)
    backend = LocalExperts(ckpt.config.expert_spec())
    load_experts(ckpt, backend, [tuple(x) for x in json.loads(args.experts)])
    identity = TlsIdentity.generate(args.peer_id)
    pins = {p: bytes.fromhex(h) for p, h in (a.split("=", 1) for a in args.allow)}
    server = ExpertServer(backend, identity, pins.get, ModelLimits.from_config(ckpt.config)).start()
    print(json.dumps({"peer_id": args.peer_id, "port": server.address[1],
                      "fingerprint": identity.fingerprint.hex()}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()


class ServerProc:
    """Parent-side handle of one expert_proc subprocess."""

    def __init__(self, ckpt: Path, peer_id: str, experts: list[tuple[int, int]], allow: dict[str, bytes],
                 timeout: float = 60.0) -> None:
        argv = [sys.executable, "-m", "tests.infer.dataplane.expert_proc", "--ckpt", str(ckpt), "--peer-id",
                peer_id, "--experts", json.dumps([list(x) for x in experts])]
        for p, fp in allow.items():
            argv += ["--allow", f"{p}={fp.hex()}"]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.ckpt = ckpt
        self.peer_id = peer_id
        self.experts = set(experts)
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self._timeout = timeout
        self.info: dict[str, Any] = {}

    def ready(self) -> ServerProc:
        """Waits (with the deadline) for the READY line."""
        q: queue.Queue[str] = queue.Queue()
        assert self.proc.stdout is not None
        out = self.proc.stdout
        threading.Thread(target=lambda: q.put(out.readline()), daemon=True).start()
        try:
            line = q.get(timeout=self._timeout)
        except queue.Empty as exc:
            self.kill()
            raise TimeoutError(f"expert server {self.peer_id} did not start in {self._timeout} s") from exc
        if not line:
            raise RuntimeError(f"expert server {self.peer_id} exited with {self.proc.wait(5)}")
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
                self.proc.kill()
                self.proc.wait(10)


if __name__ == "__main__":
    main()
