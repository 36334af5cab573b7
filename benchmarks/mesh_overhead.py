"""Data-plane overhead: one MoE layer's dispatch + combine over the data plane vs a raw TCP round trip of the same
bytes, measured in one run (part 1 of the Inference issue's mesh benchmark).

Two server subprocesses on 127.0.0.1: a raw TCP server that reads a request of N bytes and answers M bytes, and
an ``ExpertServer`` (TLS 1.3, pinned certificates) holding 8 experts of one layer with hidden 2048 and a tiny
intermediate size. Activations travel as bf16; the experts compute in fp32 by default (``--expert-dtype bf16`` to
change): on CPUs bf16 ``F.linear`` of these shapes is ~3× slower than fp32 (emulated without AMX / AVX512-BF16, and
still 24 vs 7 µs on the AVX512-BF16 dev box), which a CPU peer would avoid. Expert compute is reported
separately: the server's time inside the backend call only (``aux`` of each response). The client sends exactly
the frame bytes ``RemoteExperts`` sends; the raw baseline moves the same N and M bytes.

    python benchmarks/mesh_overhead.py [--iters 2000] [--expert-dtype fp32|bf16]

Headline: ``median(dataplane - server compute) / median(raw)`` (differences taken per iteration), the plane's own
overhead (routing bookkeeping, framing, TLS, validation, server hand-off, weighting, combine). Goal ≤ 1.5×. Also
printed: ``dataplane / raw`` with compute.
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def serve_experts(client_fp: str, dtype: torch.dtype) -> None:
    from ekmesh.infer.dataplane.channel import TlsIdentity
    from ekmesh.infer.dataplane.server import ExpertServer
    from ekmesh.infer.experts import ExpertSpec, ExpertWeights, LocalExperts

    torch.set_num_threads(1)
    be = LocalExperts(ExpertSpec(HIDDEN, INTER, EXPERTS), dtype=dtype)
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
    ap.add_argument("--expert-dtype", choices=sorted(DTYPES), default="fp32")
    args = ap.parse_args()
    if args.serve == "raw":
        return serve_raw()
    if args.serve == "experts":
        return serve_experts(args.client_fp, DTYPES[args.expert_dtype])

    from ekmesh.infer.dataplane.channel import ChannelPool, TlsIdentity
    from ekmesh.infer.dataplane.remote import RemoteExperts

    torch.set_num_threads(1)
    me = TlsIdentity.generate("client")
    ep, einfo = _spawn("--serve", "experts", "--client-fp", me.fingerprint.hex(),
                       "--expert-dtype", args.expert_dtype)
    rp, rinfo = _spawn("--serve", "raw")
    try:
        pins = {"server": bytes.fromhex(str(einfo["fingerprint"]))}.get
        pool = ChannelPool(me, pins, lambda p: ("127.0.0.1", int(str(einfo["port"]))), _limits())
        remote = RemoteExperts(_limits(), None, lambda layer, e: ["server"], pool)
        raw = socket.create_connection(("127.0.0.1", int(str(rinfo["port"]))))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rbuf = bytearray(64 << 20)
        print(f"loopback, hidden {HIDDEN} bf16 on the wire, top-{K} of {EXPERTS} experts (intermediate {INTER}, "
              f"{args.expert_dtype} compute), {args.iters} iterations, medians")
        for name, t in CASES:
            g = torch.Generator().manual_seed(0)
            hidden = torch.randn(t, HIDDEN, generator=g).to(torch.bfloat16)  # [T, D]
            ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(t)])  # [T, K]
            w = torch.softmax(torch.randn(t, K, generator=g), -1).to(torch.bfloat16)  # [T, K]
            n = 44 + t * K * 12 + t * HIDDEN * 2  # request frame bytes (all T*K pairs to the one peer)
            m = 44 + t * HIDDEN * 2  # response frame bytes
            dp, rw, cp = [], [], []  # per iteration: data plane, raw, server compute (seconds)
            for i in range(args.iters + 50):
                c0 = remote.stats()["server"].server_compute_s if i else 0.0
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
                    cp.append(remote.stats()["server"].server_compute_s - c0)
            # medians of per-iteration values: the overhead is the median of (round trip - that trip's compute)
            d, r, compute = statistics.median(dp), statistics.median(rw), statistics.median(cp)
            over = statistics.median(x - c for x, c in zip(dp, cp, strict=True))
            print(f"{name:20s} overhead ratio (compute excluded) {over / r:5.2f}× | raw {r * 1e6:7.1f} µs | "
                  f"data plane {d * 1e6:7.1f} µs = overhead {over * 1e6:7.1f} + server compute "
                  f"{compute * 1e6:7.1f} µs | with compute {d / r:5.2f}× | request {n} B, answer {m} B")
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
