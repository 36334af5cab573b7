"""What an expert server counts: requests, batches, refusals, and its side of the round-trip split.

``ServerStats`` is the server's counterpart of the host's ``peerstats``: per-peer and refusal counts, and the timing
of the split that ``benchmarks/gpu_mesh.py`` reports (the host's side is ``peerstats.HostSplit``): per REQUEST its
decode (framing in) and its answer's send (TLS encryption + socket write); per computed batch the copies of the rows
to the backend's device and of the answers back into their frames (with the cast to the wire dtype), the backend
call (on CUDA followed by a synchronize, so that the kernels' time lands here and not in the copy that follows: that
copy would wait for them anyway) and the answers' frame building (framing out). Plain ``perf_counter_ns`` sums,
always on. Not responsible for: measuring (``server.ExpertServer`` reads the clocks and hands the spans here).

Invariants: only ``ExpertServer`` mutates a ``ServerStats``; the split's counters change under ``lock`` (the
per-batch parts from the one computing thread, the per-request ones from each connection's thread), so
``split()`` returns counters consistent with each other.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class ServerStats:
    requests: int = 0
    batches: int = 0
    mixed_batches: int = 0  # batches that merged frames of several peers (e.g. two attention hosts)
    by_peer: dict[str, int] = field(default_factory=dict)  # frames received per authenticated peer
    busy: int = 0
    refused: int = 0  # connections closed for a bad certificate, a cap, or a malformed frame
    over_budget: int = 0  # connections closed because their frame's memory could not be reserved in time
    # the round-trip split (module docstring), cumulative ns over ``timed`` REQUESTs answered; the per-batch parts
    # (copy, compute, encode) are added by the one computing thread, the per-request ones under ``lock``
    timed: int = 0
    decode_ns: int = 0
    copy_ns: int = 0
    compute_ns: int = 0
    encode_ns: int = 0
    send_ns: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def split(self) -> dict[str, int]:
        """The split's counters, consistent with each other."""
        with self.lock:
            return {"requests": self.timed, "decode_ns": self.decode_ns, "copy_ns": self.copy_ns,
                    "compute_ns": self.compute_ns, "encode_ns": self.encode_ns, "send_ns": self.send_ns}

    def request_timed(self, decode_ns: int, send_ns: int) -> None:
        """One REQUEST answered: its frame's decode and its answer's send."""
        with self.lock:
            self.timed += 1
            self.decode_ns += decode_ns
            self.send_ns += send_ns

    def batch_timed(self, copy_ns: int, compute_ns: int, encode_ns: int) -> None:
        """One batch computed: its copies, its backend call and its answers' frame building."""
        with self.lock:
            self.copy_ns += copy_ns
            self.compute_ns += compute_ns
            self.encode_ns += encode_ns
