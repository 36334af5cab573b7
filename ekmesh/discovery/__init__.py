"""The mesh layer: identity, the Noise-only libp2p host, discovery (``--peer``, mDNS, Kademlia rendezvous),
membership (signed adverts, failure detection) and the local control endpoint. No torch, ever.

This package's ``__init__`` imports nothing, so importing a pure submodule (``snapshot``, ``config``) stays cheap.
"""
