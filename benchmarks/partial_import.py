"""Registry import: bytes a partial import fetches, and peak memory of a full import, measured in one run.

Builds a random Qwen3-MoE checkpoint (several safetensors shards + index, written shard by shard), serves it from
a hub stand-in (a local HTTP server with Range support, used through HF_ENDPOINT), then runs real ``ekmesh import``
subprocesses:

1. a full import from the hub, and one from the directory: peak RSS of each (the child's VmHWM), next to
   the checkpoint size, its largest tensor, and the RSS of a child that only imports the same modules;
2. the manifest copied into a fresh store, then ``ekmesh import REPO --experts 0.25``: the bytes the server sent,
   divided by the bytes of the dense part (+ config / tokenizer files) and the chosen experts;
3. ``ekmesh import MODEL_ID --quantize q4`` on the store of step 1, and ``ekmesh import DIR --quantize q4`` into a
   fresh store (one pass, the float experts never stored): peak RSS of quantizing every expert (one expert at a
   time, so it should not grow with the checkpoint: run two sizes, e.g. ``--layers 4`` and ``--layers 16``, and
   compare), the fresh store's size, and that both give the same model.

    python benchmarks/partial_import.py                 # ~0.9 GB checkpoint
    python benchmarks/partial_import.py --experts 32 --layers 4   # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.shard.hubstub, the hub stand-in

from ekmesh.infer.models import qwen3_moe  # noqa: E402
from tests.shard.hubstub import HubStub  # noqa: E402

REPO = "bench/random-moe"


def build_checkpoint(d: Path, layers: int, experts: int, hidden: int, inter: int, vocab: int,
                     shards: int) -> tuple[int, int]:
    """Writes the checkpoint; returns (total tensor bytes, largest tensor bytes)."""
    hf = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=vocab, hidden_size=hidden,
              intermediate_size=2 * inter, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
              head_dim=hidden // 8, moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=4,
              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
              max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=False, torch_dtype="float32")
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(hf))
    with torch.device("meta"):
        model = qwen3_moe.build(qwen3_moe.Config.from_hf_config(hf))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for layer in range(layers):
        for e in range(experts):
            p = f"model.layers.{layer}.mlp.experts.{e}"
            shapes |= {f"{p}.gate_proj.weight": (inter, hidden), f"{p}.up_proj.weight": (inter, hidden),
                       f"{p}.down_proj.weight": (hidden, inter)}
    names = sorted(shapes)
    per = -(-len(names) // shards)
    wm, total, largest = {}, 0, 0
    g = torch.Generator().manual_seed(0)
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: torch.randn(shapes[n], generator=g) for n in names[i * per:(i + 1) * per]}
        save_file(part, str(d / fname))
        for n, t in part.items():
            wm[n] = fname
            total += t.numel() * 4
            largest = max(largest, t.numel() * 4)
        del part
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return total, largest


# Runs a module as __main__ and writes its own peak RSS (VmHWM: the high-water mark of the process's memory since
# exec; ru_maxrss of a child would also count the benchmark's own pages at fork time) to $BENCH_RSS_OUT.
_WRAP = """
import atexit, os, runpy, sys
def _report():
    with open('/proc/self/status') as f:
        kib = next(line.split()[1] for line in f if line.startswith('VmHWM:'))
    with open(os.environ['BENCH_RSS_OUT'], 'w') as f:
        f.write(kib)
atexit.register(_report)
mod = sys.argv.pop(1)
runpy.run_module(mod, run_name='__main__', alter_sys=True)
"""


def peak_child(args: list[str], env: dict[str, str]) -> tuple[str, float, int]:
    """Runs ``python -m MODULE ARGS`` (``args[0]`` the module) in a child; returns (stdout, seconds, peak RSS)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _WRAP, *args], env={**env, "BENCH_RSS_OUT": rss.name},
                              capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{args} failed:\n{proc.stderr}")
        return proc.stdout, dt, int(open(rss.name).read()) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ekmesh-bench-"))
    try:
        ck = root / "ckpt"
        total, largest = build_checkpoint(ck, a.layers, a.experts, a.hidden, a.inter, a.vocab, a.shards)
        print(f"checkpoint: {total / 2**20:.1f} MiB in {a.shards} shards, largest tensor {largest / 2**20:.1f} MiB "
              f"({total / largest:.1f}x smaller than the checkpoint); {a.layers} layers x {a.experts} experts")
        env = {**os.environ}
        for v in ("HF_HUB_OFFLINE", "HF_TOKEN", "EKMESH_TEST_IMPORT_DELAY_S"):
            env.pop(v, None)
        _, _, base = peak_child(["ekmesh.shard.importer"],
                                {**env, "EKMESH_HOME": str(root / "h0")})
        print(f"baseline: a child that only imports ekmesh's import modules peaks at {base / 2**20:.0f} MiB RSS")
        with HubStub({REPO: ck}) as hub:
            env["HF_ENDPOINT"] = hub.url
            out, dt, rss_hub = peak_child(["ekmesh.cli", "import", REPO, "--json"],
                                          {**env, "EKMESH_HOME": str(root / "a")})
            full = json.loads(out)
            print(f"full import from the hub stand-in: {dt:.1f} s, {full['bytes'] / dt / 2**20:.0f} MiB/s, "
                  f"peak RSS {rss_hub / 2**20:.0f} MiB (+{(rss_hub - base) / 2**20:.0f} MiB over baseline)")
            out, dt, rss_dir = peak_child(["ekmesh.cli", "import", str(ck), "--json"],
                                          {**env, "EKMESH_HOME": str(root / "a2")})
            print(f"full import from the directory:    {dt:.1f} s, peak RSS {rss_dir / 2**20:.0f} MiB "
                  f"(+{(rss_dir - base) / 2**20:.0f} MiB over baseline)")
            shutil.rmtree(root / "a2")

            from ekmesh.shard.blobfmt import parts_for, payload_size
            from ekmesh.shard.importer import parse_experts
            from ekmesh.shard.manifest import Manifest
            from ekmesh.shard.source import TensorEntry

            mid = full["model_id"]
            raw = (root / "a" / "store" / "manifests" / f"{mid[7:]}.json").read_bytes()
            m = Manifest.parse(raw, mid)
            peer = root / "b" / "store" / "manifests"
            peer.mkdir(parents=True)
            (peer / f"{mid[7:]}.json").write_bytes(raw)
            hub.reset()
            out, dt, rss_part = peak_child(["ekmesh.cli", "import", REPO, "--experts", "0.25", "--json"],
                                           {**env, "EKMESH_HOME": str(root / "b")})
            part = json.loads(out)
            tensors = {n: TensorEntry(t["file"], *t["range"], t["dtype"], tuple(t["shape"]))
                       for n, t in m.data["tensors"].items()}

            def payload(bid: str) -> int:
                info = m.data["blobs"][bid]
                return int(info["size"]) if "file" in info else payload_size(parts_for(info["keys"], tensors))

            chosen = parse_experts("0.25", m)
            dense = sum(payload(b) for b in {*m.dense_ids().values(), *m.file_ids().values()})
            experts = sum(payload(m.expert_ids()[x]) for x in chosen)
            all_experts = sum(payload(b) for b in m.expert_ids().values())
            print(f"partial import of {part['experts_present']}/{part['experts_total']} experts: server sent "
                  f"{hub.file_bytes / 2**20:.2f} MiB (+{hub.api_bytes} B of API JSON) in {dt:.1f} s, "
                  f"peak RSS {rss_part / 2**20:.0f} MiB")
            print(f"  dense + files {dense / 2**20:.2f} MiB, chosen experts {experts / 2**20:.2f} MiB "
                  f"(all experts {all_experts / 2**20:.2f} MiB)")
            print(f"  ratio bytes fetched / (dense + chosen experts) = {hub.file_bytes / (dense + experts):.4f}")
            print(f"  fraction of a full download: {hub.file_bytes / (dense + all_experts):.3f}")

            out, dt, rss_q = peak_child(["ekmesh.cli", "import", mid, "--quantize", "q4", "--json"],
                                        {**env, "EKMESH_HOME": str(root / "a")})
            q = json.loads(out)
            print(f"import --quantize q4 of the stored model: {dt:.1f} s, peak RSS {rss_q / 2**20:.0f} MiB "
                  f"(+{(rss_q - base) / 2**20:.0f} MiB over baseline; checkpoint {total / 2**20:.0f} MiB), "
                  f"q4 model {q['bytes'] / 2**20:.1f} MiB")
            out, dt, rss_q1 = peak_child(["ekmesh.cli", "import", str(ck), "--quantize", "q4", "--json"],
                                         {**env, "EKMESH_HOME": str(root / "q")})
            q1 = json.loads(out)
            held = sum(f.stat().st_size for f in (root / "q" / "store" / "blobs").rglob("*") if f.is_file())
            def experts_of(home: str, mid: str) -> Any:
                return json.loads((root / home / "store" / "manifests" / f"{mid[7:]}.json").read_text())["experts"]
            same = experts_of("q", q1["model_id"]) == experts_of("a", q["model_id"])  # the parents' sources differ
            print(f"import --quantize q4 of the directory, one pass: {dt:.1f} s, peak RSS {rss_q1 / 2**20:.0f} MiB, "
                  f"store {held / 2**20:.1f} MiB (the same quantized expert blobs: {same})")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
