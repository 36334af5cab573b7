"""Import through a hub stand-in (a real HTTP server on 127.0.0.1 port 0, used via HF_ENDPOINT): a full import works
and matches the directory import's blobs; a partial import of 25% of the experts fetches no more than the dense
part + 1.02 x those experts' bytes, counted by the server; a server that ignores Range is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ekmesh.core.errors import ShardError
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.generate import Generator
from ekmesh.infer.loader import load_all, load_dense, load_experts
from ekmesh.registry.imports import import_full, import_partial
from ekmesh.registry.lookup import open_checkpoint
from ekmesh.shard.blobfmt import parts_for, payload_size
from ekmesh.shard.importer import parse_experts
from ekmesh.shard.manifest import Manifest
from ekmesh.shard.source import TensorEntry
from ekmesh.shard.store import Store
from tests.shard.checkpoints import make_sharded
from tests.shard.hubstub import HubStub

REPO = "tiny-org/tiny-moe"


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 32 experts per MoE layer so that 25% is a real subset and experts dominate the bytes
    return make_sharded(tmp_path_factory.mktemp("hub"), num_experts=32)[0]


def payload(m: Manifest, blob_id: str) -> int:
    """Source bytes a blob is made of (what a range fetch of it costs); file blobs: the file's size."""
    info = m.data["blobs"][blob_id]
    if "file" in info:
        return int(info["size"])
    tensors = {n: TensorEntry(t["file"], *t["range"], t["dtype"], tuple(t["shape"]))
               for n, t in m.data["tensors"].items()}
    return payload_size(parts_for(info["keys"], tensors))


def test_full_then_partial_import_from_the_hub(ckpt_dir: Path, tmp_path: Path, monkeypatch) -> None:
    with HubStub({REPO: ckpt_dir}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        full = import_full(REPO)
        assert full.alias == REPO and full.experts_present == full.experts_total == 64
        assert hub.file_bytes == full.fetched
        m = Store().load_manifest(full.model_id)
        assert m.data["source"] == {"kind": "hub", "repo": REPO, "revision": hub.sha}
        want = Generator(*load_all(ckpt_dir)[1:]).logits([1, 2, 3, 4])
        assert torch.equal(Generator(*load_all(open_checkpoint(REPO))[1:]).logits([1, 2, 3, 4]), want)
        # Same blobs as a directory import: only the manifest's source differs.
        local = Store().load_manifest(import_full(str(ckpt_dir)).model_id)
        assert local.blob_ids() == m.blob_ids() and local.id != m.id

        # A peer with only the manifest imports 25% of the experts.
        monkeypatch.setenv("EKMESH_HOME", str(tmp_path / "peer"))
        peer = Store()
        (peer.root / "manifests" / f"{m.id[7:]}.json").write_bytes(m.bytes())
        hub.reset()
        part = import_partial(REPO, "0.25")
        chosen = parse_experts("0.25", m)
        assert part.experts_present == len(chosen) == 16
        dense = sum(payload(m, b) for b in set(m.dense_ids().values()) | set(m.file_ids().values()))
        experts = sum(payload(m, m.expert_ids()[a]) for a in chosen)
        print(f"partial import: server sent {hub.file_bytes} file bytes (+{hub.api_bytes} API) for dense {dense} + "
              f"experts {experts}: ratio {hub.file_bytes / (dense + experts):.4f}")
        assert hub.file_bytes <= dense + 1.02 * experts
        assert all(method == "GET" and (rng or path.endswith(".json")) for method, path, rng in hub.requests
                   if "/resolve/" in path), hub.requests
        ck = open_checkpoint(REPO)
        experts_backend = LocalExperts(ck.config.expert_spec(), "cpu", torch.float32)
        load_dense(ck)
        assert load_experts(ck, experts_backend, chosen) == 16
        hub.reset()
        assert import_partial(REPO, "0.25").stored == 0 and hub.file_bytes == 0


def test_a_server_that_ignores_range_is_refused(ckpt_dir: Path, monkeypatch) -> None:
    with HubStub({REPO: ckpt_dir}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        m = Store().load_manifest(import_full(REPO).model_id)
        hub.reset()
        monkeypatch.setenv("EKMESH_HOME", str(Path(Store().root).parent.parent / "peer2"))
        Store().save_manifest(m)
        orig = hub._serve

        def no_range(h, body):  # a server that answers every request with the whole file
            h.headers.replace_header("Range", "") if h.headers.get("Range") else None
            return orig(h, body)

        hub._serve = no_range  # type: ignore[method-assign]
        with pytest.raises(ShardError, match="ignored Range"):
            import_partial(REPO, "0:0")
        assert not any(Store().has(b) for b in {*m.dense_ids().values(), *m.expert_ids().values()})


def test_offline_imports_from_the_hf_cache(ckpt_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from huggingface_hub import snapshot_download

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with HubStub({REPO: ckpt_dir}) as hub:
        snapshot_download(REPO, endpoint=hub.url, cache_dir=str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = import_full(REPO)
    m = Store().load_manifest(res.model_id)
    assert m.data["source"] == {"kind": "hub", "repo": REPO, "revision": hub.sha}
    assert res.experts_present == 64
    with pytest.raises(ShardError, match="not in the local HF cache, and HF_HUB_OFFLINE is set"):
        import_full("nobody/nothing")
