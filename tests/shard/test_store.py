"""Store and manifests: atomic verified writes, verify-once, quarantine of tampered or truncated blobs, manifests
refused for bad JSON / schema / hash, aliases, gc."""

from __future__ import annotations

import json

import blake3
import pytest

from ekmesh.core.errors import BlobHashMismatchError, ManifestError, ShardMissingError
from ekmesh.shard.manifest import Manifest, canonical
from ekmesh.shard.store import Store

BID = "blake3:" + blake3.blake3(b"x").hexdigest()


def _manifest(config_extra: int = 0) -> dict:
    cfg = "blake3:" + blake3.blake3(b"{}").hexdigest()
    return {"schema": 1, "architecture": "X", "config": {"n": config_extra}, "dtype": None, "quantization": None,
            "source": {"kind": "dir", "path": "/m/tiny"},
            "tensors": {"w": {"file": "a.safetensors", "range": [8, 16], "dtype": "F32", "shape": [2]}},
            "dense": {"embed": BID}, "experts": [None], "files": {"config.json": cfg},
            "blobs": {BID: {"size": 1, "keys": ["w"]}, cfg: {"size": 2, "file": "config.json"}},
            "sizes": {"dense": 1, "experts": 0, "files": 2, "total": 3}}


def test_put_is_atomic_verified_and_content_addressed(tmp_path):
    s = Store()
    bid = s.put([b"hello ", b"world"])
    assert bid == "blake3:" + blake3.blake3(b"hello world").hexdigest()
    assert s.blob_path(bid).read_bytes() == b"hello world"
    assert list((s.root / "tmp").iterdir()) == []
    assert s.verify(bid) == s.blob_path(bid)
    with pytest.raises(BlobHashMismatchError, match=BID):
        s.put([b"not x"], expected_id=BID)
    assert not s.has(BID) and list((s.root / "tmp").iterdir()) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_blob_is_quarantined_and_named(damage):
    s = Store()
    bid = s.put([bytes(range(256)) * 4])
    s.verify(bid)  # recorded as verified
    p = s.blob_path(bid)
    data = bytearray(p.read_bytes())
    if damage == "flip":
        data[500] ^= 0x01
    else:
        data = data[:-1]
    p.write_bytes(bytes(data))
    with pytest.raises(BlobHashMismatchError) as ei:
        s.verify(bid)
    assert bid in str(ei.value) and ei.value.blob_id == bid
    assert not p.exists() and len(list((s.root / "quarantine").iterdir())) == 1
    with pytest.raises(ShardMissingError, match=bid):
        s.verify(bid)


def test_manifest_roundtrip_id_alias_and_gc():
    s = Store()
    m = Manifest.build(_manifest())
    assert m.id == "blake3:" + blake3.blake3(canonical(m.data)).hexdigest()
    s.save_manifest(m)
    s.set_alias("tiny", m.id)
    assert s.resolve("tiny") == m.id == s.resolve(m.id) == s.resolve(m.id[7:20])
    assert s.load_manifest(m.id).data == m.data
    keep = s.put([b"x"])
    drop = s.put([b"unreferenced"])
    res = s.gc()
    assert (res.blobs, res.bytes) == (1, len(b"unreferenced"))
    assert s.has(keep) and not s.has(drop)
    s.remove_model(m.id)
    assert s.aliases() == {} and s.gc().blobs == 1
    with pytest.raises(ShardMissingError, match="not a model id or alias"):
        s.resolve("tiny")


def test_corrupt_manifests_are_refused_with_the_field_named():
    s = Store()
    m = Manifest.build(_manifest())
    path = s.root / "manifests" / f"{m.id[7:]}.json"
    s.save_manifest(m)
    path.write_bytes(b"{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        s.load_manifest(m.id)
    path.write_bytes(canonical({**m.data, "schema": 2}))
    with pytest.raises(ManifestError, match="'schema' must be 1"):
        s.load_manifest(m.id)
    path.write_bytes(canonical(_manifest(config_extra=1)))  # valid, but not the bytes of this id
    with pytest.raises(ManifestError, match="hash to .* not to its id"):
        s.load_manifest(m.id)
    path.write_bytes(json.dumps(m.data, indent=1).encode())  # same content, not canonical bytes
    with pytest.raises(ManifestError):
        s.load_manifest(m.id)
    for field, value, msg in [("dense", {"embed": "sha256:00"}, "dense.embed"),
                              ("experts", [[BID, "blake3:" + "0" * 64]], r"experts\[0\]\[1\]"),
                              ("source", {"kind": "ftp"}, "source.kind"), ("architecture", 3, "architecture")]:
        with pytest.raises(ManifestError, match=msg):
            Manifest.build({**_manifest(), field: value})
    bad = _manifest()
    del bad["sizes"]
    with pytest.raises(ManifestError, match="'sizes' is missing"):
        Manifest.build(bad)


def test_threads_of_one_process_save_manifests_and_aliases_at_once(tmp_path):
    """Writes of one process's threads do not share a temp file: before, the temp name was the pid alone, so one
    thread's rename took the other's file away (FileNotFoundError, seen killing a node)."""
    import threading

    s = Store(tmp_path / "store")
    m = Manifest.build(_manifest())
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        start.wait()
        try:
            for _ in range(200):
                s.save_manifest(m)
                s.set_alias(f"a{i}", m.id)
        except BaseException as exc:  # noqa: BLE001 (collected and re-raised by the test)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert s.load_manifest(m.id).data == m.data
    assert s.aliases() == {f"a{i}": m.id for i in range(4)}  # no thread's alias lost
    assert not list((tmp_path / "store").rglob("*.tmp"))
