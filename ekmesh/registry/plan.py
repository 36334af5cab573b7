"""``ekmesh plan``'s arithmetic: will a model fit, from its config.json alone, and does this node's mesh hold it?

Role: find a model's config (a checkpoint directory, a model id or alias in the store, or a hub id: only its
config.json is fetched), size its dense part and its routed experts in every format (``ekmesh.infer.sizes``), and
compare that with memory: the live peers of the node running for this EKMESH_HOME (``mesh_fit``), or peers of one
given size (``peers_needed``). It reads no weights and places nothing.

The rule (an estimate, not placement; ``ekmesh.shard.placement`` decides where each expert goes):
- the attention host is the peer offering the most memory, and it holds the dense part (bf16);
- every peer's memory left after that holds routed experts, R copies of each, and no peer holds two copies of the
  same expert, so a peer contributes at most one full copy: the plan fits when
  ``sum over peers of min(memory left, expert bytes) >= R x expert bytes`` (hence R <= number of peers) and the
  largest peer holds the dense part. ``missing_bytes`` is the memory more peers (or a larger host) would have to
  offer.
- a peer offers its ``memory_total`` (``ekmesh join --memory``, else the machine's memory), all of it: nothing is
  kept for the KV cache, activations or the system.

Invariants: a hub id is contacted only when the name is neither a directory nor in a store; no torch tensor is
allocated (the dense part is built on the meta device).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ekmesh.core.constants import STATUS_PATH
from ekmesh.core.errors import CheckpointError, ConfigError, ProtocolError, ShardError, ShardMissingError
from ekmesh.infer import sizes
from ekmesh.infer.loader import family_config, read_json
from ekmesh.infer.quant import fp8_block_size

DEFAULT_REPLICAS = 2  # as ``ekmesh join --replicas``
LIVE = ("self", "up")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelConfigSource:
    """A model's config.json, how the plan names the model, and the format a stored model's experts were quantized
    to (its manifest's ``experts_format``; None for any other model)."""

    label: str
    hf: dict[str, Any]
    experts_format: str | None = None


def find_config(model: str) -> ModelConfigSource:
    """The config of ``model``: a checkpoint directory, else a model id / alias in the store (the user's, then the
    packaged one: the manifest's ``config``), else a hub id (config.json only; ``HF_HUB_OFFLINE``: the HF cache)."""
    if os.path.isdir(model):
        path = Path(model)
        return ModelConfigSource(path.resolve().name, read_json(path / "config.json"))
    from ekmesh.registry.lookup import resolve_store

    try:
        store = resolve_store(model)
    except ShardMissingError:
        pass
    else:
        manifest = store.load_manifest(store.resolve(model))
        quantized = manifest.data.get("experts_format") or {}
        return ModelConfigSource(model, dict(manifest.data["config"]), quantized.get("format"))
    not_here = f"{model} is not a checkpoint directory, nor a model id or alias in the store (see `ekmesh models`)"
    if not _HUB_ID.match(model):
        raise CheckpointError(f"{not_here}, nor a hub id (owner/name)")
    from ekmesh.shard.hub import open_hub

    try:
        raw = open_hub(model).read_file("config.json")
        hf = json.loads(raw)
    except ShardError as exc:
        raise CheckpointError(f"{not_here}, and the hub gave no config.json for it: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"the hub's config.json of {model} is not valid JSON: {exc}") from exc
    if not isinstance(hf, dict):
        raise CheckpointError(f"the hub's config.json of {model} must hold a JSON object")
    return ModelConfigSource(model, hf)


@dataclass(frozen=True)
class ModelPlan:
    """A model's sizes from its config, the format its experts would be held in, and R."""

    model: str
    architecture: str
    dense: sizes.DenseSizes
    moe_layers: int
    num_experts: int  # routed experts per MoE layer
    expert_params: int  # parameters of one routed expert
    per_expert: dict[str, sizes.ExpertBytes]  # format -> one expert
    own_format: str | None  # the checkpoint's quantized format, if any
    default_format: str  # the experts as held without --quantize: as stored, else the checkpoint's own, else bf16
    format: str  # the experts as the plan holds them
    replicas: int

    @property
    def experts(self) -> int:
        """Routed experts in the whole model (MoE layers x experts per layer)."""
        return self.moe_layers * self.num_experts

    def experts_bytes(self, fmt: str | None = None) -> int:
        """Every routed expert, once, in ``fmt`` (default: the chosen format)."""
        return self.experts * self.per_expert[fmt or self.format].bytes

    @property
    def formats(self) -> list[str]:
        return list(self.per_expert)

    @property
    def needed_bytes(self) -> int:
        """Dense part plus R copies of every expert in the chosen format."""
        return self.dense.bytes + self.replicas * self.experts_bytes()


def plan_model(source: ModelConfigSource, quantize: str | None = None,
               replicas: int = DEFAULT_REPLICAS) -> ModelPlan:
    """Sizes ``source``'s model, its experts held as ``quantize`` (q8, q4), else as they are held now (a stored
    model's quantized format, else the checkpoint's own format, else bf16), ``replicas`` copies of each."""
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    if quantize is not None and quantize not in sizes.QUANTIZE:
        raise ConfigError(f"--quantize must be one of {', '.join(sizes.QUANTIZE)}, got {quantize!r}")
    hf = source.hf
    fam, cfg = family_config(hf, f"{source.label}: config.json")
    own = sizes.checkpoint_format(hf)
    block = fp8_block_size(hf.get("quantization_config")) if own == sizes.FP8 else None
    dense = sizes.dense_sizes(fam, cfg, block, sizes.dtype_bytes(hf))
    spec = cfg.expert_spec()
    formats = [sizes.BF16] + ([own] if own else []) + list(sizes.QUANTIZE)
    per_expert = {f: sizes.expert_bytes(spec, f, block or sizes.FP8_BLOCK) for f in formats}
    archs = hf.get("architectures") or []
    held = source.experts_format if source.experts_format in per_expert else own or sizes.BF16
    return ModelPlan(
        model=source.label, architecture=str(archs[0] if archs else hf.get("model_type", "?")), dense=dense,
        moe_layers=sum(cfg.moe_layers), num_experts=cfg.num_experts, expert_params=sizes.expert_params(spec),
        per_expert=per_expert, own_format=own, default_format=held, format=quantize or held, replicas=replicas)


# ------------------------------------------------------------------------------------------------ memory


@dataclass(frozen=True)
class LivePeer:
    peer_id: str
    name: str
    memory: int  # bytes offered (the advert's memory_total)


@dataclass(frozen=True)
class MeshFit:
    """The plan against some peers (the rule is in the module docstring). ``missing_bytes`` is
    ``host_short_bytes`` (the largest peer lacks them for the dense part) plus ``experts_short_bytes`` (the room
    for R copies lacks them); ``copies_limited`` says that part of that room cannot be used because a peer holds
    one copy of an expert at most (R copies need R peers with room)."""

    peers: int
    offered_bytes: int
    needed_bytes: int
    fits: bool
    missing_bytes: int
    host: LivePeer | None  # the attention host: the peer offering the most memory
    host_short_bytes: int
    experts_short_bytes: int
    copies_limited: bool


def mesh_fit(dense_bytes: int, experts_bytes: int, replicas: int, peers: list[LivePeer]) -> MeshFit:
    """Whether ``peers`` hold the dense part on the largest of them and ``replicas`` copies of experts worth
    ``experts_bytes`` (one copy) in the rest of their memory, a peer holding at most one copy."""
    needed = dense_bytes + replicas * experts_bytes
    if not peers:
        return MeshFit(0, 0, needed, needed == 0, needed, None, dense_bytes, replicas * experts_bytes, False)
    ordered = sorted(peers, key=lambda p: (-p.memory, p.peer_id))
    host = ordered[0]
    host_short = max(0, dense_bytes - host.memory)
    room = [max(0, host.memory - dense_bytes)] + [p.memory for p in ordered[1:]]
    usable = sum(min(r, experts_bytes) for r in room)  # one copy per peer at most
    experts_short = max(0, replicas * experts_bytes - usable)
    limited = experts_short > 0 and usable < min(sum(room), replicas * experts_bytes)
    missing = host_short + experts_short
    return MeshFit(len(peers), sum(p.memory for p in peers), needed, missing == 0, missing, host, host_short,
                   experts_short, limited)


def peers_needed(dense_bytes: int, experts_bytes: int, replicas: int, peer_bytes: int) -> int | None:
    """The fewest peers offering ``peer_bytes`` each for which ``mesh_fit`` fits; None when none can hold the
    dense part. Closed form of ``mesh_fit`` on identical peers: the host holds ``min(peer - dense, one copy)`` of
    the experts, each other peer ``min(peer, one copy)``."""
    if peer_bytes < dense_bytes:
        return None
    rest = replicas * experts_bytes - min(peer_bytes - dense_bytes, experts_bytes)
    if rest <= 0:
        return 1
    per_peer = min(peer_bytes, experts_bytes)
    return None if per_peer == 0 else 1 + -(-rest // per_peer)


def live_peers(home: Path, timeout: float) -> list[LivePeer]:
    """The live peers (``self`` and ``up``) of the node running for ``home``, with the memory each offers;
    ``NodeNotRunningError`` when no node answers."""
    from ekmesh.discovery.control import get_json

    snapshot = get_json(home, STATUS_PATH, timeout)
    out = []
    for p in snapshot.get("peers", []):
        if not isinstance(p, dict) or p.get("state") not in LIVE:
            continue
        memory = p.get("memory_total")
        if not isinstance(memory, int) or memory < 0:
            raise ProtocolError(f"the node's status names peer {p.get('peer_id')!r} with memory_total {memory!r}")
        out.append(LivePeer(str(p.get("peer_id", "")), str(p.get("name", "")), memory))
    return out
