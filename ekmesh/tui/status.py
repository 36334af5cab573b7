"""The ``ekmesh status`` view: a status snapshot (see ``ekmesh.discovery.snapshot``) → a rich renderable.

Pure: no I/O, no clock; what it shows comes only from the snapshot, so a fixed snapshot renders to fixed text.
Colour carries no information that the text lacks (counts are digits, states are words). Models are shown by name
with the id shortened (``tui.names``) where the snapshot gives names, else by their whole id.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ekmesh.tui.names import model_label

STATE_STYLE = {"self": "bold cyan", "up": "green", "down": "red", "left": "dim"}
GIB = 1 << 30


def render_status(snapshot: dict[str, Any]) -> RenderableType:
    peers = snapshot.get("peers", [])
    names = {p["peer_id"]: p["name"] for p in peers}
    live = sum(1 for p in peers if p["state"] in ("self", "up"))
    mesh = snapshot.get("mesh", {})
    if mesh.get("open"):
        mesh_text = Text("open mesh (no mesh key: anyone who can reach a node can join)", style="yellow")
    else:
        mesh_text = Text(f"private mesh (key id {mesh.get('key_id')})", style="green")
    header = Text.assemble(("ekmesh ", "bold"), f"node {short_id(snapshot.get('self', ''))} · ",
                           mesh_text, f" · {live} of {len(peers)} peers up")
    parts: list[RenderableType] = [header]
    failing = [b for b in snapshot.get("bootstrap", []) if b["state"] in ("refused", "unreachable")]
    parts += [bootstrap_line(b, live) for b in failing]
    parts.append(peers_table(peers))
    if snapshot.get("claim"):
        parts += [Text(""), claim_line(snapshot["claim"])]
    if snapshot.get("serving"):
        parts.append(serving_line(snapshot["serving"], names))
    for model_id, shard in snapshot.get("models", {}).items():
        parts += [Text(""), shard_map(model_id, shard, names)]
    return Group(*parts)


def bootstrap_line(entry: dict[str, Any], live: int) -> Text:
    """A ``--peer`` that did not admit this node (``refused``: another mesh key?) or cannot be reached."""
    alone = " · this node is alone" if live <= 1 else ""
    return Text(f"bootstrap peer {short_id(entry['peer_id'])} {entry['state']}: {entry['reason']}{alone}",
                style="bold red")


def claim_line(claim: dict[str, Any]) -> Text:
    """This node's claiming progress: assigned / fetched / ready, transfer totals, under-replication, bad peers."""
    me = claim.get("self", {})
    rate = claim.get("rate_bps")
    text = Text.assemble(
        ("claiming ", "bold"), model_label(str(claim.get("model")), claim.get("names") or []),
        f" ({claim.get('state')}, R={claim.get('replicas')})",
        f" · this node: {me.get('ready', 0)} ready / {me.get('fetched', 0)} fetched / "
        f"{me.get('assigned', 0)} assigned",
    )
    if me.get("kept"):
        text.append(f" (+{me['kept']} kept until their new holders are ready)")
    text.append(f" · fetched {claim.get('blobs_fetched', 0)} blobs, {human_bytes(claim.get('bytes_fetched', 0))}")
    if rate:
        text.append(f" at {human_bytes(rate)}/s")
    under = len(claim.get("under_replicated", []))
    if under:
        text.append(f" · {under} experts under-replicated (the mesh has too little memory for "
                    f"{claim.get('replicas')} copies)", style="yellow")
    if claim.get("bad_peers"):
        text.append(f" · {len(claim['bad_peers'])} peers served bad bytes", style="red")
    return text


def serving_line(serving: dict[str, Any], names: dict[str, str]) -> Text:
    """What this node serves: experts loaded on its device, attention host state, API, data-plane peers used."""
    held = f"{serving.get('loaded_experts', 0)} experts"
    if serving.get("experts_format"):  # a node that knows its model: the experts' format and bytes on the device
        held += f" ({serving['experts_format']}, {human_bytes(int(serving.get('loaded_bytes') or 0))})"
    text = Text.assemble(("serving  ", "bold"), f"{held} loaded on {serving.get('device')} ({serving.get('dtype')})")
    if serving.get("attention"):
        ready = serving.get("ready")
        text.append(" · attention host: ")
        text.append("ready" if ready else str(serving.get("state")), style="green" if ready else "yellow")
        missing = serving.get("missing_experts")
        if missing:
            text.append(f" · {missing} experts have no live holder", style="red")
    else:
        text.append(" · no attention (--no-attention)")
    if serving.get("api_url"):
        text.append(f" · API {serving['api_url']}")
    used = serving.get("peers") or {}
    if used:
        text.append(" · round trips: " + ", ".join(
            f"{names.get(p, short_id(p))} {s['mean_rtt_ms']:.2f} ms" + (f" ({s['failures']} failed)"
                                                                         if s.get("failures") else "")
            for p, s in sorted(used.items())))
    decoding = serving.get("decoding") or {}
    if decoding:
        text.append(f" · decoding: {decoding.get('speculative')}"
                    + (" (draft model)" if decoding.get("draft") else "")
                    + f", {decoding.get('active', 0)} active, batch {decoding.get('mean_batch', 0):g} mean / "
                      f"{decoding.get('max_batch', 0)} max")
    verify = serving.get("verify") or {}
    if verify:
        text.append(f" · verified {verify.get('pairs', 0)} results ({100 * verify.get('fraction', 0):g}% sampled)")
        for ban in verify.get("banned") or []:
            text.append(f" · banned {names.get(ban['peer'], short_id(ban['peer']))}: {ban.get('reason', '')}",
                        style="bold red")
    return text


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB`` (binary units; whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def peers_table(peers: list[dict[str, Any]]) -> Table:
    table = Table(expand=False, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("name", "peer", "address", "device", "memory", "load", "RTT", "seen", "state"):
        table.add_column(col, no_wrap=True, min_width=5 if col == "state" else None,
                         justify="right" if col in ("load", "RTT", "seen") else "left")
    for p in peers:
        table.add_row(
            _clip(p["name"], 14), short_id(p["peer_id"]), _address(p["addrs"]), _device(p["devices"]),
            f"{p['memory_free'] / GIB:.1f}/{p['memory_total'] / GIB:.1f}G", f"{p['load']:.2f}",
            "-" if p["rtt_ms"] is None else f"{p['rtt_ms']:.1f}ms",
            "now" if p["state"] == "self" else f"{p['last_seen_s']:.0f}s",
            Text(p["state"], style=STATE_STYLE.get(p["state"], "")),
        )
    return table


def shard_map(model_id: str, shard: dict[str, Any], names: dict[str, str]) -> RenderableType:
    lo, hi = shard["layers"]
    experts = shard["experts"]
    title = Text.assemble(
        ("model ", "bold"), (model_label(model_id, shard.get("names") or []), "bold"),
        f"  layers [{lo}, {hi}) × {experts} experts · coverage {shard['coverage']:.1%}"
        f" · replicated {shard['replicated']:.1%}",
    )
    width = len(str(hi - 1))
    rows = []
    for offset, row in enumerate(shard["holders"]):
        line = Text(f"L{lo + offset:<{width}} ")
        for n in row:
            line.append(_cell(n), style="red" if n == 0 else "yellow" if n == 1 else "green")
        rows.append(line)
    legend = Text.assemble("legend: ", ("·", "red"), " no holder  ", ("1", "yellow"), " one  ",
                           ("2-9", "green"), " replicas  ", ("+", "green"), " ten or more")
    totals = Table(title="experts ready per peer", title_justify="left", expand=False, box=box.SIMPLE_HEAD,
                   pad_edge=False)
    totals.add_column("peer", no_wrap=True)
    totals.add_column("name", no_wrap=True)
    totals.add_column("experts", justify="right")
    totals.add_column("share", justify="right")
    cells = max(1, (hi - lo) * experts)
    for peer_id, count in sorted(shard["per_peer"].items(), key=lambda kv: (-kv[1], kv[0])):
        totals.add_row(short_id(peer_id), names.get(peer_id, "?"), str(count), f"{count / cells:.1%}")
    return Group(title, *rows, legend, totals)


def short_id(peer_id: str) -> str:
    """The last 8 characters of a peer id: the prefix (``12D3KooW``) is the same for every Ed25519 peer."""
    return "…" + peer_id[-8:] if len(peer_id) > 8 else peer_id


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _cell(n: int) -> str:
    return "·" if n == 0 else str(n) if n < 10 else "+"


def _address(addrs: list[str]) -> str:
    if not addrs:
        return "-"
    parts = addrs[0].split("/")
    if len(parts) >= 5 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6") and parts[3] in ("tcp", "udp"):
        return f"{parts[2]}:{parts[4]}"
    return addrs[0]


def _device(devices: list[dict[str, Any]]) -> str:
    """Device kinds with counts, e.g. ``cuda×2+cpu``; the full names are in the JSON."""
    counts: dict[str, int] = {}
    for d in devices:
        counts[d["kind"]] = counts.get(d["kind"], 0) + 1
    return "+".join(k if n == 1 else f"{k}×{n}" for k, n in counts.items()) or "-"
