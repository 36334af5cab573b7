"""Blob exchange, the client. Modules, each importing only those listed before it:

- ``config``: ``FetchConfig`` (caps, sizes, deadlines) and ``FetchReport`` (what one fetch call did);
- ``partial``: ``Partial``, the ``.part`` file and resume record of one blob being fetched;
- ``peers``: ``PeerSlots``, the per-peer state shared by all fetch calls (transfer slots, BUSY hold-backs, bans,
  idle links, ``dial``) under one condition variable;
- ``run``: ``Job`` and ``Run``, one fetch call's scheduler over worker threads;
- ``fetcher``: ``Fetcher`` (and its behaviour, in its docstring) and ``source_fallback``.
"""
