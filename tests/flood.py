"""A flood of idle TCP connections for listener tests: opened from chosen loopback addresses (Linux routes all of
127/8 to lo, so 127.0.0.2 is another source than 127.0.0.1), each reopened as soon as the server closes it."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable


class Flood:
    """Idle TCP connections to ``address``: ``per_source`` from each address of ``sources``, each reopened as soon as
    the server closes it, until ``stop``. ``closed`` counts the connections the server closed."""

    def __init__(self, address: tuple[str, int], sources: list[str], per_source: int) -> None:
        self.address, self.want = address, {s: per_source for s in sources}
        self.open: dict[socket.socket, str] = {}
        self.opened = self.closed = 0
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="flood", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                held: dict[str, int] = {}
                for s in self.open.values():
                    held[s] = held.get(s, 0) + 1
                for src, n in self.want.items():
                    for _ in range(n - held.get(src, 0)):
                        try:
                            sock = socket.create_connection(self.address, timeout=2, source_address=(src, 0))
                        except OSError:
                            continue  # the backlog is full: try again on the next round
                        self.open[sock] = src
                        self.opened += 1
                poll = select.poll()
                by_fd = {sock.fileno(): sock for sock in self.open}
                for fd in by_fd:
                    poll.register(fd, select.POLLIN)
                for fd, _ in poll.poll(50):
                    sock = by_fd[fd]
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        del self.open[sock]
                        sock.close()
                        with self._cond:
                            self.closed += 1
                            self._cond.notify_all()
        finally:
            for sock in self.open:
                sock.close()

    def wait_closed(self, n: int, timeout: float = 30.0) -> None:
        """Until the server has closed ``n`` flood connections (the flood is at the server's caps)."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.closed >= n, timeout), f"server closed only {self.closed}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> Flood:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def holds_within(cond: Callable[[], bool], timeout: float) -> bool:
    """Polls ``cond`` until it holds or ``timeout`` passes; returns whether it held (a test asserts on it)."""
    deadline, tick = time.monotonic() + timeout, threading.Event()
    while not cond():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.01)
    return True
