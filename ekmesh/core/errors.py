"""The ekmesh error hierarchy.

Every error that ekmesh raises on purpose is an ``EkmeshError``. Lower-level errors (OSError, safetensors,
json, tokenizers, jinja2) are translated once, at the boundary of the package that met them, with
``raise ... from exc`` so the cause stays visible.

    EkmeshError
    ├── ConfigError                  a config file or option is invalid
    │   └── UnsupportedArchitectureError   the model's architecture is not one ekmesh implements
    ├── CheckpointError              a checkpoint directory cannot be read as the config says it should
    │   ├── MissingTensorError       a tensor the model needs is absent (names the tensor)
    │   └── TensorShapeError         a tensor has the wrong shape or dtype (names the tensor)
    ├── ShardError                   the registry (store, blobs, manifests) cannot give what was asked
    │   ├── ShardMissingError        a blob or model is not in the store (names it)
    │   ├── BlobHashMismatchError    a blob's bytes do not hash to its id (names the id; blob quarantined)
    │   ├── BlobUnavailableError     blob exchange could not fetch some blobs from any holder or fallback (names each)
    │   ├── StoreFullError           the disk holding the store is full (names what was being written and where)
    │   └── ManifestError            a manifest is malformed, fails its schema (names the field) or its hash
    ├── TokenizerError               tokenizer files or chat template are missing or invalid
    ├── GenerationError              bad generation request (empty prompt, ids out of range, ...)
    ├── PeerError                    talking to one peer failed; the peer may be retried or marked down
    │   ├── PeerUnreachableError     no connection within the deadline (also: another mesh key)
    │   ├── PeerClosedError          the connection or stream closed or reset in the middle of an exchange
    │   └── PeerIdentityError        the peer's data-plane certificate does not match the pin for its peer id
    ├── ProtocolError                a peer sent bytes that break a protocol (oversized, malformed, bad signature)
    ├── OverBudgetError              a listener's memory budget had no room for what a peer sent, in time
    ├── ExpertUnavailableError       a routed expert has no live holder and no source to fetch it from
    ├── ExpertNotLoadedError         a token was routed to an expert the backend asked does not hold (names it)
    ├── ModelNameError               a model name (alias, hub id) names no model the store or the live mesh knows
    │   └── AmbiguousModelNameError  live peers advertise one name for different models (lists each id, its peers)
    ├── ApiError                     an API request cannot be answered (the HTTP server maps each to a status)
    │   ├── BadRequestError          the request is not a valid request (400; names the field at fault)
    │   ├── UnknownModelError        the request names a model this node does not serve (404)
    │   └── NotServingError          this node cannot answer now: no model, or not ready yet (503)
    ├── LocalNodeError               the node of this EKMESH_HOME cannot be reached or started
    │   ├── NodeNotRunningError      no node is running for this EKMESH_HOME
    │   ├── NodeAlreadyRunningError  another node already runs for this EKMESH_HOME
    │   └── RelayError               the local node's experts relay refused or failed (``ekmesh.hf``)
    │       ├── RelayAuthError       the relay refused the token (a stale node.json, or another home's)
    │       ├── ModelNotServedError  the local node serves another model (names what it serves)
    │       └── ExpertsMissingError  some of the model's experts have no live holder (names how many)
    └── DemoError                    `ekmesh demo`'s local mesh could not start or become ready in time

Exceptions that are not errors stay where they are used and private (``_ClientGone``, ``_Skip``: control flow
inside one module), or are interrupts (``DemoInterrupted`` is a ``KeyboardInterrupt``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class EkmeshError(Exception):
    """Base of every error ekmesh raises on purpose."""


class ConfigError(EkmeshError):
    """A configuration (a model's config.json, a CLI option, a generation setting) is invalid."""


class UnsupportedArchitectureError(ConfigError):
    """The model's architecture is not implemented; the message lists the supported ones."""


class CheckpointError(EkmeshError):
    """A checkpoint cannot be read: bad index, unreadable safetensors file, inconsistent layout."""


class MissingTensorError(CheckpointError):
    """A tensor the model needs is not in the checkpoint. ``name`` is the tensor's checkpoint name."""

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        super().__init__(f"tensor {name!r} is missing from the checkpoint" + (f" ({detail})" if detail else ""))


class TensorShapeError(CheckpointError):
    """A tensor in the checkpoint has a shape (or dtype) other than the config implies."""

    def __init__(self, name: str, expected: object, got: object) -> None:
        self.name = name
        self.expected = expected
        self.got = got
        super().__init__(f"tensor {name!r} has shape {got}, expected {expected}")


class ShardError(EkmeshError):
    """The registry cannot give what was asked: a blob, a manifest, a model, or an import source."""


class ShardMissingError(ShardError):
    """A blob or model (``what``: its id or alias) is not in the store."""

    def __init__(self, what: str, detail: str = "") -> None:
        self.what = what
        super().__init__(f"{what} is not in the store" + (f" ({detail})" if detail else ""))


class BlobHashMismatchError(ShardError):
    """A blob's bytes do not hash to its id ``blob_id``; it was moved to quarantine and nothing of it was used."""

    def __init__(self, blob_id: str, detail: str = "") -> None:
        self.blob_id = blob_id
        super().__init__(f"blob {blob_id} is corrupt: its bytes do not hash to its id"
                         + (f" ({detail})" if detail else ""))


class BlobUnavailableError(ShardError):
    """Blob exchange could not bring some blobs into the store: every holder was missing, busy past the deadline,
    broken or banned (served bytes that failed the hash), and the fallback (if any) failed too. ``failures`` maps
    each such blob id to the reason (per peer); ``report`` is the fetch's report (what did arrive, who was banned)."""

    def __init__(self, failures: dict[str, str], report: object = None) -> None:
        self.failures = failures
        self.report = report
        lines = "; ".join(f"{b}: {why}" for b, why in sorted(failures.items())[:5])
        more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} blob(s) could not be fetched: {lines}{more}")


class StoreFullError(ShardError):
    """The filesystem holding the store (``where``) has no space left (ENOSPC, or a quota's EDQUOT) for ``what`` (a
    blob being imported or fetched, a manifest, an import's journal). What was being written was removed (no half
    blob, no temp file) and what was stored before stays, so the same import or fetch resumes from it once space is
    freed. ``free``: bytes free there when it failed (None if unknown); ``report``: a blob fetch's report (what did
    arrive), else None."""

    def __init__(self, what: str, where: str, free: int | None = None, report: object = None) -> None:
        self.what = what
        self.where = where
        self.free = free
        self.report = report
        left = f" ({free} bytes free)" if free is not None else ""
        super().__init__(f"no space left on the disk holding the store {where}{left} while writing {what}: free "
                         "some space there and run it again (what is already stored is kept)")


class ManifestError(ShardError):
    """A manifest is not valid JSON, fails its schema (the message names the field), or does not hash to its id."""


class TokenizerError(EkmeshError):
    """Tokenizer files or the chat template are missing, unreadable or fail to render."""


class GenerationError(EkmeshError):
    """A generation request is invalid (empty prompt, token ids outside the vocabulary, bad sampling values)."""


class PeerError(EkmeshError):
    """Talking to one peer failed. ``peer`` is its peer id (base58) when known."""

    def __init__(self, message: str, peer: str | None = None) -> None:
        self.peer = peer
        super().__init__(message)


class PeerUnreachableError(PeerError):
    """No connection to the peer could be made before the deadline (down, firewalled, or another mesh key)."""


class PeerClosedError(PeerError):
    """The connection or stream to the peer closed, reset, or timed out in the middle of an exchange."""


class PeerIdentityError(PeerError):
    """The peer's data-plane certificate claims another peer id, or its fingerprint is not the one pinned (from the
    peer's signed advert) for the peer id it claims. The connection is refused."""


class ProtocolError(EkmeshError):
    """A peer sent data that breaks an ekmesh protocol: too large, malformed, or with a bad signature."""


class OverBudgetError(EkmeshError):
    """A listener could not reserve memory for what a peer is sending (a data-plane frame) from its budget
    (``core/limits.ByteBudget``) before the deadline; the message gives the budget's use."""

class ExpertUnavailableError(EkmeshError):
    """Expert (``layer``, ``expert``) has no live holder that answered and no source to fetch its weights from."""

    def __init__(self, layer: int, expert: int, detail: str = "") -> None:
        self.layer = layer
        self.expert = expert
        super().__init__(f"expert (layer={layer}, expert={expert}) is unavailable: no live holder and no source"
                         + (f" ({detail})" if detail else ""))


class ExpertNotLoadedError(EkmeshError):
    """A token was routed to expert (``layer``, ``expert``), which the backend asked does not hold."""

    def __init__(self, layer: int, expert: int) -> None:
        self.layer = layer
        self.expert = expert
        super().__init__(f"expert (layer={layer}, expert={expert}) is not loaded in this backend")


class ModelNameError(EkmeshError):
    """``name`` (an alias, or the hub id a model was imported from) names no model that the store knows or that a
    live peer advertises (``join --model NAME`` waited for the mesh until its deadline)."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


class AmbiguousModelNameError(ModelNameError):
    """Live peers advertise ``name`` for different models. ``models`` maps each model id to the peers (as
    ``"name (peer id)"``) that advertise it under that name; the message lists them all."""

    def __init__(self, name: str, models: Mapping[str, Sequence[str]]) -> None:
        self.models = {mid: list(peers) for mid, peers in sorted(models.items())}
        listed = "; ".join(f"{mid} (peers: {', '.join(sorted(peers)) or '-'})" for mid, peers in self.models.items())
        super().__init__(name, f"{name!r} names {len(self.models)} different models in the mesh: {listed}; "
                               "give the model id instead")


class ApiError(EkmeshError):
    """An API request cannot be answered; the HTTP server answers each kind with its own status."""


class BadRequestError(ApiError):
    """The request body is not a valid request (HTTP 400). ``param``: the request field at fault, when one is (the
    ``param`` of OpenAI's error shape), e.g. a field ekmesh does not support."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownModelError(ApiError):
    """The request names a model this node does not serve (HTTP 404)."""


class NotServingError(ApiError):
    """This node cannot answer now: it serves no model, or its experts are not all reachable yet (HTTP 503)."""


class LocalNodeError(EkmeshError):
    """The node that runs for this ``EKMESH_HOME`` cannot be reached, or a second one cannot start."""


class NodeNotRunningError(LocalNodeError):
    """No node is running for this ``EKMESH_HOME`` (no control file, or its endpoint does not answer)."""


class NodeAlreadyRunningError(LocalNodeError):
    """Another node already runs for this ``EKMESH_HOME``; two nodes must not share one identity."""


class RelayError(LocalNodeError):
    """The local node's experts relay (``node/experts_relay.py``) refused a client or failed a request: it serves
    no model yet, does not host attention, or could not compute a layer (the message says which)."""


class RelayAuthError(RelayError):
    """The relay refused the client's token: node.json belongs to an earlier run or to another ``EKMESH_HOME``."""


class ModelNotServedError(RelayError):
    """The local node serves another model than the one asked for (the message names the one it serves)."""


class ExpertsMissingError(RelayError):
    """Some routed experts of the model have no live holder in the mesh, so its layers cannot be computed there.
    ``missing``: how many; the message names a few as (layer, expert)."""

    def __init__(self, message: str, missing: int = 0) -> None:
        self.missing = missing
        super().__init__(message)


class DemoError(EkmeshError):
    """``ekmesh demo``'s local mesh could not be started or did not become ready in time (``Demo.logs_kept`` names
    the directory where the peers' logs were kept)."""
