"""A node whose bootstrap peer does not admit it says so: a WARNING, its status (``bootstrap``: refused, with the
likely cause), the status view, and every answer of its API (it runs alone, on what its own store holds).

Real ``ekmesh join`` processes on 127.0.0.1: A on mesh key ``alpha``; B on ``beta`` bootstrapping from A and serving
the packaged built-in model; C on ``alpha`` bootstrapping from A (admitted); D bootstrapping from a port where
nothing listens (unreachable).
"""

from __future__ import annotations

import socket
import subprocess

from tests.discovery.meshproc import NodeProc, ekmesh_argv, env_for, wait_until
from tests.node.servingmesh import BASE, post


def _bootstrap(node: NodeProc) -> dict[str, str]:
    (entry,) = node.status()["bootstrap"]
    return entry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_node_refused_by_its_bootstrap_peer_says_it_is_alone(tmp_path):
    a = NodeProc(tmp_path / "a", *BASE, "--mesh-key", "alpha")
    nodes = [a]
    try:
        b = NodeProc(tmp_path / "b", *BASE, "--mesh-key", "beta", "--peer", a.addrs[0], "--model", "builtin")
        nodes.append(b)
        c = NodeProc(tmp_path / "c", *BASE, "--mesh-key", "alpha", "--peer", a.addrs[0])
        nodes.append(c)
        nowhere = f"/ip4/127.0.0.1/tcp/{_free_port()}/p2p/{a.peer_id}"
        d = NodeProc(tmp_path / "d", *BASE, "--peer", nowhere)
        nodes.append(d)

        wait_until(lambda: _bootstrap(b)["state"] == "refused", 60, "B's bootstrap peer diagnosed as refusing it")
        assert "another mesh key" in _bootstrap(b)["reason"]
        wait_until(lambda: _bootstrap(c)["state"] == "connected", 60, "C admitted by A")
        wait_until(lambda: _bootstrap(d)["state"] == "unreachable", 60, "D's bootstrap diagnosed as unreachable")

        # The status view says it in words.
        res = subprocess.run(ekmesh_argv("status"), env={**env_for(b.home), "COLUMNS": "160"}, capture_output=True,
                             text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        assert "another mesh key" in res.stdout and "alone" in res.stdout, res.stdout

        # B answers from its packaged model, and every answer says it is alone.
        wait_until(lambda: b.status()["serving"]["ready"], 90, "B serving the built-in model alone")
        out = post(b.hello["api_url"] + "/completions", {"prompt": "In the beginning", "max_tokens": 2,
                                                         "temperature": 0})
        warning = out["ekmesh"].get("warning") or ""
        assert "alone" in warning and "mesh key" in warning, out["ekmesh"]
    finally:
        for n in nodes:
            n.stop()
    err = b.stderr()
    refusals = [line for line in err.splitlines() if "WARNING" in line and "another mesh key" in line]
    assert len(refusals) == 1, err[-3000:]  # once per change of diagnosis, not once per retry
