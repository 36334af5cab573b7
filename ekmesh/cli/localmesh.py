"""``ekmesh demo``: a whole mesh on this machine, then a chat with it.

Role: start N ``ekmesh join`` peers as subprocesses on loopback (private ``EKMESH_HOME``s, a random mesh key, no
mDNS, no DHT) that claim the built-in model, so that they divide its routed experts among them; wait until peer 0
can answer (its dense part loaded, every expert ready on ``replicas`` live peers, no peer holding them all); then run
``ekmesh chat`` against peer 0's OpenAI-compatible API, once (``prompt``) or interactively; then stop everything.

Not responsible for: serving, claiming or placement (the peers do that; this module only reads their status
snapshots), the chat itself (``ekmesh chat``), rendering (it reports progress as short lines to a callback).
It imports neither torch nor libp2p, so the demo starts at once and spends its time in the peers.

Invariants:
- everything the demo writes lives in one private temporary directory (mode 0700): the peers' homes, the mesh key
  file (0600, so the key is never on a command line), the peers' logs. It is removed when the demo ends, whether it
  ends well, fails, is interrupted or is terminated (``keep`` leaves it for debugging); on a failure the logs are
  first copied to a directory of their own (``Demo.logs_kept``; the CLI names it);
- every peer runs in a session (process group) of its own, so a terminal's Ctrl-C reaches the demo and never the
  peers directly; the demo stops every process it started (SIGINT to each group, SIGKILL after ``stop_grace``
  seconds), also from ``atexit`` and on SIGTERM/SIGHUP;
- every wait has a deadline (``DemoConfig``); a peer that exits early fails the demo at once, with its log's tail.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import ekmesh
from ekmesh.core import threads
from ekmesh.core.constants import STATUS_PATH
from ekmesh.core.errors import DemoError, EkmeshError, LocalNodeError
from ekmesh.discovery.control import get_json

MODEL = "builtin"
MAX_PEERS = 16
LOG_TAIL_LINES = 12

Progress = Callable[[str], None]


class DemoInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP reached the demo; raised in the main thread so that every ``finally`` runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def replicas_for(peers: int) -> int:
    """Copies of each expert the demo asks for. With 2 peers, 2 copies would give each peer every expert, so the
    mesh would divide nothing: 1. From 3 peers on, 2 copies still leave each peer about 2/N of the experts, and
    stopping any one peer loses none."""
    return 1 if peers < 3 else 2


@dataclass(frozen=True)
class DemoConfig:
    peers: int = 3
    prompt: str | None = None  # answer this once and exit; None: an interactive chat
    temperature: float | None = None  # None: ``ekmesh chat``'s default
    max_tokens: int | None = 96
    seed: int | None = None
    keep: bool = False  # leave the temporary directory in place (its path is reported)
    verbose: int = 0  # passed on to the peers as ``-v``s (their logs are in the temporary directory)
    start_timeout: float = 60.0  # for one peer to print its ``started`` event
    ready_timeout: float = 120.0  # from the first peer's start until the mesh can answer
    poll_interval: float = 0.25
    status_timeout: float = 5.0  # one status request to peer 0's control endpoint
    stop_grace: float = 5.0  # how long stopping waits after SIGINT before it SIGKILLs
    advert_interval: float = 0.5  # the peers' advert period: short, so that the mesh settles in seconds

    def __post_init__(self) -> None:
        if not 2 <= self.peers <= MAX_PEERS:
            raise DemoError(f"--peers must be between 2 and {MAX_PEERS} (a mesh needs at least two peers), "
                            f"got {self.peers}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DemoError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.temperature is not None and not self.temperature >= 0:
            raise DemoError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if not self.ready_timeout > 0:
            raise DemoError(f"--timeout must be positive, got {self.ready_timeout}")
        if self.prompt is not None and not self.prompt.strip():
            raise DemoError("--prompt is empty")

    @property
    def replicas(self) -> int:
        return replicas_for(self.peers)


# -- readiness, read from peer 0's status snapshot ----------------------------------------------------------


@dataclass(frozen=True)
class Readiness:
    """What peer 0's snapshot says about the demo mesh (see ``readiness``)."""

    peers: int
    """Peers the demo started."""
    target: int
    """Ready holders every expert needs."""
    live: int = 0
    """Live peers peer 0 sees, itself included."""
    model: str | None = None
    experts: int | None = None
    """Routed experts of the model (once peer 0 has its manifest)."""
    replicated: int = 0
    """Experts ready on at least ``target`` live peers."""
    holding: int = 0
    """Live peers that hold at least one expert ready."""
    most_held: int = 0
    """The most experts one peer holds ready."""
    serving_state: str = ""
    serving_ready: bool = False
    api_url: str | None = None

    @property
    def divided(self) -> bool:
        """Every peer holds a part of the experts, none holds them all."""
        return self.experts is not None and self.holding == self.peers and self.most_held < self.experts

    @property
    def ready(self) -> bool:
        return (self.live == self.peers and self.experts is not None and self.replicated >= self.experts
                and self.divided and self.serving_ready and self.api_url is not None)

    def describe(self) -> str:
        if self.live < self.peers:
            return f"peers meeting {self.live}/{self.peers}"
        if self.experts is None:
            return "reading the model"
        if self.replicated < self.experts:
            copies = "ready" if self.target == 1 else f"ready on {self.target} peers"
            return f"claiming experts {self.replicated}/{self.experts} {copies}"
        if not self.divided:
            return (f"dividing the experts ({self.holding}/{self.peers} peers hold some, one holds "
                    f"{self.most_held}/{self.experts})")
        return f"loading the model ({self.serving_state or 'starting'})"


def readiness(snap: Mapping[str, Any], peers: int, target: int) -> Readiness:
    """Read peer 0's status snapshot (``ekmesh status --json``): how far the demo mesh is from answering.

    Uses the ``claim`` block (model id, experts), the shard map (``models``: ready holders per expert, per peer) and
    the ``serving`` block (``ready``: the node can answer). Anything missing or malformed reads as not ready.
    """
    live = sum(1 for p in _list(snap.get("peers")) if isinstance(p, dict) and p.get("state") in ("self", "up"))
    claim = _dict(snap.get("claim"))
    serving = _dict(snap.get("serving"))
    model = serving.get("model") if isinstance(serving.get("model"), str) else None
    model = model or (claim.get("model") if isinstance(claim.get("model"), str) else None)
    experts = claim.get("experts") if isinstance(claim.get("experts"), int) and claim["experts"] > 0 else None
    shard = _dict(_dict(snap.get("models")).get(model)) if model else {}
    cells = [n for row in _list(shard.get("holders")) for n in _list(row) if isinstance(n, int)]
    per_peer = [n for n in _dict(shard.get("per_peer")).values() if isinstance(n, int)]
    api_url = serving.get("api_url")
    return Readiness(
        peers=peers, target=target, live=live, model=model, experts=experts if shard else None,
        replicated=sum(1 for n in cells if n >= target), holding=sum(1 for n in per_peer if n > 0),
        most_held=max(per_peer, default=0), serving_state=str(serving.get("state") or ""),
        serving_ready=serving.get("ready") is True, api_url=api_url if isinstance(api_url, str) else None)


def _dict(v: object) -> dict[Any, Any]:
    return v if isinstance(v, dict) else {}


def _list(v: object) -> list[Any]:
    return v if isinstance(v, list) else []


# -- the processes ------------------------------------------------------------------------------------------


def ekmesh_argv(*args: str) -> list[str]:
    """Run the ``ekmesh`` command with this interpreter (the console script may not be on PATH)."""
    return [sys.executable, "-m", "ekmesh.cli", *args]


def _child_env(home: Path, peers: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["EKMESH_HOME"] = str(home)
    if peers > 1 and not threads.user_chose(env):
        # peers of one machine share its CPUs: each gets its share of torch's operator threads (core/threads.py)
        env[threads.ENV] = str(threads.auto_threads(threads.usable_cpus(), peers))
    # the children import the very ekmesh this process runs, installed or not
    src = str(Path(ekmesh.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Peer:
    """One ``ekmesh join --json`` subprocess in its own session; a thread reads its stdout (one JSON event a
    line), stderr goes to ``log``."""

    def __init__(self, index: int, home: Path, log: Path, argv: list[str], peers: int) -> None:
        self.index = index
        self.home = home
        self.log = log
        self.started: dict[str, Any] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        home.mkdir(mode=0o700)
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(argv, env=_child_env(home, peers), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        threading.Thread(target=self._pump, name=f"demo-peer-{index}", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:
            for raw in self.proc.stdout:
                if self.started is None:
                    self._lines.put(raw.decode("utf-8", "replace"))
        self._lines.put(None)

    def wait_started(self, deadline: float) -> dict[str, Any]:
        """The peer's first event (peer id, addresses, ...), by ``deadline`` (``time.monotonic``)."""
        while self.started is None:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DemoError(f"peer {self.index} did not start in time{self.log_tail()}") from None
            if line is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
                raise DemoError(f"peer {self.index} closed its output (exit code {self.proc.poll()})"
                                f"{self.log_tail()}")
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and isinstance(ev.get("peer_id"), str) and _list(ev.get("addrs")):
                self.started = ev
        return self.started

    @property
    def peer_addr(self) -> str:
        """Its first listen address with ``/p2p/<peer id>``, as ``--peer`` wants it."""
        assert self.started is not None
        addr = str(self.started["addrs"][0])
        return addr if "/p2p/" in addr else f"{addr}/p2p/{self.started['peer_id']}"

    def log_tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            return ""
        return (": the end of its log:\n  " + "\n  ".join(lines)) if lines else " (its log is empty)"


class Demo:
    """The demo mesh: ``start`` the peers, ``wait_ready``, ``chat``, ``stop`` (idempotent; also at exit).

    Used as a context manager, or through ``run`` which does all of it and handles the signals."""

    def __init__(self, config: DemoConfig, progress: Progress = lambda _s: None) -> None:
        self.config = config
        self.progress = progress
        self.root: Path | None = None
        self.peers: list[Peer] = []
        self.chat_proc: subprocess.Popen[bytes] | None = None
        self.api_url: str | None = None
        self.logs_kept: Path | None = None
        self._t0 = time.monotonic()
        self._stopped = False

    # -- whole run ------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start, wait, chat, stop. Returns the chat's exit code; ``DemoError`` on a failure, ``KeyboardInterrupt``
        (``DemoInterrupted`` for SIGTERM/SIGHUP) when interrupted: everything is stopped and removed either way."""
        with self, _terminate_as_interrupt():
            self.start()
            self.wait_ready()
            return self.chat()

    def __enter__(self) -> Demo:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, KeyboardInterrupt) and not self._stopped:
            self.progress(f"interrupted ({exc}), stopping" if isinstance(exc, DemoInterrupted) else
                          "interrupted, stopping")
        self.stop(failed=isinstance(exc, EkmeshError))

    # -- starting -------------------------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self._t0 = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="ekmesh-demo-"))  # mode 0700
        atexit.register(self.stop)
        key_file = self.root / "mesh.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        where = f" (state in {self.root})" if cfg.keep else ""
        self.progress(f"starting {cfg.peers} peers on 127.0.0.1 with the built-in model{where}")
        first = self._spawn(0, key_file, [])
        first.wait_started(time.monotonic() + cfg.start_timeout)
        self.progress(f"peer 1/{cfg.peers} up")
        for i in range(1, cfg.peers):
            # the others only hold experts: one attention host is all the demo chats with
            self._spawn(i, key_file, ["--peer", first.peer_addr, "--no-attention"])
        deadline = time.monotonic() + cfg.start_timeout
        for n, peer in enumerate(self.peers[1:], start=2):
            peer.wait_started(deadline)
            self.progress(f"peer {n}/{cfg.peers} up")
        url = first.started.get("api_url") if first.started else None
        self.api_url = url if isinstance(url, str) else None

    def join_argv(self, index: int, key_file: Path, extra: list[str]) -> list[str]:
        cfg = self.config
        return ekmesh_argv(
            "join", "--json", "--name", f"demo-{index}", "--model", MODEL,
            "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--no-dht", "--no-relay", "--no-reserve",
            "--exit-with-parent",
            "--mesh-key-file", str(key_file), "--api-port", "0", "--replicas", str(cfg.replicas),
            "--advert-interval", str(cfg.advert_interval), *(["-v"] * min(cfg.verbose, 2)), *extra)

    def _spawn(self, index: int, key_file: Path, extra: list[str]) -> Peer:
        assert self.root is not None
        peer = Peer(index, self.root / f"peer-{index}", self.root / f"peer-{index}.log",
                    self.join_argv(index, key_file, extra), self.config.peers)
        self.peers.append(peer)
        return peer

    # -- waiting --------------------------------------------------------------------------------------------

    def wait_ready(self) -> Readiness:
        """Poll peer 0's snapshot until the mesh can answer; ``DemoError`` at the deadline."""
        cfg = self.config
        deadline = self._t0 + cfg.ready_timeout
        said = ""
        while True:
            self._check_alive()
            try:
                snap = get_json(self.peers[0].home, STATUS_PATH, cfg.status_timeout)
            except LocalNodeError:
                snap = {}  # not serving its control endpoint yet, or busy: asked again below
            last = readiness(snap, cfg.peers, cfg.replicas)
            if last.ready:
                break
            text = last.describe()
            if text != said:
                self.progress(text)
                said = text
            if time.monotonic() >= deadline:
                raise DemoError(f"the demo mesh was not ready after {cfg.ready_timeout:.0f} s ({text})")
            time.sleep(cfg.poll_interval)
        self.api_url = self.api_url or last.api_url
        self.progress(f"ready in {time.monotonic() - self._t0:.1f} s: {last.experts} experts on {cfg.peers} peers, "
                      f"{last.target} {'copy' if last.target == 1 else 'copies'} each, "
                      f"at most {last.most_held} on one peer; chat at {self.api_url}")
        return last

    def _check_alive(self) -> None:
        for peer in self.peers:
            code = peer.proc.poll()
            if code is not None:
                raise DemoError(f"peer {peer.index} exited with code {code}{peer.log_tail()}")

    # -- chatting -------------------------------------------------------------------------------------------

    def chat_argv(self) -> list[str]:
        cfg = self.config
        assert self.api_url is not None
        argv = ["chat", "--api", self.api_url]
        if cfg.prompt is not None:
            argv += ["--prompt", cfg.prompt]
        if cfg.temperature is not None:
            argv += ["--temperature", repr(cfg.temperature)]
        if cfg.max_tokens is not None:
            argv += ["--max-tokens", str(cfg.max_tokens)]
        if cfg.seed is not None:
            argv += ["--seed", str(cfg.seed)]
        return ekmesh_argv(*argv)

    def chat(self) -> int:
        """Run ``ekmesh chat`` on peer 0's API with this terminal's stdin/stdout/stderr; its exit code.

        Interactive, the chat is in the foreground of the terminal and owns Ctrl-C (it may use it to cut an answer
        short): the demo ignores SIGINT until the chat exits. With a prompt, the chat runs in a session of its own
        and the demo's SIGINT handler passes one SIGINT on to it, so a Ctrl-C stops it exactly once.
        """
        cfg = self.config
        one_shot = cfg.prompt is not None
        self._check_alive()
        proc = self.chat_proc = subprocess.Popen(self.chat_argv(), env=_child_env(self.peers[0].home),
                                                 stdin=subprocess.DEVNULL if one_shot else None,
                                                 start_new_session=one_shot)
        interrupted_at: float | None = None

        def on_sigint(_signum: int, _frame: FrameType | None) -> None:
            nonlocal interrupted_at
            if one_shot and interrupted_at is None:
                interrupted_at = time.monotonic()
                _signal_group(proc, signal.SIGINT)

        with _handler(signal.SIGINT, on_sigint):
            while (code := proc.poll()) is None:
                if interrupted_at is not None and time.monotonic() - interrupted_at > cfg.stop_grace:
                    proc.kill()  # it did not stop on SIGINT
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.1)
        if interrupted_at is not None or code == 130:
            raise KeyboardInterrupt
        return code

    # -- stopping -------------------------------------------------------------------------------------------

    def stop(self, failed: bool = False) -> None:
        """Stop every process the demo started and remove its temporary directory (idempotent). With ``failed``,
        the peers' logs are copied out first (``logs_kept``)."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        with _handler(signal.SIGINT, _ignore), _handler(signal.SIGTERM, _ignore), _handler(signal.SIGHUP, _ignore):
            # a second Ctrl-C (or a SIGTERM) must not cut the cleanup short
            procs: list[subprocess.Popen[bytes]] = [p.proc for p in self.peers]
            if self.chat_proc is not None:
                procs.append(self.chat_proc)
            start = time.monotonic()
            for p in procs:
                _signal_group(p, signal.SIGINT)
            deadline = start + self.config.stop_grace
            killed = 0
            for p in procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    killed += 1
                    _signal_group(p, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=self.config.stop_grace)
            if self.peers:
                late = f" ({killed} killed after {self.config.stop_grace:.0f} s)" if killed else ""
                self.progress(f"stopped {len(self.peers)} peers in {time.monotonic() - start:.1f} s{late}")
            if self.root is not None:
                if failed and not self.config.keep:
                    self.logs_kept = self._keep_logs()
                if self.config.keep:
                    self.progress(f"kept the demo's state in {self.root}")
                else:
                    shutil.rmtree(self.root, ignore_errors=True)

    def _keep_logs(self) -> Path | None:
        assert self.root is not None
        logs = sorted(self.root.glob("peer-*.log"))
        if not logs:
            return None
        dest = Path(tempfile.mkdtemp(prefix="ekmesh-demo-logs-"))
        for log in logs:
            with contextlib.suppress(OSError):
                shutil.copy2(log, dest / log.name)
        return dest


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    """Signal ``proc``'s process group (it leads one: ``start_new_session``), or ``proc`` alone if it does not."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)


Handler = Callable[[int, FrameType | None], Any]


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    """A Python-level "ignore": unlike ``SIG_IGN`` it is not inherited by the children started meanwhile."""


@contextlib.contextmanager
def _handler(signum: int, handler: Handler) -> Iterator[None]:
    """Install a signal handler for the block (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, old)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``DemoInterrupted`` in the main thread, so cleanup runs as for Ctrl-C."""

    def raise_(signum: int, _frame: FrameType | None) -> None:
        raise DemoInterrupted(signum)

    with _handler(signal.SIGTERM, raise_), _handler(signal.SIGHUP, raise_):
        yield
