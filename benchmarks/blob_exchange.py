"""Blob exchange throughput between two local processes vs a raw socket copy of the same bytes, in one run.

    python benchmarks/blob_exchange.py [--mib 256] [--repeat 5]

A server process holds one random blob in its store and listens twice: blob exchange (pinned TLS handshake, then
AES-GCM frames; ``BlobListener``) and a raw TCP socket that streams the blob file's bytes (read in 1 MiB chunks,
``sendall``). The client (this process) runs, interleaved, ``--repeat`` times each:
- raw: connect, ``recv_into`` a 1 MiB buffer, write to a file. No TLS, no hash, no fsync: the link-speed reference.
- raw into the store: the same socket copy, doing what the registry asks of any blob that enters a store, whatever
  brought it: blake3 of the bytes as they arrive (the same hasher as the fetcher's), then ``Store.adopt`` (fsync,
  hash check, rename, directory fsync). No TLS.
- exchange: ``Fetcher.fetch`` into an empty store with the default config: connect + pinned handshake, AEAD frames,
  ``pwrite``, blake3 as the bytes arrive, then ``Store.adopt``.
The hash and the fsync belong to the store, not to the transport, so the fair baseline does them too: the ratio
exchange / raw into the store is the price of the exchange itself (handshake, AEAD, framing, scheduling; goal >= 0.5).
The ratio exchange / raw is printed as well: the whole cost of a verified, durable, authenticated copy against bare
bytes. Medians of ``--repeat`` runs, and the best of them (on a shared machine other work only ever slows a run).
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
from collections.abc import Callable
from pathlib import Path

import blake3

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ekmesh.core.tls import TlsIdentity, make_context  # noqa: E402
from ekmesh.shard.blobserver import BlobListener, BlobServer  # noqa: E402
from ekmesh.shard.exchange import TlsDialer  # noqa: E402
from ekmesh.shard.fetch.fetcher import Fetcher  # noqa: E402
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


def raw_into_store(port: int, store: Store, blob_id: str) -> int:
    buf, got = memoryview(bytearray(CHUNK)), 0
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    part = store.root / "tmp" / "raw.part"
    with socket.create_connection(("127.0.0.1", port)) as s, open(part, "wb", buffering=0) as f:
        while n := s.recv_into(buf):
            f.write(buf[:n])
            hasher.update(buf[:n])
            got += n
    store.adopt(part, blob_id, hasher, got)
    return got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
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

        def exchange(store: Store) -> int:
            fetcher = Fetcher(store, dial)
            try:
                fetcher.fetch({blob_id: ["server"]}, timeout=300)
            finally:
                fetcher.close()
            return store.verify(blob_id).stat().st_size

        ways: dict[str, Callable[[Store], int]] = {
            "raw": lambda store: raw_copy(info["raw"], store.root / "raw"),
            "raw into the store": lambda store: raw_into_store(info["raw"], store, blob_id),
            "exchange": exchange,
        }
        rates: dict[str, list[float]] = {k: [] for k in ways}
        for i in range(args.repeat):
            for name, way in ways.items():
                store = Store(work / "client")
                t = time.perf_counter()
                assert way(store) == size
                rates[name].append(size / 1e6 / (time.perf_counter() - t))
                shutil.rmtree(store.root)  # at once: the next run does not pay for this one's dirty pages
            print(f"run {i}: " + ", ".join(f"{k} {v[-1]:.0f} MB/s" for k, v in rates.items()), flush=True)
        proc.stdin.close()
        proc.wait(30)
        for what, pick in (("median", statistics.median), ("best", max)):
            r = {k: pick(v) for k, v in rates.items()}
            each = ", ".join(f"{k} {v:.0f} MB/s" for k, v in r.items())
            print(f"blob {args.mib} MiB, {what} of {args.repeat}: {each}; ratio exchange / raw into the store "
                  f"{r['exchange'] / r['raw into the store']:.2f} (goal >= 0.5), exchange / raw "
                  f"{r['exchange'] / r['raw']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
