"""Model names in adverts: signed, bounded and validated like every advert field; the mesh's name table, its
conflicts, and the names the status snapshot shows."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from ekmesh.core.errors import AmbiguousModelNameError, ProtocolError
from ekmesh.discovery.advert import DOMAIN, MAX_NAME, MAX_NAMES, Advert, ModelReady, sign_advert, verify_advert
from ekmesh.discovery.config import MeshTimeouts
from ekmesh.discovery.names import MeshNames
from ekmesh.discovery.snapshot import build_snapshot
from ekmesh.discovery.view import MeshView

pytestmark = pytest.mark.timeout(30)
X = "blake3:" + "9063ab" + "0" * 58
Y = "blake3:" + "77aa01" + "1" * 58


def make(kp, **kw) -> Advert:
    base = dict(peer_id=ID.from_pubkey(kp.public_key).to_base58(), incarnation=5, seq=7, name="n", version="0.1")
    return Advert(**{**base, **kw})


def signed_wire(kp, obj) -> dict[str, str]:
    """``obj`` signed as its peer would sign it: only its content can make it fail."""
    body = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return {"b": base64.b64encode(body).decode(), "s": base64.b64encode(kp.private_key.sign(DOMAIN + body)).decode()}


def test_names_travel_signed_and_are_absent_when_unset():
    kp = create_new_key_pair()
    plain = sign_advert(make(kp), kp.private_key)
    assert b"names" not in plain.body  # the adverts of nodes that serve no named model are unchanged
    advert = make(kp, names={"tinyds": X, "Qwen/Qwen3-30B-A3B": X})
    got = verify_advert(json.loads(json.dumps(sign_advert(advert, kp.private_key).to_wire()))).advert
    assert got == advert and got.names == {"tinyds": X, "Qwen/Qwen3-30B-A3B": X}


def test_a_forged_name_is_rejected():
    """A relay that adds (or changes) a name in someone's advert breaks its signature."""
    kp = create_new_key_pair()
    wire = sign_advert(make(kp, names={"tinyds": X}), kp.private_key).to_wire()
    assert verify_advert(wire).advert.names == {"tinyds": X}
    body = json.loads(base64.b64decode(wire["b"]))
    body["names"]["tinyds"] = Y  # the same name, pointed at another model
    wire["b"] = base64.b64encode(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).decode()
    with pytest.raises(ProtocolError, match="not signed by that peer"):
        verify_advert(wire)


@pytest.mark.parametrize("names,message", [
    ({"blake3:abc": X}, "'blake3:abc' is not a model name"),  # a name must never look like a model id
    ({"two words": X}, "'two words' is not a model name"),
    ({"a/b/c": X}, "'a/b/c' is not a model name"),
    ({"-dash": X}, "'-dash' is not a model name"),
    ({"": X}, "'' is not a model name"),
    ({"x" * (MAX_NAME + 1): X}, "is not a model name"),
    ({f"m{i}": X for i in range(MAX_NAMES + 1)}, f"at most {MAX_NAMES} entries"),
    ({"tinyds": "not-an-id"}, "'tinyds' must name a model id"),
    ({"tinyds": 7}, "'tinyds' must name a model id"),
    (["tinyds"], "must be an object"),
])
def test_malformed_names_reject_the_advert_whole(names, message):
    kp = create_new_key_pair()
    obj = {**make(kp).to_json(), "names": names}
    with pytest.raises(ProtocolError, match=re.escape(message)):
        verify_advert(signed_wire(kp, obj))


def test_the_name_table_resolves_names_ids_and_prefixes_and_refuses_a_conflict():
    a, b, c = (make(create_new_key_pair(), name=n) for n in ("alpha", "bravo", "charlie"))
    a = replace(a, names={"tinyds": X, "org/tiny": X})
    b = replace(b, names={"tinyds": Y}, models={Y: ModelReady((0, 1), 2)})
    c = replace(c, names={"tinyds": X})
    names = MeshNames.of([a, c])
    assert names.resolve("tinyds") == X and names.resolve("org/tiny") == X
    assert names.resolve(X) == X and names.resolve("9063ab00") == X and names.resolve("blake3:9063ab00") == X
    assert names.resolve("nosuch") is None and names.resolve("9063") is None  # too short for a prefix
    assert names.table["tinyds"] == {X: tuple(sorted([f"alpha ({a.peer_id})", f"charlie ({c.peer_id})"]))}
    assert names.names_of(X) == ["org/tiny", "tinyds"] and names.names_of(Y) == []

    both = MeshNames.of([a, b, c])
    assert both.resolve("org/tiny") == X and both.resolve(Y) == Y  # an id stays unambiguous
    with pytest.raises(AmbiguousModelNameError) as err:
        both.resolve("tinyds")
    msg = str(err.value)
    for expected in (X, Y, a.peer_id, b.peer_id, c.peer_id, "alpha", "bravo", "charlie"):
        assert expected in msg, msg
    assert err.value.models == {X: sorted([f"alpha ({a.peer_id})", f"charlie ({c.peer_id})"]),
                                Y: [f"bravo ({b.peer_id})"]}


def test_the_snapshot_names_each_model_by_what_live_peers_advertise():
    me, other = create_new_key_pair(), create_new_key_pair()
    grid = ModelReady((0, 2), 2, {0: frozenset({0, 1})})
    view = MeshView(sign_advert(make(me, name="me", models={X: grid}), me.private_key), MeshTimeouts())
    view.offer(sign_advert(make(other, name="other", models={X: grid}, names={"tinyds": X}), other.private_key))
    snap = build_snapshot(view, [], True, None)
    assert snap["models"][X]["names"] == ["tinyds"]
    assert snap["models"][X]["per_peer"]  # the shard map itself is unchanged
