"""What an attention host knows of each peer's answers: counts, latency, and how long to wait for the next one.

``PeerStats`` keeps, per peer, EWMAs of its round trip (for choosing among replicas: lowest latency × (1 + in
flight)), of its wait (the round trip less the compute the server reports in each answer: network, queues, framing)
and of its compute per row. An answer's deadline follows the frame's size: max(floor, multiple × (wait + rows ×
per-row)), so a prefill's frame of hundreds of rows is not held to a decode step's latency and a hung peer costs a
decode step about the floor (0.3 s) when a replica can take over; when some expert of the frame has no other holder
the next step is fetching its blob and computing it on the host (which then keeps it), so the floor is 2 s: a busy
peer is not replaced by a download. Before any measurement, ``first_s`` (it includes opening the channel).

``HostSplit`` adds up, over every good answer, where a host's round trips went (the host's side of the split that
``benchmarks/gpu_mesh.py`` reports; the expert server's side is its ``ServerStats``): plain ``perf_counter_ns``
sums and counts, a few clock reads per frame, always on.

Invariants: only ``RemoteExperts`` mutates a ``PeerStats`` or its ``HostSplit``, under its lock; the EWMAs move only
on good answers; the split counts only frames that got a good answer, so for each of them copy_out + encode + send
<= rtt and decode <= wait <= rtt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ekmesh.infer.dataplane.poll import Waits


@dataclass(frozen=True)
class RemoteTimeouts:
    floor_s: float = 0.3  # never wait less than this for an answer (a busy peer's scheduling jitter)
    fallback_floor_s: float = 2.0  # ... or this, when an expert of the frame has no other holder (a blob fetch next)
    rtt_multiple: float = 10.0  # ... nor less than this many times what the peer is expected to take for the frame
    first_s: float = 10.0  # before any measurement (includes opening the channel)
    cooldown_s: float = 5.0  # a failed peer is chosen last for this long
    max_waves: int = 8  # re-assignment rounds per call before giving up
    check_slack: float = 2.0  # a checking replica outside the wave may be this much slower than its slowest peer,
    check_margin_s: float = 0.005  # or this much (under it, a blob fetch to check here would cost more than waiting)


@dataclass
class PeerStats:
    """Per-peer data-plane statistics (for ``ekmesh chat``'s status line, peer choice and deadlines)."""

    round_trips: int = 0
    failures: int = 0
    total_rtt_s: float = 0.0
    ewma_rtt_s: float | None = None
    ewma_wait_s: float = 0.0  # round trip less the server's compute: network, queues, framing
    ewma_row_s: float = 0.0  # the server's compute per row of a frame
    server_compute_s: float = 0.0
    in_flight: int = 0
    down_until: float = 0.0
    waits: Waits = field(default_factory=Waits)  # recent waits for this peer's answers: how long to poll

    @property
    def mean_rtt_s(self) -> float:
        return self.total_rtt_s / self.round_trips if self.round_trips else 0.0

    def measured(self, rtt_s: float, compute_s: float, rows: int) -> None:
        """A good answer to a frame of ``rows`` rows came back after ``rtt_s``; the server computed ``compute_s``."""
        compute = min(compute_s, rtt_s)
        self.round_trips += 1
        self.total_rtt_s += rtt_s
        self.server_compute_s += compute_s
        self.down_until = 0.0
        if self.ewma_rtt_s is None:
            self.ewma_rtt_s, self.ewma_wait_s, self.ewma_row_s = rtt_s, rtt_s - compute, compute / rows
        else:
            self.ewma_rtt_s = 0.8 * self.ewma_rtt_s + 0.2 * rtt_s
            self.ewma_wait_s = 0.8 * self.ewma_wait_s + 0.2 * (rtt_s - compute)
            self.ewma_row_s = 0.8 * self.ewma_row_s + 0.2 * compute / rows

    def deadline_s(self, rows: int, t: RemoteTimeouts, replicated: bool = True) -> float:
        """How long an answer to a frame of ``rows`` rows is waited for (module docstring); ``replicated``: another
        holder could take the frame's pairs (else the floor is ``fallback_floor_s``)."""
        if self.ewma_rtt_s is None:
            return t.first_s
        floor = t.floor_s if replicated else t.fallback_floor_s
        return max(floor, t.rtt_multiple * (self.ewma_wait_s + rows * self.ewma_row_s))


@dataclass
class HostSplit:
    """Cumulative ns and counts of an attention host's data-plane round trips (frames with a good answer only).

    rtt: from the start of the frame's device-to-host copy (or its encoding, on a CPU) to its answer decoded; it
    contains copy_out, encode, send and wait, and, between send and wait, whatever the host did meanwhile (its own
    experts: ``local_ns``). copy_out: the rows sent, device to host (0 on a CPU host). encode: building the REQUEST
    frame (framing). send: ``sendall`` of the frame (TLS encryption + socket write). wait: blocked for the answer
    (network, the server's whole time, TLS decryption) including decode: the answer's header and body decoded
    (framing). copy_in: answers moved host to device (after the round trip; 0 on a CPU host). local: this host's
    own experts computed while frames were out (on CUDA: the time to launch them), over ``local_calls`` calls."""

    frames: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    rtt_ns: int = 0
    copy_out_ns: int = 0
    encode_ns: int = 0
    send_ns: int = 0
    wait_ns: int = 0
    decode_ns: int = 0
    copy_in_ns: int = 0
    copies_in: int = 0
    local_ns: int = 0
    local_calls: int = 0
