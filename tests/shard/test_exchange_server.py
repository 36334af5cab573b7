"""Blob exchange, serving: answers on a raw authenticated link (OK with offset, NOT_FOUND, BAD_RANGE, BUSY),
malformed requests close only their own link, unauthenticated clients (plain TCP, unpinned certificate, wrong
server pin) get nothing, and both ends of a link send without Nagle's delay. Real sockets on 127.0.0.1 port 0."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import pytest

from ekmesh.core.errors import PeerClosedError, PeerError, PeerIdentityError
from ekmesh.core.tls import TlsIdentity, make_context
from ekmesh.shard.blobserver import ServerLimits
from ekmesh.shard.exchange import CHUNK, Link, Status, TlsDialer, client_link, get, server_link
from tests.shard.test_exchange import NAMES, GatedServer, blob, mesh, put

MiB = 1 << 20


@pytest.fixture(scope="module")
def ids() -> dict[str, TlsIdentity]:
    return {n: TlsIdentity.generate(n) for n in NAMES}


def read_body(link: Link, n: int) -> bytes:
    out, buf = bytearray(), memoryview(bytearray(CHUNK))
    while len(out) < n:
        out += buf[:link.recv_into(buf, 10)]
    return bytes(out)


@pytest.mark.timeout(30)
def test_answers_on_one_link(tmp_path: Path, ids) -> None:
    with mesh(tmp_path, ids) as m:
        data = blob(3 * MiB + 17, 1)
        bid = put(m.serve("s1"), data)
        link = m.dialer()("s1")
        try:
            a = get(link, bid, 1000, 0, 10)
            assert (a.status, a.size, a.length) == (Status.OK, len(data), len(data) - 1000)
            assert read_body(link, a.length) == data[1000:]
            a = get(link, bid, len(data) - 5, 100, 10)  # a range past the end is cut at the end
            assert (a.status, a.length) == (Status.OK, 5) and read_body(link, 5) == data[-5:]
            a = get(link, "blake3:" + "ab" * 32, 0, 0, 10)
            assert a.status is Status.NOT_FOUND and "not in the store" in a.message
            a = get(link, bid, len(data) + 1, 0, 10)
            assert (a.status, a.size) == (Status.BAD_RANGE, len(data))
            a = get(link, bid, 0, 10, 10)  # the link still serves after every refusal
            assert a.status is Status.OK and read_body(link, 10) == data[:10]
        finally:
            link.close()
        assert [s.status for s in m.servers["s1"].served] == [Status.OK, Status.OK, Status.NOT_FOUND,
                                                            Status.BAD_RANGE, Status.OK]


@pytest.mark.timeout(30)
def test_busy_beyond_the_per_peer_cap(tmp_path: Path, ids) -> None:
    with mesh(tmp_path, ids) as m:
        data = blob(2 * MiB, 2)
        bid = put(m.serve("s1", GatedServer, ServerLimits(max_per_peer=1, busy_retry_ms=50)), data)
        first, second = m.dialer()("s1"), m.dialer()("s1")
        try:
            a = get(first, bid, 0, 0, 10)  # holds the only slot (gated until a BUSY goes out)
            b = get(second, bid, 0, 0, 10)
            assert b.status is Status.BUSY and b.retry_s == 0.05
            assert read_body(first, a.length) == data
            b = get(second, bid, 0, 0, 10)
            assert b.status is Status.OK and read_body(second, b.length) == data
        finally:
            first.close()
            second.close()


REQ = struct.Struct("!BBHQQ")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("payload", [
    REQ.pack(9, 0, 4, 0, 0) + b"abcd",  # unknown op
    REQ.pack(1, 0, 7, 0, 0) + b"blake3:",  # not an id
    REQ.pack(1, 0, 99, 0, 0) + b"x",  # id length that does not match the frame
    b"\x01\x02",  # too short
    b"y" * 400,  # garbage
], ids=["op", "id", "idlen", "short", "garbage"])
def test_malformed_requests_close_only_their_link(tmp_path: Path, ids, payload: bytes, caplog) -> None:
    with mesh(tmp_path, ids) as m:
        data = blob(100_000, 3)
        bid = put(m.serve("s1"), data)
        bad, good = m.dialer()("s1"), m.dialer()("s1")
        try:
            bad.send(payload, 5)
            with pytest.raises(PeerClosedError):
                bad.recv(512, 10)
            a = get(good, bid, 0, 0, 10)
            assert a.status is Status.OK and read_body(good, a.length) == data
        finally:
            bad.close()
            good.close()
        assert "closing blob link of peer client" in caplog.text


@pytest.mark.timeout(30)
def test_oversized_frame_closes_the_link(tmp_path: Path, ids) -> None:
    with mesh(tmp_path, ids) as m:
        m.serve("s1")
        link = m.dialer()("s1")
        try:
            link.sock.sendall(struct.pack("!I", 1 << 30))  # a 1 GiB request frame: refused before allocating
            with pytest.raises(PeerClosedError):
                link.recv(512, 10)
        finally:
            link.close()


@pytest.mark.timeout(30)
def test_unauthenticated_clients_get_nothing(tmp_path: Path, ids) -> None:
    with mesh(tmp_path, ids) as m:
        data = blob(200_000, 4)
        bid = put(m.serve("s1"), data)
        # plain TCP speaking the request in the clear
        with socket.create_connection(m.addresses["s1"], timeout=10) as s:
            s.sendall(struct.pack("!I", REQ.size + 71) + REQ.pack(1, 0, 71, 0, 0) + bid.encode())
            got = b""
            try:
                while chunk := s.recv(65536):
                    got += chunk
            except ConnectionResetError:
                pass  # the server refused the handshake
            assert data[:64] not in got and len(got) < 100
        # a client whose certificate is not pinned by the server
        with pytest.raises(PeerError):
            link = m.dialer("stranger")("s1")
            get(link, bid, 0, 0, 10)
        # a server that is not the one pinned for the peer id we dial
        wrong = TlsDialer(make_context(ids["client"], server=False),
                          {**m.pins, "s1": ids["s2"].fingerprint}.get, m.addresses.get)
        with pytest.raises(PeerIdentityError):
            wrong("s1")
        assert not m.servers["s1"].served and m.servers["s1"].bytes_sent == 0


@pytest.mark.timeout(30)
def test_a_model_id_gets_its_checked_manifest(tmp_path: Path, ids) -> None:
    """Manifest spread: a GET of a model id answers the stored manifest, which hashes to that id; a manifest whose
    bytes were altered on disk is not served."""
    from ekmesh.shard.manifest import Manifest
    from tests.shard.test_store import _manifest

    with mesh(tmp_path, ids) as m:
        store = m.serve("s1")
        man = Manifest.build(_manifest())
        store.save_manifest(man)
        link = m.dialer()("s1")
        try:
            a = get(link, man.id, 0, 0, 10)
            assert a.status is Status.OK
            assert Manifest.parse(read_body(link, a.length), man.id) == man
            store.manifest_path(man.id).write_bytes(man.bytes().replace(b"{", b"{ ", 1))
            assert get(link, man.id, 0, 0, 10).status is Status.NOT_FOUND
        finally:
            link.close()


@pytest.mark.timeout(30)
def test_both_ends_of_a_link_send_without_nagle(ids) -> None:
    """Every message leaves in one ``sendall``; with Nagle's algorithm the small handshake and control messages
    waited for the peer's delayed ACK (~40 ms a handshake on Linux)."""
    pins = {n: i.fingerprint for n, i in ids.items()}.get
    with socket.create_server(("127.0.0.1", 0)) as lst:
        served: list[Link] = []

        def accept() -> None:
            raw, _ = lst.accept()
            served.append(server_link(raw, make_context(ids["s1"], server=True), pins, 10))

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        client = client_link(socket.create_connection(lst.getsockname(), timeout=10),
                             make_context(ids["client"], server=False), pins, "s1", 10)
        t.join(10)
        assert served, "the server end of the handshake did not finish"
        server = served[0]
        try:
            assert server.peer == "client"
            for link in (client, server):
                assert link.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            client.send(b"ping", 10)
            assert server.recv(16, 10) == b"ping"
            server.send(b"pong", 10)
            assert client.recv(16, 10) == b"pong"
        finally:
            client.close()
            server.close()
