"""Helpers for tests that run ekmesh nodes as real subprocesses (``ekmesh join``) and poll them with deadlines."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ekmesh.core.constants import STATUS_PATH
from ekmesh.core.errors import NodeNotRunningError
from ekmesh.discovery.control import get_json

REPO = Path(__file__).resolve().parents[2]

# Runs the `join`/`status` subcommands exactly as `ekmesh` does, through ekmesh.cli.mesh.register.

FAST = ["--advert-interval", "0.5", "--down-after", "5"]


def ekmesh_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ekmesh.cli", *args]


def env_for(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["EKMESH_HOME"] = str(home)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("LIBP2P_DEBUG", None)
    return env


class NodeProc:
    """One `ekmesh join --json` subprocess; its stdout lines are collected by a thread."""

    def __init__(self, home: Path, *args: str, prefix: list[str] | None = None) -> None:
        self.home = home
        self.args = args
        self.lines: queue.Queue[str] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        argv = (prefix or []) + ekmesh_argv("join", "--json", *args)
        self.proc = subprocess.Popen(argv, env=env_for(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        # stderr is drained all along (a node that logged ~64 KiB into an unread pipe would block on its next line),
        # into ``stderr()`` and ``<home>/node.log``
        self._err: list[str] = []
        self._err_thread = threading.Thread(target=self._pump_err, daemon=True)
        self._err_thread.start()
        first = self.next_line(timeout=30)
        self.hello = json.loads(first)
        self.peer_id: str = self.hello["peer_id"]
        self.addrs: list[str] = self.hello["addrs"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        self.home.mkdir(parents=True, exist_ok=True)
        with (self.home / "node.log").open("a") as log:  # kept for a look after a failed run (--basetemp)
            for line in self.proc.stderr:
                self._err.append(line)
                log.write(line)
                log.flush()

    def stderr(self) -> str:
        """What the node wrote to stderr so far (all of it once it has exited and ``stop`` returned)."""
        if self.proc.poll() is not None:
            self._err_thread.join(timeout=10)
        return "".join(self._err)

    def next_line(self, timeout: float) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"node printed nothing within {timeout}s; stderr:\n{self.stderr()}") from None

    def wait_event(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if pred(ev):
                return ev
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            ev = json.loads(line)
            self.events.append(ev)
            if pred(ev):
                return ev
        raise AssertionError(f"no matching event within {timeout}s; events: {self.events}")

    def drain(self) -> list[dict[str, Any]]:
        """Collect every event printed so far (after ``stop``: every event)."""
        if self.proc.poll() is not None:
            self._pump_thread.join(timeout=10)
        while True:
            try:
                self.events.append(json.loads(self.lines.get_nowait()))
            except queue.Empty:
                return self.events

    def status(self) -> dict[str, Any]:
        return get_json(self.home, STATUS_PATH, timeout=5)

    def states(self) -> dict[str, str]:
        return {p["peer_id"]: p["state"] for p in self.status()["peers"]}

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll ``pred`` until it holds; returns the seconds it took. Fails with ``what`` after ``timeout``."""
    start = time.monotonic()
    last_exc: Exception | None = None
    while time.monotonic() - start < timeout:
        try:
            if pred():
                return time.monotonic() - start
        except (NodeNotRunningError, KeyError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc})"
                                                                            if last_exc else ""))
