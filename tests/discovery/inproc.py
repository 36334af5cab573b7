"""Helpers for in-process node tests: run several ``Node``s in one trio nursery, and wait for a condition."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from ekmesh.node.node import Node


@asynccontextmanager
async def running(*nodes: Node) -> AsyncIterator[tuple[Node, ...]]:
    async with trio.open_nursery() as nursery:
        for node in nodes:
            await nursery.start(lambda task_status, n=node: n.run(handle_signals=False, task_status=task_status))
        try:
            yield nodes
        finally:
            for node in nodes:
                node.stop()


async def until(pred: Callable[[], bool], timeout: float, what: str) -> float:
    """Polls ``pred`` until true; returns the seconds it took, or fails the test after ``timeout``."""
    start = trio.current_time()
    with trio.move_on_after(timeout):
        while not pred():
            await trio.sleep(0.05)
        return trio.current_time() - start
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
