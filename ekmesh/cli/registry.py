"""The registry subcommands ``import``, ``models`` and ``gc`` (registered into ``ekmesh.cli`` by ``register``).

No torch at import time: ``ekmesh.registry`` (which wires shard to the loader) is imported inside the handlers.
Output: ``import`` prints the model id (``--json``: one object with model_id, alias, bytes, blobs, experts_present,
experts_total, fetched, stored, skipped, format); ``import --quantize q8|q4`` makes a derived model whose experts
are quantized (``registry.quantize``); ``models`` prints one line per model with its experts' format (``--json``: a
list);
``models rm`` and ``gc`` print what they removed. Progress bars (bytes, rate, ETA) go to stderr when it is a
terminal, or with ``--progress``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ekmesh.core.errors import ConfigError, ShardMissingError
from ekmesh.tui.status import human_bytes

if TYPE_CHECKING:
    from ekmesh.shard.importer import ImportResult


def register(sub: Any) -> None:
    imp = sub.add_parser("import", help="import a checkpoint (hub id or directory) into the local registry",
                         description="Import a Hugging Face checkpoint into the content-addressed store. A full "
                                     "import reads every byte once and prints the model id; --experts fetches "
                                     "only the dense part and some experts, given the model's manifest.")
    imp.add_argument("source", help="a hub repo id (e.g. Qwen/Qwen3-30B-A3B), a checkpoint directory, or (with "
                                    "--experts) a model id / alias whose manifest is in the store")
    imp.add_argument("--revision", help="hub branch, tag or commit (default: main)")
    imp.add_argument("--alias", help="short name for the model (default: the hub id or directory name)")
    imp.add_argument("--experts", metavar="SPEC", help="partial import: LAYER:EXPERT,... , a fraction like "
                                                       "0.25, or 'assigned'")
    imp.add_argument("--quantize", choices=["q8", "q4"],
                     help="store the routed experts quantized, as a new model derived from SOURCE (a model id or "
                          "alias in the store, e.g. builtin, or a directory / hub id read once, its unquantized "
                          "experts never stored): q8 = int8 with one scale per output row, q4 = 4-bit with a scale "
                          "and zero per group")
    imp.add_argument("--group-size", type=int, metavar="G",
                     help="q4 group size, 32/64/128/256 (default: per tensor, the largest of 128/64/32 that divides "
                          "its input dimension)")
    imp.add_argument("--json", action="store_true", help="print one JSON object")
    imp.add_argument("--progress", action="store_true", help="draw progress bars even if stderr is not a terminal")
    imp.set_defaults(func=cmd_import)

    models = sub.add_parser("models", help="list the models in the local registry")
    models.add_argument("--json", action="store_true", help="print a JSON list")
    msub = models.add_subparsers(dest="models_command", metavar="rm")
    rm = msub.add_parser("rm", help="remove a model's manifest and aliases (then `ekmesh gc` frees its blobs)")
    rm.add_argument("model", help="model id, id prefix or alias")
    models.set_defaults(func=cmd_models)

    gc = sub.add_parser("gc", help="delete blobs that no model in the registry references")
    gc.add_argument("--json", action="store_true")
    gc.set_defaults(func=cmd_gc)


class _RichProgress:
    """Import progress drawn by rich on stderr: bytes, rate, ETA."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                           TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self._label = label
        self._task: Any = None

    def start(self, total_bytes: int, blobs: int) -> None:
        self._p.start()
        self._task = self._p.add_task(f"{self._label} ({blobs} blobs)", total=total_bytes)

    def advance(self, nbytes: int) -> None:
        self._p.update(self._task, advance=nbytes)

    def stop(self) -> None:
        self._p.stop()


def cmd_import(args: argparse.Namespace) -> int:
    from ekmesh.registry.imports import import_full, import_partial

    if args.quantize is None and args.group_size is not None:
        raise ConfigError("--group-size goes with --quantize q4")
    if args.quantize is not None and args.experts is not None:
        raise ConfigError("--quantize makes a new model from a whole one: import it without --experts (peers then "
                          "fetch their share of the quantized model)")
    prog = _RichProgress(f"import {args.source}") if (args.progress or sys.stderr.isatty()) else None
    try:
        if args.experts is not None:
            res = import_partial(args.source, args.experts, revision=args.revision, alias=args.alias,
                                 progress=prog)
        elif args.quantize is not None:
            res = _import_quantized(args, prog)
        else:
            res = import_full(args.source, revision=args.revision, alias=args.alias, progress=prog)
    finally:
        if prog is not None:
            prog.stop()
    if args.json:
        print(json.dumps(res.as_json()))
    else:
        print(res.model_id)
        print(f"alias {res.alias}: {res.blobs} blobs, {human_bytes(res.bytes)}, experts ({res.format}) "
              f"{res.experts_present}/{res.experts_total} ({res.stored} stored, {res.skipped} already present)",
              file=sys.stderr)
    return 0


def _import_quantized(args: argparse.Namespace, prog: _RichProgress | None) -> ImportResult:
    """``--quantize``: from a stored model as it is, else from the directory / hub repo SOURCE in one pass (the
    dense part and the quantized experts stored; the unquantized experts never are)."""
    from ekmesh.registry.lookup import resolve_store
    from ekmesh.registry.quantize import import_quantized, import_quantized_from_source

    try:
        resolve_store(args.source)
    except ShardMissingError:
        return import_quantized_from_source(args.source, args.quantize, args.group_size, alias=args.alias,
                                            progress=prog, revision=args.revision)
    return import_quantized(args.source, args.quantize, args.group_size, alias=args.alias, progress=prog)


def model_rows() -> list[dict[str, Any]]:
    from ekmesh.shard.store import Store

    store = Store()
    aliases = store.aliases()
    rows = []
    for mid in store.models():
        m = store.load_manifest(mid)
        ids = m.blob_ids()
        present = {b for b in ids if store.has(b)}
        ex = m.expert_ids()
        rows.append({"model_id": mid, "aliases": sorted(a for a, v in aliases.items() if v == mid),
                     "architecture": m.architecture, "source": m.data["source"],
                     "format": m.experts_format_name(), "derived_from": (m.experts_format or {}).get("derived_from"),
                     "bytes_total": m.data["sizes"]["total"], "bytes_present": sum(m.size(b) for b in present),
                     "experts_present": sum(1 for b in ex.values() if b in present), "experts_total": len(ex)})
    return rows


def cmd_models(args: argparse.Namespace) -> int:
    from ekmesh.shard.store import Store

    if args.models_command == "rm":
        store = Store()
        mid = store.resolve(args.model)
        store.remove_model(mid)
        print(f"removed {mid}; `ekmesh gc` frees blobs no other model uses")
        return 0
    rows = model_rows()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no models; add one with `ekmesh import SOURCE`")
        return 0
    for r in rows:
        print(f"{r['model_id'][:23]}  {','.join(r['aliases']) or '-':<28} {r['architecture']:<26} "
              f"{r['format']:<9} {human_bytes(r['bytes_present'])}/{human_bytes(r['bytes_total'])}  "
              f"experts {r['experts_present']}/{r['experts_total']}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from ekmesh.shard.store import Store

    res = Store().gc()
    if args.json:
        print(json.dumps({"blobs": res.blobs, "bytes": res.bytes}))
    else:
        print(f"freed {res.blobs} blobs, {human_bytes(res.bytes)}")
    return 0
