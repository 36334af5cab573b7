"""Names and numbers that several parts of ekmesh must agree on, defined once.

A path or port written out in two places drifts; every user of these imports them from here.
"""

from __future__ import annotations

P2P_PORT = 7733
"""The libp2p listen port a node tries first (a free one if it is taken)."""

API_PORT = 7734
"""The OpenAI-compatible API's port on 127.0.0.1 (a free one if it is taken)."""

STATUS_PATH = "/ekmesh/status"
"""The local control endpoint's path that answers a node's status snapshot (``ekmesh status --json``)."""

SPECULATIVE = "ngram"
"""How an attention host decodes by default (``ekmesh join --speculative``; a request may choose another): prompt
lookup drafts, whose length adapts to what they save (``infer/speculative.py``; measured in docs/BENCHMARKS.md)."""

SPECULATIVE_MODES = ("off", "ngram", "draft")
"""``--speculative`` and the API's ``speculative`` field (``infer/speculative.MODES``)."""

MAX_PENALTY = 2.0
"""OpenAI's bound on ``presence_penalty`` and ``frequency_penalty``: each in [-2, 2] (``infer/sampling.py``)."""

VERIFY_FRACTION = 0.05
"""The default fraction of remote (token, expert) results an attention host recomputes (``ekmesh join --verify``;
why this value, as measured: ``infer/dataplane/verify.py``)"""
