"""A full disk for tests: a small tmpfs mounted where a store lives (root and mount(8) needed; without them the
test fails, saying so, and never skips), and a filler file that takes what space is left."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(path: Path, kib: int) -> Iterator[Callable[[int], None]]:
    """A tmpfs of ``kib`` KiB mounted at ``path`` (unmounted on exit); yields ``resize(kib)`` (a remount, contents
    kept). Fails the test, with the reason, when it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)],
                         capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        pytest.fail(f"this test mounts a small tmpfs (it needs root and mount(8)); `mount -t tmpfs` at {path} "
                    f"failed: {out.stderr.strip() or out.returncode}", pytrace=False)

    def resize(new_kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_kib}k", str(path)], check=True, capture_output=True,
                       timeout=10)

    try:
        yield resize
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True, timeout=10)


def fill(directory: Path) -> Path:
    """A file in ``directory`` written until its filesystem has no space left; returns its path (unlink it to give
    the space back)."""
    path = directory / "filler"
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return path
