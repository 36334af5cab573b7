"""Configuration of the mesh layer: every network deadline and period, and the mesh key.

``MeshTimeouts`` is the one place where the mesh layer's waits get their deadlines: no network wait in
``ekmesh.discovery`` or ``ekmesh.node.node`` uses a number that does not come from it.

``MeshKey`` turns the user's ``--mesh-key`` secret into three unrelated values with domain-separated hashes:
the libp2p private-network key (``psk``; a peer without it cannot even finish a handshake), a public rendezvous
key for the DHT, and a public mesh tag for mDNS records so that nodes skip LAN peers of other meshes. The public
values never reveal the secret (but, as with any password, a weak key can be guessed offline from them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ekmesh.core.errors import ConfigError

"""The TCP port ``ekmesh join`` listens on by default; a free port is used instead when it is taken."""


@dataclass(frozen=True)
class MeshTimeouts:
    """Deadlines (``*_timeout``, seconds) and periods (``*_interval``) of the mesh layer.

    Failure detection: a peer is marked down when no fresh advert of it arrived for ``down_after`` seconds, or
    when ``ping_failures`` consecutive pings/syncs to it failed (a killed peer: about
    ``ping_failures * advert_interval`` plus the connect deadline).
    """

    connect_timeout: float = 4.0
    """One dial (TCP + Noise + yamux). A wrong mesh key only shows as this deadline passing."""
    stream_timeout: float = 3.0
    """Open a stream, send a request, read the answer."""
    ping_timeout: float = 2.0
    """One libp2p ping round trip, including opening its stream."""
    advert_interval: float = 1.0
    """How often each node refreshes its advert and syncs/pings every peer it is connected to."""
    down_after: float = 10.0
    """A peer whose adverts stop for this long is marked down."""
    ping_failures: int = 2
    """This many consecutive failed pings/syncs mark a peer down at once."""
    leave_timeout: float = 1.5
    """How long a clean shutdown waits for its leave announcements to be delivered."""
    redial_interval: float = 2.0
    """First wait before dialing a down or unreachable peer again (doubled per failure)."""
    redial_max_interval: float = 30.0
    """Longest wait between dials to a down peer."""
    forget_after: float = 600.0
    """A peer that is down or left for this long is dropped from the view."""
    rendezvous_interval: float = 10.0
    """How often the node re-announces itself under the DHT rendezvous key and looks for others there."""
    dht_timeout: float = 5.0
    """One DHT provide or find-providers query."""
    mdns_timeout: float = 3.0
    """Resolve one mDNS service record."""
    control_timeout: float = 5.0
    """One request to the local control endpoint (both ends)."""
    relay_refresh_interval: float = 300.0
    """How often a node renews its reservation on each relay (at once when its connection to the relay changed);
    also the wait before asking again a relay that refused."""

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not value > 0:
                raise ConfigError(f"timeout {name} must be positive, got {value!r}")
        if self.down_after <= self.advert_interval:
            raise ConfigError(
                f"down_after ({self.down_after}s) must be longer than advert_interval ({self.advert_interval}s)"
            )


def _derive(domain: str, secret: bytes) -> bytes:
    return hashlib.sha256(b"ekmesh/" + domain.encode() + b"\x00" + secret).digest()


@dataclass(frozen=True)
class MeshKey:
    """What a mesh key (or its absence: an open mesh) means to the network layer."""

    secret: bytes | None

    @classmethod
    def open(cls) -> MeshKey:
        return cls(None)

    @classmethod
    def from_options(cls, key: str | None, key_file: str | Path | None) -> MeshKey:
        """Build from ``--mesh-key`` / ``--mesh-key-file``; neither means an open mesh."""
        if key is not None and key_file is not None:
            raise ConfigError("give either --mesh-key or --mesh-key-file, not both")
        if key_file is not None:
            try:
                raw = Path(key_file).expanduser().read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read mesh key file {key_file}: {exc.strerror}") from exc
            secret = raw.strip()
            if not secret:
                raise ConfigError(f"mesh key file {key_file} is empty")
            return cls(secret)
        if key is not None:
            if not key:
                raise ConfigError("--mesh-key must not be empty")
            return cls(key.encode())
        return cls(None)

    @property
    def is_open(self) -> bool:
        return self.secret is None

    @property
    def psk_hex(self) -> str | None:
        """The 32-byte libp2p private-network key as hex, or None for an open mesh."""
        return None if self.secret is None else _derive("psk", self.secret).hex()

    @property
    def key_id(self) -> str | None:
        """A short public fingerprint of the key, shown by ``status`` so users can compare keys."""
        return None if self.secret is None else _derive("key-id", self.secret).hex()[:12]

    @property
    def rendezvous(self) -> str:
        """The DHT key under which members of this mesh announce themselves (a sha2-256 multihash, hex)."""
        secret = self.secret if self.secret is not None else b"open"
        return "1220" + _derive("rendezvous", secret).hex()

    @property
    def tag(self) -> str:
        """A short public tag in mDNS records: nodes ignore LAN peers whose tag differs."""
        secret = self.secret if self.secret is not None else b"open"
        return _derive("mdns-tag", secret).hex()[:16]
