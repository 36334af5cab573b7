"""Disk faults: the filesystem holding the store runs out of space (ENOSPC) during an import and during a blob fetch
(issue 16). A small tmpfs that the test mounts holds the store (root and mount(8) needed: without them these tests
fail with a message, they never skip).

- Import: a tiny checkpoint does not fit. The import fails with ``StoreFullError`` naming the store and what it was
  writing; nothing partial is left (no temp file anywhere in the store, every blob hashes to its name, every line of
  the import's journal is whole). The tmpfs is remounted larger and the same import completes: it skips the blobs
  stored before (their bytes are not read from the checkpoint again) and gives the model id of an import into an
  ample store. The tmpfs sizes vary so that the disk fills while writing different things (blob bytes, verified
  records, the journal, the manifest).
- Fetch: two real blob servers (pinned mutual TLS on 127.0.0.1 port 0) hold a small blob and a large one; the small
  one is fetched first and fits, then a fetch of both fails with ``StoreFullError`` naming the large blob and the
  store; nothing partial is left (no ``fetch-*`` file, no half blob); once the tmpfs is larger the same fetch
  completes, the small blob is not asked for again. Whole, and in ranges from both holders.
"""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest

from ekmesh.core.errors import ShardError, StoreFullError
from ekmesh.core.tls import TlsIdentity
from ekmesh.registry.imports import import_full
from ekmesh.shard.fetch.fetcher import FetchConfig, FetchReport
from ekmesh.shard.store import Store
from tests.diskfull import tmpfs
from tests.shard.test_exchange import blob, mesh, put
from tests.tiny_models import make_tiny

KiB = 1 << 10


def assert_nothing_partial(store: Store) -> None:
    """No temp or partial file anywhere in the store, every blob hashes to its name, every journal line is whole."""
    leftovers = [p for p in store.root.rglob("*") if p.is_file() and (p.parent.name == "tmp" or p.suffix == ".tmp")]
    assert not leftovers, f"partial files left in the store: {sorted(map(str, leftovers))}"
    for p in (store.root / "blobs" / "blake3").glob("*/*"):
        assert blake3.blake3(p.read_bytes()).hexdigest() == p.name, f"a half-written blob is visible: {p}"
    for journal in (store.root / "imports").glob("*.jsonl"):
        for line in journal.read_text().splitlines():
            json.loads(line)  # a torn line would lose the record appended after it


# the store's tmpfs in KiB: the import (23 blobs, ~190 KB; it fits in 352 KiB of tmpfs pages) fills it while
# appending to the journal (16), writing an expert's bytes (48), committing an expert (136), storing config.json
# (312), or writing the manifest (336)
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kib", [16, 48, 136, 312, 336])
def test_an_import_that_does_not_fit_fails_clearly_keeps_nothing_partial_and_resumes(tmp_path: Path,
                                                                                     kib: int) -> None:
    src = tmp_path / "ckpt"
    make_tiny("qwen3_moe", src)
    ample = import_full(str(src), store=Store(tmp_path / "ample"))
    with tmpfs(tmp_path / "fs", kib) as resize:
        store = Store(tmp_path / "fs" / "store")
        with pytest.raises(StoreFullError) as err:
            import_full(str(src), store=store)
        assert isinstance(err.value, ShardError) and err.value.where == str(store.root), err.value
        assert "no space left" in str(err.value) and str(store.root) in str(err.value), err.value
        assert_nothing_partial(store)
        recorded = {json.loads(line)["job"] for j in (store.root / "imports").glob("*.jsonl")
                    for line in j.read_text().splitlines()}

        resize(4096)
        again = import_full(str(src), store=store)
        assert again.model_id == ample.model_id and again.blobs == ample.blobs
        m = store.load_manifest(again.model_id)
        for bid in m.blob_ids():
            store.verify(bid, m.size(bid), rehash=True)
        # what the first run stored and recorded is not read from the checkpoint again
        assert again.skipped == len(recorded) and again.stored + again.skipped == ample.stored, (again, recorded)
        assert again.fetched < ample.fetched or not recorded
        assert_nothing_partial(store)


@pytest.fixture(scope="module")
def ids() -> dict[str, TlsIdentity]:
    return {n: TlsIdentity.generate(n) for n in ("client", "s1", "s2", "s3", "evil", "stranger")}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ranged", [False, True], ids=["whole", "ranges"])
def test_a_fetch_that_does_not_fit_fails_clearly_keeps_nothing_partial_and_resumes(tmp_path: Path, ids,
                                                                                   ranged: bool) -> None:
    cfg = FetchConfig(split_at=64 * KiB, range_size=64 * KiB, record_every=32 * KiB) if ranged \
        else FetchConfig(record_every=32 * KiB)
    with tmpfs(tmp_path / "client", 256) as resize, mesh(tmp_path, ids) as m:
        small, large = blob(16 * KiB, 3), blob(1024 * KiB, 4)
        for s in ("s1", "s2"):
            small_id = put(m.serve(s), small)
            large_id = put(m.stores[s], large)
        f = m.fetcher(cfg)
        assert f.fetch({small_id: ["s1", "s2"]}, timeout=30).stored == {small_id: "peers"}
        asked_small = sum(1 for s in ("s1", "s2") for x in m.servers[s].served if x.blob_id == small_id)

        holders = {small_id: ["s1", "s2"], large_id: ["s1", "s2"]}
        with pytest.raises(StoreFullError) as err:
            f.fetch(holders, timeout=30)
        assert err.value.where == str(f.store.root) and large_id in str(err.value), err.value
        assert isinstance(err.value.report, FetchReport) and err.value.report.stored == {small_id: "present"}
        assert not f.store.has(large_id) and f.store.verify(small_id).read_bytes() == small
        assert_nothing_partial(f.store)

        resize(4096)
        report = f.fetch(holders, timeout=30)
        assert report.stored == {small_id: "present", large_id: "peers"}
        assert f.store.verify(large_id, rehash=True).read_bytes() == large
        assert sum(1 for s in ("s1", "s2") for x in m.servers[s].served if x.blob_id == small_id) == asked_small
        if ranged:
            assert all(report.received.get(s, 0) > 0 for s in ("s1", "s2")), report.received
        assert_nothing_partial(f.store)
