"""Mesh tokens/s: three real ``ekmesh join`` nodes on the built-in model against one process, on loopback and on
emulated links (parts 2 and 3 of the Inference issue's mesh benchmark; part 1 is ``mesh_overhead.py``).

Mesh: an attention host that holds none of the experts (``--no-experts``) and two expert holders
(``--no-attention``), R = 1, so every MoE layer of every decoded token makes one data-plane round trip (two frames
in parallel when a token's experts sit on both holders). One process: ``python -m ekmesh.api --model builtin``.
Both answer ``POST /v1/completions`` with the same text prompt, greedy, ``ignore_eos``; tokens/s is the server's
own ``ekmesh.tokens_per_s`` (decode only: (tokens - 1) / (last token - first token)). Runs alternate (one process,
mesh, one process, ...) so both sides of each ratio see the same load; medians are reported, and the generated
token ids of the two sides must be equal.

Links: ``loopback`` (127.0.0.1), ``lan`` (0.5 ms, 1 Gbit/s) and ``wifi`` (3 ms ± 1 ms, 300 Mbit/s). For the last
two each node lives in a network namespace of its own, and the delay, jitter and rate apply to every packet a
node sends (so a round trip between two nodes crosses two of them: ~1 ms on ``lan``, ~6 ms on ``wifi``). With
``--emulator netem`` (the default when the kernel has it) the namespaces hang off a bridge through veth pairs with
``tc qdisc add dev X root netem delay D J rate R``; otherwise (``tun``) each namespace gets a TUN device and a
helper process forwards its IPv4 packets with the same model (delay + uniform jitter, serialised at the rate, in
order per sender, as netem does with a rate); its own forwarding time is part of what the floor measures.

Floor per token = (MoE layers that reach a remote peer per token) × RTT + one-process time per token, where RTT is
the mean round trip of a plain TCP exchange of the data plane's decode frame sizes between the host's namespace
and a holder's, measured through the same link in the same run. Goals: loopback mesh ≥ 0.7× one process; on the
emulated links time per token ≤ 1.2× the floor.

    python benchmarks/mesh_tokens.py [--links loopback,lan,wifi] [--layout remote|spread] [--holders 2|1]
                                     [--model builtin|wide] [--tokens 64] [--repeats 3] [--json]
                                     [--speculative ngram,draft] [--prompt-kind kjv|repeat] [--concurrency N]

``--layout spread`` gives the attention host its placement share of the experts too (a third, R = 1, as the demo
does): it then computes its own pairs while its frames are out, and a token whose experts are all its own makes
no round trip at that layer; the floor above still counts a round trip per MoE layer, so for this layout only the
ratio to one process is meaningful.

``--model wide``: instead of the built-in model (hidden 384, 12 experts, top-2: a decode step is ~4-9 ms of compute on
a CPU, so a round trip per layer weighs heavily), a random Qwen3-MoE whose layers have Qwen3-30B-A3B's shapes (hidden
2048, 32 query / 4 key-value heads of 128, experts of 768, top-8) but 4 layers and 32 experts (2.4 GB in fp32), built
with transformers (``pip install -e .[dev]``), imported into one holder's store (the others fetch from it) and
prompted with token ids.

``--speculative ngram,draft``: the same mesh also answers the same prompt drafting (prompt lookup; the built-in
model's draft model), reported against plain decoding in the same run: tokens/s and the ratio, round trips per
generated token per MoE layer (the ``ekmesh`` block's ``round_trips`` over its tokens; plain decoding makes ~1), the
acceptance, and tokens/s against the cap 1 / (MoE layers × RTT) that plain decoding cannot pass. ``--prompt-kind
repeat`` asks the model to repeat a passage with an edit (what prompt lookup is for). ``--concurrency N``: N
conversations with different prompts at once (batched on the host) against the same N one after the other:
aggregate tokens/s and the ratio. Every answer's tokens must equal one process's (plain decoding, alone), else the
run fails.

Under each mesh line (plain decoding and each speculative mode) a ``host`` line says where the attention host's
decode steps went, from its data-plane split (``peerstats.HostSplit``, the difference over each answer): ms per
target step, frames per generated token, and per frame the encoding, the send (TLS + socket), the wait for the
answer and the frame's whole round trip (medians over the answers).

``--holders 1`` runs the attention host with one expert holder instead of two (the holder then has every expert, so
a layer is always one frame to one peer, never two frames whose slower answer sets the pace).

Needs root, iproute2 and either sch_netem or /dev/net/tun for ``lan``/``wifi``. Creates and always deletes its own
namespaces (``ekb<pid>…``) and temporary homes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import queue
import random
import secrets
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
LINKS: dict[str, tuple[float, float, float] | None] = {  # per sending node: delay s, ± jitter s, rate bit/s
    "loopback": None, "lan": (0.5e-3, 0.0, 1e9), "wifi": (3e-3, 1e-3, 300e6)}
PROMPT = "And God said, Let there be light: and there was light. And God saw the light, that it was good:"
NODES = ("host", "a", "b")  # the attention host, two expert holders
ROLES = {  # --layout: remote (the attention host holds no expert: every MoE layer goes out) or spread (the host also
    # holds its placement share, a third, as in ``ekmesh demo``: it computes those pairs while the frames are out)
    "remote": {"host": ["--no-experts"], "a": ["--no-attention"], "b": ["--no-attention"]},
    "spread": {"host": ["--attention"], "a": ["--no-attention"], "b": ["--no-attention"]}}


# -- processes ------------------------------------------------------------------------------------------------

def child_env(home: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment, with this checkout importable, ``EKMESH_HOME`` = ``home`` when given, and ``extra``."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if home is not None:
        env["EKMESH_HOME"] = str(home)
    return {**env, **(extra or {})}


class Proc:
    """A subprocess (optionally in a network namespace) whose stdout lines are read by a thread."""

    def __init__(self, argv: list[str], ns: str | None = None, home: Path | None = None,
                 log: Path | None = None, env_extra: dict[str, str] | None = None) -> None:
        env = child_env(home, env_extra)
        prefix = ["ip", "netns", "exec", ns] if ns else []
        self.name = " ".join(argv[1:3])
        self.log, self._err = log, (open(log, "wb") if log else None)  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(prefix + argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err or subprocess.DEVNULL, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def json(self, timeout: float) -> dict[str, Any]:
        """The next stdout line that is a JSON object."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.name} said nothing in {timeout:.0f} s{self.tail()}") from None
            if line is None:
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}){self.tail()}")
            if line.startswith("{"):
                out = json.loads(line)
                assert isinstance(out, dict)
                return out

    def ask(self, wait: float, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.json(wait)

    def tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return ":\n  " + "\n  ".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: a node leaves the mesh cleanly
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._err is not None:
            self._err.close()


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def post(url: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    assert isinstance(out, dict)
    return out


def completion(tokens: int, prompt: str | list[int] = PROMPT, speculative: str = "off") -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "speculative": speculative}


PROMPTS = [PROMPT, "In the beginning God created the heaven and the earth. And the earth was without form,",
           "The LORD is my shepherd; I shall not want. He maketh me to lie down", "Blessed are the poor in spirit:",
           "And Moses said unto the people, Fear ye not,", "Then Jesus said unto his disciples,",
           "Hear, O Israel: The LORD our God is one LORD:", "Let not your heart be troubled:"]
# a prompt that asks to repeat a passage with an edit (prompt lookup finds what follows in the prompt itself)
REPEAT = ("Repeat the passage, with Moses for Aaron. Passage: And Aaron said unto the people, Fear ye not, stand "
          "still, and see the salvation of the LORD, which he will shew to you to day. Repeated: And Moses said")


WIDE = dict(vocab_size=4096, hidden_size=2048, intermediate_size=6144, num_hidden_layers=4, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=32, num_experts_per_tok=8,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
            initializer_range=0.02, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)
WIDE_PROMPT = [(37 * i + 11) % 4096 for i in range(24)]  # token ids (the random model has no tokenizer)


def make_wide(directory: Path) -> dict[str, int]:
    """Writes the ``--model wide`` checkpoint (seeded random fp32 weights) and returns its facts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **WIDE), dtype=torch.float32)
    model.save_pretrained(directory)
    del model
    return {"moe_layers": int(WIDE["num_hidden_layers"]), "hidden": int(WIDE["hidden_size"]),
            "top_k": int(WIDE["num_experts_per_tok"]), "experts": int(WIDE["num_experts"])}


def import_into(home: Path, source: Path) -> str:
    """``ekmesh import SOURCE`` into ``home``'s store; returns the model id."""
    r = subprocess.run([sys.executable, "-m", "ekmesh.cli", "import", str(source), "--json"], env=child_env(home),
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"import of {source} failed: {r.stderr[-2000:]}")
    return str(json.loads(r.stdout)["model_id"])


# -- network namespaces ---------------------------------------------------------------------------------------

def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def netem_available() -> bool:
    probe = f"ekb{os.getpid()}p"
    try:
        sh("ip", "netns", "add", probe)
        return subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                               "delay", "1ms"], capture_output=True, timeout=20).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)


class Net:
    """Namespaces ekb<pid><link><node>, 10.<n>.0.<i>/24, joined by a bridge (netem) or by a TUN forwarder."""

    def __init__(self, link: str, emulator: str, tmp: Path) -> None:
        self.link, self.emulator = link, emulator
        tag = f"ekb{os.getpid() % 100000}{link[0]}"
        self.ns = {n: tag + n[0] for n in NODES}
        self.sw = tag + "s"
        net = f"10.{100 + os.getpid() % 100}.{list(LINKS).index(link)}"
        self.ip = {n: f"{net}.{i + 1}" for i, n in enumerate(NODES)}
        self.forwarder: Proc | None = None
        self._tmp = tmp

    def __enter__(self) -> Net:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        delay, jitter, rate = LINKS[self.link]  # type: ignore[misc]
        for n in NODES:
            sh("ip", "netns", "add", self.ns[n])
            sh("ip", "-n", self.ns[n], "link", "set", "lo", "up")
        if self.emulator == "tun":
            spec = [{"name": self.ns[n] + "t", "ns": self.ns[n], "ip": self.ip[n]} for n in NODES]
            self.forwarder = Proc(me("--forward", json.dumps({"devs": spec, "delay": delay, "jitter": jitter,
                                                               "rate": rate})), log=self._tmp / "forward.log")
            self.forwarder.json(30)
            return
        sh("ip", "netns", "add", self.sw)
        sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.sw, "link", "set", "br0", "up")
        for n in NODES:
            outer, inner = self.ns[n] + "0", self.ns[n] + "1"
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", outer, "netns", self.sw)
            sh("ip", "link", "set", inner, "netns", self.ns[n])
            sh("ip", "-n", self.sw, "link", "set", outer, "master", "br0", "up")
            sh("ip", "-n", self.ns[n], "addr", "add", self.ip[n] + "/24", "dev", inner)
            sh("ip", "-n", self.ns[n], "link", "set", inner, "up")
            sh("ip", "netns", "exec", self.ns[n], "tc", "qdisc", "add", "dev", inner, "root", "netem", "delay",
               f"{delay * 1e3:g}ms", *([f"{jitter * 1e3:g}ms"] if jitter else []), "rate", f"{rate / 1e6:g}mbit")

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.forwarder is not None:
            self.forwarder.stop()
        for ns in [*self.ns.values(), self.sw]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def forward(spec: dict[str, Any]) -> None:
    """The TUN link emulator: one TUN device per namespace; every IPv4 packet a node sends leaves after its
    sender's delay + uniform jitter, serialised at the sender's rate and in order per sender."""
    fds: dict[bytes, int] = {}
    for dev in spec["devs"]:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", dev["name"].encode(), 0x0001 | 0x1000))  # TUNSETIFF
        sh("ip", "link", "set", dev["name"], "netns", dev["ns"])
        sh("ip", "-n", dev["ns"], "addr", "add", dev["ip"] + "/24", "dev", dev["name"])
        sh("ip", "-n", dev["ns"], "link", "set", dev["name"], "up")
        fds[socket.inet_aton(dev["ip"])] = fd
    delay, jitter, rate = spec["delay"], spec["jitter"], spec["rate"]
    # a wire does not wait for a CPU: real-time priority (the forwarder needs little CPU), and a 1 µs timer slack
    # instead of 50 µs so that packets leave on time
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(29, 1000)  # PR_SET_TIMERSLACK, ns
    rng = random.Random(0)
    last = dict.fromkeys(fds.values(), 0.0)  # per sender: departure of its previous packet
    heap: list[tuple[float, int, int, bytes]] = []
    seq = 0
    print(json.dumps({"forwarding": len(fds)}), flush=True)
    watch = [*fds.values(), sys.stdin.fileno()]
    while True:
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, out, pkt = heapq.heappop(heap)
            try:
                os.write(out, pkt)
            except OSError:
                pass  # a full TUN queue drops, as a link would
        timeout = max(0.0, heap[0][0] - now) if heap else None
        ready, _, _ = select.select(watch, [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            if fd == sys.stdin.fileno():
                return  # the benchmark closed our stdin
            try:
                pkt = os.read(fd, 65536)
            except BlockingIOError:
                continue
            dest = fds.get(pkt[16:20]) if pkt and pkt[0] >> 4 == 4 else None
            if dest is None:
                continue
            go = max(now + max(0.0, delay + rng.uniform(-jitter, jitter)), last[fd]) + len(pkt) * 8 / rate
            last[fd] = go
            seq += 1
            heapq.heappush(heap, (go, seq, dest, pkt))


# -- helpers inside the namespaces ----------------------------------------------------------------------------

def echo() -> None:
    """Reads (n, m) u32 then n bytes, answers m bytes; one connection; prints its port first."""
    srv = socket.create_server(("0.0.0.0", 0))
    srv.settimeout(600)  # never outlives a benchmark that died (a process would keep its namespace alive)
    print(json.dumps({"port": srv.getsockname()[1]}), flush=True)
    conn, _ = srv.accept()
    conn.settimeout(600)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    while True:
        head = _recv(conn, 8)
        if head is None:
            return
        n, m = struct.unpack("<II", head)
        if _recv(conn, n) is None:
            return
        conn.sendall(memoryview(buf)[:m])


def _recv(sock: socket.socket, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            return None
        out += chunk
    return out


def drive(home: str) -> None:
    """Runs in the attention host's namespace: answers JSON commands on stdin (ready, rtt, complete)."""
    from ekmesh.core.constants import STATUS_PATH
    from ekmesh.core.errors import LocalNodeError
    from ekmesh.discovery.control import get_json

    api = ""
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "ready":
            deadline = time.monotonic() + cmd["timeout"]
            while True:
                try:
                    snap = get_json(Path(home), STATUS_PATH, 5)
                except LocalNodeError:
                    snap = {}
                if _ready(snap, cmd["nodes"]):
                    api = snap["serving"]["api_url"]
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mesh not ready: {json.dumps(snap.get('serving'))}")
                time.sleep(0.3)
            out: dict[str, Any] = {"api_url": api, "loaded_experts": snap["serving"]["loaded_experts"],
                                   "dtype": snap["serving"]["dtype"], "threads": snap["serving"]["threads"]}
        elif cmd["op"] == "rtt":
            sock = socket.create_connection((cmd["ip"], cmd["port"]), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            req, answer, times = struct.pack("<II", cmd["request"], cmd["answer"]) + bytes(cmd["request"]), [], []
            for i in range(cmd["n"] + 10):
                t0 = time.perf_counter()
                sock.sendall(req)
                if _recv(sock, cmd["answer"]) is None:
                    raise RuntimeError("echo server closed")
                answer.append(time.perf_counter() - t0)
                if i >= 10:
                    times.append(answer[-1])
                time.sleep(0.002)
            sock.close()
            out = {"mean_s": statistics.fmean(times), "median_s": statistics.median(times)}
        elif cmd["op"] == "many":  # concurrent conversations: each answer's ekmesh block and the wall time
            answers: list[dict[str, Any]] = [{} for _ in cmd["bodies"]]

            def ask(i: int, body: dict[str, Any], answers: list[dict[str, Any]] = answers, url: str = api) -> None:
                answers[i] = post(url + "/completions", body)["ekmesh"]

            t0 = time.perf_counter()
            workers = [threading.Thread(target=ask, args=(i, b)) for i, b in enumerate(cmd["bodies"])]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            out = {"answers": answers, "wall_s": time.perf_counter() - t0}
        else:  # one answer, with what the host's data plane spent on it (the difference of its split)
            before = get_json(Path(home), STATUS_PATH, 5)["serving"]["split"]["host"]
            out = post(api + "/completions", cmd["body"])["ekmesh"]
            after = get_json(Path(home), STATUS_PATH, 5)["serving"]["split"]["host"]
            out["host_split"] = {k: after[k] - before[k] for k in after}
        print(json.dumps(out), flush=True)


def _ready(snap: dict[str, Any], nodes: int) -> bool:
    """Every node live and settled (holding what placement assigns it), every expert ready somewhere, the host
    serving."""
    serving = snap.get("serving") or {}
    if not serving.get("ready") or not serving.get("api_url"):
        return False
    mid = serving["model"]
    peers = [p for p in snap.get("peers", []) if p.get("state") in ("self", "up")]
    rows = [r for r in ((snap.get("models") or {}).get(mid) or {}).get("holders", []) if any(r)]
    return (len(peers) == nodes and bool(rows) and min(min(r) for r in rows) >= 1
            and all(p["assigned"].get(mid, 0) == (p["models"].get(mid) or 0) for p in peers))


# -- the benchmark --------------------------------------------------------------------------------------------

def model_facts() -> dict[str, int]:
    """MoE layers, hidden size and top-k of the built-in model (from its packaged manifest)."""
    from ekmesh.shard.store import packaged_store

    store = packaged_store()
    assert store is not None, "the built-in model is not packaged in this checkout"
    m = store.load_manifest(store.aliases()["builtin"])
    cfg = m.data["config"]
    return {"moe_layers": len({layer for layer, _ in m.expert_ids()}), "hidden": cfg["hidden_size"],
            "top_k": cfg["num_experts_per_tok"], "experts": cfg["num_local_experts"]}


def run_link(link: str, args: argparse.Namespace, one: str, facts: dict[str, int], tmp: Path) -> dict[str, Any]:
    key = tmp / f"{link}.key"
    key.write_text(secrets.token_hex(32) + "\n")
    procs: list[Proc] = []
    names = NODES[:1 + args.holders]
    holders = holder_env(args.holders)
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(Net(link, args.emulator, tmp)) if LINKS[link] else None
        stack.callback(_stop_all, procs)  # (runs before the namespaces go)
        nodes: dict[str, Proc] = {}
        first = ""
        homes = {n: tmp / f"{link}-{n}" for n in names}
        for home in homes.values():
            home.mkdir(mode=0o700)
        # the wide model goes into one holder's store; the other nodes fetch the manifest and their blobs from it
        model = import_into(homes["a"], args.wide_dir) if args.wide_dir else "builtin"
        for n in names:
            home = homes[n]
            ip = net.ip[n] if net else "127.0.0.1"
            argv = [sys.executable, "-m", "ekmesh.cli", "join", "--json", "--name", f"bench-{n}", "--model",
                    model, "--listen", f"/ip4/{ip}/tcp/0", "--no-mdns", "--no-dht", "--no-relay",
                    "--no-reserve", "--exit-with-parent", "--mesh-key-file", str(key), "--api-port", "0",
                    "--replicas", "1", "--advert-interval", "1", *ROLES[args.layout][n],
                    *(["--peer", first] if first else [])]
            p = nodes[n] = Proc(argv, net.ns[n] if net else None, home, tmp / f"{link}-{n}.log",
                                None if n == "host" else holders)
            procs.append(p)
            hello = p.json(60)
            if not first:
                addr = str(hello["addrs"][0])
                first = addr if "/p2p/" in addr else f"{addr}/p2p/{hello['peer_id']}"
        host_ns = net.ns["host"] if net else None
        driver = Proc(me("--drive", str(tmp / f"{link}-host")), host_ns, log=tmp / f"{link}-driver.log")
        procs.append(driver)
        ready = driver.ask(args.ready_timeout + 10, op="ready", nodes=len(names), timeout=args.ready_timeout)
        assert (ready["loaded_experts"] == 0) == (args.layout == "remote"), ready
        echo_p = Proc(me("--echo"), net.ns["a"] if net else None, log=tmp / f"{link}-echo.log")
        procs.append(echo_p)
        port = echo_p.json(30)["port"]
        d, k = facts["hidden"], facts["top_k"]
        frame = 44 + d * (4 if ready["dtype"] == "float32" else 2)  # one decode token's answer (wire = node dtype)
        rtt = driver.ask(120, op="rtt", ip=net.ip["a"] if net else "127.0.0.1", port=port, n=args.rtt_samples,
                         request=frame + 12 * k, answer=frame)
        post(one + "/completions", completion(8, args.prompt))  # warm-up, both sides
        driver.ask(300, op="complete", body=completion(8, args.prompt))
        mesh, local = [], []
        modes: dict[str, list[dict[str, Any]]] = {m: [] for m in args.speculative}
        for _ in range(args.repeats):
            local.append(post(one + "/completions", completion(args.tokens, args.prompt))["ekmesh"])
            mesh.append(driver.ask(600, op="complete", body=completion(args.tokens, args.prompt)))
            for m in modes:  # (same prompt; each mode's tokens must equal one process's)
                modes[m].append(driver.ask(600, op="complete", body=completion(args.tokens, args.prompt, m)))
        out = {**summarise(link, mesh, local, rtt, facts), "host_threads": ready["threads"],
               "holder_threads": holders.get("EKMESH_THREADS", "as the host")}
        out["speculative"] = {m: speculative_summary(runs, mesh, local, rtt, facts) for m, runs in modes.items()}
        if args.concurrency > 1:
            out["concurrency"] = run_concurrent(driver, one, args, local)
        return out


def holder_env(holders: int) -> dict[str, str]:
    """The expert holders' torch operator threads: the attention host and the one-process reference take the
    product's default (half the CPUs, ``core/threads.py``), as each would on a machine of its own; the holders of
    this one machine share the other half (at least one thread each). ``EKMESH_THREADS`` or ``OMP_NUM_THREADS``
    in the environment apply to every process instead."""
    from ekmesh.core import threads

    if threads.user_chose(os.environ):
        return {}
    return {threads.ENV: str(threads.auto_threads(threads.usable_cpus(), 2 * holders))}


def _stop_all(procs: list[Proc]) -> None:
    for p in reversed(procs):
        p.stop()


def summarise(link: str, mesh: list[dict[str, Any]], local: list[dict[str, Any]], rtt: dict[str, float],
              facts: dict[str, int]) -> dict[str, Any]:
    m_tps = statistics.median(r["tokens_per_s"] for r in mesh)
    l_tps = statistics.median(r["tokens_per_s"] for r in local)
    floor = facts["moe_layers"] * rtt["mean_s"] + 1 / l_tps
    return {
        "link": link, "emulated": LINKS[link], "mesh_tok_s": m_tps, "one_process_tok_s": l_tps,
        "ratio_mesh_vs_one": m_tps / l_tps, "rtt_mean_ms": rtt["mean_s"] * 1e3, "rtt_median_ms": rtt["median_s"] * 1e3,
        "floor_ms_per_token": floor * 1e3, "mesh_ms_per_token": 1e3 / m_tps, "ratio_vs_floor": (1 / m_tps) / floor,
        "mean_layer_rtt_ms": statistics.median(r["mean_layer_rtt_ms"] for r in mesh),
        "ttft_s_mesh": statistics.median(r["ttft_s"] for r in mesh),
        "ttft_s_one": statistics.median(r["ttft_s"] for r in local),
        "mesh_runs_tok_s": [r["tokens_per_s"] for r in mesh], "one_runs_tok_s": [r["tokens_per_s"] for r in local],
        "tokens_equal": all(r["token_ids"] == local[0]["token_ids"] for r in mesh + local),
        "host_step": step_split(mesh),
    }


def step_split(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Where the attention host's decode steps went, medians over ``runs``: ms per target step (decode time over
    steps), data-plane frames per generated token, and per frame (µs) the host's encoding, sending (TLS + socket),
    waiting for the answer (network, the holder's whole time, decoding) and the frame's whole round trip (from its
    encoding to its answer decoded, so it also holds the sends of the layer's other frames and, for the second frame
    of a layer, the wait for the first; ``peerstats.HostSplit``)."""
    def med(value: Callable[[dict[str, Any]], float]) -> float:
        return round(statistics.median(value(r) for r in runs), 3)

    def per_frame(r: dict[str, Any], key: str) -> float:
        return r["host_split"][key] / max(r["host_split"]["frames"], 1) / 1e3

    out = {"ms_per_step": med(lambda r: 1e3 * (r["tokens"] - 1) / r["tokens_per_s"] / max(r["steps"], 1)
                              if r["tokens_per_s"] else 0.0),
           "frames_per_token": med(lambda r: r["host_split"]["frames"] / max(r["tokens"], 1))}
    for part in ("encode", "send", "wait", "rtt"):
        out[f"{part}_us_per_frame"] = med(lambda r, part=part: per_frame(r, f"{part}_ns"))
    return out


def speculative_summary(runs: list[dict[str, Any]], plain: list[dict[str, Any]], local: list[dict[str, Any]],
                        rtt: dict[str, float], facts: dict[str, int]) -> dict[str, Any]:
    """One speculative mode against plain decoding on the same mesh, same prompt, in the same run."""
    tps = statistics.median(r["tokens_per_s"] for r in runs)
    plain_tps = statistics.median(r["tokens_per_s"] for r in plain)
    cap = 1 / (facts["moe_layers"] * rtt["mean_s"])  # one dependent round trip per MoE layer per token
    return {"tok_s": tps, "ratio_vs_plain": tps / plain_tps, "cap_tok_s": cap, "ratio_vs_cap": tps / cap,
            "round_trips_per_token": statistics.median(r["round_trips"] / r["tokens"] for r in runs),
            "plain_round_trips_per_token": statistics.median(r["round_trips"] / r["tokens"] for r in plain),
            "steps": statistics.median(r["steps"] for r in runs),
            "acceptance": statistics.median(r["accepted"] / r["drafted"] if r["drafted"] else 0.0 for r in runs),
            "runs_tok_s": [r["tokens_per_s"] for r in runs], "host_step": step_split(runs),
            "tokens_equal": all(r["token_ids"] == local[0]["token_ids"] for r in runs)}


def run_concurrent(driver: Proc, one: str, args: argparse.Namespace, local: list[dict[str, Any]]) -> dict[str, Any]:
    """N conversations at once (different prompts, plain decoding; batched on the host) against one at a time on
    the same mesh: aggregate tokens/s, each answer checked against one process."""
    n = args.concurrency
    prompts = [PROMPTS[i % len(PROMPTS)] if isinstance(args.prompt, str) else
               [(t + 7 * i) % 4096 for t in args.prompt] for i in range(n)]
    expected = [post(one + "/completions", completion(args.tokens, p))["ekmesh"]["token_ids"] for p in prompts]
    alone, together = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for p in prompts:  # one after the other
            driver.ask(600, op="complete", body=completion(args.tokens, p))
        alone.append(n * args.tokens / (time.perf_counter() - t0))
        r = driver.ask(1200, op="many", bodies=[completion(args.tokens, p) for p in prompts])
        together.append({"tok_s": n * args.tokens / r["wall_s"],
                         "equal": [a["token_ids"] for a in r["answers"]] == expected})
    agg = statistics.median(t["tok_s"] for t in together)
    seq = statistics.median(alone)
    return {"n": n, "aggregate_tok_s": agg, "one_at_a_time_tok_s": seq, "ratio": agg / seq,
            "tokens_equal": all(t["equal"] for t in together)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--links", default="loopback,lan,wifi")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rtt-samples", type=int, default=200)
    ap.add_argument("--emulator", choices=["auto", "netem", "tun"], default="auto")
    ap.add_argument("--ready-timeout", type=float, default=180)
    ap.add_argument("--layout", choices=sorted(ROLES), default="remote")
    ap.add_argument("--holders", type=int, choices=[1, 2], default=2)
    ap.add_argument("--model", choices=["builtin", "wide"], default="builtin")
    ap.add_argument("--speculative", default="", help="comma-separated modes (ngram, draft) measured against plain "
                                                        "decoding on the same mesh")
    ap.add_argument("--prompt-kind", choices=["kjv", "repeat"], default="kjv",
                    help="repeat: a prompt asking to repeat a passage with an edit (prompt lookup's case)")
    ap.add_argument("--concurrency", type=int, default=1, help="also N conversations at once vs one at a time")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--forward", help=argparse.SUPPRESS)
    ap.add_argument("--drive", help=argparse.SUPPRESS)
    ap.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.forward:
        forward(json.loads(args.forward))
        return
    if args.drive:
        drive(args.drive)
        return
    if args.echo:
        echo()
        return
    args.speculative = [m for m in args.speculative.split(",") if m]
    links = args.links.split(",")
    if any(LINKS[x] for x in links):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            print("emulated links need root and iproute2: running loopback only", file=sys.stderr)
            links = [x for x in links if not LINKS[x]]
        elif args.emulator == "auto":
            args.emulator = "netem" if netem_available() else "tun"
    tmp = Path(tempfile.mkdtemp(prefix="ekmesh-bench-"))
    results = []
    one: Proc | None = None
    try:
        if args.model == "wide":
            args.wide_dir, args.prompt = tmp / "wide", WIDE_PROMPT
            facts = make_wide(args.wide_dir)
        else:
            args.wide_dir, args.prompt = None, REPEAT if args.prompt_kind == "repeat" else PROMPT
            facts = model_facts()
        one = Proc([sys.executable, "-m", "ekmesh.api", "--model", str(args.wide_dir or "builtin"), "--port", "0"],
                   log=tmp / "one.log")
        url = one.json(120)["api_url"]
        for link in links:
            results.append(run_link(link, args, url, facts, tmp))
            if not args.json:
                report(results[-1], facts, args)
    finally:
        if one is not None:
            one.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    differ = [r["link"] for r in results if not (r["tokens_equal"] and all(
        s["tokens_equal"] for s in r.get("speculative", {}).values()) and r.get("concurrency", {}).get(
        "tokens_equal", True))]
    if args.json:
        print(json.dumps({"model": args.model, "facts": facts, "layout": args.layout, "holders": args.holders,
                          "tokens": args.tokens, "repeats": args.repeats,
                          "emulator": args.emulator, "results": results}, indent=1))
    if differ:
        sys.exit(f"token ids differ between the mesh and one process on: {', '.join(differ)}")


def report(r: dict[str, Any], facts: dict[str, int], args: argparse.Namespace) -> None:
    link = r["link"] if not r["emulated"] else f"{r['link']} ({args.emulator})"
    link += "" if args.layout == "remote" else f", {args.layout}"
    link += "" if args.holders == 2 else ", 1 holder"
    link += "" if args.model == "builtin" else f", {args.model} model"
    print(f"{link}: mesh {r['mesh_tok_s']:.1f} tok/s vs one process {r['one_process_tok_s']:.1f} tok/s = "
          f"{r['ratio_mesh_vs_one']:.2f}× | {r['mesh_ms_per_token']:.2f} ms/token vs floor "
          f"{r['floor_ms_per_token']:.2f} ms ({facts['moe_layers']} × RTT {r['rtt_mean_ms']:.3f} ms + "
          f"{1e3 / r['one_process_tok_s']:.2f} ms compute) = {r['ratio_vs_floor']:.2f}× | host's mean layer "
          f"round trip {r['mean_layer_rtt_ms']:.3f} ms | TTFT {r['ttft_s_mesh'] * 1e3:.0f} vs "
          f"{r['ttft_s_one'] * 1e3:.0f} ms | tokens equal: {r['tokens_equal']} | torch threads: host "
          f"{r['host_threads']}, holders {r['holder_threads']}", flush=True)
    host_step("plain", r["host_step"])
    for mode, s in r.get("speculative", {}).items():
        print(f"  {mode}: {s['tok_s']:.1f} tok/s = {s['ratio_vs_plain']:.2f}× plain, {s['ratio_vs_cap']:.2f}× the "
              f"cap {s['cap_tok_s']:.1f} tok/s (1 / ({facts['moe_layers']} × RTT)) | round trips per token per MoE "
              f"layer {s['round_trips_per_token']:.2f} (plain {s['plain_round_trips_per_token']:.2f}) | acceptance "
              f"{s['acceptance']:.2f} | tokens equal: {s['tokens_equal']}", flush=True)
        host_step(mode, s["host_step"])
    c = r.get("concurrency")
    if c:
        print(f"  {c['n']} conversations at once: {c['aggregate_tok_s']:.1f} tok/s vs {c['one_at_a_time_tok_s']:.1f} "
              f"one at a time = {c['ratio']:.2f}× | tokens equal: {c['tokens_equal']}", flush=True)


def host_step(mode: str, h: dict[str, float]) -> None:
    print(f"    host, {mode}: {h['ms_per_step']:.2f} ms a step, {h['frames_per_token']:.1f} frames a token; a frame: "
          f"encode {h['encode_us_per_frame']:.0f} µs, send {h['send_us_per_frame']:.0f} µs, wait "
          f"{h['wait_us_per_frame']:.0f} µs, round trip {h['rtt_us_per_frame']:.0f} µs", flush=True)


if __name__ == "__main__":
    main()
