"""Ship a trained draft model into the built-in model's packaged store as ``builtin-draft`` (docs/BUILTIN_MODEL.md).

Role: the step after ``tools/train_draft.py train``. It checks the checkpoint (a dense ``Qwen3ForCausalLM`` with the
built-in's vocabulary and, byte for byte, its tokenizer files), imports it with the registry's own full import
(``ekmesh.registry.imports.import_full``: the blobs, manifest and model id of ``ekmesh import DIR --alias
builtin-draft``) into ``ekmesh/builtin/store`` beside ``builtin`` (the tokenizer blobs are the built-in's, stored
once), removes a previously shipped draft and what only a writable store keeps, re-hashes every blob through a
read-only ``Store``, measures the stored draft against the stored built-in with ekmesh's code
(``tools/draft_figures.py``), and writes the figures under ``draft`` in ``ekmesh/builtin/card.json`` (and the
store's new size as its ``store_bytes``). The checkpoint directory is not shipped.

    python -m tools.package_draft /tmp/draft --data .train --report draft.json

A tool of its own rather than an option of ``tools/package_builtin.py``: the built-in is packaged first and its
store, model id and figures must stay as they are when a draft is added or replaced, while ``package_builtin``
rebuilds the store from nothing, which also drops the draft (a draft distilled from another built-in must be
distilled and packaged again).

Invariants: the store holds the manifest aliased ``builtin`` and at most one more, aliased ``builtin-draft``; every
figure under ``draft`` is measured from the stored blobs, fp32 on the CPU, over ``.train/heldout.json``, which must
equal the test's ``tests/tools/data/builtin_heldout_windows.json``; ``greedy_agreement_subset`` is over
``windows[::SUBSET_STRIDE]``, the subset the test recomputes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tools.draft_figures import TEACHER, TOKENIZER_FILES, evaluate_pair, heldout_figures, load_pair
from tools.package_builtin import CARD, STORE, SUBSET_STRIDE, WINDOWS, cli, seal, store_bytes

ALIAS = "builtin-draft"
DRAFT_MAX_BYTES = 8_000_000  # what shipping a draft may add to the package's store
ARCHITECTURE = "Qwen3ForCausalLM"
CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "vocab_size", "tie_word_embeddings")
TRAINING_KEYS = ("device", "torch", "transformers", "seed", "steps", "best_step", "stop", "select", "batch",
                 "seq_len", "tokens_seen", "lr", "warmup", "alpha", "weight_decay", "teacher_dtype", "train_seconds",
                 "wall_seconds", "argv")


def check_checkpoint(checkpoint: Path, builtin: Any, files: dict[str, bytes]) -> dict[str, Any]:
    """The checkpoint's config, after refusing (SystemExit) anything but a dense Qwen3 with the built-in's
    vocabulary and tokenizer files (``files``: the built-in's stored tokenizer files)."""
    hf = json.loads((checkpoint / "config.json").read_text())
    if hf.get("architectures") != [ARCHITECTURE]:
        raise SystemExit(f"{checkpoint} is a {hf.get('architectures')}, not a {ARCHITECTURE} draft")
    if hf.get("vocab_size") != builtin.data["config"]["vocab_size"]:
        raise SystemExit(f"{checkpoint}: vocab_size {hf.get('vocab_size')}, the built-in's is "
                         f"{builtin.data['config']['vocab_size']}")
    for name, data in files.items():
        if not (checkpoint / name).is_file() or (checkpoint / name).read_bytes() != data:
            raise SystemExit(f"{checkpoint / name} is not the built-in model's {name}: a draft must share its "
                             "tokenizer byte for byte")
    return hf


def package(checkpoint: Path, data: Path, report: Path | None = None, root: Path = STORE, card_path: Path = CARD,
            windows_file: Path | None = WINDOWS, timing: bool = True, prompts: int = 8,
            gen_tokens: int = 64) -> dict[str, Any]:
    """Imports ``checkpoint`` as ``builtin-draft`` into the store at ``root`` and writes its figures into the card at
    ``card_path`` (the defaults are the package's; the tests pass copies and fewer, shorter replays: ``prompts``,
    ``gen_tokens``). Returns the card's ``draft`` entry."""
    from ekmesh.registry.imports import import_full
    from ekmesh.registry.lookup import open_checkpoint
    from ekmesh.shard.store import Store

    card = json.loads(card_path.read_text())
    ro = Store(root, read_only=True)
    if ro.resolve(TEACHER) != card["model_id"]:
        raise SystemExit(f"{root}: {TEACHER!r} is not the card's model {card['model_id']}; package the built-in first")
    builtin = ro.load_manifest(card["model_id"])
    files = {name: ro.read_verified(builtin.file_ids()[name]) for name in TOKENIZER_FILES}
    hf = check_checkpoint(checkpoint, builtin, files)
    windows = json.loads((data / "heldout.json").read_text())
    if windows_file is not None and windows != json.loads(windows_file.read_text()):
        raise SystemExit(f"{data / 'heldout.json'} differs from {windows_file}, the windows the tests read")

    rw = Store(root)
    old = ({mid for alias, mid in rw.aliases().items() if alias != TEACHER} | set(rw.models())) - {builtin.id}
    for mid in sorted(old):  # a previous draft (the store holds builtin and at most the draft)
        rw.remove_model(mid)
    rw.gc()
    before = store_bytes(root)
    res = import_full(str(checkpoint), alias=ALIAS, store=rw)
    ro = seal(root)
    size = store_bytes(root)
    m = ro.load_manifest(res.model_id)
    print(f"imported {res.model_id} as {ALIAS!r}: {len(m.blob_ids())} blobs, {size - before} bytes added; "
          f"store {size} bytes")
    if m.file_ids().get(TOKENIZER_FILES[0]) != builtin.file_ids()[TOKENIZER_FILES[0]]:
        raise SystemExit("the stored draft's tokenizer blob is not the built-in's")  # checked above; never expected
    if size - before > DRAFT_MAX_BYTES:
        raise SystemExit(f"the draft adds {size - before} bytes to the package, more than {DRAFT_MAX_BYTES}")

    draft, target = load_pair(open_checkpoint(ALIAS, ro), open_checkpoint(TEACHER, ro))
    fig = evaluate_pair(draft, target, windows, prompts, gen_tokens, timing)
    subset = windows[::SUBSET_STRIDE]
    part = heldout_figures(draft, target, subset)
    print(f"greedy agreement over windows[::{SUBSET_STRIDE}]: {part['greedy_agreement']:.5f} "
          f"({part['agree']}/{part['positions']})")
    entry: dict[str, Any] = {
        "alias": ALIAS, "model_id": m.id, "architecture": m.architecture, "config": {k: hf[k] for k in CONFIG_KEYS},
        "params": fig["params"], "blobs": len(m.blob_ids()), "blob_bytes": sum(m.size(b) for b in m.blob_ids()),
        "added_bytes": size - before, "tokenizer_blobs": {n: m.file_ids()[n] for n in TOKENIZER_FILES},
        "greedy_agreement": round(fig["greedy_agreement"], 5), "agree": fig["agree"], "positions": fig["positions"],
        "heldout_kl": round(fig["kl"], 5), "heldout_windows": len(windows),
        "greedy_agreement_subset": round(part["greedy_agreement"], 5), "agree_subset": part["agree"],
        "positions_subset": part["positions"], "subset": f"windows[::{SUBSET_STRIDE}]", "subset_windows": len(subset),
        "iid_tokens_per_step": {k: round(v, 3) for k, v in fig["iid_tokens_per_step"].items()},
        "greedy_speculation": {**fig["greedy_speculation"], "greedy_agreement":
                               round(fig["greedy_speculation"]["greedy_agreement"], 5), "tokens_per_step":
                               {k: round(v, 3) for k, v in fig["greedy_speculation"]["tokens_per_step"].items()}},
    }
    if timing:
        entry["cpu_timing"] = fig["cpu_timing"]
    if report is not None:
        r = json.loads(report.read_text())
        entry["training"] = {k: r[k] for k in TRAINING_KEYS if k in r}
        entry["training"]["heldout_agreement_at_training"] = round(r["heldout"]["greedy_agreement"], 5)
    card["store_bytes"] = size
    card["draft"] = entry
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    return entry


def main(argv: list[str] | None = None) -> None:
    cli("package_draft", __doc__ or "", "train_draft", package, argv)


if __name__ == "__main__":
    main()
