"""Ship a trained built-in checkpoint as the read-only registry store inside the package (docs/BUILTIN_MODEL.md).

Role: the step after ``tools/train_builtin.py train``. It imports a Hugging Face checkpoint directory with the
registry's own full import (``ekmesh.registry.imports.import_full``: the same blobs, manifest and model id as
``ekmesh import DIR --alias builtin``) into ``ekmesh/builtin/store``, removes what only a writable store keeps
(``verified/``, ``tmp/``, ``quarantine/``, ``imports/``), re-hashes every blob through a read-only ``Store``, then
measures the held-out loss of the stored blobs with ekmesh's own model code and writes ``ekmesh/builtin/card.json``
(the figures the model card quotes and ``tests/tools/test_builtin_model.py`` checks) and the held-out windows the
test reads (``tests/tools/data/builtin_heldout_windows.json``). The checkpoint directory is not shipped.

    python -m tools.package_builtin /tmp/ckpt --data .train

Invariants: the store it writes holds exactly one manifest, aliased ``builtin`` (a draft shipped before is dropped
with the old store and must be distilled from the new built-in and shipped again: ``tools/package_draft.py`` adds
it, aliased ``builtin-draft``, with its figures under ``draft`` in the card); the held-out loss is the definition of
``tools/builtin_data.heldout_windows`` (mean next-token cross-entropy, fp32 from the bf16 weights), over every
window and over the test's subset ``windows[::SUBSET_STRIDE]``.

``seal`` (what only a writable store keeps removed, every blob re-hashed), ``store_bytes`` and ``cli`` (the command
line) serve ``tools/package_draft.py`` too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ekmesh.shard.store import Store

ALIAS = "builtin"
SUBSET_STRIDE = 4  # the test recomputes the loss over windows[::4] (13 of 50 windows) to stay under a minute
ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "ekmesh" / "builtin" / "store"
CARD = ROOT / "ekmesh" / "builtin" / "card.json"
WINDOWS = ROOT / "tests" / "tools" / "data" / "builtin_heldout_windows.json"
WRITABLE_ONLY = ("verified", "tmp", "quarantine", "imports")  # what only a writable store keeps


def store_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def seal(root: Path) -> Store:
    """Removes what only a writable store keeps from the store at ``root`` and re-hashes every blob of every model
    through a read-only ``Store``, which it returns."""
    from ekmesh.shard.store import Store

    for sub in WRITABLE_ONLY:
        shutil.rmtree(root / sub, ignore_errors=True)
    ro = Store(root, read_only=True)
    for mid in ro.models():
        m = ro.load_manifest(mid)
        for bid in sorted(m.blob_ids()):
            ro.verify(bid, m.size(bid))
    return ro


def cli(module: str, doc: str, trainer: str, package: Callable[[Path, Path, Path | None], dict[str, Any]],
        argv: list[str] | None) -> None:
    """The command line of ``python -m tools.<module>``: a checkpoint directory that ``trainer`` wrote, ``--data``
    and ``--report``; prints what ``package`` returns as JSON."""
    p = argparse.ArgumentParser(prog=f"python -m tools.{module}", description=doc.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help=f"the Hugging Face checkpoint directory that {trainer} wrote")
    p.add_argument("--data", type=Path, default=Path(".train"), help="prepare's directory (held-out windows)")
    p.add_argument("--report", type=Path, default=None, help=f"{trainer}'s --report JSON, copied into card.json")
    args = p.parse_args(argv)
    print(json.dumps(package(args.checkpoint, args.data, args.report), indent=1))


def heldout_loss(source: Any, windows: list[list[int]], batch: int = 16) -> float:
    """Mean next-token cross-entropy over ``windows`` with ekmesh's one-process model, fp32 on the CPU.

    ``source``: a checkpoint directory or an opened ``Checkpoint``. Windows are right-padded with token 0 into
    batches of ``batch`` ([B, T]); attention is causal and routing is per token, so padding after a window does
    not change its logits, and padded positions are left out of the loss."""
    import torch
    import torch.nn.functional as F

    from ekmesh.infer.loader import load_all

    _, model, experts = load_all(source, "cpu", torch.float32)
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            chunk = windows[i : i + batch]
            width = max(len(w) for w in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)  # [B, T+1]
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)  # [B, T+1]
            for r, w in enumerate(chunk):
                ids[r, : len(w)] = torch.tensor(w)
                labels[r, : len(w)] = torch.tensor(w)
            logits = model(ids[:, :-1], model.new_cache(), experts).float()  # [B, T, V]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += sum(len(w) - 1 for w in chunk)
    return total / count


def package(checkpoint: Path, data: Path, report: Path | None) -> dict[str, Any]:
    from ekmesh.registry.imports import import_full
    from ekmesh.registry.lookup import open_checkpoint
    from ekmesh.shard.store import Store

    if STORE.exists():
        if "builtin-draft" in json.loads((STORE / "aliases.json").read_text()):
            print("dropping the shipped builtin-draft with the old store: distil and package it again from the new "
                  "built-in (tools/train_draft.py, tools/package_draft.py)")
        shutil.rmtree(STORE)
    res = import_full(str(checkpoint), alias=ALIAS, store=Store(STORE))
    ro = seal(STORE)  # (the store holds this one model)
    m = ro.load_manifest(ro.resolve(ALIAS))
    size = store_bytes(STORE)
    print(f"imported {res.model_id} as {ALIAS!r}: {res.blobs} blobs, {res.bytes} bytes; store {size} bytes")

    windows = json.loads((data / "heldout.json").read_text())
    WINDOWS.parent.mkdir(parents=True, exist_ok=True)
    WINDOWS.write_text(json.dumps(windows, separators=(",", ":")) + "\n")
    subset = windows[::SUBSET_STRIDE]
    t0 = time.time()
    full = heldout_loss(open_checkpoint(ALIAS, ro), windows)
    t1 = time.time()
    part = heldout_loss(open_checkpoint(ALIAS, ro), subset)
    print(f"held-out loss (ekmesh, fp32, cpu): {full:.5f} over {len(windows)} windows ({t1 - t0:.0f}s), "
          f"{part:.5f} over windows[::{SUBSET_STRIDE}] ({len(subset)} windows, {time.time() - t1:.0f}s)")
    card: dict[str, Any] = {
        "alias": ALIAS, "model_id": m.id, "store_bytes": size, "blobs": len(m.blob_ids()),
        "heldout_loss": round(full, 5), "heldout_tokens": sum(len(w) - 1 for w in windows),
        "heldout_windows": len(windows),
        "heldout_loss_subset": round(part, 5), "subset": f"windows[::{SUBSET_STRIDE}]",
        "subset_windows": len(subset), "subset_tokens": sum(len(w) - 1 for w in subset),
    }
    if report is not None:
        r = json.loads(report.read_text())
        card["training"] = {k: r[k] for k in ("device", "seed", "steps", "best_step", "batch", "seq_len", "lr",
                                              "warmup", "weight_decay", "dropout", "train_seconds",
                                              "wall_seconds", "argv")}
        card["train_loss"] = round(r["train_loss_at_best"], 5)
        card["heldout_loss_gpu"] = round(r["heldout_loss"], 5)
    CARD.write_text(json.dumps(card, indent=1) + "\n")
    return card


def main(argv: list[str] | None = None) -> None:
    cli("package_builtin", __doc__ or "", "train", package, argv)


if __name__ == "__main__":
    main()
