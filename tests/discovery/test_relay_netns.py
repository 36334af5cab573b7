"""Circuit relay for real: A and B in two network namespaces that cannot reach each other, both reaching R.

Topology (three namespaces, no IP forwarding on R, so packets between A's and B's networks are dropped)::

    A 10.N.1.2 ── veth ── 10.N.1.1  R  10.N.2.1 ── veth ── 10.N.2.2 B        (M, wrong mesh key, beside A)

A and B have a default route through R, so a direct dial between them is silently dropped (like a NAT or a
firewall), not refused. They are started as real ``ekmesh join`` processes with ``--peer`` R's address on their
side, no mDNS and no DHT; they can only meet through R's relay.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from meshproc import FAST, NodeProc, ekmesh_argv, env_for, wait_until

from tests.netns import routed_pair
from tests.requires import require_netns


@pytest.fixture(autouse=True)
def _can_make_namespaces() -> None:
    require_netns()  # root and iproute2: without them these tests fail, saying so (never skip)


@pytest.fixture
def split_net() -> Iterator[tuple[dict[str, str], str]]:
    with routed_pair("ekr", 120, forwarding=False) as net:
        yield net


def status(node: NodeProc, ns: str) -> dict:
    """``ekmesh status --json`` run inside the node's namespace (its control endpoint is on that loopback)."""
    out = subprocess.run(["ip", "netns", "exec", ns, *ekmesh_argv("status", "--json")], env=env_for(node.home),
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def joined(node: NodeProc, other: NodeProc, timeout: float) -> None:
    node.wait_event(lambda e: e["event"] == "joined" and e["peer_id"] == other.peer_id, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_nodes_that_cannot_reach_each_other_meet_through_a_relay(tmp_path, split_net):
    ns, net = split_net
    base = ["--listen", "/ip4/0.0.0.0/tcp/0", "--no-mdns", "--no-dht", *FAST]
    common = [*base, "--mesh-key", "k"]
    nodes: list[NodeProc] = []

    def start(name: str, where: str, *args: str) -> NodeProc:
        node = NodeProc(tmp_path / name, *args, "--name", name, prefix=["ip", "netns", "exec", ns[where]])
        nodes.append(node)
        return node

    try:
        r = start("r", "r", *common)
        on_a_side = next(x for x in r.addrs if x.startswith(f"/ip4/{net}.1.1/"))
        on_b_side = next(x for x in r.addrs if x.startswith(f"/ip4/{net}.2.1/"))
        a = start("a", "a", *common, "--peer", on_a_side)
        b = start("b", "b", *common, "--peer", on_b_side)
        m = start("m", "a", *base, "--mesh-key", "wrong", "--peer", on_a_side)

        joined(a, b, timeout=30)
        joined(b, a, timeout=30)
        # Topology check: a direct TCP dial from A's namespace to B's listen address gets no answer.
        b_direct = next(x for x in b.addrs if x.startswith(f"/ip4/{net}.2.2/")).split("/")
        probe = subprocess.run(["ip", "netns", "exec", ns["a"], sys.executable, "-c",
                                "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1)",
                                b_direct[2], b_direct[4]], capture_output=True, text=True, timeout=20)
        assert probe.returncode != 0 and "timed out" in probe.stderr, probe.stderr

        # The connection is relayed: each advertises a circuit address through R, and status shows the route.
        def relayed() -> bool:
            sa, sb = status(a, ns["a"]), status(b, ns["b"])
            b_seen_by_a = next(p for p in sa["peers"] if p["peer_id"] == b.peer_id)
            return (b.peer_id in sa["relay"]["relayed_peers"] and a.peer_id in sb["relay"]["relayed_peers"]
                    and any(x.endswith(f"/p2p/{r.peer_id}/p2p-circuit/p2p/{b.peer_id}")
                            for x in b_seen_by_a["addrs"])
                    and sb["relay"]["circuit_addrs"] and r.peer_id not in sa["relay"]["relayed_peers"])
        wait_until(relayed, 15, "A and B to be connected through R", interval=0.3)

        # Kill the relay: A and B lose their only path and mark each other down.
        r.proc.kill()
        a.wait_event(lambda e: e["event"] == "down" and e["peer_id"] == b.peer_id, timeout=15)
        b.wait_event(lambda e: e["event"] == "down" and e["peer_id"] == a.peer_id, timeout=15)
    finally:
        for node in nodes:
            node.stop()
    # M, with another mesh key, reached nobody through R and was admitted nowhere.
    assert not [e for e in m.drain() if e["event"] == "joined"]
    assert all(e.get("peer_id") != m.peer_id for n in (a, b, r) for e in n.drain())
