"""Core: errors, typed ids and addresses, shared constants, paths, TLS identities, thread policy. Imports nothing
else of ekmesh, and no torch, libp2p or trio."""
