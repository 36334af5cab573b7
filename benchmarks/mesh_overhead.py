"""Data-plane overhead: one MoE layer's dispatch + combine over the data plane vs a raw TCP round trip of the same
bytes, measured in one run (part 1 of the Inference issue's mesh benchmark; parts 2 and 3, tokens/s of real nodes
on loopback and on emulated links, are ``mesh_tokens.py``).

Four server subprocesses on 127.0.0.1: a raw TCP server that reads a request of N bytes and answers M bytes, the
same over a pinned TLS 1.3 socket (the encryption floor: no framing, no validation, no compute), the raw server
again with both of its ends busy-polling for up to 3 ms before they block (as the data plane's waits do where they
poll: ``infer/dataplane/poll.py``, on by default with 4 cores or more, ``EKMESH_POLL_US`` to force it), and
an ``ExpertServer`` (TLS 1.3, pinned certificates) holding every expert of one layer. The client sends exactly the
frame bytes ``RemoteExperts`` sends; the baselines move the same N and M bytes. The data plane, raw and TLS round
trips alternate within each iteration, so they see the same load; the polled baseline runs on its own right after
(two polling servers at once would take both cores of a 2-core machine from the client).

Shapes (``--shape``): ``wide`` (default): hidden 2048, bf16 on the wire, top-8 of 8 experts with a tiny intermediate
size (16), fp32 expert compute (``--expert-dtype bf16`` to change: on CPUs bf16 ``F.linear`` of these shapes is ~3×
slower than fp32, which a CPU peer would avoid); ``builtin``: the built-in model's experts (hidden 384, fp32 on the
wire as a CPU node sends it, top-2 of 12, intermediate 160). Expert compute is reported separately: the server's
time inside the backend call only (``aux`` of each response).

    python benchmarks/mesh_overhead.py [--iters 2000] [--shape wide|builtin] [--expert-dtype fp32|bf16]
                                       [--gap-us 0] [--json]

``--gap-us N``: before each timed round trip the client computes for N µs (small matrix-vector products, as an
attention host does between two MoE layers), so the servers have been idle that long, as in a decode step, instead
of answering back to back. Round trips after a gap cost more on machines whose idle cores lose their warm state.

Headline: ``median(dataplane - server compute) / median(raw)`` (differences taken per iteration), the plane's own
overhead (routing bookkeeping, framing, TLS, validation, server hand-off, weighting, combine). Goal ≤ 1.5×. Also
printed: the TLS-only round trip over raw, ``dataplane / raw`` with compute, and the overhead over the polled raw
round trip (the data plane polls, so on a machine where waking a sleeping core is expensive, a blocking raw round
trip carries wake-up costs the data plane avoids; this ratio leaves them out of both sides).
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
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# hidden, intermediate, experts, top-k, wire dtype
SHAPES: dict[str, tuple[int, int, int, int, torch.dtype]] = {
    "wide": (2048, 16, 8, 8, torch.bfloat16), "builtin": (384, 160, 12, 2, torch.float32)}
CASES = [("decode: 1 token", 1), ("prefill: 64 tokens", 64)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _limits(shape: str):  # type: ignore[no-untyped-def]
    from ekmesh.infer.dataplane.frames import ModelLimits

    d, _, e, _, _ = SHAPES[shape]
    return ModelLimits(num_layers=1, num_experts=e, hidden=d, moe_layers=(True,))


POLL_S = 3e-3  # the polled baseline: busy-poll this long, then block


def _recv_into(sock: socket.socket, view: memoryview, polled: bool) -> int:
    """One read; ``polled``: busy-polls (non-blocking reads, ``sched_yield`` between them, as the data plane does
    where it polls: ``infer/dataplane/poll.py``) for up to ``POLL_S``, then blocks."""
    if not polled:
        return sock.recv_into(view)
    until = time.monotonic() + POLL_S
    sock.setblocking(False)
    try:
        while time.monotonic() < until:
            try:
                return sock.recv_into(view)
            except BlockingIOError:
                os.sched_yield()
    finally:
        sock.setblocking(True)
    return sock.recv_into(view)


def serve_raw(client_fp: str, polled: bool = False) -> None:
    """Reads (n, m) u32 then n bytes, answers m bytes; repeats. Over pinned TLS 1.3 when ``client_fp`` is set;
    waiting for each request as the data plane does when ``polled``."""
    from ekmesh.core.tls import TlsIdentity, check_peer_cert, make_context

    srv = socket.create_server(("127.0.0.1", 0))
    ident = TlsIdentity.generate("server")
    print(json.dumps({"port": srv.getsockname()[1], "fingerprint": ident.fingerprint.hex()}), flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if client_fp:
        conn = make_context(ident, server=True).wrap_socket(conn, server_side=True)
        check_peer_cert(conn, {"client": bytes.fromhex(client_fp)}.get)  # type: ignore[arg-type]
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    while True:
        head = bytearray(8)
        got = 0
        while got < 8:
            try:
                r = _recv_into(conn, memoryview(head)[got:], polled)
            except OSError:
                return
            if r == 0:
                return
            got += r
        n, m = struct.unpack("<II", head)
        got = 0
        while got < n:
            got += _recv_into(conn, view[got:n], polled)
        conn.sendall(view[:m])


def serve_experts(client_fp: str, shape: str, dtype: torch.dtype) -> None:
    from ekmesh.infer.dataplane.channel import TlsIdentity
    from ekmesh.infer.dataplane.server import ExpertServer
    from ekmesh.infer.expert import ExpertSpec, ExpertWeights
    from ekmesh.infer.experts import LocalExperts

    torch.set_num_threads(1)
    d, inter, experts, _, _ = SHAPES[shape]
    be = LocalExperts(ExpertSpec(d, inter, experts), dtype=dtype)
    for e in range(experts):
        be.add(0, e, ExpertWeights(torch.randn(2 * inter, d) * 0.02, torch.randn(d, inter) * 0.02))
    ident = TlsIdentity.generate("server")
    srv = ExpertServer(be, ident, {"client": bytes.fromhex(client_fp)}.get, _limits(shape)).start()
    print(json.dumps({"port": srv.address[1], "fingerprint": ident.fingerprint.hex()}), flush=True)
    sys.stdin.read()
    srv.stop()


def _spawn(*args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout is not None
    return p, json.loads(p.stdout.readline())


def _connect(info: dict[str, Any], me: Any = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(info["port"])))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if me is None:
        return sock
    from ekmesh.core.tls import check_peer_cert, make_context

    tls = make_context(me, server=False).wrap_socket(sock)
    check_peer_cert(tls, {"server": bytes.fromhex(info["fingerprint"])}.get, "server")  # type: ignore[arg-type]
    return tls


def _busy(gap_s: float, a: torch.Tensor, x: torch.Tensor) -> None:
    """Keeps this core busy with small matrix-vector products for ``gap_s`` seconds (an attention host's work
    between two MoE layers)."""
    until = time.perf_counter() + gap_s
    while time.perf_counter() < until:
        torch.nn.functional.linear(x, a)


def _round_trip(sock: socket.socket, n: int, m: int, buf: bytearray, polled: bool = False) -> None:
    sock.sendall(struct.pack("<II", n, m) + bytes(n))
    got = 0
    while got < m:
        got += _recv_into(sock, memoryview(buf)[got:m], polled)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", choices=["raw", "polled", "tls", "experts"])
    ap.add_argument("--client-fp", default="")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="wide")
    ap.add_argument("--expert-dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--gap-us", type=float, default=0.0, help="client compute before each round trip (µs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.serve in ("raw", "polled", "tls"):
        serve_raw(args.client_fp if args.serve == "tls" else "", polled=args.serve == "polled")
        return
    if args.serve == "experts":
        serve_experts(args.client_fp, args.shape, DTYPES[args.expert_dtype])
        return

    from ekmesh.infer.dataplane.channel import ChannelPool, TlsIdentity
    from ekmesh.infer.dataplane.remote import RemoteExperts

    torch.set_num_threads(1)
    d, inter, experts, k, wire = SHAPES[args.shape]
    me = TlsIdentity.generate("client")
    fp = me.fingerprint.hex()
    procs = [_spawn("--serve", "experts", "--client-fp", fp, "--shape", args.shape,
                    "--expert-dtype", args.expert_dtype), _spawn("--serve", "raw"),
             _spawn("--serve", "tls", "--client-fp", fp), _spawn("--serve", "polled")]
    (_, einfo), (_, rinfo), (_, tinfo), (_, pinfo) = procs
    results = []
    try:
        pins = {"server": bytes.fromhex(str(einfo["fingerprint"]))}.get
        pool = ChannelPool(me, pins, lambda p: ("127.0.0.1", int(str(einfo["port"]))), _limits(args.shape))
        remote = RemoteExperts(_limits(args.shape), None, lambda layer, e: ["server"], pool)
        raw, tls, polled = _connect(rinfo), _connect(tinfo, me), _connect(pinfo)
        rbuf = bytearray(64 << 20)
        gap = args.gap_us * 1e-6
        ga, gx = torch.randn(d, d) * (d ** -0.5), torch.randn(1, d)  # the gap's work: [D, D] @ [D]
        wname = str(wire).removeprefix("torch.")
        if not args.json:
            print(f"loopback, hidden {d} {wname} on the wire, top-{k} of {experts} experts (intermediate {inter}, "
                  f"{args.expert_dtype} compute), {args.iters} iterations, {args.gap_us:.0f} µs of client compute "
                  f"before each round trip, medians")
        for name, t in CASES:
            g = torch.Generator().manual_seed(0)
            hidden = torch.randn(t, d, generator=g).to(wire)  # [T, D]
            ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(t)])  # [T, K]
            w = torch.softmax(torch.randn(t, k, generator=g), -1).to(wire)  # [T, K]
            n = 44 + t * k * 12 + t * d * wire.itemsize  # request frame bytes (all T*K pairs to the one peer)
            m = 44 + t * d * wire.itemsize  # response frame bytes
            dp, rw, tl, cp, pl = [], [], [], [], []  # per iteration: data plane, raw, TLS, compute, raw polled (s)
            for i in range(args.iters + 50):
                c0 = remote.stats()["server"].server_compute_s if i else 0.0
                _busy(gap, ga, gx)
                t0 = time.perf_counter()
                remote(0, hidden, ids, w)
                t1 = time.perf_counter()
                _busy(gap, ga, gx)
                t2 = time.perf_counter()
                _round_trip(raw, n, m, rbuf)
                t3 = time.perf_counter()
                _busy(gap, ga, gx)
                t4 = time.perf_counter()
                _round_trip(tls, n, m, rbuf)
                t5 = time.perf_counter()
                if i >= 50:  # warm-up excluded
                    dp.append(t1 - t0)
                    rw.append(t3 - t2)
                    tl.append(t5 - t4)
                    cp.append(remote.stats()["server"].server_compute_s - c0)
            # the polled baseline on its own, once the expert server has stopped polling (its polling and this
            # server's would otherwise take both cores of a 2-core machine from the client)
            time.sleep(0.05)
            for i in range(args.iters + 50):
                _busy(gap, ga, gx)
                t6 = time.perf_counter()
                _round_trip(polled, n, m, rbuf, polled=True)
                if i >= 50:
                    pl.append(time.perf_counter() - t6)
            time.sleep(0.05)
            # medians of per-iteration values: the overhead is the median of (round trip - that trip's compute)
            dm, r, tm, compute, pm = (statistics.median(x) for x in (dp, rw, tl, cp, pl))
            over = statistics.median(x - c for x, c in zip(dp, cp, strict=True))
            res = {"case": name, "tokens": t, "request_bytes": n, "answer_bytes": m, "raw_us": r * 1e6,
                   "tls_us": tm * 1e6, "dataplane_us": dm * 1e6, "server_compute_us": compute * 1e6,
                   "overhead_us": over * 1e6, "overhead_ratio": over / r, "tls_ratio": tm / r,
                   "ratio_with_compute": dm / r, "raw_polled_us": pm * 1e6, "overhead_vs_polled": over / pm}
            results.append(res)
            if not args.json:
                print(f"{name:20s} overhead ratio (compute excluded) {over / r:5.2f}× | raw {r * 1e6:7.1f} µs | "
                      f"TLS only {tm * 1e6:7.1f} µs ({tm / r:4.2f}×) | data plane {dm * 1e6:7.1f} µs = overhead "
                      f"{over * 1e6:7.1f} + server compute {compute * 1e6:7.1f} µs | with compute {dm / r:5.2f}× | "
                      f"raw polled {pm * 1e6:6.1f} µs (overhead {over / pm:5.2f}× that) | "
                      f"request {n} B, answer {m} B")
        raw.close()
        tls.close()
        polled.close()
        pool.close()
    finally:
        for p, _ in procs:
            assert p.stdin is not None
            p.stdin.close()
            p.kill()
            p.wait()
    if args.json:
        print(json.dumps({"shape": args.shape, "gap_us": args.gap_us, "hidden": d, "intermediate": inter,
                          "experts": experts, "top_k": k,
                          "wire": wname, "expert_dtype": args.expert_dtype, "iters": args.iters,
                          "results": results}, indent=1))


if __name__ == "__main__":
    main()
