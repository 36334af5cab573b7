"""Terminal views: pure functions from snapshots (plain dicts) to rich renderables. No torch, no libp2p."""
