"""A real blob-exchange server process for tests: serves a store over pinned TLS until its stdin closes.

    python -m tests.shard.blob_proc --store DIR --peer-id ID --allow PEER=HEXFP [--allow ...]

Prints one JSON line ``{"port", "fingerprint"}`` once listening. ``BlobProc`` starts one and reads that line with
a deadline; ``kill()`` is a SIGKILL (no goodbye on any socket).
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
    ap.add_argument("--store", required=True)
    ap.add_argument("--peer-id", required=True)
    ap.add_argument("--allow", action="append", default=[], help="PEER=HEX fingerprint of an allowed client")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    from ekmesh.core.tls import TlsIdentity, make_context
    from ekmesh.shard.blobserver import BlobListener, BlobServer
    from ekmesh.shard.store import Store

    identity = TlsIdentity.generate(args.peer_id)
    pins = parse_allow(args.allow)
    listener = BlobListener(BlobServer(Store(args.store)), make_context(identity, server=True), pins.get)
    print(json.dumps({"port": listener.address[1], "fingerprint": identity.fingerprint.hex()}), flush=True)
    sys.stdin.read()
    listener.stop()


class BlobProc(ServingProc):
    """Parent-side handle of one blob_proc subprocess (ready once constructed)."""

    what = "blob server"

    def __init__(self, store: Path, peer_id: str, allow: dict[str, bytes], timeout: float = 30.0) -> None:
        super().__init__("tests.shard.blob_proc", ["--store", str(store), "--peer-id", peer_id,
                                                   *allow_args(allow)], peer_id, timeout)
        self.ready()


if __name__ == "__main__":
    main()
