"""Network namespaces for tests (root and iproute2): two leaf namespaces ``a`` and ``b``, each on its own /24 behind
a router namespace ``r``, whose IPv4 forwarding decides whether ``a`` and ``b`` reach each other."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def set_forwarding(ns: str, on: bool) -> None:
    ip("netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.ip_forward={int(on)}")


@contextlib.contextmanager
def routed_pair(prefix: str, second_octet: int, forwarding: bool) -> Iterator[tuple[dict[str, str], str]]:
    """``({"a": ns, "r": ns, "b": ns}, "10.N")``: leaf ``a`` is ``10.N.1.2`` (router side ``10.N.1.1``), leaf ``b``
    ``10.N.2.2``; names and N vary with the pid so parallel runs do not collide. Everything is deleted on exit."""
    tag = f"{os.getpid() % 100000}"
    ns = {k: f"{prefix}{tag}{k}" for k in ("a", "r", "b")}
    net = f"10.{second_octet + os.getpid() % 100}"
    try:
        for n in ns.values():
            ip("netns", "add", n)
            ip("-n", n, "link", "set", "lo", "up")
        set_forwarding(ns["r"], forwarding)
        for side, sub in (("a", 1), ("b", 2)):
            outer, inner = f"{prefix}{tag}{side}0", f"{prefix}{tag}{side}1"
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", outer, "netns", ns["r"])
            ip("link", "set", inner, "netns", ns[side])
            ip("-n", ns["r"], "addr", "add", f"{net}.{sub}.1/24", "dev", outer)
            ip("-n", ns[side], "addr", "add", f"{net}.{sub}.2/24", "dev", inner)
            ip("-n", ns["r"], "link", "set", outer, "up")
            ip("-n", ns[side], "link", "set", inner, "up")
            ip("-n", ns[side], "route", "add", "default", "via", f"{net}.{sub}.1")
        yield ns, net
    finally:
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=10)
