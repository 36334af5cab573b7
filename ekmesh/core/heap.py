"""How the C allocator keeps and gives back freed memory (glibc only; elsewhere these do nothing).

``keep_freed()``: glibc returns big freed blocks to the OS and faults them back in on the next call: a prefill's
few-MiB temporaries cost twice the expert compute that way (benchmarks/mesh_overhead.py). It makes blocks up to
32 MiB come from the heap and trims the heap only above 1 GiB free. It also caps glibc's arenas at 2: with one
per thread, an attention host answering 16 conversations at once (a thread each) grew from 548 to 1,168 MiB over a
soak and kept growing with each burst; with 2 it stayed at 640 MiB after the first burst (benchmarks/soak.py).

``trim()``: loading experts makes large short-lived buffers (a float32 weight before its bf16 copy, int32 codes
before an int4 pack), which the settings above keep inside the process: a node's resident memory stayed up to 4x
above the bytes of the experts it holds (``benchmarks/node_memory.py``). ``trim()`` asks the allocator to return
its free memory now (``malloc_trim(0)``); it never frees anything in use and takes milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # malloc.h
ARENAS = 2


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def keep_freed() -> bool:
    """Keeps freed blocks up to 32 MiB in the heap, trims it only above 1 GiB free, and caps the arenas at
    ``ARENAS``; True when it could."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    mallopt(_M_ARENA_MAX, ARENAS)
    return True


def trim() -> bool:
    """Returns free heap memory to the OS where the C library can; True when it could."""
    fn = getattr(_libc(), "malloc_trim", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    fn(0)
    return True
