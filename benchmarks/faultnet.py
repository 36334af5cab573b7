"""Network faults for ``faults_nodes.py``: expert holders in network namespaces of their own, joined to the attention
host's (the root) namespace by a user-space link emulator that can cut one holder's link or delay what it sends.

This kernel has no ``sch_netem`` (and no iptables/nft), so the link is a process, as ``mesh_tokens.py``'s
``--emulator tun``: one TUN device per namespace (the root namespace's for the attention host, 10.A.B.1; holder i
10.A.B.(i+2), all in one /24) and a forwarder that reads every IPv4 packet a node sends and writes it into the TUN of
its destination, after the sender's current delay (0 unless ``delay`` set one), in order per sender.

- ``cut(i)``: holder i's TUN goes down inside its namespace. What the others send it is dropped silently (the
  forwarder's write into a TUN that is down fails, and nothing is answered: every dial and read on the other side
  runs into its deadline, as with a pulled cable); what it sends has no route. ``mend(i)`` sets it up again (the
  kernel restores the connected route; the node's sockets carry on).
- ``delay(i, s)``: every packet holder i sends leaves ``s`` seconds late (a round trip with it takes ``s`` longer);
  0 removes it. Packets already queued keep their time, so order per sender is kept.

Invariants: the namespaces (``ekf<pid>n<i>``) and the root TUN (``ekf<pid>h``, gone with the forwarder's file
descriptor) are always removed on exit; the forwarder exits when its stdin closes. Needs root, iproute2 and
/dev/net/tun. Run as ``python benchmarks/faultnet.py --forward SPEC`` only by ``FaultNet``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.mesh_tokens import Proc, sh  # noqa: E402

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def available() -> str | None:
    """Why namespaces cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


class FaultNet:
    """``holders`` namespaces behind the forwarder; ``prefix(i)`` runs a command in holder i's namespace."""

    def __init__(self, holders: int, tmp: Path) -> None:
        pid = os.getpid()
        self.tag = f"ekf{pid % 100000}"
        net = f"10.{200 + pid % 50}.{(pid // 50) % 250}"
        self.host_ip = f"{net}.1"
        self.ip = [f"{net}.{i + 2}" for i in range(holders)]
        self.ns = [f"{self.tag}n{i}" for i in range(holders)]
        self.dev = [f"{self.tag}t{i}" for i in range(holders)]
        self._tmp = tmp
        self._forwarder: Proc | None = None

    def __enter__(self) -> FaultNet:
        try:
            for ns in self.ns:
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            devs = [{"name": self.tag + "h", "ns": None, "ip": self.host_ip}]
            devs += [{"name": d, "ns": ns, "ip": ip} for d, ns, ip in zip(self.dev, self.ns, self.ip, strict=True)]
            self._forwarder = Proc([sys.executable, str(Path(__file__).resolve()), "--forward",
                                    json.dumps({"devs": devs})], log=self._tmp / "forward.log")
            self._forwarder.json(30)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[i]]

    def cut(self, i: int) -> None:
        sh("ip", "-n", self.ns[i], "link", "set", self.dev[i], "down")

    def mend(self, i: int) -> None:
        sh("ip", "-n", self.ns[i], "link", "set", self.dev[i], "up")

    def delay(self, i: int, seconds: float) -> None:
        assert self._forwarder is not None
        self._forwarder.ask(10, op="delay", ip=self.ip[i], s=seconds)

    def close(self) -> None:
        if self._forwarder is not None:
            self._forwarder.stop()
            self._forwarder = None
        for ns in self.ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def forward(spec: dict[str, Any]) -> None:
    """The forwarder: one TUN device per entry of ``spec["devs"]`` (moved into its namespace unless ``ns`` is None);
    every IPv4 packet leaves for the TUN of its destination address after its sender's delay. Commands on stdin,
    one JSON object a line, each answered with one: ``{"op": "delay", "ip": sender, "s": seconds}``."""
    by_ip: dict[bytes, int] = {}
    for dev in spec["devs"]:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", dev["name"].encode(), IFF_TUN | IFF_NO_PI))
        where = [] if dev["ns"] is None else ["-n", dev["ns"]]
        if dev["ns"] is not None:
            sh("ip", "link", "set", dev["name"], "netns", dev["ns"])
        sh("ip", *where, "addr", "add", dev["ip"] + "/24", "dev", dev["name"])
        sh("ip", *where, "link", "set", dev["name"], "up")
        by_ip[socket.inet_aton(dev["ip"])] = fd
    # a wire does not wait for a CPU (as mesh_tokens.forward): real-time priority, a 1 µs timer slack
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(29, 1000)  # PR_SET_TIMERSLACK, ns
    delay = dict.fromkeys(by_ip.values(), 0.0)  # per sender fd
    last = dict.fromkeys(by_ip.values(), 0.0)  # per sender: departure of its previous packet
    heap: list[tuple[float, int, int, bytes]] = []
    seq, pending = 0, b""
    print(json.dumps({"forwarding": len(by_ip)}), flush=True)
    watch = [*by_ip.values(), sys.stdin.fileno()]
    while True:
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, out, pkt = heapq.heappop(heap)
            with contextlib.suppress(OSError):  # a TUN that is down (cut) or full drops, as a link would
                os.write(out, pkt)
        ready, _, _ = select.select(watch, [], [], max(0.0, heap[0][0] - now) if heap else None)
        now = time.monotonic()
        for fd in ready:
            if fd == sys.stdin.fileno():
                data = os.read(fd, 65536)
                if not data:
                    return  # the benchmark is gone
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    cmd = json.loads(line)
                    delay[by_ip[socket.inet_aton(cmd["ip"])]] = float(cmd["s"])
                    print(json.dumps({"ok": True}), flush=True)
                continue
            try:
                pkt = os.read(fd, 65536)
            except OSError:  # nothing after all, or the device went down under the read
                continue
            dest = by_ip.get(pkt[16:20]) if len(pkt) >= 20 and pkt[0] >> 4 == 4 else None
            if dest is None:
                continue
            go = max(now + delay[fd], last[fd])
            last[fd] = go
            seq += 1
            heapq.heappush(heap, (go, seq, dest, pkt))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--forward":
        forward(json.loads(sys.argv[2]))
    else:
        sys.exit(__doc__)
