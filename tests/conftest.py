"""Session set-up for every test."""

from __future__ import annotations

import signal


def pytest_configure(config: object) -> None:
    # A runner may start the tests with SIGINT ignored (e.g. as a background job of a non-interactive shell), and an
    # ignored signal stays ignored across exec: the tests that press Ctrl-C in a terminal (chat, demo) would see
    # nothing happen. A handled signal is reset to the default in every child, so handling it here restores Ctrl-C
    # for every process the tests start (and for pytest itself).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
