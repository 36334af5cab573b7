"""Blob exchange, fetching: several blobs (small and >= 8 MiB) from 2-3 serving stores, a ranged parallel fetch of
one large blob from 3 holders, a corrupt holder detected / reported / banned, resume after a server process is
SIGKILLed mid-transfer, BUSY and NOT_FOUND handled, the source fallback, and resume records that never go back in
time. Real sockets on 127.0.0.1 port 0, real stores in tmp_path, pinned mutual TLS."""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from ekmesh.core.errors import BlobUnavailableError, ShardError
from ekmesh.core.tls import TlsIdentity, make_context
from ekmesh.shard.blobserver import BlobListener, BlobServer, ServerLimits
from ekmesh.shard.exchange import Status, TlsDialer
from ekmesh.shard.fetch.fetcher import FetchConfig, Fetcher, source_fallback
from ekmesh.shard.store import Store
from tests.shard.blob_proc import BlobProc

MiB = 1 << 20
NAMES = ("client", "s1", "s2", "s3", "evil", "stranger")
DEFAULT_LIMITS, DEFAULT_CONFIG = ServerLimits(), FetchConfig()


@pytest.fixture(scope="module")
def ids() -> dict[str, TlsIdentity]:
    return {n: TlsIdentity.generate(n) for n in NAMES}


class CorruptServer(BlobServer):
    """Serves one byte flipped in every data frame of the blobs in ``bad`` (a lying peer)."""

    bad: set[str] = set()

    def _fill(self, f: object, view: memoryview, blob_id: str, offset: int) -> int:
        n = super()._fill(f, view, blob_id, offset)
        if blob_id in self.bad and n:
            view[0] ^= 0xFF
        return n


class GatedServer(BlobServer):
    """Holds its first transfer until it has answered BUSY once, so a test sees BUSY without relying on timing."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.gate = threading.Event()

    def _fill(self, f: object, view: memoryview, blob_id: str, offset: int) -> int:
        assert self.gate.wait(10), "the client never sent a request beyond the cap"
        return super()._fill(f, view, blob_id, offset)

    def _reply(self, link, req, status, *a, **kw) -> None:  # type: ignore[no-untyped-def]
        super()._reply(link, req, status, *a, **kw)
        if status is Status.BUSY:
            self.gate.set()


class Mesh:
    """Blob servers on 127.0.0.1 port 0, each with its own store, and a client that pins them all."""

    def __init__(self, root: Path, ids: dict[str, TlsIdentity]) -> None:
        self.root, self.ids = root, ids
        self.pins = {n: i.fingerprint for n, i in ids.items() if n != "stranger"}
        self.addresses: dict[str, tuple[str, int]] = {}
        self.servers: dict[str, BlobServer] = {}
        self.stores: dict[str, Store] = {}
        self._stack = ExitStack()

    def serve(self, name: str, server_cls: type[BlobServer] = BlobServer,
              limits: ServerLimits = DEFAULT_LIMITS) -> Store:
        store = self.stores.get(name) or Store(self.root / name)
        self.stores[name] = store
        srv = server_cls(store, limits)
        lst = self._stack.enter_context(BlobListener(srv, make_context(self.ids[name], server=True),
                                                     self.pins.get))
        self.servers[name], self.addresses[name] = srv, lst.address
        return store

    def dialer(self, who: str = "client") -> TlsDialer:
        return TlsDialer(make_context(self.ids[who], server=False), self.pins.get, self.addresses.get)

    def fetcher(self, config: FetchConfig = DEFAULT_CONFIG, **kw: object) -> Fetcher:
        f = Fetcher(Store(self.root / "client"), self.dialer(), config, **kw)  # type: ignore[arg-type]
        self._stack.callback(f.close)
        return f

    def close(self) -> None:
        self._stack.close()


@contextmanager
def mesh(tmp_path: Path, ids: dict[str, TlsIdentity]) -> Iterator[Mesh]:
    m = Mesh(tmp_path, ids)
    try:
        yield m
    finally:
        m.close()


def put(store: Store, data: bytes) -> str:
    return store.put([data])


def blob(n: int, seed: int) -> bytes:
    return os.urandom(n) if seed < 0 else (bytes([seed % 251]) * 7 + os.urandom(n))[:n]


def assert_stored(store: Store, blob_id: str, data: bytes) -> None:
    assert store.verify(blob_id).read_bytes() == data
    assert not list((store.root / "tmp").glob("fetch-*")), "partial files left behind"


@pytest.mark.timeout(60)
def test_several_blobs_small_and_large_from_three_stores(tmp_path: Path, ids) -> None:
    with mesh(tmp_path, ids) as m:
        data = {i: blob(n, i) for i, n in enumerate([1, 70_000, 300_000, 2 * MiB, 8 * MiB, 13 * MiB + 5])}
        data[6] = b""
        holders: dict[str, list[str]] = {}
        for s in ("s1", "s2", "s3"):
            m.serve(s)
        bids = {}
        for i, d in data.items():
            who = [("s1", "s2", "s3")[k % 3] for k in (i, i + 1)]  # each blob on two of the three
            for s in who:
                bids[i] = put(m.stores[s], d)
            holders[bids[i]] = who
        f = m.fetcher(FetchConfig(range_size=4 * MiB))
        report = f.fetch(holders, timeout=30)
        for i, d in data.items():
            assert_stored(f.store, bids[i], d)
            assert report.stored[bids[i]] == "peers"
        assert len([p for p, n in report.received.items() if n]) == 3  # the work was spread over the holders
        assert f.fetch(holders).stored == {b: "present" for b in holders}  # idempotent, nothing re-fetched


@pytest.mark.timeout(60)
def test_ranged_parallel_fetch_of_one_large_blob_from_three_holders(tmp_path: Path, ids) -> None:
    with mesh(tmp_path, ids) as m:
        data = blob(24 * MiB + 123, -1)
        for s in ("s1", "s2", "s3"):
            bid = put(m.serve(s), data)
        f = m.fetcher(FetchConfig(range_size=2 * MiB, max_per_peer=2))
        report = f.fetch({bid: ["s1", "s2", "s3"]}, sizes={bid: len(data)}, timeout=30)
        assert_stored(f.store, bid, data)
        ranges = sorted((x.offset, x.offset + x.length) for s in ("s1", "s2", "s3")
                        for x in m.servers[s].served if x.status is Status.OK)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False)), "ranges overlap or leave gaps"
        assert all(report.received[s] > 0 for s in ("s1", "s2", "s3"))
        assert len(ranges) == 13


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [300_000, 20 * MiB], ids=["small", "ranged"])
def test_corrupt_holder_is_reported_banned_and_bypassed(tmp_path: Path, ids, size: int) -> None:
    with mesh(tmp_path, ids) as m:
        data = blob(size, 1)
        evil = m.serve("evil", CorruptServer)
        bid = put(evil, data)
        CorruptServer.bad = {bid}
        put(m.serve("s1"), data)
        put(m.serve("s2"), data)
        reported: list[tuple[str, str]] = []
        f = m.fetcher(FetchConfig(range_size=4 * MiB, ban_s=120), on_bad_peer=lambda p, b: reported.append((p, b)))
        report = f.fetch({bid: ["evil", "s1", "s2"]}, timeout=30)
        assert_stored(f.store, bid, data)
        assert reported == [("evil", bid)] and report.bad_peers == [("evil", bid)]
        assert 100 < f.banned()["evil"] <= 120
        assert not list((f.store.root / "quarantine").iterdir())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [300_000, 12 * MiB], ids=["small", "ranged"])
def test_only_a_corrupt_holder_fails_clearly_and_stores_nothing(tmp_path: Path, ids, size: int) -> None:
    with mesh(tmp_path, ids) as m:
        data = blob(size, 2)
        bid = put(m.serve("evil", CorruptServer), data)
        CorruptServer.bad = {bid}
        reported: list[str] = []
        f = m.fetcher(FetchConfig(range_size=4 * MiB), on_bad_peer=lambda p, b: reported.append(p))
        with pytest.raises(BlobUnavailableError, match="do not hash") as err:
            f.fetch({bid: ["evil"]}, timeout=30)
        assert isinstance(err.value, ShardError) and bid in err.value.failures
        assert reported == ["evil"] and not f.store.has(bid)
        assert not list((f.store.root / "tmp").glob("fetch-*.part"))
        asked = len(m.servers["evil"].served)
        with pytest.raises(BlobUnavailableError, match="no holder left"):  # still banned: not even asked again
            f.fetch({bid: ["evil"]}, timeout=30)
        assert len(m.servers["evil"].served) == asked


@pytest.mark.timeout(60)
def test_resume_after_the_server_process_is_killed_mid_transfer(tmp_path: Path, ids) -> None:
    with mesh(tmp_path, ids) as m:
        data = blob(40 * MiB, 3)
        src = Store(tmp_path / "proc")
        bid = put(src, data)
        proc = BlobProc(src.root, "s1", {"client": ids["client"].fingerprint})
        m.pins["s1"], m.addresses["s1"] = proc.fingerprint, proc.address
        got = [0]
        killed = threading.Event()

        def progress(b: str, peer: str, n: int) -> None:
            got[0] += n
            if got[0] >= 6 * MiB and not killed.is_set():
                proc.kill()  # waits until the process is gone
                killed.set()

        cfg = FetchConfig(split_at=64 * MiB, record_every=1 * MiB)
        try:
            f = m.fetcher(cfg, on_progress=progress)
            with pytest.raises(BlobUnavailableError, match="s1"):
                f.fetch({bid: ["s1"]}, timeout=30)
        finally:
            proc.close()
        assert killed.is_set() and not f.store.has(bid)
        kept = got[0]
        assert 6 * MiB <= kept < len(data)

        server = m.serve("s2")
        put(server, data)
        f2 = m.fetcher(cfg)
        report = f2.fetch({bid: ["s2"]}, timeout=30)
        assert_stored(f2.store, bid, data)
        asked = [(x.offset, x.length) for x in m.servers["s2"].served]
        assert asked == [(kept, len(data) - kept)], "the second fetch did not continue where the first stopped"
        assert report.received == {"s2": len(data) - kept}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("holders", [["s1"], ["s1", "s2"]], ids=["one-holder-waits", "other-holder"])
def test_busy_holders_are_waited_for_or_bypassed(tmp_path: Path, ids, holders: list[str]) -> None:
    with mesh(tmp_path, ids) as m:
        datas = [blob(3 * MiB, i) for i in range(8)]
        tight = ServerLimits(max_per_peer=1, busy_retry_ms=20)
        bids = []
        for s in holders:
            store = m.serve(s, GatedServer if s == "s1" else BlobServer, limits=tight)
            bids = [put(store, d) for d in datas]
        f = m.fetcher(FetchConfig(max_per_peer=4, max_total=8))
        report = f.fetch({b: holders for b in bids}, timeout=30)
        for b, d in zip(bids, datas, strict=True):
            assert_stored(f.store, b, d)
        statuses = [r[4] for r in report.requests]
        served = sorted(x.status.name for s in holders for x in m.servers[s].served)
        assert "BUSY" in statuses and statuses.count("OK") == len(bids), (str(Counter(statuses)), str(Counter(served)))
        if len(holders) == 2:
            assert report.received["s1"] > 0 and report.received["s2"] > 0


@pytest.mark.timeout(60)
def test_not_found_and_unreachable_holders_are_skipped(tmp_path: Path, ids) -> None:
    with mesh(tmp_path, ids) as m:
        data = blob(500_000, 4)
        m.serve("s1")  # does not have it
        bid = put(m.serve("s2"), data)
        m.addresses["s3"] = ("127.0.0.1", 9)  # nobody listens there
        f = m.fetcher()
        report = f.fetch({bid: ["s3", "s1", "s2"]}, timeout=30)
        assert_stored(f.store, bid, data)
        assert ("s1", bid, 0, 0, "NOT_FOUND") in report.requests
        missing = "blake3:" + "0" * 64
        with pytest.raises(BlobUnavailableError, match="NOT_FOUND") as err:
            f.fetch({missing: ["s1", "s2"]}, timeout=30)
        assert list(err.value.failures) == [missing]


@pytest.mark.timeout(120)
def test_fallback_rebuilds_blobs_from_the_manifest_source(tmp_path: Path, ids) -> None:
    from ekmesh.registry.imports import import_full
    from tests.shard.checkpoints import make_sharded

    ck = make_sharded(tmp_path / "ck")[0]
    res = import_full(str(ck), store=Store(tmp_path / "origin"))
    manifest = Store(tmp_path / "origin").load_manifest(res.model_id)
    wanted = sorted(manifest.blob_ids())[:4]
    with mesh(tmp_path, ids) as m:
        m.serve("s1")  # has none of them
        store = Store(tmp_path / "client")
        f = m.fetcher(fallback=source_fallback(store, manifest))
        report = f.fetch({b: ["s1"] for b in wanted}, sizes={b: manifest.size(b) for b in wanted}, timeout=60)
        assert report.stored == {b: "fallback" for b in wanted}
        for b in wanted:
            assert store.verify(b, manifest.size(b))


@pytest.mark.timeout(30)
def test_a_late_background_record_never_replaces_a_newer_one(tmp_path: Path) -> None:
    """The syncer records ranges after their data sync, so its snapshot can arrive after a transfer's own record:
    the newer record stays; and once the file is closed, nothing writes its record again."""
    import json

    from ekmesh.shard.fetch.partial import Partial

    part = Partial(Store(tmp_path / "s"), "blake3:" + "cd" * 32, 4 * MiB)
    part.mark(0, MiB)
    late = (part.done, part.version)  # what a background sync took before its fdatasync
    part.mark(MiB, 3 * MiB)
    part.save()  # a transfer's end
    part.save(*late)
    assert json.loads(part.rec.read_text())["done"] == [[0, 3 * MiB]]
    part.sync()  # a current snapshot: nothing newer to write
    assert json.loads(part.rec.read_text())["done"] == [[0, 3 * MiB]]
    part.mark(3 * MiB, 4 * MiB)
    part.close(keep=True)
    part.sync()
    part.save()
    assert json.loads(part.rec.read_text())["done"] == [[0, 3 * MiB]]  # as it was when the file closed
