"""mDNS on a real (virtual) LAN: two network namespaces joined by a veth pair, nodes started with no --peer."""

from __future__ import annotations

import os
import subprocess

import pytest
from meshproc import FAST, NodeProc

from tests.requires import require_netns


@pytest.fixture(autouse=True)
def _can_make_namespaces() -> None:
    require_netns()  # root and iproute2: without them these tests fail, saying so (never skip)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def lan():
    tag = f"{os.getpid() % 100000}"
    ns = (f"ekm{tag}a", f"ekm{tag}b")
    veth = (f"ekv{tag}a", f"ekv{tag}b")
    subnet = f"10.{77 + os.getpid() % 100}.{os.getpid() % 250}"
    try:
        for n in ns:
            ip("netns", "add", n)
        ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for i, (n, v) in enumerate(zip(ns, veth, strict=True)):
            ip("link", "set", v, "netns", n)
            ip("-n", n, "addr", "add", f"{subnet}.{i + 1}/24", "dev", v)
            ip("-n", n, "link", "set", v, "up")
            ip("-n", n, "link", "set", "lo", "up")
        yield ns, subnet
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True, timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_two_nodes_in_two_namespaces_find_each_other_by_mdns(tmp_path, lan):
    (ns_a, ns_b), subnet = lan
    args = ["--listen", "/ip4/0.0.0.0/tcp/0", "--no-dht", *FAST]
    a = NodeProc(tmp_path / "a", *args, "--name", "a", prefix=["ip", "netns", "exec", ns_a])
    b = NodeProc(tmp_path / "b", *args, "--name", "b", prefix=["ip", "netns", "exec", ns_b])
    try:
        assert a.addrs[0].startswith(f"/ip4/{subnet}.1/tcp/")  # LAN address first, loopback after
        a.wait_event(lambda e: e["event"] == "joined" and e["peer_id"] == b.peer_id, timeout=30)
        b.wait_event(lambda e: e["event"] == "joined" and e["peer_id"] == a.peer_id, timeout=30)
    finally:
        assert a.stop() == 0
        b.stop()
    # b saw a's clean leave before it stopped itself, or had already stopped: either way no crash.
    assert b.proc.returncode == 0


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_mdns_ignores_a_node_of_another_mesh(tmp_path, lan):
    (ns_a, ns_b), _ = lan
    args = ["--listen", "/ip4/0.0.0.0/tcp/0", "--no-dht", *FAST]
    a = NodeProc(tmp_path / "a", *args, "--mesh-key", "one", prefix=["ip", "netns", "exec", ns_a])
    b = NodeProc(tmp_path / "b", *args, "--mesh-key", "two", prefix=["ip", "netns", "exec", ns_b])
    c = NodeProc(tmp_path / "c", *args, "--mesh-key", "one", prefix=["ip", "netns", "exec", ns_b])
    try:
        a.wait_event(lambda e: e["event"] == "joined" and e["peer_id"] == c.peer_id, timeout=30)
        c.wait_event(lambda e: e["event"] == "joined" and e["peer_id"] == a.peer_id, timeout=30)
    finally:
        for n in (a, b, c):
            n.stop()
    assert all(e.get("peer_id") != b.peer_id for e in a.drain() + c.drain())
    assert not [e for e in b.drain() if e["event"] == "joined"]
