"""A mesh of real ``ekmesh join`` processes that starts in a fraction of ``ServingMesh``'s time, for the
transformers bridge's tests.

``ServingMesh`` (tests/node/servingmesh.py) starts its nodes one after another, each a fresh interpreter that
imports torch, libp2p and the node (~3 s of CPU each on two cores), and waits for holders that fetch their blobs
from the importing node. ``QuickMesh`` forks its nodes from a ``Zygote`` (tests/hf/zygote.py: the imports done once
per test module) and starts the others as soon as node 0 printed its address (their bootstrap peer). With
``share_store`` every home starts with a copy of node 0's store (the importing node's), so no node fetches a blob: a
node still verifies what it finds in its store before it serves it. Stopping interrupts every node at once.

What the nodes run (``ekmesh.cli.main.main(["join", "--json", ...])``), their arguments and the readiness they are
waited for (``wait_ready``) are ``ServingMesh``'s.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.discovery.meshproc import REPO, NodeProc, env_for
from tests.hf.zygote import Zygote
from tests.node.servingmesh import BASE, ServingMesh, seed_identity

STOP_S = 10.0  # a node's exit after SIGINT; then it is killed
HELLO_S = 30.0  # as NodeProc


class ForkedNodeProc(NodeProc):
    """``NodeProc`` over a node forked by ``zygote`` (same threads, same events, same ``stop``)."""

    def __init__(self, zygote: Zygote, home: Path, *args: str) -> None:
        self.home = home
        self.args = args
        self.lines: queue.Queue[str] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self.proc = zygote.spawn(["join", "--json", *args], env_for(home), str(REPO))  # type: ignore[assignment]
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        self._err: list[str] = []
        self._err_thread = threading.Thread(target=self._pump_err, daemon=True)
        self._err_thread.start()
        self.hello = json.loads(self.next_line(timeout=HELLO_S))
        self.peer_id: str = self.hello["peer_id"]
        self.addrs: list[str] = self.hello["addrs"]


class QuickMesh(ServingMesh):
    """``roles``: one list of extra ``join`` arguments per node (as ``ServingMesh``); ``seeds``: their identities;
    node 0 is every other node's bootstrap peer."""

    def __init__(self, zygote: Zygote, tmp: Path, model: str, roles: Sequence[Sequence[str]], seeds: Sequence[str],
                 extra: Sequence[str] = (), share_store: bool = True) -> None:
        self.nodes: list[NodeProc] = []
        self.claiming = sum(1 for role in roles if "--no-experts" not in role)
        self._args = [[*BASE, "--model", model, "--name", f"n{i}", *extra, *role] for i, role in enumerate(roles)]
        homes = [tmp / f"n{i}" for i in range(len(roles))]
        for i, home in enumerate(homes):
            seed_identity(home, seeds[i])
            if share_store and i:
                shutil.copytree(homes[0] / "store", home / "store", dirs_exist_ok=True)
        try:
            self.nodes.append(ForkedNodeProc(zygote, homes[0], *self._args[0]))
            boot = ["--peer", self.nodes[0].addrs[0]]
            with ThreadPoolExecutor(len(roles)) as pool:
                rest = [pool.submit(ForkedNodeProc, zygote, homes[i], *self._args[i], *boot)
                        for i in range(1, len(roles))]
                failures = []
                for f in rest:  # every node that started is kept (and stopped below if another did not)
                    try:
                        self.nodes.append(f.result())
                    except AssertionError as exc:  # no hello within HELLO_S
                        failures.append(exc)
                if failures:
                    raise failures[0]
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        live = [n for n in self.nodes if n.proc.poll() is None]
        for n in live:
            n.signal(signal.SIGINT)
        for n in live:
            try:
                n.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                n.proc.kill()
                n.proc.wait(timeout=STOP_S)
