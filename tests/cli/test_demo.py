"""``ekmesh demo``: a real mesh of local peers on the shipped built-in model, run as the user runs it.

The slow tests start ``ekmesh demo`` as a subprocess (or in a pty, where a Ctrl-C is what a terminal sends) with
``TMPDIR`` inside ``tmp_path``, so the demo's temporary directory, its peers' homes and every process it starts
(each one's ``EKMESH_HOME`` lies under that directory) can be found: a watcher polls ``/proc`` throughout the run
and records every such process. After the demo exits, none of them may be left and the directory must be empty.

- the answer: greedy output for a fixed prompt from the demo mesh (3 peers, experts divided, 2 copies each) equals
  ``ekmesh generate builtin --chat`` in one process;
- Ctrl-C in a terminal while the mesh starts, SIGINT while the answer streams, SIGTERM while the mesh starts: the
  demo exits (130, 130, 143) within a deadline, all its processes gone, its state removed;
- interactive: the chat owns Ctrl-C (the peers survive it), Ctrl-D ends the chat and the demo with 0.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ekmesh.cli import main as cli
from ekmesh.cli.localmesh import DemoConfig, readiness, replicas_for
from ekmesh.core.errors import DemoError

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Genesis 1"  # a chapter request: the shape the built-in model was trained to answer (BUILTIN_MODEL.md)
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds processes through /proc")


# -- readiness from a snapshot (fast) -----------------------------------------------------------------------

MODEL = "blake3:" + "ab" * 32


def _snap(per_peer: dict[str, int], holders: list[list[int]], serving_ready: bool = True,
          live: int | None = None) -> dict[str, Any]:
    peers = [{"peer_id": p, "state": "self" if i == 0 else "up"} for i, p in enumerate(per_peer)]
    if live is not None:
        for p in peers[live:]:
            p["state"] = "down"
    return {
        "peers": peers,
        "claim": {"model": MODEL, "experts": sum(len(r) for r in holders)},
        "models": {MODEL: {"layers": [0, len(holders)], "holders": holders, "per_peer": per_peer}},
        "serving": {"model": MODEL, "attention": True, "state": "serving", "ready": serving_ready,
                    "missing_experts": 0, "api_url": "http://127.0.0.1:1/v1"},
    }


def test_readiness_needs_every_expert_on_target_peers_divided_and_serving() -> None:
    ok = readiness(_snap({"a": 4, "b": 4, "c": 4}, [[2, 2, 2], [2, 2, 2]]), peers=3, target=2)
    assert ok.ready and ok.replicated == 6 and ok.most_held == 4
    assert ok.api_url == "http://127.0.0.1:1/v1"

    short = readiness(_snap({"a": 4, "b": 4, "c": 3}, [[2, 2, 2], [2, 2, 1]]), peers=3, target=2)
    assert not short.ready and short.describe() == "claiming experts 5/6 ready on 2 peers"

    one_holds_all = readiness(_snap({"a": 6, "b": 3, "c": 3}, [[2, 2, 2], [2, 2, 2]]), peers=3, target=2)
    assert not one_holds_all.ready and "one holds 6/6" in one_holds_all.describe()

    idle = readiness(_snap({"a": 6, "b": 6, "c": 0}, [[2, 2, 2], [2, 2, 2]]), peers=3, target=2)
    assert not idle.ready, "a peer that holds nothing is not dividing the experts"

    loading = readiness(_snap({"a": 4, "b": 4, "c": 4}, [[2, 2, 2], [2, 2, 2]], serving_ready=False), 3, 2)
    assert not loading.ready and loading.describe().startswith("loading the model")

    down = readiness(_snap({"a": 4, "b": 4, "c": 4}, [[2, 2, 2], [2, 2, 2]], live=2), peers=3, target=2)
    assert not down.ready and down.describe() == "peers meeting 2/3"


def test_readiness_reads_missing_or_malformed_parts_as_not_ready() -> None:
    assert not readiness({}, 3, 2).ready
    assert readiness({}, 3, 2).describe() == "peers meeting 0/3"
    broken = _snap({"a": 4, "b": 4, "c": 4}, [[2, 2, 2], [2, 2, 2]])
    broken["models"][MODEL]["holders"] = "nonsense"
    assert not readiness(broken, 3, 2).ready
    no_serving = _snap({"a": 4, "b": 4, "c": 4}, [[2, 2, 2], [2, 2, 2]])
    del no_serving["serving"]
    assert not readiness(no_serving, 3, 2).ready


def test_replicas_leave_no_peer_holding_everything() -> None:
    assert replicas_for(2) == 1 and replicas_for(3) == 2 and replicas_for(8) == 2
    with pytest.raises(DemoError, match="--peers must be between 2"):
        DemoConfig(peers=1)


def test_bad_options_exit_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--peers", "1"]) == 1
    assert capsys.readouterr().err.startswith("ekmesh demo: --peers must be between 2 and")
    assert cli.main(["demo", "--max-tokens", "0"]) == 1
    assert "--max-tokens must be at least 1" in capsys.readouterr().err


# -- the real thing (slow) ----------------------------------------------------------------------------------


class DemoProcs:
    """Every process whose ``EKMESH_HOME`` lies under ``root``, seen by polling ``/proc`` from a thread."""

    def __init__(self, root: Path) -> None:
        self.prefix = str(root) + os.sep
        self.seen: dict[int, tuple[str, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def scan(self) -> dict[int, tuple[str, str]]:
        """pid -> (its EKMESH_HOME, its command line)."""
        out = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                env = (d / "environ").read_bytes().split(b"\0")
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            for kv in env:
                home = os.fsdecode(kv[12:]) if kv.startswith(b"EKMESH_HOME=") else ""
                if home.startswith(self.prefix):
                    out[int(d.name)] = (home, cmd.replace(b"\0", b" ").decode(errors="replace").strip())
        return out

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            for pid, (home, cmd) in self.scan().items():
                if cmd or pid not in self.seen:  # an exiting process reads with an empty command line
                    self.seen[pid] = (home, cmd)

    def finish(self) -> dict[int, tuple[str, str]]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.seen

    @staticmethod
    def homes(procs: dict[int, tuple[str, str]], command: str) -> set[str]:
        """The homes of the ``ekmesh <command>`` processes: one per peer (a peer's forked helpers share its home
        and its command line)."""
        return {home for home, cmd in procs.values() if f" -m ekmesh.cli {command} " in f"{cmd} "}


def _env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp), EKMESH_HOME=str(tmp_path / "home"), COLUMNS="200",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("LIBP2P_DEBUG", None)
    return env, tmp


def _demo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ekmesh.cli", "demo", *args]


class Lines:
    """A pipe read line by line by a thread; ``wait_for`` a line containing some text, with a deadline."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in iter(stream.readline, ""):
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if text in line:
                return line
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout} s: {self.lines}") from None
            if line is None:
                raise AssertionError(f"the stream ended without a line with {text!r}: {self.lines}")
            self.lines.append(line)
            if text in line:
                return line

    def rest(self, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return "".join(self.lines)


def _assert_all_gone(procs: DemoProcs, tmp: Path, peers: int, chat: bool) -> None:
    seen = procs.finish()
    assert len(procs.homes(seen, "join")) == peers, f"expected {peers} peers, the demo started: {seen}"
    assert len(procs.homes(seen, "chat")) == (1 if chat else 0), seen
    left = procs.scan()
    assert left == {}, f"processes the demo started are still running: {left}"
    # (torch keeps its own caches in TMPDIR, e.g. torchinductor_<user>: shared by every run, not the demo's state)
    left_dirs = sorted(tmp.glob("ekmesh-demo*"))
    assert left_dirs == [], f"the demo left state behind: {left_dirs}"


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_proc
def test_demo_answers_as_one_process_does(tmp_path: Path) -> None:
    env, tmp = _env(tmp_path)
    procs = DemoProcs(tmp)
    start = time.monotonic()
    demo = subprocess.run(_demo_argv("--peers", "3", "--prompt", PROMPT, "--temperature", "0",
                                     "--max-tokens", "32"),
                          env=env, capture_output=True, text=True, timeout=180)
    took = time.monotonic() - start
    print(f"demo: {took:.1f} s\n{demo.stderr}")
    assert demo.returncode == 0, demo.stderr
    _assert_all_gone(procs, tmp, peers=3, chat=True)
    assert "ready in" in demo.stderr and "3 peers, 2 copies each" in demo.stderr, demo.stderr

    one = subprocess.run([sys.executable, "-m", "ekmesh.cli", "generate", "builtin", "--chat", "--prompt", PROMPT,
                          "--max-tokens", "32", "--json"],
                         env=dict(env, EKMESH_HOME=str(tmp_path / "one")), capture_output=True, text=True,
                         timeout=120)
    assert one.returncode == 0, one.stderr
    text = json.loads(one.stdout)["text"]
    assert len(json.loads(one.stdout)["token_ids"]) == 32
    assert demo.stdout == text + "\n", f"demo mesh:\n{demo.stdout!r}\none process:\n{text!r}"
    assert text.startswith("Genesis"), text


@pytest.mark.slow
@pytest.mark.timeout(180)
@needs_proc
def test_ctrl_c_in_a_terminal_while_the_mesh_starts_stops_everything(tmp_path: Path) -> None:
    import pexpect

    env, tmp = _env(tmp_path)
    procs = DemoProcs(tmp)
    child = pexpect.spawn(_demo_argv()[0], _demo_argv()[1:], env=env, encoding="utf-8", timeout=120)
    try:
        child.expect("peer 3/3 up")
        # the terminal sends SIGINT to its foreground process group: the demo (the peers are in their own)
        sent = time.monotonic()
        child.sendintr()
        child.expect(pexpect.EOF, timeout=20)
        took = time.monotonic() - sent
    finally:
        child.close(force=True)
    print(f"stopped {took:.1f} s after Ctrl-C; output:\n{child.before}")
    assert child.exitstatus == 130, child.before
    assert "ekmesh demo: interrupted, stopping" in child.before and "stopped 3 peers" in child.before
    _assert_all_gone(procs, tmp, peers=3, chat=False)


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_proc
def test_sigint_while_the_answer_streams_stops_everything(tmp_path: Path) -> None:
    env, tmp = _env(tmp_path)
    procs = DemoProcs(tmp)
    proc = subprocess.Popen(_demo_argv("--prompt", "Tell me about light", "--temperature", "0",
                                       "--max-tokens", "1500"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = Lines(proc.stderr)
    try:
        assert proc.stdout is not None
        err.wait_for("ready in", timeout=150)
        first = proc.stdout.read(1)  # the answer has started
        assert first, err.rest()
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)  # as `kill -INT`: the demo alone, which passes it on to the chat
        code = proc.wait(timeout=20)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    out = first + proc.stdout.read()
    print(f"stopped {took:.1f} s after SIGINT, {len(out)} chars of answer")
    assert code == 130, err.rest()
    assert "ekmesh demo: interrupted, stopping" in err.rest() and "stopped 3 peers" in err.rest()
    _assert_all_gone(procs, tmp, peers=3, chat=True)


@pytest.mark.slow
@pytest.mark.timeout(180)
@needs_proc
def test_sigterm_while_the_mesh_starts_stops_everything(tmp_path: Path) -> None:
    env, tmp = _env(tmp_path)
    procs = DemoProcs(tmp)
    proc = subprocess.Popen(_demo_argv("--peers", "2", "--prompt", PROMPT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err = Lines(proc.stderr)
    try:
        err.wait_for("peer 2/2 up", timeout=120)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 128 + signal.SIGTERM, err.rest()
    assert "interrupted (SIGTERM), stopping" in err.rest() and "stopped 2 peers" in err.rest()
    _assert_all_gone(procs, tmp, peers=2, chat=False)


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_proc
def test_interactive_chat_owns_ctrl_c_and_ctrl_d_ends_the_demo(tmp_path: Path) -> None:
    import pexpect

    from ekmesh.tui.chat import PROMPT as CHAT_PROMPT

    env, tmp = _env(tmp_path)
    procs = DemoProcs(tmp)
    child = pexpect.spawn(_demo_argv()[0], _demo_argv("--max-tokens", "12")[1:], env=env, encoding="utf-8",
                          timeout=150, dimensions=(40, 200))
    try:
        child.expect_exact(CHAT_PROMPT)
        child.sendline(PROMPT)
        child.expect_exact(CHAT_PROMPT, timeout=60)
        answer = child.before
        child.sendintr()  # at the chat's prompt: the chat says how to quit; the demo and its peers carry on
        child.expect("Ctrl-C again", timeout=20)
        assert len(procs.homes(procs.scan(), "join")) == 3, procs.scan()
        child.expect_exact(CHAT_PROMPT, timeout=20)
        child.sendeof()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert len(answer.strip().splitlines()) >= 2, f"no answer after the echoed question: {answer!r}"
    assert child.exitstatus == 0, child.before
    _assert_all_gone(procs, tmp, peers=3, chat=True)


# -- failure paths, with stand-in peers (fast) ---------------------------------------------------------------


class FakePeersDemo:
    """A ``Demo`` whose peers are small Python programs instead of ``ekmesh join``."""

    @staticmethod
    def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, **config: Any) -> Any:
        import tempfile

        from ekmesh.cli.localmesh import Demo

        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

        class Fake(Demo):
            def join_argv(self, index: int, key_file: Path, extra: list[str]) -> list[str]:
                return [sys.executable, "-c", code]

        return Fake(DemoConfig(**config), progress=lambda s: None)


HELLO = ("import json, time; print(json.dumps({'peer_id': 'P', 'addrs': ['/ip4/127.0.0.1/tcp/1/p2p/P']}), "
         "flush=True); time.sleep(600)")


def test_a_peer_that_dies_fails_the_demo_with_its_log_and_keeps_the_logs(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    demo = FakePeersDemo.make(tmp_path, monkeypatch, "import sys; print('no such model', file=sys.stderr); "
                                                     "sys.exit(3)", peers=2)
    with pytest.raises(DemoError, match=r"peer 0 closed its output \(exit code 3\): the end of its log:\n  no such"):
        demo.run()
    assert demo.root is not None and not demo.root.exists()
    assert demo.logs_kept is not None and (demo.logs_kept / "peer-0.log").read_text() == "no such model\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.logs_kept.name]


def test_a_mesh_not_ready_by_the_deadline_fails_and_is_stopped(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    demo = FakePeersDemo.make(tmp_path, monkeypatch, HELLO, peers=3, ready_timeout=1.0, stop_grace=5.0)
    start = time.monotonic()
    with pytest.raises(DemoError, match=r"not ready after 1 s \(peers meeting 0/3\)"):
        demo.run()
    assert time.monotonic() - start < 15
    assert len(demo.peers) == 3 and all(p.proc.poll() is not None for p in demo.peers)
    assert demo.root is not None and not demo.root.exists()
