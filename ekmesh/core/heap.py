"""Giving freed heap memory back to the operating system after a burst of large temporaries.

Loading experts makes large short-lived buffers (a float32 weight before its bf16 copy, int32 codes before an int4
pack). glibc's allocator keeps much of what such bursts free inside the process, so a node's resident memory stayed
up to 4x above the bytes of the experts it holds (``benchmarks/node_memory.py``). ``trim()`` asks the allocator to
return its free memory (glibc's ``malloc_trim(0)``) and is a no-op where that function does not exist (macOS,
musl, Windows). It never frees anything in use and takes milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = getattr(ctypes.CDLL(name), "malloc_trim", None)
    except OSError:
        return None
    if fn is not None:
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
    return fn


def trim() -> bool:
    """Returns free heap memory to the OS where the C library can; True when it could."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
