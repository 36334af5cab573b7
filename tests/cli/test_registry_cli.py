"""``ekmesh import`` / ``models`` / ``gc`` / ``generate MODEL-ID`` as real subprocesses: generation from the store
equals generation from the directory; a SIGKILLed import leaves no partial blob visible and a re-run skips what was
finished; a tampered blob makes ``generate`` fail with one line naming it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

from tests.shard.checkpoints import make_sharded


def run_cli(home: Path, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "EKMESH_HOME": str(home), **(env or {})}
    e.pop("HF_ENDPOINT", None)
    return subprocess.run([sys.executable, "-m", "ekmesh.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sharded(tmp_path_factory.mktemp("reg"), "olmoe", num_experts=16)[0]


def test_import_models_generate_rm_gc(ckpt: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = run_cli(home, "import", str(ckpt), "--json", "--alias", "tiny")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["alias"] == "tiny" and out["experts_present"] == out["experts_total"] == 48
    assert set(out) >= {"model_id", "alias", "bytes", "blobs", "experts_present", "experts_total"}
    mid = out["model_id"]
    gen = ("--prompt", "w1 w7 w3", "--max-tokens", "8", "--json", "--device", "cpu", "--dtype", "fp32")
    want = run_cli(home, "generate", str(ckpt), *gen)
    assert want.returncode == 0, want.stderr
    for ref in ("tiny", mid):
        got = run_cli(home, "generate", ref, *gen)
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["token_ids"] == json.loads(want.stdout)["token_ids"]
    r = run_cli(home, "models", "--json")
    (row,) = json.loads(r.stdout)
    assert row["model_id"] == mid and row["aliases"] == ["tiny"] and row["experts_present"] == 48
    assert row["architecture"] == "OlmoeForCausalLM" and row["bytes_present"] == row["bytes_total"] > 0
    assert "tiny" in run_cli(home, "models").stdout
    r = run_cli(home, "models", "rm", "tiny")
    assert r.returncode == 0 and mid in r.stdout
    r = run_cli(home, "gc", "--json")
    assert json.loads(r.stdout)["blobs"] == out["blobs"]
    assert not any((home / "store" / "blobs").rglob("*/*/*"))
    r = run_cli(home, "generate", "tiny", "--prompt-ids", "1")
    assert r.returncode == 1 and "is not a checkpoint directory, nor a model id or alias" in r.stderr


def test_tampered_blob_fails_generate_with_its_id(ckpt: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    mid = json.loads(run_cli(home, "import", str(ckpt), "--json").stdout)["model_id"]
    m = json.loads((home / "store" / "manifests" / f"{mid[7:]}.json").read_text())
    bid = m["experts"][2][11]
    p = home / "store" / "blobs" / "blake3" / bid[7:9] / bid[7:]
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    r = run_cli(home, "generate", ckpt.name, "--prompt-ids", "1,2", "--max-tokens", "2")
    assert r.returncode == 1
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"ekmesh: error: blob {bid} is corrupt: its bytes do not hash to its id ({len(data)} bytes")
    assert not p.exists() and any((home / "store" / "quarantine").iterdir())


def _blobs(home: Path) -> list[Path]:
    return [p for p in (home / "store" / "blobs" / "blake3").glob("*/*") if p.is_file()]


def test_sigkilled_import_leaves_no_partial_blob_and_resumes(ckpt: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "EKMESH_HOME": str(home), "EKMESH_TEST_IMPORT_DELAY_S": "0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "ekmesh.cli", "import", str(ckpt), "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while len(_blobs(home)) < 8 if (home / "store").exists() else True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "import made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = _blobs(home)
    assert 8 <= len(before) < 53  # 48 experts + 5 dense groups: killed mid-way
    for p in before:  # every visible blob is complete: it hashes to its name
        assert blake3.blake3(p.read_bytes()).hexdigest() == p.name
    assert not list((home / "store" / "manifests").iterdir())
    r = run_cli(home, "import", str(ckpt), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["skipped"] >= len(before) - 1 and out["stored"] + out["skipped"] == 53
    assert out["experts_present"] == 48
    assert list((home / "store" / "tmp").iterdir()) == []
    fresh = run_cli(tmp_path / "fresh", "import", str(ckpt), "--json")
    assert json.loads(fresh.stdout)["model_id"] == out["model_id"]


@pytest.mark.slow
def test_import_assigned_takes_this_peers_share_of_the_live_mesh(ckpt: Path, tmp_path: Path) -> None:
    """Two real nodes whose memory holds ~60% of the experts each: `--experts assigned` on one of them imports
    exactly what the placement over the live view gives it (computed here independently), and not everything."""
    from ekmesh.shard.manifest import Manifest
    from ekmesh.shard.placement import PeerCapacity, place
    from tests.discovery.meshproc import NodeProc, wait_until

    seed = tmp_path / "seed"
    out = json.loads(run_cli(seed, "import", str(ckpt), "--json").stdout)
    manifest_file = seed / "store" / "manifests" / (out["model_id"].split(":")[1] + ".json")
    m = Manifest.parse(manifest_file.read_bytes(), out["model_id"])
    expert_bytes = sum(m.size(b) for b in m.expert_ids().values())
    gib = 0.6 * expert_bytes / 2**30  # each node offers ~60% of all experts' bytes
    homes = [tmp_path / "b", tmp_path / "c"]
    for h in homes:  # the manifest reaches the peer out of band (manifest spread comes with the Placement issue)
        (h / "store" / "manifests").mkdir(parents=True)
        (h / "store" / "manifests" / manifest_file.name).write_bytes(manifest_file.read_bytes())
    common = ("--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--no-dht", "--memory", f"{gib:.12f}")
    b = NodeProc(homes[0], *common, "--name", "b")
    c = None
    try:
        c = NodeProc(homes[1], *common, "--name", "c", "--peer", b.addrs[0])
        wait_until(lambda: b.states().get(c.peer_id) == "up", 30, "b sees c")
        snap = b.status()
        peers = [PeerCapacity(p["peer_id"], p["memory_total"], p["speed"] or 1.0)
                 for p in snap["peers"] if p["state"] in ("self", "up")]
        experts = m.expert_ids()
        want = place(m.id, list(experts), {k: m.size(v) for k, v in experts.items()}, peers, 2).assigned(b.peer_id)
        assert 0 < len(want) < len(experts)
        r = run_cli(homes[0], "import", str(ckpt), "--experts", "assigned", "--json")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["model_id"] == out["model_id"] and got["experts_present"] == len(want)
        present = {k for k, bid in experts.items() if (homes[0] / "store" / "blobs" / "blake3" /
                                                          bid.split(":")[1][:2] / bid.split(":")[1]).exists()}
        assert present == set(want)
    finally:
        if c is not None:
            c.stop()
        b.stop()
