"""A fork server for ``ekmesh join`` processes (a test harness helper): the imports a node makes at start-up are
done once, and each node is a fresh process forked from them.

Why: on two cores a node's start is dominated by its imports (torch, libp2p, the node's modules, and torch._dynamo
that an attention host's dense load pulls in: ~3 s of CPU per node, measured), and the interpreter's teardown after
it stopped (~1.2 s of CPU). A mesh test pays both three times. Forked from a process that has imported them (and
has run nothing: no torch op, no Python thread, no trio loop), a node starts in a fraction of a second and runs
``ekmesh.cli.main.main(["join", ...])`` as ``python -m ekmesh.cli join ...`` would, in a process of its own, with its
own environment, stdout and stderr; when ``main`` returns it exits with its status without the teardown.

Protocol on the ``AF_UNIX`` ``SOCK_SEQPACKET`` socket whose fd is ``argv[1]`` (one JSON object a message):
``{"argv", "env", "cwd"}`` with two fds (the node's stdout and stderr, write ends) -> ``{"pid"}``; when a node exits,
``{"exited": pid, "rc": status}``. When the socket closes (the test side is done, or died) the server kills the
nodes still running and exits.

``Zygote`` (the test side) starts the server and gives ``ForkedProcess`` objects that behave as ``subprocess.Popen``
does for ``tests.discovery.meshproc.NodeProc`` (``pid``, ``stdout``, ``stderr``, ``poll``, ``wait``, ``send_signal``,
``kill``, ``returncode``).
"""

from __future__ import annotations

import importlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import IO, Any

NODE_MODULES = ("torch", "torch._dynamo", "libp2p", "trio", "ekmesh.cli.main", "ekmesh.cli.mesh",
                "ekmesh.node.node", "ekmesh.node.serving", "ekmesh.node.claim", "ekmesh.node.experts_relay")
MAX_MESSAGE = 1 << 16
START_S = 60.0  # the server's imports, on a loaded machine


# --- the server (its own process) ----------------------------------------------------------------------------------

def _child(cmd: dict[str, Any], out: int, err: int, closing: Sequence[Any], pidfds: Sequence[int]) -> None:
    """In the forked process: become the node and exit with its status (never returns)."""
    rc = 1
    try:
        for obj in closing:
            obj.close()
        for fd in pidfds:
            os.close(fd)
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the process's stdin until it exits
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(cmd["env"])
        os.chdir(cmd["cwd"])
        sys.argv = ["ekmesh", *cmd["argv"]]
        from ekmesh.cli.main import main

        rc = int(main(cmd["argv"]))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a process boundary: report it as the process would, then exit
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass  # the reader went away: nothing left to tell it
        os._exit(rc)


def serve(fd: int, preload: Sequence[str]) -> None:
    for name in (*NODE_MODULES, *preload):
        importlib.import_module(name)
    sock = socket.socket(fileno=fd)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, None)
    children: dict[int, int] = {}  # pidfd -> pid
    try:
        sock.send(json.dumps({"ready": os.getpid()}).encode())
        while _step(sock, sel, children):
            pass
    except OSError as exc:  # the test side went away mid-message
        sys.stderr.write(f"zygote: {exc}\n")
    finally:
        for pid in children.values():  # nodes the test side left running (it died): they go with it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _step(sock: socket.socket, sel: selectors.BaseSelector, children: dict[int, int]) -> bool:
    """One round of events; False once the test side closed the socket."""
    for key, _ in sel.select():
        if key.data is None:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 2)
            if not msg:
                return False
            cmd = json.loads(msg)
            out, err = fds
            pid = os.fork()
            if pid == 0:
                _child(cmd, out, err, [sel, sock], list(children))
            os.close(out)
            os.close(err)
            pidfd = os.pidfd_open(pid)
            children[pidfd] = pid
            sel.register(pidfd, selectors.EVENT_READ, pid)
            sock.send(json.dumps({"pid": pid}).encode())
        else:
            sel.unregister(key.fd)
            os.close(key.fd)
            pid = children.pop(key.fd)
            _, status = os.waitpid(pid, 0)
            sock.send(json.dumps({"exited": pid, "rc": os.waitstatus_to_exitcode(status)}).encode())
    return True


# --- the test side --------------------------------------------------------------------------------------------------

class ForkedProcess:
    """A node forked by the server, seen as ``subprocess.Popen`` is seen by ``NodeProc``."""

    def __init__(self, zygote: Zygote, pid: int, stdout: IO[str], stderr: IO[str], args: list[str]) -> None:
        self._zygote, self.pid, self.stdout, self.stderr, self.args = zygote, pid, stdout, stderr, args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self._zygote.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        rc = self._zygote.wait_exit(self.pid, timeout)
        if rc is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        self.returncode = rc
        return rc

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The fork server, started with ``env`` (the environment of its imports; each node gets its own)."""

    def __init__(self, env: dict[str, str], preload: Sequence[str] = ()) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = mine
        self._lock = threading.Condition()
        self._exits: dict[int, int] = {}
        self._replies: list[dict[str, Any]] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.hf.zygote", str(theirs.fileno()), *preload],
                                     env=env, pass_fds=[theirs.fileno()])
        theirs.close()
        self._reader = threading.Thread(target=self._read, name="zygote-replies", daemon=True)
        self._reader.start()
        if self._reply(START_S) is None:
            self.close()
            raise AssertionError(f"the fork server did not start within {START_S}s")

    def _read(self) -> None:
        while True:
            try:
                msg = self._sock.recv(MAX_MESSAGE)
            except OSError:
                msg = b""
            with self._lock:
                if not msg:
                    self._replies.append({"closed": True})
                    self._lock.notify_all()
                    return
                reply = json.loads(msg)
                if "exited" in reply:
                    self._exits[int(reply["exited"])] = int(reply["rc"])
                else:
                    self._replies.append(reply)
                self._lock.notify_all()

    def _reply(self, timeout: float) -> dict[str, Any] | None:
        with self._lock:
            if not self._lock.wait_for(lambda: bool(self._replies), timeout):
                return None
            reply = self._replies.pop(0)
        return None if "closed" in reply else reply

    def spawn(self, argv: list[str], env: dict[str, str], cwd: str, timeout: float = 30.0) -> ForkedProcess:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            socket.send_fds(self._sock, [json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()],
                            [out_w, err_w])
        finally:
            os.close(out_w)
            os.close(err_w)
        reply = self._reply(timeout)
        if reply is None:
            os.close(out_r)
            os.close(err_r)
            raise AssertionError(f"the fork server did not fork within {timeout}s (rc {self.proc.poll()})")
        return ForkedProcess(self, int(reply["pid"]), os.fdopen(out_r, "r"), os.fdopen(err_r, "r"), argv)

    def exit_code(self, pid: int) -> int | None:
        with self._lock:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._lock:
            self._lock.wait_for(lambda: pid in self._exits, timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader; the server sees the end and exits
        except OSError:
            pass  # the server is gone already
        self._sock.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2:])
