"""How many threads torch's CPU operators use in an ekmesh process (intra-op parallelism), chosen on purpose.

torch's own default is one thread per logical CPU. For decode-sized work that is the worst choice measured: on a
16-CPU Xeon the built-in model generated 143 tok/s with 16 threads, 184 with 1, 287 with 4 and 306 with 8, and nodes
of one machine with 16 threads each took 0.65–0.87 ms per layer round trip with two holders and 12–22 ms with one,
against 0.37–0.59 ms with fewer threads (docs/BENCHMARKS.md, 2026-11-27). Operator threads that busy-wait between
operators take the cores that the process's own data-plane, network and API threads, the SMT sibling of each compute
core, and other ekmesh processes of the same machine need. Wide matrix work (a 30B-class model's experts) still gains
from more threads, so the default is half the CPUs this process may run on: 8 of 16 was the best there for the
built-in model and within 1.7× of 16 for 2048-wide fp32 experts.

``EKMESH_THREADS`` (a count, or ``auto``) overrides the default; a process that runs several peers on one machine
(``ekmesh demo``) hands each its share through it. Without it, an ``OMP_NUM_THREADS`` that the user set is left to
torch. Only what starts a process's compute calls ``configure``: ``ekmesh generate``, ``python -m ekmesh.api`` and a
node's ``Serving`` (created when a node serves a model; ``ekmesh join`` checks the variable at start). The setting is
process-wide, so library code never changes it. This module imports no torch (``core`` never does): the
entry point hands its ``torch`` to ``configure``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ekmesh.core.errors import ConfigError

ENV = "EKMESH_THREADS"
MAX_THREADS = 1024


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity on this OS
        return max(1, os.cpu_count() or 1)


def auto_threads(cpus: int, processes: int = 1) -> int:
    """The default for one of ``processes`` ekmesh processes sharing ``cpus`` CPUs: half its share, at least 1."""
    return max(1, cpus // (2 * max(1, processes)))


def user_chose(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` sets a thread count (``EKMESH_THREADS`` or ``OMP_NUM_THREADS``, non-empty)."""
    return bool(environ.get(ENV, "").strip() or environ.get("OMP_NUM_THREADS", "").strip())


def plan(environ: Mapping[str, str], cpus: int) -> int | None:
    """The thread count to set, or ``None`` to leave torch's own (``OMP_NUM_THREADS`` set, ``EKMESH_THREADS`` not).
    Raises ``ConfigError`` naming ``EKMESH_THREADS`` when its value is not ``auto`` or a count in [1, 1024]."""
    raw = environ.get(ENV, "")
    if not raw.strip():
        return None if user_chose(environ) else auto_threads(cpus)  # (OMP_NUM_THREADS is set: torch's)
    value = raw.strip()
    if value.lower() == "auto":
        return auto_threads(cpus)
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        raise ConfigError(f"{ENV} must be 'auto' or a number of threads in [1, {MAX_THREADS}], got {raw!r}")
    return n


def configure(torch: Any, environ: Mapping[str, str] | None = None) -> int:
    """Sets ``torch``'s intra-op thread count as ``plan`` says for this process; returns the count in force."""
    n = plan(os.environ if environ is None else environ, usable_cpus())
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
