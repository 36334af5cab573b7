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
import sys
from pathlib import Path

from tests.serving_proc import ServingProc, allow_args, parse_allow


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
    pins = parse_allow(args.allow)
    server = ExpertServer(backend, identity, pins.get, ModelLimits.from_config(ckpt.config)).start()
    print(json.dumps({"peer_id": args.peer_id, "port": server.address[1],
                      "fingerprint": identity.fingerprint.hex()}), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()


class ServerProc(ServingProc):
    """Parent-side handle of one expert_proc subprocess."""

    what = "expert server"

    def __init__(self, ckpt: Path, peer_id: str, experts: list[tuple[int, int]], allow: dict[str, bytes],
                 timeout: float = 60.0) -> None:
        args = ["--ckpt", str(ckpt), "--peer-id", peer_id, "--experts", json.dumps([list(x) for x in experts]),
                *allow_args(allow)]
        super().__init__("tests.infer.dataplane.expert_proc", args, peer_id, timeout)
        self.ckpt = ckpt
        self.experts = set(experts)


if __name__ == "__main__":
    main()
