"""Real nodes as subprocesses on 127.0.0.1: convergence, failure detection, leave, restart, and the status CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from meshproc import FAST, NodeProc, ekmesh_argv, env_for, wait_until

DOWN_AFTER = 5.0  # matches FAST


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_four_nodes_converge_detect_kill_leave_and_restart(tmp_path):
    common = ["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", *FAST]
    nodes: list[NodeProc] = []
    try:
        seed = NodeProc(tmp_path / "n0", *common, "--name", "n0")
        nodes.append(seed)
        for i in (1, 2, 3):
            nodes.append(NodeProc(tmp_path / f"n{i}", *common, "--name", f"n{i}", "--peer", seed.addrs[0]))
        ids = {n.peer_id for n in nodes}
        assert len(ids) == 4

        def converged(group: list[NodeProc], live: set[str]) -> bool:
            for n in group:
                states = n.states()
                if {p for p, s in states.items() if s in ("self", "up")} != live:
                    return False
            return True

        took = wait_until(lambda: converged(nodes, ids), 20, "all 4 nodes to see all 4 up")
        print(f"converged in {took:.1f}s after the last start")

        # SIGKILL: no leave is sent; the others must notice within the down timeout.
        killed = nodes[3]
        killed.signal(signal.SIGKILL)
        killed.proc.wait(timeout=10)
        survivors = nodes[:3]
        took = wait_until(lambda: all(n.states().get(killed.peer_id) == "down" for n in survivors),
                          DOWN_AFTER + 5, "the killed node to be marked down")
        print(f"SIGKILL detected in {took:.1f}s (down_after {DOWN_AFTER}s)")
        assert took <= DOWN_AFTER + 2

        # SIGINT: a clean leave, seen as "left" (not "down") well before the down timeout.
        leaver = nodes[2]
        old_id = leaver.peer_id
        start = time.monotonic()
        leaver.signal(signal.SIGINT)
        took = wait_until(lambda: all(n.states().get(old_id) == "left" for n in nodes[:2]),
                          DOWN_AFTER, "the SIGINTed node to be marked left")
        print(f"leave seen in {took:.1f}s")
        assert took < DOWN_AFTER / 2
        assert leaver.proc.wait(timeout=10) == 0
        assert time.monotonic() - start < 10
        assert not (leaver.home / "node.json").exists()
        # The leave is final: no "up" advert of the old run reaches anyone afterwards.
        assert all(n.states()[old_id] == "left" for n in nodes[:2])
        assert "Traceback" not in leaver.stderr()

        # Restart the same home: same peer id, back in everyone's view (the killed one stays down).
        restarted = NodeProc(leaver.home, *common, "--name", "n2", "--peer", seed.addrs[0])
        nodes[2] = restarted
        assert restarted.peer_id == old_id
        live = {nodes[0].peer_id, nodes[1].peer_id, old_id}
        wait_until(lambda: converged(nodes[:3], live), 20, "the restarted node to be back in every view")
        snap = nodes[0].status()
        entry = next(p for p in snap["peers"] if p["peer_id"] == old_id)
        assert entry["state"] == "up" and entry["name"] == "n2"
        assert nodes[0].states()[killed.peer_id] == "down"
        seen = [e["event"] for e in nodes[0].drain() if e.get("peer_id") == old_id]
        assert seen == ["joined", "left", "joined"], seen
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.timeout(60)
def test_status_cli_against_a_running_node_and_without_one(tmp_path):
    home = tmp_path / "solo"
    argv_status = ekmesh_argv("status")
    # No node: a clear message and a non-zero exit.
    res = subprocess.run(argv_status, env=env_for(home), capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert "no ekmesh node is running" in res.stderr and "ekmesh join" in res.stderr

    node = NodeProc(home, "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--name", "solo", "--memory", "2")
    try:
        res = subprocess.run(ekmesh_argv("status", "--json"), env=env_for(home), capture_output=True,
                             text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        snap = json.loads(res.stdout)
        assert snap["schema"] == 1 and snap["self"] == node.peer_id
        assert snap["mesh"] == {"open": True, "key_id": None}
        (me,) = snap["peers"]
        assert me["state"] == "self" and me["name"] == "solo" and me["memory_total"] == 2 << 30
        assert me["addrs"] == node.addrs
        res = subprocess.run(argv_status, env={**env_for(home), "COLUMNS": "160"}, capture_output=True, text=True,
                             timeout=30)
        assert res.returncode == 0, res.stderr
        assert "open mesh" in res.stdout and "solo" in res.stdout and "self" in res.stdout

        # A second node on the same home is refused (it would share the identity).
        res = subprocess.run(ekmesh_argv("join", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"),
                             env=env_for(home), capture_output=True, text=True, timeout=30)
        assert res.returncode == 1 and "already running" in res.stderr
    finally:
        assert node.stop() == 0
    res = subprocess.run(argv_status, env=env_for(home), capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "no ekmesh node is running" in res.stderr
