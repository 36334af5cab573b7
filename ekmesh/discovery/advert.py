"""Signed adverts: what a peer tells the mesh about itself.

An advert is canonical JSON (sorted keys, no spaces) signed with the peer's identity key over
``DOMAIN + body``. The peer id inside the body names the key that must have signed it (ekmesh ids are Ed25519
and carry their public key), so an advert can be relayed by anyone and still be checked by everyone; one signed
by another key, or altered, is rejected with ``ProtocolError``.

Ordering: ``(incarnation, seq)``. The incarnation grows on every start of a node (it is persisted), ``seq``
on every refresh, so a restarted peer's adverts supersede the ones of its previous life and a replayed old
advert changes nothing. ``state`` is ``"up"`` or ``"left"`` (sent once on clean shutdown).

Adverts stay small (gossip-friendly): the experts a peer holds ready travel as one bitmap per model
(``layers`` half-open × ``experts`` bits, row-major), e.g. 48 layers × 128 experts = 768 bytes. Every field is
bounded and checked before use, and parsed once here into typed values: ``data_addr`` and ``blob_addr`` are
``Endpoint``s, ``tls_fp`` a ``Fingerprint``; an advert with a malformed one is rejected whole.

``names`` (optional) maps the names a peer knows the model it serves by (its store's aliases, the hub id it was
imported from) to that model's id, so ``join --model NAME`` elsewhere can find it (``discovery.names``). A name is
``NAME_RE`` (letters, digits, ``._-``; one ``/`` as in a hub id ``org/repo``; no ``:``, so no name looks like a model
id), at most ``MAX_NAME`` characters, at most ``MAX_NAMES`` of them; the id has the form ``algo:hex``. One bad entry
rejects the advert whole, as for every other field.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from ekmesh.core.errors import ProtocolError
from ekmesh.core.ids import Endpoint, Fingerprint, PeerId

DOMAIN = b"ekmesh/advert/v1\x00"
MAX_BODY = 64 * 1024
MAX_SIGNATURE = 128
MAX_ADDRS = 16
MAX_DEVICES = 16
MAX_MODELS = 32
MAX_TEXT = 256
MAX_GRID_BITS = 1 << 20
STATES = ("up", "left")
MAX_NAMES = 16
MAX_NAME = 160
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?\Z")
MODEL_ID_FORM = re.compile(r"[a-z0-9]{1,16}:[0-9a-f]{16,128}\Z")


def valid_name(name: str) -> bool:
    """Whether ``name`` may travel in an advert as a model's name (see the module docstring)."""
    return len(name) <= MAX_NAME and NAME_RE.match(name) is not None


@dataclass(frozen=True)
class ModelReady:
    """Which experts of one model a peer holds ready: ``ready[layer]`` = expert ids, layers in ``[lo, hi)``."""

    layers: tuple[int, int]
    experts: int
    ready: Mapping[int, frozenset[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lo, hi = self.layers
        if not (0 <= lo < hi and self.experts > 0 and (hi - lo) * self.experts <= MAX_GRID_BITS):
            raise ProtocolError(f"bad model grid: layers [{lo}, {hi}) × {self.experts} experts")
        for layer, experts in self.ready.items():
            if not lo <= layer < hi or any(not 0 <= e < self.experts for e in experts):
                raise ProtocolError(f"ready expert outside layers [{lo}, {hi}) × {self.experts}: layer {layer}")

    def count(self) -> int:
        return sum(len(e) for e in self.ready.values())

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.layers
        bits = bytearray(((hi - lo) * self.experts + 7) // 8)
        for layer, experts in self.ready.items():
            for e in experts:
                i = (layer - lo) * self.experts + e
                bits[i >> 3] |= 1 << (i & 7)
        return {"layers": [lo, hi], "experts": self.experts, "ready": base64.b64encode(bytes(bits)).decode()}

    @classmethod
    def from_json(cls, obj: Any) -> ModelReady:
        if not isinstance(obj, dict):
            raise ProtocolError("model entry is not an object")
        layers = obj.get("layers")
        if not (isinstance(layers, list) and len(layers) == 2 and all(_is_int(x) for x in layers)):
            raise ProtocolError("model 'layers' must be [lo, hi]")
        lo, hi = int(layers[0]), int(layers[1])
        experts = _nonneg(obj.get("experts"), "model experts")
        if not (0 <= lo < hi and experts > 0 and (hi - lo) * experts <= MAX_GRID_BITS):
            raise ProtocolError(f"bad model grid: layers [{lo}, {hi}) × {experts} experts")
        bits = _b64(obj.get("ready"), "model 'ready'", ((hi - lo) * experts + 7) // 8)
        if len(bits) != ((hi - lo) * experts + 7) // 8:
            raise ProtocolError("model 'ready' bitmap has the wrong length")
        ready: dict[int, set[int]] = {}
        for byte_index, byte in enumerate(bits):
            while byte:
                low = byte & -byte
                i = byte_index * 8 + low.bit_length() - 1
                byte ^= low
                if i >= (hi - lo) * experts:
                    raise ProtocolError("model 'ready' bitmap has bits past the grid")
                ready.setdefault(lo + i // experts, set()).add(i % experts)
        return cls((lo, hi), experts, {k: frozenset(v) for k, v in ready.items()})


@dataclass(frozen=True)
class Device:
    """One compute device of a peer: ``kind`` is e.g. ``cpu``, ``cuda``, ``mps``; ``memory`` in bytes."""

    kind: str
    name: str
    memory: int

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "memory": self.memory}


@dataclass(frozen=True)
class Advert:
    """What a peer says about itself. Memory figures are bytes; ``load`` is 0 (idle) and up."""

    peer_id: PeerId
    incarnation: int
    seq: int
    name: str
    version: str
    addrs: tuple[str, ...] = ()
    devices: tuple[Device, ...] = ()
    memory_total: int = 0
    memory_free: int = 0
    speed: float | None = None
    data_addr: Endpoint | None = None
    """The peer's data-plane listener (its expert server; absent while it serves no experts)."""
    models: Mapping[str, ModelReady] = field(default_factory=dict)
    load: float = 0.0
    state: str = "up"
    blob_addr: Endpoint | None = None
    """The peer's blob-exchange listener (absent in adverts of peers that serve no blobs)."""
    tls_fp: Fingerprint | None = None
    """SHA-256 fingerprint of the peer's TLS certificate (``core.tls``; hex on the wire), pinned by direct
    connections (blob exchange and the data plane)."""
    names: Mapping[str, str] = field(default_factory=dict)
    """Names of the models this peer serves (``{name: model id}``; at most ``MAX_NAMES``)."""

    @property
    def order(self) -> tuple[int, int]:
        return (self.incarnation, self.seq)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "v": 1,
            "peer_id": self.peer_id,
            "incarnation": self.incarnation,
            "seq": self.seq,
            "state": self.state,
            "name": self.name,
            "version": self.version,
            "addrs": list(self.addrs),
            "devices": [d.to_json() for d in self.devices],
            "memory_total": self.memory_total,
            "memory_free": self.memory_free,
            "speed": self.speed,
            "data_addr": None if self.data_addr is None else str(self.data_addr),
            "models": {k: m.to_json() for k, m in sorted(self.models.items())},
            "load": self.load,
        }
        # Optional fields appear only when set, so the adverts of nodes that do not use them stay as they were.
        if self.blob_addr is not None:
            obj["blob_addr"] = str(self.blob_addr)
        if self.tls_fp is not None:
            obj["tls_fp"] = self.tls_fp.hex()
        if self.names:
            obj["names"] = dict(sorted(self.names.items()))
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> Advert:
        if not isinstance(obj, dict) or obj.get("v") != 1:
            raise ProtocolError("advert is not a version-1 object")
        addrs = _list(obj.get("addrs"), "addrs", MAX_ADDRS)
        devices = _list(obj.get("devices"), "devices", MAX_DEVICES)
        models = obj.get("models")
        if not isinstance(models, dict) or len(models) > MAX_MODELS:
            raise ProtocolError(f"advert 'models' must be an object of at most {MAX_MODELS} entries")
        state = obj.get("state")
        if state not in STATES:
            raise ProtocolError(f"advert 'state' must be one of {STATES}")
        speed, data_addr = obj.get("speed"), obj.get("data_addr")
        blob_addr, tls_fp = obj.get("blob_addr"), obj.get("tls_fp")
        return cls(
            peer_id=PeerId(_text(obj.get("peer_id"), "peer_id")),
            incarnation=_nonneg(obj.get("incarnation"), "incarnation"),
            seq=_nonneg(obj.get("seq"), "seq"),
            state=state,
            name=_text(obj.get("name"), "name"),
            version=_text(obj.get("version"), "version"),
            addrs=tuple(_text(a, "addrs[]") for a in addrs),
            devices=tuple(_device(d) for d in devices),
            memory_total=_nonneg(obj.get("memory_total"), "memory_total"),
            memory_free=_nonneg(obj.get("memory_free"), "memory_free"),
            speed=None if speed is None else _number(speed, "speed"),
            data_addr=None if data_addr is None else _endpoint(data_addr, "data_addr"),
            models={_text(k, "model id"): ModelReady.from_json(m) for k, m in models.items()},
            load=_number(obj.get("load"), "load"),
            blob_addr=None if blob_addr is None else _endpoint(blob_addr, "blob_addr"),
            tls_fp=None if tls_fp is None else _fingerprint(tls_fp, "tls_fp"),
            names=_names(obj.get("names", {})),
        )


@dataclass(frozen=True)
class SignedAdvert:
    """An advert with the exact bytes that were signed, so it can be relayed without re-encoding."""

    advert: Advert
    body: bytes
    signature: bytes

    def to_wire(self) -> dict[str, str]:
        return {"b": base64.b64encode(self.body).decode(), "s": base64.b64encode(self.signature).decode()}


def sign_advert(advert: Advert, private_key: PrivateKey) -> SignedAdvert:
    body = json.dumps(advert.to_json(), sort_keys=True, separators=(",", ":")).encode()
    if len(body) > MAX_BODY:
        raise ProtocolError(f"advert is {len(body)} bytes, more than {MAX_BODY}")
    return SignedAdvert(advert, body, private_key.sign(DOMAIN + body))


def verify_advert(wire: Any) -> SignedAdvert:
    """Check a relayed advert: well-formed, bounded, and signed by the key of the peer id it names."""
    if not isinstance(wire, dict):
        raise ProtocolError("signed advert is not an object")
    body = _b64(wire.get("b"), "advert body", MAX_BODY)
    signature = _b64(wire.get("s"), "advert signature", MAX_SIGNATURE)
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"advert body is not JSON: {exc}") from exc
    advert = Advert.from_json(obj)
    try:
        public_key = ID.from_base58(advert.peer_id).extract_public_key()
    except (ValueError, KeyError) as exc:
        raise ProtocolError(f"advert peer id {advert.peer_id!r} is not a peer id") from exc
    if public_key is None:
        raise ProtocolError(f"advert peer id {advert.peer_id} does not carry its public key")
    if not public_key.verify(DOMAIN + body, signature):
        raise ProtocolError(f"advert for {advert.peer_id} is not signed by that peer's key")
    return SignedAdvert(advert, body, signature)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _nonneg(x: Any, what: str) -> int:
    if not _is_int(x) or x < 0:
        raise ProtocolError(f"advert {what!r} must be a non-negative integer")
    return int(x)


def _number(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0 or x == float("inf"):
        raise ProtocolError(f"advert {what!r} must be a finite non-negative number")
    return float(x)


def _text(x: Any, what: str) -> str:
    if not isinstance(x, str) or len(x) > MAX_TEXT:
        raise ProtocolError(f"advert {what!r} must be a string of at most {MAX_TEXT} characters")
    return x


def _endpoint(x: Any, what: str) -> Endpoint:
    try:
        return Endpoint.parse(_text(x, what))
    except ValueError as exc:
        raise ProtocolError(f"advert {what!r}: {exc}") from exc


def _fingerprint(x: Any, what: str) -> Fingerprint:
    try:
        return Fingerprint.from_hex(_text(x, what))
    except ValueError as exc:
        raise ProtocolError(f"advert {what!r}: {exc}") from exc


def _names(x: Any) -> dict[str, str]:
    if not isinstance(x, dict) or len(x) > MAX_NAMES:
        raise ProtocolError(f"advert 'names' must be an object of at most {MAX_NAMES} entries")
    out = {}
    for name, model_id in x.items():
        if not isinstance(name, str) or not valid_name(name):
            raise ProtocolError(f"advert 'names': {str(name)[:MAX_NAME]!r} is not a model name (letters, digits, "
                                f"'._-', at most one '/', at most {MAX_NAME} characters)")
        if not isinstance(model_id, str) or not MODEL_ID_FORM.match(model_id):
            raise ProtocolError(f"advert 'names': {name!r} must name a model id (algo:hex), got "
                                f"{str(model_id)[:80]!r}")
        out[name] = model_id
    return out


def _list(x: Any, what: str, limit: int) -> list[Any]:
    if not isinstance(x, list) or len(x) > limit:
        raise ProtocolError(f"advert {what!r} must be a list of at most {limit} items")
    return x


def _device(x: Any) -> Device:
    if not isinstance(x, dict):
        raise ProtocolError("advert device is not an object")
    return Device(_text(x.get("kind"), "device kind"), _text(x.get("name"), "device name"),
                  _nonneg(x.get("memory"), "device memory"))


def _b64(x: Any, what: str, limit: int) -> bytes:
    if not isinstance(x, str) or len(x) > (limit + 2) // 3 * 4:
        raise ProtocolError(f"{what} must be base64 of at most {limit} bytes")
    try:
        return base64.b64decode(x, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"{what} is not valid base64") from exc
