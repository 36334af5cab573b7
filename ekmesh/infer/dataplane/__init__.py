"""The data plane: activations between an attention host and expert peers over direct TLS channels.

``frames`` (the bounded, validated wire format), ``channel`` (pinned mutual-TLS connections, one per peer pair),
``server`` (``ExpertServer``: serves held experts to many attention hosts) and ``remote`` (``RemoteExperts``: the
experts backend that dispatches to peers, fails over and falls back). Stdlib sockets + torch only: no libp2p,
no trio (identity and addresses come in as plain values and callables from the node).
"""
