"""The ``plan`` subcommand: will a model fit? (registered into ``ekmesh.cli`` by ``register``).

Sizes come from the model's config.json alone (``ekmesh.registry.plan``, formulas in ``ekmesh.infer.sizes``); with a
node running for this EKMESH_HOME, its live peers' offered memory is compared with what the model needs. Output: a
few aligned lines, or with ``--json`` one object (``plan_json``); ``--peers-of`` adds a Markdown table of how many
peers of given sizes the model needs. No torch at import time: the registry is imported inside the handler.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from ekmesh.tui.status import human_bytes

if TYPE_CHECKING:
    from ekmesh.registry.plan import MeshFit, ModelPlan

GIB = 1 << 30
RULE = ("The rule (an estimate, not placement): the peer offering the most memory is the attention host and holds "
        "the dense part (bf16); all memory left holds R copies of every routed expert, a peer holding at most one "
        "copy of an expert, so it fits when the sum over peers of min(memory left, one copy) >= R copies and R <= "
        "peers. A peer offers all of its memory_total (`ekmesh join --memory`); nothing is kept for KV cache, "
        "activations or the system.")


def _sizes(text: str) -> list[float]:
    try:
        out = [float(p) for p in text.split(",") if p.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--peers-of takes GiB sizes like 16,32,64, got {text!r}") from exc
    if not out or any(not x > 0 for x in out):
        raise argparse.ArgumentTypeError(f"--peers-of takes positive GiB sizes like 16,32,64, got {text!r}")
    return out


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help="will a model fit? its sizes per format, and whether this node's mesh holds it",
                       description="Size a model from its config.json alone (no weights are read): the dense part, "
                                   "the routed experts in bf16, the checkpoint's own format, q8 and q4, and, with a "
                                   "node running for this EKMESH_HOME, whether its live peers hold it. " + RULE)
    p.add_argument("model", help="a hub id (only config.json is fetched), a checkpoint directory, or a model id / "
                                 "alias in the store (`ekmesh models`)")
    p.add_argument("--quantize", choices=("q8", "q4"),
                   help="hold the experts as q8 or q4 (default: the checkpoint's own format, else bf16)")
    p.add_argument("--replicas", type=int, default=2, metavar="R", help="copies of each expert (default 2)")
    p.add_argument("--peers-of", type=_sizes, metavar="GIB,...",
                   help="also print how many peers offering this many GiB each the model needs (e.g. 16,32,64)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from ekmesh.core.errors import NodeNotRunningError
    from ekmesh.core.paths import ekmesh_home
    from ekmesh.discovery.config import MeshTimeouts
    from ekmesh.registry.plan import find_config, live_peers, mesh_fit, plan_model

    plan = plan_model(find_config(args.model), args.quantize, args.replicas)
    home = ekmesh_home()
    try:
        peers = live_peers(home, MeshTimeouts().control_timeout)
    except NodeNotRunningError:
        fit = None
    else:
        fit = mesh_fit(plan.dense.bytes, plan.experts_bytes(), plan.replicas, peers)
    needed = peers_table(plan, args.peers_of) if args.peers_of else None
    if args.json:
        out = plan_json(plan, fit)
        if needed is not None:
            out["peers_needed"] = needed
        print(json.dumps(out))
        return 0
    print("\n".join(plan_lines(plan, fit, str(home))))
    if needed is not None:
        print()
        print("\n".join(markdown_table(plan, needed)))
    return 0


def plan_json(plan: ModelPlan, fit: MeshFit | None) -> dict[str, Any]:
    """The ``--json`` object: model, architecture, params {dense, experts}, dense_bytes (bf16) and
    dense_stored_bytes, moe_layers, experts_per_layer, experts_bytes {format: every expert once}, q4_kept_q8 (the
    weights a q4 expert keeps in q8), format, replicas, needed_bytes, and mesh: null without a node, else peers,
    offered_bytes, needed_bytes, fits, missing_bytes, attention_host, host_short_bytes, experts_short_bytes,
    copies_limited (see ``ekmesh.registry.plan.MeshFit``)."""
    q4 = plan.per_expert["q4"]
    return {
        "model": plan.model, "architecture": plan.architecture,
        "params": {"dense": plan.dense.params, "experts": plan.experts * plan.expert_params},
        "dense_bytes": plan.dense.bytes, "dense_stored_bytes": plan.dense.stored_bytes,
        "moe_layers": plan.moe_layers, "experts_per_layer": plan.num_experts,
        "experts_bytes": {f: plan.experts_bytes(f) for f in plan.formats},
        "q4_kept_q8": list(q4.q8_kept),
        "format": plan.format, "replicas": plan.replicas, "needed_bytes": plan.needed_bytes,
        "mesh": None if fit is None else {
            "peers": fit.peers, "offered_bytes": fit.offered_bytes, "needed_bytes": fit.needed_bytes,
            "fits": fit.fits, "missing_bytes": fit.missing_bytes,
            "attention_host": None if fit.host is None else {"peer_id": fit.host.peer_id, "name": fit.host.name,
                                                             "memory": fit.host.memory},
            "host_short_bytes": fit.host_short_bytes, "experts_short_bytes": fit.experts_short_bytes,
            "copies_limited": fit.copies_limited,
        },
    }


def _count(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.2f} B"
    if n >= 10**6:
        return f"{n / 1e6:.2f} M"
    return f"{n:,}"


def plan_lines(plan: ModelPlan, fit: MeshFit | None, home: str) -> list[str]:
    """The plan as text (pure: same plan and fit, same lines)."""
    pad = " " * 13
    expert_params = plan.experts * plan.expert_params
    stored = plan.dense.stored_bytes
    lines = [
        f"{plan.model} ({plan.architecture})",
        f"{'parameters':<13}{_count(plan.dense.params + expert_params)}: dense {_count(plan.dense.params)}, "
        f"routed experts {_count(expert_params)} ({plan.moe_layers} MoE layers x {plan.num_experts})",
        f"{'dense part':<13}{human_bytes(plan.dense.bytes)} in bf16 (on the attention host)"
        + (f"; {human_bytes(stored)} as the checkpoint stores it" if stored != plan.dense.bytes else ""),
        f"{'experts':<13}{'format':<8}{'one expert':>12}{'all experts':>14}",
    ]
    for f in plan.formats:
        e = plan.per_expert[f]
        mark = "*" if f == plan.format else " "
        note = ""
        if f == plan.own_format:
            note = "  (checkpoint's own)"
        elif f == plan.default_format != "bf16":
            note = "  (as stored)"
        if e.q8_kept:
            note += (f"  ({', '.join(e.q8_kept)} counted as q8: no q4 group of 128, 64 or 32 divides its input size, "
                     "so `ekmesh import --quantize q4` refuses this model)")
        lines.append(f"{pad[:-2]}{mark} {f:<8}{human_bytes(e.bytes):>12}{human_bytes(plan.experts_bytes(f)):>14}"
                     f"{note}")
    lines.append(f"{'needs':<13}{human_bytes(plan.dense.bytes)} + {plan.replicas} x "
                 f"{human_bytes(plan.experts_bytes())} ({plan.format}, R={plan.replicas}) = "
                 f"{human_bytes(plan.needed_bytes)}")
    if fit is None:
        lines.append(f"{'mesh':<13}no node running for {home} (start one with `ekmesh join` to check its mesh)")
        return lines
    host = "" if fit.host is None else f"; attention host {fit.host.name} ({human_bytes(fit.host.memory)})"
    lines.append(f"{'mesh':<13}{fit.peers} live peer{' offers' if fit.peers == 1 else 's offer'} "
                 f"{human_bytes(fit.offered_bytes)}{host}")
    if fit.fits:
        lines.append(f"{pad}fits")
        return lines
    lines.append(f"{pad}does not fit: {human_bytes(fit.missing_bytes)} missing")
    if fit.host_short_bytes:
        lines.append(f"{pad}the largest peer lacks {human_bytes(fit.host_short_bytes)} for the dense part")
    copies = f"{plan.replicas} cop{'ies' if plan.replicas != 1 else 'y'}"
    one_copy = "a peer holds one copy of an expert at most"
    if fit.copies_limited and fit.peers < plan.replicas:
        lines.append(f"{pad}{copies} of the experts need at least {plan.replicas} peers ({one_copy})")
    elif fit.experts_short_bytes:
        lines.append(f"{pad}the room for {copies} of the experts lacks {human_bytes(fit.experts_short_bytes)}"
                     + (f" ({one_copy})" if fit.copies_limited else ""))
    return lines


def peers_table(plan: ModelPlan, sizes_gib: list[float]) -> list[dict[str, Any]]:
    """Peers needed per format (the default one, q8, q4), R (1, 2 and --replicas) and peer size; None: never."""
    from ekmesh.registry.plan import peers_needed

    rows = []
    for f in dict.fromkeys([plan.default_format, "q8", "q4"]):
        for r in sorted({1, 2, plan.replicas}):
            for gib in sizes_gib:
                rows.append({"format": f, "replicas": r, "peer_gib": gib,
                             "peers": peers_needed(plan.dense.bytes, plan.experts_bytes(f), r, int(gib * GIB))})
    return rows


def _gib(x: float) -> str:
    return f"{x:g}"


def markdown_table(plan: ModelPlan, rows: list[dict[str, Any]]) -> list[str]:
    """``peers_table`` as one Markdown row per format: model, format, bytes, then peers per R and size."""
    reps = sorted({r["replicas"] for r in rows})
    gibs = list(dict.fromkeys(r["peer_gib"] for r in rows))
    cols = [f"R={r}, {_gib(g)} GiB" for r in reps for g in gibs]
    out = ["| model | experts as | dense + experts | " + " | ".join(cols) + " |",
           "|---|---|---:|" + "---:|" * len(cols)]
    for f in dict.fromkeys(r["format"] for r in rows):
        cells = {(r["replicas"], r["peer_gib"]): r["peers"] for r in rows if r["format"] == f}
        counts = ["—" if cells[(r, g)] is None else str(cells[(r, g)]) for r in reps for g in gibs]
        sizes = f"{human_bytes(plan.dense.bytes)} + {human_bytes(plan.experts_bytes(f))}"
        out.append(f"| {plan.model} | {f} | {sizes} | " + " | ".join(counts) + " |")
    return out
