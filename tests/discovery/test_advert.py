"""Adverts: signing, verification against the peer id's own key, bounds, and the compact expert bitmap."""

from __future__ import annotations

import base64
import json
import re

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from ekmesh.core.errors import ProtocolError
from ekmesh.core.ids import Endpoint, Fingerprint
from ekmesh.discovery.advert import Advert, Device, ModelReady, sign_advert, verify_advert


def make(kp, **kw) -> Advert:
    base = dict(peer_id=ID.from_pubkey(kp.public_key).to_base58(), incarnation=5, seq=7, name="n", version="0.1")
    return Advert(**{**base, **kw})


def test_roundtrip_keeps_every_field():
    kp = create_new_key_pair()
    ready = ModelReady((1, 49), 128, {1: frozenset({0, 5, 127}), 48: frozenset(range(128))})
    advert = make(kp, addrs=("/ip4/10.0.0.1/tcp/7733/p2p/x",), devices=(Device("cuda", "RTX", 24 << 30),),
                  memory_total=64 << 30, memory_free=10 << 30, speed=12.5, data_addr=Endpoint("10.0.0.1", 9000),
                  models={"m1": ready}, load=0.25)
    wire = sign_advert(advert, kp.private_key).to_wire()
    assert len(json.dumps(wire)) < 2500  # 48 layers x 128 experts stays small
    got = verify_advert(json.loads(json.dumps(wire))).advert
    assert got == advert
    assert got.models["m1"].count() == 3 + 128


def test_advert_signed_by_another_key_is_rejected():
    kp, other = create_new_key_pair(), create_new_key_pair()
    forged = sign_advert(make(kp), other.private_key)
    with pytest.raises(ProtocolError, match="not signed by that peer"):
        verify_advert(forged.to_wire())


def test_altered_advert_is_rejected():
    kp = create_new_key_pair()
    wire = sign_advert(make(kp), kp.private_key).to_wire()
    body = json.loads(base64.b64decode(wire["b"]))
    body["seq"] += 1
    wire["b"] = base64.b64encode(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).decode()
    with pytest.raises(ProtocolError):
        verify_advert(wire)


@pytest.mark.parametrize("mutate", [
    lambda o: o.update(state="zombie"),
    lambda o: o.update(addrs=["x"] * 100),
    lambda o: o.update(name="x" * 10_000),
    lambda o: o.update(seq=-1),
    lambda o: o.update(load=float("nan")),
    lambda o: o.update(models={"m": {"layers": [0, 1 << 20], "experts": 1 << 20, "ready": ""}}),
    lambda o: o.update(models={"m": {"layers": [0, 1], "experts": 4, "ready": base64.b64encode(b"\xff").decode()}}),
    lambda o: o.pop("peer_id"),
])
def test_malformed_adverts_are_rejected_before_use(mutate):
    kp = create_new_key_pair()
    obj = make(kp).to_json()
    mutate(obj)
    body = json.dumps(obj).encode()
    wire = {"b": base64.b64encode(body).decode(), "s": base64.b64encode(kp.private_key.sign(body)).decode()}
    with pytest.raises(ProtocolError):
        verify_advert(wire)


def test_garbage_is_a_protocol_error():
    for wire in (None, [], {"b": "!!", "s": ""}, {"b": "a" * 200_000, "s": ""}, {"b": "", "s": ""}):
        with pytest.raises(ProtocolError):
            verify_advert(wire)


def test_blob_exchange_fields_are_optional_and_round_trip():
    kp = create_new_key_pair()
    plain = sign_advert(make(kp), kp.private_key)
    assert b"blob_addr" not in plain.body and b"tls_fp" not in plain.body  # an advert without them is unchanged
    assert verify_advert(plain.to_wire()).advert.blob_addr is None
    fp = Fingerprint(bytes.fromhex("ab" * 32))
    signed = sign_advert(make(kp, blob_addr=Endpoint("127.0.0.1", 4242), tls_fp=fp), kp.private_key)
    assert b'"blob_addr":"127.0.0.1:4242"' in signed.body and b'"tls_fp":"' + b"ab" * 32 + b'"' in signed.body
    got = verify_advert(signed.to_wire()).advert
    assert (got.blob_addr, got.tls_fp) == (Endpoint("127.0.0.1", 4242), fp)
    assert isinstance(got.blob_addr, Endpoint) and isinstance(got.tls_fp, Fingerprint)
    with pytest.raises(ProtocolError):
        Advert.from_json({**make(kp).to_json(), "tls_fp": 7})


@pytest.mark.parametrize("field,value,message", [
    ("blob_addr", "127.0.0.1", "'blob_addr': '127.0.0.1' is not host:port"),
    ("blob_addr", "127.0.0.1:0", "'blob_addr': '127.0.0.1:0' is not host:port"),
    ("data_addr", ":9000", "'data_addr': ':9000' is not host:port"),
    ("data_addr", "h:99999", "'data_addr': 'h:99999' is not host:port"),
    ("tls_fp", "ab" * 31, "'tls_fp': 'abab"),
    ("tls_fp", "zz" * 32, "'tls_fp': 'zzzz"),
])
def test_endpoints_and_fingerprints_are_parsed_once_and_malformed_ones_refused(field, value, message):
    """An advert carries typed addresses and pins; one with a malformed address or fingerprint is refused whole."""
    kp = create_new_key_pair()
    with pytest.raises(ProtocolError, match=re.escape(message)):
        Advert.from_json({**make(kp).to_json(), field: value})
