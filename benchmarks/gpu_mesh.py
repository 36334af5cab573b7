"""Two GPUs as two peers (issue 19): a two-node mesh on one machine against the same model in one process on one GPU.

Mesh: two real ``ekmesh join`` nodes over TCP on 127.0.0.1: the attention host on device A (``--device A``) and an
expert holder on device B (``--no-attention``), R = 1, each holding half of the routed experts. The split is forced
through placement's budgets: both nodes offer ``--memory`` = half the experts' stored bytes plus half the largest
expert, so together they hold every expert once and neither can take more than half (with equal-sized experts,
exactly half each; per layer the halves are as rendezvous hashing deals them, printed). One process: ``python -m
ekmesh.api --model ID --device A``. Model: a random Qwen3-MoE with Qwen3-30B-A3B's shapes (hidden 2048, 32 query /
4 key-value heads of 128, experts of 768, top-8, vocabulary 151936; ``--layers`` 48 and ``--experts`` 128 by
default; on CPU devices the vocabulary defaults to 4096), built with transformers (``pip install -e .[dev]``) in the
benchmark's dtype, imported into the holder's store (``--quantize q4``: as ``ekmesh import --quantize q4``), and
prompted with token ids. Both sides answer ``POST /v1/completions`` greedily with ``ignore_eos``; tokens/s is the
server's ``ekmesh.tokens_per_s`` (decode only). Runs alternate (one process, mesh, ...) and medians are reported;
when both cannot sit on device A at once (a CUDA card smaller than the host's share plus the whole model, ×1.1),
the one-process runs come first and that process stops before the mesh starts (said in the output).

Token ids: in fp32 the mesh must give the one-process ids exactly (else the first differing position is printed
and the exit status is 1). In bf16 they cannot be equal in general: the holder returns its experts' weighted sum
rounded to bf16 (the wire dtype) before the host adds its own, where one process sums all k in fp32 and rounds once,
and a random model's nearly flat logits turn such a rounding into another argmax sooner or later; then the agreeing
prefix is reported (exit 0).

The per-layer round trip (one frame to the holder and its answer; means over the decode steps' frames of the measured
mesh runs, from the nodes' cumulative counters: ``split`` in ``ekmesh status --json``, ``peerstats.HostSplit`` on
the host and ``ServerStats.split`` on the holder; each run's deltas less those of a one-token answer to the same
prompt just before it, i.e. less the prefill's frames; ``split_all_frames`` in ``--json`` keeps them):

- rtt: on the host, from the start of the frame's device-to-host copy to its answer decoded, plus the answer's
  host-to-device copy;
- copy: the rows' device-to-host copy and the answer's host-to-device copy on the host; on the holder, the rows to
  its device and the answer back into its frame (with the cast to the wire dtype; on its grouped path also the
  gathers and weighted sums);
- framing: building and decoding the request frame and the answer frame (both sides);
- TLS: what TLS adds to sending and receiving a frame of the mean request size and one of the mean answer size over
  TCP on 127.0.0.1 (encryption + decryption; median send + receive through a TLS 1.3 connection with the data
  plane's certificates, less the same through a plain one), measured by this script in the same run; the nodes'
  own measured ``sendall`` times (encryption + socket write) are printed beside it;
- compute: the holder's backend call (followed by a CUDA synchronize, so the kernels are counted here);
- network: rtt less all of the above: the kernel's socket paths and loopback, wake-ups, the holder's queueing,
  and any time the answer waited for the host's own experts (computed while the frame is out: ``local``, printed
  beside; on CUDA the time to launch them).

    python benchmarks/gpu_mesh.py [--devices cuda:0,cuda:1] [--layers 48] [--experts 128] [--dtype bf16|fp32]
                                  [--quantize q4] [--tokens 64] [--repeats 3] [--workdir DIR] [--json]
    python benchmarks/gpu_mesh.py --devices cpu,cpu --layers 2 --experts 16 --tokens 16 --repeats 2   # smoke run

``--workdir DIR`` keeps the imported model (its checkpoint is deleted after import either way: at full size the
bf16 checkpoint, the holder's store and the host's half are 58 + 58 + 29 GB) for the next run with the same shape.
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.mesh_tokens import Proc, _ready, child_env, completion, post  # noqa: E402

GIB = 1 << 30
QWEN3_30B_A3B = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, moe_intermediate_size=768, num_experts_per_tok=8, norm_topk_prob=True,
                     decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096, rope_theta=1e6,
                     rms_norm_eps=1e-6, initializer_range=0.02, tie_word_embeddings=False, bos_token_id=None,
                     eos_token_id=None, pad_token_id=None)
PROMPT_LEN = 24
READY_S = 1800.0  # the holder imports, the host fetches its half: minutes at full size


# -- the model --------------------------------------------------------------------------------------------------

def make_model(directory: Path, layers: int, experts: int, vocab: int, dtype: str) -> None:
    """Writes the random Qwen3-MoE checkpoint (seeded) in ``dtype``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen3_moe", vocab_size=vocab, num_hidden_layers=layers, num_experts=experts,
                               **QWEN3_30B_A3B)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.save_pretrained(directory)


def import_model(home: Path, source: Path, quantize: str | None) -> str:
    """``ekmesh import SOURCE [--quantize q4]`` into ``home``'s store; the model id."""
    argv = [sys.executable, "-m", "ekmesh.cli", "import", str(source), "--json",
            *(["--quantize", quantize] if quantize else [])]
    r = subprocess.run(argv, env=child_env(home), capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"import of {source} failed: {r.stderr[-2000:]}")
    return str(json.loads(r.stdout)["model_id"])


def prepare(args: argparse.Namespace, work: Path) -> str:
    """The model in the holder's store (made and imported once per shape in ``work``); its id."""
    key = {k: getattr(args, k) for k in ("layers", "experts", "vocab", "dtype", "quantize")}
    done = work / "model.json"
    if done.exists() and json.loads(done.read_text())["key"] == key:
        return str(json.loads(done.read_text())["model_id"])
    shutil.rmtree(work / "b", ignore_errors=True)
    (work / "b").mkdir(mode=0o700)
    ckpt = work / "checkpoint"
    try:
        make_model(ckpt, args.layers, args.experts, args.vocab, args.dtype)
        model_id = import_model(work / "b", ckpt, args.quantize)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    done.write_text(json.dumps({"key": key, "model_id": model_id}))
    return model_id


def expert_bytes(home: Path, model_id: str) -> tuple[int, int, int]:
    """(all routed experts' stored bytes, the largest expert's, experts) of the model in ``home``'s store."""
    from ekmesh.shard.store import Store

    m = Store(home / "store", read_only=True).load_manifest(model_id)
    sizes = [m.size(bid) for bid in m.expert_ids().values()]
    return sum(sizes), max(sizes), len(sizes)


# -- TLS's share, measured here ---------------------------------------------------------------------------------

def tls_cost(sizes: list[int], reps: int = 300) -> dict[int, float]:
    """{frame size: seconds TLS adds to sending and receiving it over TCP on 127.0.0.1} (module docstring)."""
    from ekmesh.core.tls import TlsIdentity, make_context

    def pair(tls: bool) -> tuple[socket.socket, socket.socket]:
        srv = socket.create_server(("127.0.0.1", 0))
        a = socket.create_connection(srv.getsockname(), timeout=10)
        b, _ = srv.accept()
        srv.close()
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.settimeout(10)
        if not tls:
            return a, b
        ca = make_context(TlsIdentity.generate("client"), server=False)
        cb = make_context(TlsIdentity.generate("server"), server=True)
        out: list[socket.socket] = []
        t = threading.Thread(target=lambda: out.append(cb.wrap_socket(b, server_side=True)))
        t.start()
        wa = ca.wrap_socket(a)
        t.join(10)
        return wa, out[0]

    def one_way(a: socket.socket, b: socket.socket, n: int) -> float:
        data, buf = bytes(n), memoryview(bytearray(n))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a.sendall(data)
            got = 0
            while got < n:
                got += b.recv_into(buf[got:])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out: dict[int, float] = {}
    for tls in (False, True):
        a, b = pair(tls)
        with a, b:
            for n in sizes:
                out[n] = out.get(n, 0.0) + (1 if tls else -1) * one_way(a, b, n)
    return {n: max(0.0, v) for n, v in out.items()}


# -- the two sides ----------------------------------------------------------------------------------------------

def status(home: Path) -> dict[str, Any]:
    from ekmesh.core.constants import STATUS_PATH
    from ekmesh.discovery.control import get_json

    return get_json(home, STATUS_PATH, 10)


def ask(url: str, prompt: list[int], tokens: int) -> dict[str, Any]:
    out = post(url + "/completions", completion(tokens, prompt), timeout=1800)["ekmesh"]
    assert isinstance(out, dict)
    return out


def start_one(args: argparse.Namespace, model_id: str, work: Path, threads: int) -> tuple[Proc, str]:
    argv = [sys.executable, "-m", "ekmesh.api", "--model", model_id, "--port", "0", "--device", args.dev_a,
            "--dtype", args.dtype]
    one = Proc(argv, home=work / "b", log=work / "one.log", env_extra={"EKMESH_THREADS": str(threads)})
    return one, str(one.json(READY_S)["api_url"])


def start_mesh(args: argparse.Namespace, model_id: str, work: Path, budget: float,
               threads: dict[str, int]) -> tuple[list[Proc], str]:
    """The holder (it has the blobs), then the attention host bootstrapped from it; waits until settled."""
    from ekmesh.core.errors import LocalNodeError

    key = work / "mesh.key"
    key.write_text(os.urandom(32).hex() + "\n")
    (work / "host").mkdir(mode=0o700, exist_ok=True)
    common = ["--json", "--model", model_id, "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--no-dht",
              "--no-relay", "--no-reserve", "--exit-with-parent", "--mesh-key-file", str(key), "--replicas", "1",
              "--advert-interval", "1", "--memory", repr(budget), "--dtype", args.dtype]
    procs: list[Proc] = []
    try:
        b = Proc([sys.executable, "-m", "ekmesh.cli", "join", "--name", "gpu-b", "--device", args.dev_b,
                  "--no-attention", "--no-api", *common], home=work / "b", log=work / "b.log",
                 env_extra={"EKMESH_THREADS": str(threads["holder"])})
        procs.append(b)
        hello = b.json(120)
        addr = str(hello["addrs"][0])
        first = addr if "/p2p/" in addr else f"{addr}/p2p/{hello['peer_id']}"
        host = Proc([sys.executable, "-m", "ekmesh.cli", "join", "--name", "gpu-a", "--device", args.dev_a,
                     "--attention", "--api-port", "0", "--peer", first, *common], home=work / "host",
                    log=work / "host.log", env_extra={"EKMESH_THREADS": str(threads["host"])})
        procs.append(host)
        host.json(120)
        deadline = time.monotonic() + READY_S
        while True:
            with contextlib.suppress(LocalNodeError):  # (not answering yet: its control endpoint starts with it)
                snap = status(work / "host")
                if _ready(snap, 2):
                    return procs, str(snap["serving"]["api_url"])
            if time.monotonic() > deadline:
                raise RuntimeError(f"mesh not ready after {READY_S:.0f} s{host.tail()}{b.tail()}")
            for p in procs:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited ({p.proc.returncode}){p.tail()}")
            time.sleep(0.5)  # polling a condition (the mesh settled) with the deadline above
    except BaseException:
        for p in reversed(procs):
            p.stop()
        raise


def counters(work: Path) -> dict[str, dict[str, int]]:
    host = status(work / "host")["serving"]["split"]["host"]
    server = status(work / "b")["serving"]["split"]["server"]
    return {"host": dict(host), "server": dict(server)}


def delta(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {side: {k: v - before[side][k] for k, v in after[side].items()} for side in after}


# -- the benchmark -----------------------------------------------------------------------------------------------

def split_of(d: dict[str, dict[str, int]], tls: dict[int, float]) -> dict[str, float]:
    """Mean per frame (µs) of each part (module docstring), from the counters' deltas over the mesh runs."""
    h, s = d["host"], d["server"]
    n = max(h["frames"], 1)
    us = 1e-3 / n  # ns sums -> µs per frame
    req, ans = round(h["bytes_out"] / n), round(h["bytes_in"] / n)
    out = {"frames": float(h["frames"]), "server_requests": float(s["requests"]), "request_bytes": float(req),
           "answer_bytes": float(ans),
           "rtt_us": (h["rtt_ns"] + h["copy_in_ns"]) * us,
           "copy_us": (h["copy_out_ns"] + h["copy_in_ns"] + s["copy_ns"]) * us,
           "framing_us": (h["encode_ns"] + h["decode_ns"] + s["decode_ns"] + s["encode_ns"]) * us,
           "tls_us": (tls.get(req, 0.0) + tls.get(ans, 0.0)) * 1e6,
           "compute_us": s["compute_ns"] * us,
           "host_send_us": h["send_ns"] * us, "server_send_us": s["send_ns"] * us,
           "exposed_wait_us": h["wait_ns"] * us,
           "local_us_per_call": h["local_ns"] * 1e-3 / max(h["local_calls"], 1)}
    out["network_us"] = out["rtt_us"] - out["copy_us"] - out["framing_us"] - out["tls_us"] - out["compute_us"]
    return out


def summed(ds: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    return {side: {k: sum(d[side][k] for d in ds) for k in ds[0][side]} for side in ds[0]}


def prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def fits_together(args: argparse.Namespace, total: int) -> bool:
    """Whether the one process (the whole model) and the host (half the experts + dense) fit on device A at once."""
    if not args.dev_a.startswith("cuda"):
        return True
    import torch

    card = torch.cuda.get_device_properties(torch.device(args.dev_a)).total_memory
    embed = args.vocab * int(QWEN3_30B_A3B["hidden_size"]) * (2 if args.dtype == "bf16" else 4)  # [V, D], twice each
    return card > 1.1 * (1.5 * total + 2 * 2 * embed)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from ekmesh.core import threads as th

    model_id = prepare(args, work)
    total, biggest, n_experts = expert_bytes(work / "b", model_id)
    budget = (total / 2 + biggest / 2) / GIB
    cpus = th.usable_cpus()
    user = th.user_chose(os.environ)
    threads = {"host": th.auto_threads(cpus), "holder": th.auto_threads(cpus, 2), "one": th.auto_threads(cpus)}
    if user:
        threads = dict.fromkeys(threads, th.plan(os.environ, cpus) or cpus)
    prompt = [(37 * i + 11) % args.vocab for i in range(PROMPT_LEN)]
    together = fits_together(args, total)
    local: list[dict[str, Any]] = []
    mesh: list[dict[str, Any]] = []
    deltas: list[dict[str, dict[str, int]]] = []
    firsts: list[dict[str, dict[str, int]]] = []  # the same prompt, one token: the prefill's frames only
    facts: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        one, one_url = start_one(args, model_id, work, threads["one"])
        stack.callback(one.stop)
        ask(one_url, prompt, 4)  # warm-up
        if not together:
            local = [ask(one_url, prompt, args.tokens) for _ in range(args.repeats)]
            one.stop()
        procs, url = start_mesh(args, model_id, work, budget, threads)
        for p in procs:
            stack.callback(p.stop)
        snap_h, snap_b = status(work / "host")["serving"], status(work / "b")["serving"]
        facts = {"host_experts": snap_h["loaded_experts"], "holder_experts": snap_b["loaded_experts"],
                 "host_by_layer": snap_h["loaded_by_layer"], "threads": {
                     "host": snap_h["threads"], "holder": snap_b["threads"], "one": threads["one"]},
                 "host_device": snap_h["device"], "holder_device": snap_b["device"], "dtype": snap_h["dtype"]}
        ask(url, prompt, 4)  # warm-up (opens the data channel)
        for _ in range(args.repeats):
            if together:
                local.append(ask(one_url, prompt, args.tokens))
            before = counters(work)
            ask(url, prompt, 1)
            middle = counters(work)
            mesh.append(ask(url, prompt, args.tokens))
            firsts.append(delta(middle, before))
            deltas.append(delta(counters(work), middle))
    total_d, first_d = summed(deltas), summed(firsts)
    decode_d = {side: {k: v - first_d[side][k] for k, v in total_d[side].items()} for side in total_d}
    tls = tls_cost(sorted({round(d["host"][b] / max(d["host"]["frames"], 1)) for d in (total_d, decode_d)
                           for b in ("bytes_out", "bytes_in")}))
    m_tps = statistics.median(r["tokens_per_s"] for r in mesh)
    l_tps = statistics.median(r["tokens_per_s"] for r in local)
    want = local[0]["token_ids"]
    agree = min(prefix(r["token_ids"], want) for r in mesh + local)
    return {"model_id": model_id, "layers": args.layers, "experts": n_experts // args.layers,
            "devices": [args.dev_a, args.dev_b], "quantize": args.quantize, "tokens": args.tokens,
            "repeats": args.repeats, "alternating": together, "experts_bytes": total, **facts,
            "mesh_tok_s": m_tps, "one_tok_s": l_tps, "ratio": m_tps / l_tps,
            "mesh_runs_tok_s": [r["tokens_per_s"] for r in mesh], "one_runs_tok_s": [r["tokens_per_s"] for r in local],
            "host_mean_layer_rtt_ms": statistics.median(r["mean_layer_rtt_ms"] or 0.0 for r in mesh),
            "frames_per_token": decode_d["host"]["frames"] / (args.repeats * (args.tokens - 1)),
            "split": split_of(decode_d, tls), "split_all_frames": split_of(total_d, tls), "counters": total_d,
            "prefill_counters": first_d, "tls_s": tls, "tokens_equal": agree == len(want), "agreeing_prefix": agree,
            "token_count": len(want)}


def report(r: dict[str, Any]) -> None:
    s = r["split"]
    th = r["threads"]
    print(f"model: random Qwen3-MoE, Qwen3-30B-A3B shapes, {r['layers']} layers x {r['experts']} experts "
          f"({r['dtype']}{', q4 experts' if r['quantize'] else ''}), {r['experts_bytes'] / GIB:.2f} GiB of experts")
    print(f"mesh: host on {r['host_device']} holds {r['host_experts']} experts, holder on {r['holder_device']} "
          f"{r['holder_experts']} (host per layer: {' '.join(str(v) for v in r['host_by_layer'].values())}); "
          f"one process on {r['devices'][0]}; torch threads: host {th['host']}, holder {th['holder']}, one process "
          f"{th['one']}; runs {'alternating' if r['alternating'] else 'one process first, then the mesh'}")
    print(f"tokens/s (median of {r['repeats']} x {r['tokens']} tokens): mesh {r['mesh_tok_s']:.2f} vs one process "
          f"{r['one_tok_s']:.2f} = {r['ratio']:.2f}x  (mesh runs {r['mesh_runs_tok_s']}, one process "
          f"{r['one_runs_tok_s']})")
    print(f"decode round trips: {s['frames']:.0f} frames ({r['frames_per_token']:.2f} per token, "
          f"{s['server_requests']:.0f} served), request {s['request_bytes']:.0f} B, answer {s['answer_bytes']:.0f} "
          f"B; the API's mean layer round trip {r['host_mean_layer_rtt_ms']:.3f} ms")
    parts = ("copy", "framing", "tls", "compute", "network")
    print(f"per-layer round trip {s['rtt_us']:.1f} us = " + " + ".join(
        f"{p} {s[p + '_us']:.1f}" for p in parts) + f"  | sendall (TLS + write): host {s['host_send_us']:.1f}, "
        f"holder {s['server_send_us']:.1f} | host's wait {s['exposed_wait_us']:.1f}, its own experts "
        f"{s['local_us_per_call']:.1f} per layer")
    if r["tokens_equal"]:
        print(f"token ids: equal ({r['token_count']} tokens)")
    else:
        print(f"token ids: agree on the first {r['agreeing_prefix']} of {r['token_count']}"
              + (" (bf16: the holder's partial sum is rounded to bf16 on the wire; see the docstring)"
                 if r["dtype"] != "float32" else " -- they must be equal in fp32"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cuda:0,cuda:1", help="A,B: the attention host's and the holder's devices")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=None, help="default 151936 (Qwen3's); 4096 on CPU devices")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--quantize", choices=["q4"], default=None, help="routed experts imported as q4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the imported model here for the next run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.dev_a, args.dev_b = args.devices.split(",")
    cuda = args.dev_a.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.vocab = args.vocab or (151936 if cuda else 4096)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ekmesh-gpu-mesh-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        r = run(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            shutil.rmtree(work / "host", ignore_errors=True)  # (the host's half is fetched again: a fresh node)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        report(r)
    if not r["tokens_equal"] and r["dtype"] == "float32":
        want_first = r["agreeing_prefix"]
        sys.exit(f"token ids differ between the mesh and one process at position {want_first}")


if __name__ == "__main__":
    main()
