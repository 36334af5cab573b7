"""Model manifests: what a model is, byte for byte, as canonical JSON whose hash is the model id.

Schema 1 (every key required; ``validate`` names the first field that is wrong)::

    {
      "schema": 1,
      "architecture": "Qwen3MoeForCausalLM",          # config.json's architectures[0]
      "config": {...},                                # config.json, verbatim
      "dtype": "bfloat16" | null,                     # config's dtype / torch_dtype
      "quantization": {...} | null,                   # config's quantization_config
      "source": {"kind": "hub", "repo": R, "revision": COMMIT} | {"kind": "dir", "path": ABS},
      "tensors": {NAME: {"file": F, "range": [BEGIN, END], "dtype": "F32", "shape": [...]}},
                                                      # every source tensor; BEGIN/END absolute in F
      "dense": {"embed": ID, "layer.0": ID, ..., "head": ID},
      "experts": [null | [ID, ...], ...],             # one entry per layer; null for a dense layer
      "files": {"config.json": ID, "tokenizer.json": ID, ...},
      "blobs": {ID: {"size": N, "keys": [KEY, ...]} | {"size": N, "file": F} | DERIVED},
      "sizes": {"dense": N, "experts": N, "files": N, "total": N},
      "experts_format": {"format": "q8" | "q4", "group_size": N | null, "derived_from": MODEL_ID}   # optional
    }

A tensor blob is a safetensors file whose keys (sorted) are source tensor names, or ``NAME[E]`` for row E of a
fused source tensor; its bytes are rebuilt deterministically from the source ranges (``blobfmt``), which is what
lets a partial import check what it fetched against the ids here. A file blob is the file's bytes.

A quantized model (``ekmesh import SOURCE --quantize q8|q4``) carries ``experts_format`` (absent in every other
manifest, so their ids are unchanged): its routed experts are DERIVED blobs, computed from the expert weights of
the model ``derived_from`` (whose dense and file blobs it shares) rather than cut from source byte ranges::

    {"size": N, "derived": {"expert": [LAYER, E], "format": "q4"},
     "tensors": {NAME: {"dtype": "U8", "shape": [...]}, ...}}

Their tensors use ekmesh's expert layout, ``experts.<layer>.<e>.<gate_up|down>.<qweight|scale|zero>`` and
``experts.<layer>.<e>.<gate_up_bias|down_bias>`` (``ekmesh.infer.qtensor``), and the blob's safetensors metadata
records the same format (one key, ``ekmesh.expert``: ``{"expert", "format", "layer"}`` as canonical JSON).
``group_size`` null means chosen per tensor (the largest allowed that divides its input dimension); each tensor's
own group follows from its scale's shape.

Invariants: ``canonical`` is the only serialisation (sorted keys, no whitespace, UTF-8); the model id is
``blake3:`` of exactly those bytes; ``parse`` refuses bytes that are not canonical JSON of a valid schema-1
manifest, or that do not hash to the id they are loaded as (``ManifestError``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import blake3

from ekmesh.core.errors import ManifestError
from ekmesh.core.ids import BlobId, ExpertKey, ModelId

SCHEMA = 1
ID_RE = re.compile(r"^blake3:[0-9a-f]{64}\Z")  # \Z: "$" would also match before a final newline
_KEY_RE = re.compile(r"^(.+)\[(\d+)\]$")
EXPERT_FORMATS = ("q8", "q4")
_DERIVED_NAME_RE = re.compile(r"^experts\.(\d+)\.(\d+)\.[a-z_]+(\.[a-z]+)?$")
_DTYPES = ("F32", "F16", "BF16", "I8", "U8", "I32")


def canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def hash_id(data: bytes) -> str:
    return "blake3:" + blake3.blake3(data).hexdigest()


def split_key(key: str) -> tuple[str, int | None]:
    """``"name[3]"`` -> ("name", 3); ``"name"`` -> ("name", None)."""
    m = _KEY_RE.match(key)
    return (m.group(1), int(m.group(2))) if m else (key, None)


def _need(obj: Any, field: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    path = f"{where}.{field}" if where else field
    if not isinstance(obj, dict) or field not in obj:
        raise ManifestError(f"manifest field {path!r} is missing")
    v = obj[field]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is int:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ManifestError(f"manifest field {path!r} must be {want}, got {type(v).__name__}")
    return v


def _id(v: Any, path: str) -> str:
    if not isinstance(v, str) or not ID_RE.match(v):
        raise ManifestError(f"manifest field {path!r} must be a blob id 'blake3:<64 hex>', got {v!r}")
    return v


def validate(m: Any) -> None:
    """Raises ``ManifestError`` naming the first field that breaks schema 1."""
    if not isinstance(m, dict):
        raise ManifestError("a manifest must be a JSON object")
    if m.get("schema") != SCHEMA:
        raise ManifestError(f"manifest field 'schema' must be {SCHEMA}, got {m.get('schema')!r}")
    _need(m, "architecture", str)
    _need(m, "config", dict)
    _need(m, "dtype", (str, type(None)))
    _need(m, "quantization", (dict, type(None)))
    src = _need(m, "source", dict)
    kind = _need(src, "kind", str, "source")
    if kind == "hub":
        _need(src, "repo", str, "source")
        _need(src, "revision", str, "source")
    elif kind == "dir":
        _need(src, "path", str, "source")
    else:
        raise ManifestError(f"manifest field 'source.kind' must be 'hub' or 'dir', got {kind!r}")
    tensors = _need(m, "tensors", dict)
    for name, t in tensors.items():
        w = f"tensors.{name}"
        _need(t, "file", str, w)
        r = _need(t, "range", list, w)
        if len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r) or not 0 <= r[0] <= r[1]:
            raise ManifestError(f"manifest field '{w}.range' must be [begin, end] with 0 <= begin <= end")
        _need(t, "dtype", str, w)
        shape = _need(t, "shape", list, w)
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
            raise ManifestError(f"manifest field '{w}.shape' must be a list of non-negative integers")
    blobs = _need(m, "blobs", dict)
    for bid, b in blobs.items():
        _id(bid, "blobs")
        size = _need(b, "size", int, f"blobs.{bid}")
        if size < 0:
            raise ManifestError(f"manifest field 'blobs.{bid}.size' must be >= 0")
        if "derived" in b:
            _validate_derived(b, f"blobs.{bid}")
        elif "keys" in b:
            keys = _need(b, "keys", list, f"blobs.{bid}")
            for k in keys:
                name = split_key(k)[0] if isinstance(k, str) else None
                if name not in tensors:
                    raise ManifestError(f"manifest field 'blobs.{bid}.keys' names {k!r}, not in 'tensors'")
        else:
            _need(b, "file", str, f"blobs.{bid}")
    dense = _need(m, "dense", dict)
    for group, bid in dense.items():
        if _id(bid, f"dense.{group}") not in blobs:
            raise ManifestError(f"manifest field 'dense.{group}' names a blob not listed in 'blobs'")
    experts = _need(m, "experts", list)
    for layer, row in enumerate(experts):
        if row is None:
            continue
        if not isinstance(row, list):
            raise ManifestError(f"manifest field 'experts[{layer}]' must be a list of blob ids or null")
        for e, bid in enumerate(row):
            if _id(bid, f"experts[{layer}][{e}]") not in blobs:
                raise ManifestError(f"manifest field 'experts[{layer}][{e}]' names a blob not listed in 'blobs'")
    files = _need(m, "files", dict)
    if "config.json" not in files:
        raise ManifestError("manifest field 'files' must include config.json")
    for fname, bid in files.items():
        if _id(bid, f"files.{fname}") not in blobs:
            raise ManifestError(f"manifest field 'files.{fname}' names a blob not listed in 'blobs'")
    sizes = _need(m, "sizes", dict)
    for k in ("dense", "experts", "files", "total"):
        _need(sizes, k, int, "sizes")
    if "experts_format" in m:
        ef = _need(m, "experts_format", dict)
        if _need(ef, "format", str, "experts_format") not in EXPERT_FORMATS:
            raise ManifestError(f"manifest field 'experts_format.format' must be one of {EXPERT_FORMATS}, got "
                                f"{ef['format']!r}")
        _need(ef, "group_size", (int, type(None)), "experts_format")
        _id(_need(ef, "derived_from", str, "experts_format"), "experts_format.derived_from")
    for layer, row in enumerate(experts):
        for e, bid in enumerate(row or []):
            derived = blobs[bid].get("derived")
            if ("experts_format" in m) != (derived is not None):
                raise ManifestError(f"manifest field 'experts[{layer}][{e}]': a model with 'experts_format' has "
                                    "derived expert blobs, and only such a model")
            if derived is not None and (derived["expert"] != [layer, e]
                                        or derived["format"] != m["experts_format"]["format"]):
                raise ManifestError(f"manifest field 'experts[{layer}][{e}]' names a blob derived for expert "
                                    f"{derived['expert']} in {derived['format']}")


def _validate_derived(b: dict[str, Any], where: str) -> None:
    d = _need(b, "derived", dict, where)
    ex = _need(d, "expert", list, f"{where}.derived")
    if len(ex) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ex):
        raise ManifestError(f"manifest field '{where}.derived.expert' must be [layer, expert]")
    if _need(d, "format", str, f"{where}.derived") not in EXPERT_FORMATS:
        raise ManifestError(f"manifest field '{where}.derived.format' must be one of {EXPERT_FORMATS}")
    tensors = _need(b, "tensors", dict, where)
    if not tensors:
        raise ManifestError(f"manifest field '{where}.tensors' must name the blob's tensors")
    for name, t in tensors.items():
        m = _DERIVED_NAME_RE.match(name)
        if m is None or [int(m.group(1)), int(m.group(2))] != ex:
            raise ManifestError(f"manifest field '{where}.tensors' names {name!r}, not a tensor of expert {ex}")
        if _need(t, "dtype", str, f"{where}.tensors.{name}") not in _DTYPES:
            raise ManifestError(f"manifest field '{where}.tensors.{name}.dtype' must be one of {_DTYPES}")
        shape = _need(t, "shape", list, f"{where}.tensors.{name}")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
            raise ManifestError(f"manifest field '{where}.tensors.{name}.shape' must be non-negative integers")


@dataclass(frozen=True)
class Manifest:
    """A validated manifest and its id (``blake3:`` of its canonical bytes)."""

    data: dict[str, Any]
    id: ModelId

    @classmethod
    def build(cls, data: dict[str, Any]) -> Manifest:
        validate(data)
        return cls(data, ModelId(hash_id(canonical(data))))

    @classmethod
    def parse(cls, raw: bytes, expected_id: str | None = None, where: str = "manifest") -> Manifest:
        """Parses and checks manifest bytes; with ``expected_id``, they must hash to it."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{where} is not valid JSON: {exc}") from exc
        validate(data)
        got = hash_id(raw)
        if expected_id is not None and got != expected_id:
            raise ManifestError(f"{where}: its bytes hash to {got}, not to its id {expected_id}")
        if canonical(data) != raw:
            raise ManifestError(f"{where} is not in canonical form (sorted keys, no whitespace, UTF-8)")
        return cls(data, ModelId(got))

    def bytes(self) -> bytes:
        return canonical(self.data)

    @property
    def architecture(self) -> str:
        return str(self.data["architecture"])

    def expert_ids(self) -> dict[ExpertKey, BlobId]:
        return {(layer, e): BlobId(bid) for layer, row in enumerate(self.data["experts"]) if row
                for e, bid in enumerate(row)}

    def dense_ids(self) -> dict[str, BlobId]:
        return dict(self.data["dense"])

    def file_ids(self) -> dict[str, BlobId]:
        return dict(self.data["files"])

    def blob_ids(self) -> set[BlobId]:
        return set(self.data["blobs"])

    def size(self, blob_id: str) -> int:
        return int(self.data["blobs"][blob_id]["size"])

    def key_map(self) -> dict[str, str]:
        """Blob key (``name`` or ``name[e]``; a derived blob's tensor names) -> id of the blob holding it."""
        out = {k: bid for bid, b in self.data["blobs"].items() for k in b.get("keys", ())}
        out.update({k: bid for bid, b in self.data["blobs"].items() if "derived" in b for k in b["tensors"]})
        return out

    def derived_tensors(self) -> dict[str, dict[str, Any]]:
        """Every derived blob's tensors: name -> {"dtype", "shape"} (empty for a model imported from source)."""
        return {n: t for b in self.data["blobs"].values() if "derived" in b for n, t in b["tensors"].items()}

    @property
    def experts_format(self) -> dict[str, Any] | None:
        """``{"format", "group_size", "derived_from"}`` for a quantized model, else None (source layout)."""
        ef = self.data.get("experts_format")
        return dict(ef) if ef is not None else None

    def experts_format_name(self) -> str:
        """How the routed experts are stored: ``q8`` / ``q4`` (quantized by ekmesh), else the checkpoint's own
        quantization method (``fp8``, ``mxfp4``) or dtype (``bfloat16``...)."""
        if self.experts_format is not None:
            return str(self.experts_format["format"])
        q = self.data.get("quantization")
        if isinstance(q, dict) and q.get("quant_method"):
            return str(q["quant_method"])
        return str(self.data.get("dtype") or "unknown")

    def is_derived(self, blob_id: str) -> bool:
        return "derived" in self.data["blobs"].get(blob_id, {})

    def default_alias(self) -> str:
        src = self.data["source"]
        return str(src["repo"]) if src["kind"] == "hub" else str(src["path"]).rstrip("/").rsplit("/", 1)[-1]
