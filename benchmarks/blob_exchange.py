"""Blob exchange throughput between two local processes vs a raw socket copy of the same bytes, in one run.

    python benchmarks/blob_exchange.py [--mib 256] [--repeat 3]

A server process holds one random blob in its store and listens twice: blob exchange (pinned TLS handshake, then
AES-GCM frames; ``BlobListener``) and a raw TCP socket that streams the blob file's bytes (read in 1 MiB chunks,
``sendall``). The client (this process) alternates:
- raw: connect, ``recv_into`` a 1 MiB buffer, ``os.write`` to a file (no TLS, no hash, no fsync);
- exchange: ``Fetcher.fetch`` into an empty store with the default config (8 MiB ranges, 2 transfers per peer):
  connect + handshake, AEAD frames, ``pwrite``, then ``Store.adopt`` (fsync, blake3 of the whole file, rename).
It prints MB/s of each (median of ``--repeat``) and the ratio exchange / raw (goal >= 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ekmesh.core.tls import TlsIdentity, make_context  # noqa: E402
from ekmesh.shard.exchange import BlobListener, BlobServer, TlsDialer  # noqa: E402
from ekmesh.shard.fetch import Fetcher  # noqa: E402
from ekmesh.shard.store import Store  # noqa: E402

CHUNK = 1 << 20


def serve(store_dir: str, blob_id: str, client_fp: str) -> None:
    identity = TlsIdentity.generate("server")
    store = Store(store_dir)
    lst = BlobListener(BlobServer(store), make_context(identity, server=True), {"client": bytes.fromhex(client_fp)}.get)
    raw = socket.create_server(("127.0.0.1", 0))

    def raw_loop() -> None:
        while True:
            try:
                conn, _ = raw.accept()
            except OSError:
                return
            with conn, open(store.blob_path(blob_id), "rb", buffering=0) as f:
                buf = memoryview(bytearray(CHUNK))
                while n := f.readinto(buf):
                    conn.sendall(buf[:n])

    threading.Thread(target=raw_loop, daemon=True).start()
    print(json.dumps({"exchange": lst.address[1], "raw": raw.getsockname()[1],
                      "fingerprint": identity.fingerprint.hex()}), flush=True)
    sys.stdin.read()
    lst.stop()
    raw.close()


def raw_copy(port: int, dest: Path) -> int:
    buf, got = memoryview(bytearray(CHUNK)), 0
    with socket.create_connection(("127.0.0.1", port)) as s, open(dest, "wb", buffering=0) as f:
        while n := s.recv_into(buf):
            f.write(buf[:n])
            got += n
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--serve", nargs=3, metavar=("STORE", "BLOB", "CLIENT_FP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    size = args.mib << 20
    work = Path(tempfile.mkdtemp(prefix="ekmesh-bench-"))
    try:
        src = Store(work / "server")
        blob_id = src.put(os.urandom(CHUNK) for _ in range(args.mib))
        client = TlsIdentity.generate("client")
        proc = subprocess.Popen([sys.executable, __file__, "--serve", str(src.root), blob_id,
                                 client.fingerprint.hex()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        info = json.loads(proc.stdout.readline())
        dial = TlsDialer(make_context(client, server=False), {"server": bytes.fromhex(info["fingerprint"])}.get,
                         {"server": ("127.0.0.1", info["exchange"])}.get)
        raw_rates, ex_rates = [], []
        for i in range(args.repeat):
            dest = work / f"raw-{i}"
            t = time.perf_counter()
            assert raw_copy(info["raw"], dest) == size
            raw_rates.append(size / 1e6 / (time.perf_counter() - t))
            dest.unlink()
            store = Store(work / f"client-{i}")
            fetcher = Fetcher(store, dial)
            t = time.perf_counter()
            fetcher.fetch({blob_id: ["server"]}, timeout=300)
            ex_rates.append(size / 1e6 / (time.perf_counter() - t))
            fetcher.close()
            assert store.verify(blob_id).stat().st_size == size
            shutil.rmtree(store.root)
            print(f"run {i}: raw {raw_rates[-1]:.0f} MB/s, exchange {ex_rates[-1]:.0f} MB/s", flush=True)
        proc.stdin.close()
        proc.wait(30)
        raw_mb, ex_mb = statistics.median(raw_rates), statistics.median(ex_rates)
        print(f"blob {args.mib} MiB, median of {args.repeat}: raw socket copy {raw_mb:.0f} MB/s, "
              f"blob exchange {ex_mb:.0f} MB/s, ratio {ex_mb / raw_mb:.2f} (goal >= 0.5)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
