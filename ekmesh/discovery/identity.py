"""The node's persistent identity: one Ed25519 key pair under the state root.

The key is made on first run and written atomically to ``<home>/identity.key`` (libp2p protobuf encoding,
mode 0600); the peer id derives from its public key, so it is stable across restarts. A key file that is
unreadable, malformed, not Ed25519, or readable by others is an error, never silently replaced: replacing it
would change the node's identity.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from ekmesh.core.errors import ConfigError

KEY_FILE = "identity.key"
_MAX_KEY_FILE = 4096


def load_or_create_identity(home: Path) -> KeyPair:
    """Return the key pair stored under ``home``, creating it on first use."""
    path = home / KEY_FILE
    if path.exists():
        return _load(path)
    key_pair = create_new_key_pair()
    data = key_pair.private_key.serialize()
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link() fails if another process created the key meanwhile: then that key wins.
        os.link(tmp, path)
    except FileExistsError:
        return _load(path)
    finally:
        tmp.unlink()
    return key_pair


def _load(path: Path) -> KeyPair:
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"identity key {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                f"run `chmod 600 {path}`"
            )
        if st.st_size > _MAX_KEY_FILE:
            raise ConfigError(f"identity key {path} is {st.st_size} bytes, not a key")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read identity key {path}: {exc.strerror}") from exc
    try:
        private_key = deserialize_private_key(data)
    except Exception as exc:  # protobuf and nacl raise assorted types for malformed bytes
        raise ConfigError(f"identity key {path} is malformed: {exc}") from exc
    if private_key.get_type() != KeyType.Ed25519:
        raise ConfigError(f"identity key {path} is {private_key.get_type().name}, ekmesh needs Ed25519")
    return KeyPair(private_key, private_key.get_public_key())


def peer_id_of(key_pair: KeyPair) -> ID:
    return ID.from_pubkey(key_pair.public_key)
