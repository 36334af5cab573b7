"""Quality of quantized experts: held-out KJV perplexity and greedy top-1 agreement of the built-in model.

The built-in model (``builtin``, shipped in the package) is quantized with ``ekmesh import builtin --quantize``'s
own code (``registry.quantize.import_quantized``) into a temporary store, in q8 and in q4 (the default group choice,
and each fixed group size its dimensions allow). Each variant and the unquantized model run the 50 held-out windows
the model card was measured on (``tests/tools/data/builtin_heldout_windows.json``, 19,410 tokens) in one process,
fp32 activations on the CPU, in one run:

- perplexity = exp(mean next-token cross-entropy), and its ratio to the unquantized model's (goals: q8 <= 1.01,
  q4 <= 1.05);
- top-1 agreement: the fraction of positions where the quantized model's most likely next token is the
  unquantized model's (what greedy decoding would pick, position by position, teacher-forced);
- expert bytes in the store (safetensors headers included) and in memory once loaded (``LocalExperts.nbytes``:
  the kernels' packed weights and scales; the shipped model is computed in fp32, twice its bf16 bytes) against
  the same experts' weights in bf16.

Usage: ``python benchmarks/quant_quality.py [--json]``. A variant that fails to load or yields non-finite loss
fails the run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ekmesh.infer.loader import Checkpoint, load_all  # noqa: E402
from ekmesh.registry.lookup import open_checkpoint  # noqa: E402
from ekmesh.registry.quantize import import_quantized  # noqa: E402
from ekmesh.shard.store import Store, packaged_store  # noqa: E402

WINDOWS = ROOT / "tests" / "tools" / "data" / "builtin_heldout_windows.json"


def evaluate(ck: Checkpoint, windows: list[list[int]], batch: int = 16) -> tuple[float, list[torch.Tensor], int]:
    """Mean next-token cross-entropy over ``windows``, per batch the argmax next token at every position, and the
    bytes the loaded experts hold in memory."""
    _, model, experts = load_all(ck, "cpu", torch.float32)
    total, count, tops = 0.0, 0, []
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            chunk = windows[i:i + batch]
            width = max(len(w) for w in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)  # [B, T+1], right-padded with 0
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)  # [B, T+1]
            for r, w in enumerate(chunk):
                ids[r, :len(w)] = torch.tensor(w)
                labels[r, :len(w)] = torch.tensor(w)
            logits = model(ids[:, :-1], model.new_cache(), experts).float()  # [B, T, V]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += sum(len(w) - 1 for w in chunk)
            top = logits.argmax(-1)  # [B, T]
            top[labels[:, 1:] == -100] = -1  # padded positions never count
            tops.append(top)
    return total / count, tops, experts.nbytes()


def agreement(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    same = sum(int(((x == y) & (x >= 0)).sum()) for x, y in zip(a, b, strict=True))
    total = sum(int((x >= 0).sum()) for x in a)
    return same / total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    windows = json.loads(WINDOWS.read_text())
    packaged = packaged_store()
    assert packaged is not None, "the built-in model's store is not in the package"
    base_id = packaged.resolve("builtin")
    base = packaged.load_manifest(base_id)
    bf16_expert_bytes = sum(t["shape"][0] * t["shape"][1] * 2 for n, t in base.data["tensors"].items()
                            if ".experts." in n and n.endswith(".weight"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU {torch.backends.cpu.get_cpu_capability()}"
          f", {len(windows)} windows, {sum(len(w) - 1 for w in windows)} tokens", file=sys.stderr)
    t0 = time.perf_counter()
    ref_loss, ref_top, ref_loaded = evaluate(open_checkpoint(base_id, packaged), windows)
    rows: list[dict[str, Any]] = [{"variant": f"as shipped ({base.experts_format_name()})",
                                   "perplexity": math.exp(ref_loss),
                                   "ppl_ratio": 1.0, "top1_agreement": 1.0,
                                   "expert_bytes_vs_bf16": base.data["sizes"]["experts"] / bf16_expert_bytes,
                                   "loaded_bytes_vs_bf16": ref_loaded / bf16_expert_bytes,
                                   "seconds": time.perf_counter() - t0}]
    variants = [("q8", None), ("q4", None), ("q4", 32)]
    with tempfile.TemporaryDirectory(prefix="ekmesh-quant-") as tmp:
        store = Store(Path(tmp) / "store")
        for fmt, group in variants:
            t0 = time.perf_counter()
            res = import_quantized("builtin", fmt, group, alias=f"builtin-{fmt}-{group}", store=store)
            m = store.load_manifest(res.model_id)
            loss, top, loaded = evaluate(open_checkpoint(res.model_id, store), windows)
            if not math.isfinite(loss):
                raise SystemExit(f"{fmt} group {group}: non-finite held-out loss")
            rows.append({"variant": f"{fmt}" + (f" group {group}" if group else " (default groups)"),
                         "perplexity": math.exp(loss), "ppl_ratio": math.exp(loss - ref_loss),
                         "top1_agreement": agreement(top, ref_top),
                         "expert_bytes_vs_bf16": m.data["sizes"]["experts"] / bf16_expert_bytes,
                         "loaded_bytes_vs_bf16": loaded / bf16_expert_bytes,
                         "seconds": time.perf_counter() - t0})
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'variant':<26} {'perplexity':>10} {'ratio':>7} {'top-1 agree':>12} {'stored/bf16':>12} "
          f"{'loaded/bf16':>12}")
    for r in rows:
        print(f"{r['variant']:<26} {r['perplexity']:>10.3f} {r['ppl_ratio']:>7.4f} {r['top1_agreement']:>12.4f} "
              f"{r['expert_bytes_vs_bf16']:>12.3f} {r['loaded_bytes_vs_bf16']:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
