"""Identity persistence, the state root, mesh key derivation and the timeouts config."""

from __future__ import annotations

import os

import pytest

from ekmesh.core.errors import ConfigError
from ekmesh.core.paths import ekmesh_home
from ekmesh.discovery.config import MeshKey, MeshTimeouts
from ekmesh.discovery.host import split_peer_addr
from ekmesh.discovery.identity import load_or_create_identity, peer_id_of


def test_identity_is_created_private_and_stable(tmp_path):
    first = peer_id_of(load_or_create_identity(tmp_path))
    assert (tmp_path / "identity.key").stat().st_mode & 0o777 == 0o600
    assert peer_id_of(load_or_create_identity(tmp_path)) == first
    os.chmod(tmp_path / "identity.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_identity(tmp_path)
    os.chmod(tmp_path / "identity.key", 0o600)
    (tmp_path / "identity.key").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="malformed"):
        load_or_create_identity(tmp_path)


def test_ekmesh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EKMESH_HOME", str(tmp_path / "h"))
    assert ekmesh_home() == tmp_path / "h" and (tmp_path / "h").stat().st_mode & 0o777 == 0o700
    monkeypatch.delenv("EKMESH_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "x"))
    assert ekmesh_home() == tmp_path / "x" / "ekmesh"


def test_mesh_key_derivations_are_separate_and_public_parts_hide_the_key(tmp_path):
    k = MeshKey.from_options("s3cret", None)
    assert k.psk_hex and len(bytes.fromhex(k.psk_hex)) == 32
    assert len({k.psk_hex, k.rendezvous[4:], k.tag, k.key_id}) == 4
    assert "s3cret" not in k.rendezvous + k.tag
    assert MeshKey.from_options("other", None).rendezvous != k.rendezvous
    assert MeshKey.open().is_open and MeshKey.open().psk_hex is None
    (tmp_path / "key").write_text("s3cret\n")
    assert MeshKey.from_options(None, tmp_path / "key") == k
    with pytest.raises(ConfigError):
        MeshKey.from_options("a", tmp_path / "key")
    with pytest.raises(ConfigError):
        MeshKey.from_options(None, tmp_path / "missing")


def test_timeouts_are_validated():
    with pytest.raises(ConfigError):
        MeshTimeouts(connect_timeout=0)
    with pytest.raises(ConfigError):
        MeshTimeouts(advert_interval=5, down_after=2)


def test_peer_addresses_need_a_peer_id():
    with pytest.raises(ConfigError, match="/p2p/"):
        split_peer_addr("/ip4/127.0.0.1/tcp/7733")
    with pytest.raises(ConfigError):
        split_peer_addr("not an address")
