"""Data-plane overhead: one MoE layer's dispatch + combine over the data plane vs a raw TCP round trip of the same
bytes, measured in one run (part 1 of the Inference issue's mesh benchmark).

Two server subprocesses on 127.0.0.1: a raw TCP server that reads a request of N bytes and answers M bytes, and
an ``ExpertServer`` (TLS 1.3, pinned certificates) holding 8 experts of one layer with hidden 2048 (bf16) and a
tiny intermediate size, so expert compute is small and reported separately (the server's own compute time). The
client sends exactly the frame bytes ``RemoteExperts`` sends; the raw baseline moves the same N and M bytes.

    python benchmarks/mesh_overhead.py [--iters 2000]

Ratios: ``dataplane / raw`` (the whole call: routing bookkeeping, framing, TLS, validation, server batching,
compute, combine) and ``(dataplane - server compute) / raw`` (the plane's own overhead). Goal ≤ 1.5×.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTER, EXPERTS, K = 2048, 16, 8, 8
REPO = Path(__file__).resolve().parents[1]
CASES = [("decode: 1 token", 1), ("prefill: 64 tokens", 64)]


def _limits():  # type: ignore[no-untyped-def]
    from ekmesh.infer.dataplane.frames import ModelLimits

    return ModelLimits(num_layers=1, num_experts=EXPERTS, hidden=HIDDEN, moe_layers=(True,))


def serve_raw() -> None:
    """Reads (n, m) u32 then n bytes, answers m bytes; repeats."""
    srv = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    while True:
        head = bytearray(8)
        got = 0
        while got < 8:
            r = conn.recv_into(memoryview(head)[got:])
            if r == 0:
                return
            got += r
        n, m = struct.unpack("<II", head)
        got = 0
        while got < n:
            got += conn.recv_into(view[got:n])
        conn.sendall(view[:m])


def serve_experts(client_fp: str) -> None:
    from ekmesh.infer.dataplane.channel import TlsIdentity
    from ekmesh.infer.dataplane.server import ExpertServer
    from ekmesh.infer.experts import ExpertSpec, ExpertWeights, LocalExperts

    torch.set_num_threads(1)
    be = LocalExperts(ExpertSpec(HIDDEN, INTER, EXPERTS), dtype=torch.bfloat16)
    for e in range(EXPERTS):
        be.add(0, e, ExpertWeights(torch.randn(2 * INTER, HIDDEN) * 0.02, torch.randn(HIDDEN, INTER) * 0.02))
    ident = TlsIdentity.generate("server")
    srv = ExpertServer(be, ident, {"client": bytes.fromhex(client_fp)}.get, _limits()).start()
    print(json.dumps({"port": srv.address[1], "fingerprint": ident.fingerprint.hex()}), flush=True)
    sys.stdin.read()
    srv.stop()


def _spawn(*args: str) -> tuple[subprocess.Popen[str], dict[str, object]]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout is not None
    return p, json.loads(p.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", choices=["raw", "experts"])
    ap.add_argument("--client-fp", default="")
    ap.add_argument("--iters", type=int, default=2000)
    args = ap.parse_args()
    if args.serve == "raw":
        return serve_raw()
    if args.serve == "experts":
        return serve_experts(args.client_fp)

    from ekmesh.infer.dataplane.channel import ChannelPool, TlsIdentity
    from ekmesh.infer.dataplane.remote import RemoteExperts

    torch.set_num_threads(1)
    me = TlsIdentity.generate("client")
    ep, einfo = _spawn("--serve", "experts", "--client-fp", me.fingerprint.hex())
    rp, rinfo = _spawn("--serve", "raw")
    try:
        pins = {"server": bytes.fromhex(str(einfo["fingerprint"]))}.get
        pool = ChannelPool(me, pins, lambda p: ("127.0.0.1", int(str(einfo["port"]))), _limits())
        remote = RemoteExperts(_limits(), None, lambda layer, e: ["server"], pool)
        raw = socket.create_connection(("127.0.0.1", int(str(rinfo["port"]))))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rbuf = bytearray(64 << 20)
        print(f"loopback, hidden {HIDDEN} bf16, top-{K} of {EXPERTS} experts (intermediate {INTER}), "
              f"{args.iters} iterations, medians")
        for name, t in CASES:
            g = torch.Generator().manual_seed(0)
            hidden = torch.randn(t, HIDDEN, generator=g).to(torch.bfloat16)  # [T, D]
            ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(t)])  # [T, K]
            w = torch.softmax(torch.randn(t, K, generator=g), -1).to(torch.bfloat16)  # [T, K]
            n = 44 + t * K * 12 + t * HIDDEN * 2  # request frame bytes (all T*K pairs to the one peer)
            m = 44 + t * HIDDEN * 2  # response frame bytes
            dp, rw = [], []
            before = remote.stats().get("server")
            c0, n0 = (before.server_compute_s, before.round_trips) if before else (0.0, 0)
            for i in range(args.iters + 50):
                t0 = time.perf_counter()
                remote(0, hidden, ids, w)
                t1 = time.perf_counter()
                raw.sendall(struct.pack("<II", n, m) + bytes(n))
                got = 0
                while got < m:
                    got += raw.recv_into(memoryview(rbuf)[got:m])
                t2 = time.perf_counter()
                if i >= 50:  # warm-up excluded
                    dp.append(t1 - t0)
                    rw.append(t2 - t1)
            st = remote.stats()["server"]
            compute = (st.server_compute_s - c0) / (st.round_trips - n0)
            d, r = statistics.median(dp), statistics.median(rw)
            print(f"{name:20s} request {n:7d} B, answer {m:7d} B | raw {r * 1e6:7.1f} µs | data plane "
                  f"{d * 1e6:7.1f} µs (server compute {compute * 1e6:6.1f} µs) | ratio {d / r:4.2f}× "
                  f"(without compute {(d - compute) / r:4.2f}×)")
        raw.close()
        pool.close()
    finally:
        for p in (ep, rp):
            assert p.stdin is not None
            p.stdin.close()
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
