"""The membership view as a state machine, driven by a fake clock."""

from __future__ import annotations

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from ekmesh.discovery.advert import Advert, sign_advert
from ekmesh.discovery.config import MeshTimeouts
from ekmesh.discovery.view import MeshView

T = MeshTimeouts(down_after=5.0, ping_failures=2, forget_after=60.0)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def signed(kp, inc=1, seq=1, state="up", name="p"):
    pid = ID.from_pubkey(kp.public_key).to_base58()
    return sign_advert(Advert(peer_id=pid, incarnation=inc, seq=seq, name=name, version="v", state=state),
                       kp.private_key)


def test_join_stale_down_back_up_leave_restart_forget():
    clock = Clock()
    me, peer = create_new_key_pair(), create_new_key_pair()
    view = MeshView(signed(me, name="me"), T, clock)
    pid = signed(peer).advert.peer_id
    assert [e.kind for e in view.offer(signed(peer, seq=1))] == ["joined"]
    assert view.offer(signed(peer, seq=1)) == []  # not newer: ignored
    clock.now += 4
    view.offer(signed(peer, seq=2))
    clock.now += 4
    assert view.tick() == []
    clock.now += 2
    assert [e.kind for e in view.tick()] == ["down"]
    assert pid not in view.digest() and view.newer_than({}) == [view.get(view.self_id).signed]
    assert [e.kind for e in view.offer(signed(peer, seq=3))] == ["joined"]
    assert [e.kind for e in view.offer(signed(peer, seq=4, state="left"))] == ["left"]
    assert view.offer(signed(peer, seq=3)) == []  # a replayed older advert cannot undo the leave
    assert [e.kind for e in view.offer(signed(peer, inc=2, seq=1))] == ["joined"]  # restarted
    view.offer(signed(peer, inc=2, seq=2, state="left"))
    clock.now += 61
    view.tick()
    assert view.get(pid) is None


def test_failed_pings_mark_down_and_success_resets():
    clock = Clock()
    me, peer = create_new_key_pair(), create_new_key_pair()
    view = MeshView(signed(me), T, clock)
    pid = signed(peer).advert.peer_id
    view.offer(signed(peer))
    assert view.ping_failed(pid, "refused") == []
    view.ping_ok(pid, 1.5)
    assert view.ping_failed(pid, "refused") == []
    assert [e.kind for e in view.ping_failed(pid, "refused")] == ["down"]
    assert view.get(pid).state == "down" and "refused" in view.get(pid).reason


def test_own_adverts_relayed_back_are_ignored():
    me = create_new_key_pair()
    view = MeshView(signed(me, seq=5), T, Clock())
    assert view.offer(signed(me, seq=99)) == []
    assert view.get(view.self_id).state == "self"
    assert view.newer_than({view.self_id: [1, 5]}) == []
