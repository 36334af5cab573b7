"""``ekmesh import``: a checkpoint (local directory or hub repo) into the store, fully or partially.

Full import (``import_full``): read the config and every safetensors header (a few KiB per file), ask the injected
``planner`` (infer's ``read_plan``: the loader run on headers only) which tensors (and rows) the dense part and
each expert read, group the dense ones per layer (``dense_group``), then stream each blob's source ranges
into the store chunk by chunk — never a whole tensor in memory — hashing as it goes, and finally write the
manifest, whose hash is the model id. A manifest needs every blob's id, i.e. every byte once, so the first import
of a model is always a full one.

Partial import (``import_partial``): given a manifest already in this store (from a full import here, or copied in
from a peer that did one), fetch only the dense blobs, the chosen experts' blobs and the config / tokenizer files,
by byte range from the manifest's source (the hub repo at the recorded commit, or the recorded directory). The
manifest carries every tensor's absolute byte range, so not even the safetensors headers are needed; each blob is
rebuilt from its ranges, hashed, and stored only if it hashes to the manifest's id.

Resume: blobs already in the store (and verifying) are skipped. A full import also appends each finished blob to
a journal (``store/imports/<source key>.jsonl``, keyed by the source and its tensor table) so a re-run skips it
without reading its bytes again. A full disk stops an import with ``StoreFullError`` (naming the blob or record it
was writing, and the store) and leaves nothing partial: the store removes a blob it could not finish, and a journal
line it could not finish is cut off again, so the re-run, once space is freed, resumes from every whole record.
Test hook: ``EKMESH_TEST_IMPORT_DELAY_S`` sleeps that long after each stored blob, so tests can kill an import
mid-way reliably. Progress goes to an injected ``Progress`` (the CLI draws it).
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import blake3

from ekmesh.core.errors import BlobHashMismatchError, CheckpointError, ConfigError, ShardMissingError
from ekmesh.shard.blobfmt import Part, blob_size, parts_for, stream_blob
from ekmesh.shard.hub import open_hub
from ekmesh.shard.manifest import SCHEMA, Manifest, canonical
from ekmesh.shard.source import DirSource, Source, TensorEntry
from ekmesh.shard.store import Store, out_of_space

DELAY_ENV = "EKMESH_TEST_IMPORT_DELAY_S"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ReadPlan(Protocol):
    """What the loader reads (``ekmesh.infer.readplan.ReadPlan``): dense keys, each expert's keys (``name`` or
    ``name[e]``), and the model's layer / expert counts."""

    dense: list[str]
    experts: dict[tuple[int, int], list[str]]
    num_layers: int
    num_experts: int


# (config.json, {tensor: (safetensors dtype, shape)}, label) -> ReadPlan; the wiring layer passes infer's read_plan.
Planner = Callable[[dict[str, Any], dict[str, tuple[str, tuple[int, ...]]], str], ReadPlan]
# (layer, expert, the expert blob's bytes as chunks) -> the blob's id. Given to ``import_full``, it receives every
# expert blob instead of the store (``import --quantize`` from a source: hash, quantize, keep only the result).
ExpertSink = Callable[[int, int, Iterator[bytes]], str]


def dense_group(key: str) -> str:
    """The dense blob a tensor goes to: ``…layers.N.…`` -> ``layer.N``; ``embed`` in the name -> ``embed``;
    anything else (final norm, lm_head) -> ``head``."""
    m = _LAYER_RE.search(key)
    if m:
        return f"layer.{int(m.group(1))}"
    return "embed" if "embed" in key else "head"


class Progress(Protocol):
    def start(self, total_bytes: int, blobs: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...


@dataclass
class ImportResult:
    model_id: str
    alias: str
    bytes: int  # bytes of this model's blobs present in the store
    blobs: int  # blobs of this model present in the store
    experts_present: int
    experts_total: int
    fetched: int  # bytes read from the source by this run
    stored: int  # blobs written by this run
    skipped: int  # blobs this run found already stored
    format: str = ""  # the routed experts' format (``Manifest.experts_format_name``)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def open_source(ref: str, revision: str | None = None) -> Source:
    """A directory if ``ref`` names one (or looks like a path), else a hub repo id."""
    p = Path(ref).expanduser()
    if p.is_dir():
        if revision is not None:
            raise ConfigError("--revision applies to hub repos, not to a local directory")
        return DirSource(p)
    if ref.startswith((".", "/", "~")) or p.exists():
        raise CheckpointError(f"{ref} is not a checkpoint directory")
    return open_hub(ref, revision)


def _delay() -> None:
    v = os.environ.get(DELAY_ENV)
    if v:
        time.sleep(float(v))


def _metered(chunks: Iterable[bytes], progress: Progress | None) -> Iterator[bytes]:
    for c in chunks:
        if progress is not None:
            progress.advance(len(c))
        yield c


class Journal:
    """Append-only record of the blobs an import has finished, by job name (a torn last line is ignored): a
    re-run skips them without reading their bytes again."""

    def __init__(self, store: Store, key: str) -> None:
        self.store = store
        self.path = store.root / "imports" / f"{key}.jsonl"
        self.done: dict[str, str] = {}
        try:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.done[str(rec["job"])] = str(rec["id"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        except FileNotFoundError:
            pass

    def record(self, job: str, blob_id: str) -> None:
        """Appends one line; a line the disk had no room for is cut off again (a torn line would swallow the next
        record appended after it), and ``StoreFullError`` raised."""
        line = (json.dumps({"job": job, "id": blob_id}) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self.store.write_error(f"the import journal {self.path.name}", exc) from exc
        try:
            end = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(line):
                    n = os.write(fd, line[written:])
                    if n <= 0:
                        raise OSError(errno.EIO, f"{self.path}: a write took no bytes")
                    written += n
                os.fsync(fd)
            except OSError as exc:
                if out_of_space(exc):
                    os.ftruncate(fd, end)  # shrinking needs no space
                raise self.store.write_error(f"the import journal's record of {job}", exc) from exc
        finally:
            os.close(fd)
        self.done[job] = blob_id


def still_good(store: Store, blob_id: str) -> bool:
    """Whether the store holds ``blob_id`` and it verifies."""
    try:
        store.verify(blob_id)
    except (ShardMissingError, BlobHashMismatchError):
        return False
    return True


def source_tensors(src: Source) -> dict[str, TensorEntry]:
    """Every tensor of the source's safetensors files (headers only); a name in two files is an error."""
    tensors: dict[str, TensorEntry] = {}
    for f in src.weight_files():
        for name, t in src.header(f)[0].items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is in both {tensors[name].file} and {f}")
            tensors[name] = t
    return tensors


def import_full(ref: str, planner: Planner, revision: str | None = None, alias: str | None = None,
                store: Store | None = None, progress: Progress | None = None,
                expert_sink: ExpertSink | None = None) -> ImportResult:
    """Imports every blob of ``ref``; ``planner`` says which tensors the dense part and each expert read. With
    ``expert_sink`` the expert blobs go to it instead of the store (their ids still enter the manifest, which then
    describes a model whose experts are absent here, as after a partial import)."""
    store = store or Store()
    store.clean_tmp()
    src = open_source(ref, revision)
    try:
        hf = json.loads(src.read_file("config.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{src.label('config.json')} is not valid JSON: {exc}") from exc
    if not isinstance(hf, dict):
        raise CheckpointError(f"{src.label('config.json')} must hold a JSON object")
    tensors = source_tensors(src)
    plan = planner(hf, {n: (t.dtype, t.shape) for n, t in tensors.items()}, ref)
    groups: dict[str, list[str]] = {}
    for k in plan.dense:
        groups.setdefault(dense_group(k), []).append(k)

    jobs: list[tuple[str, list[Part]]] = [(f"dense.{g}", parts_for(keys, tensors)) for g, keys in groups.items()]
    jobs += [(f"expert.{layer}.{e}", parts_for(keys, tensors)) for (layer, e), keys in plan.experts.items()]
    stat = {}
    if isinstance(src, DirSource):
        for f in src.weight_files():
            st = (src.path / f).stat()
            stat[f] = [st.st_size, st.st_mtime_ns]
    table = {n: [t.file, t.begin, t.end, t.dtype, list(t.shape)] for n, t in tensors.items()}
    key = blake3.blake3(canonical({"source": src.describe(), "tensors": table, "stat": stat})).hexdigest()[:32]
    journal = Journal(store, key)

    sunk = {j for j, _ in jobs if expert_sink is not None and j.startswith("expert.")}  # the sink sees every expert
    todo = [(j, parts) for j, parts in jobs
            if j in sunk or not (j in journal.done and still_good(store, journal.done[j]))]
    if progress is not None:
        progress.start(sum(blob_size(p) for _, p in todo), len(todo))
    ids: dict[str, str] = {j: journal.done[j] for j, _ in jobs if j in journal.done}
    sizes: dict[str, int] = {}
    for job, parts in todo:
        chunks = _metered(stream_blob(parts, src), progress)
        if expert_sink is not None and job.startswith("expert."):
            _, at_layer, at_expert = job.split(".")
            ids[job] = expert_sink(int(at_layer), int(at_expert), chunks)
            continue  # not stored: nothing to journal
        ids[job] = store.put(chunks, what=f"the {job} blob of {ref}")
        journal.record(job, ids[job])
        _delay()
    for job, parts in jobs:
        sizes[ids[job]] = blob_size(parts)

    blobs: dict[str, dict[str, Any]] = {}
    for job, parts in jobs:
        blobs[ids[job]] = {"size": sizes[ids[job]], "keys": [p.key for p in parts]}
    files: dict[str, str] = {}
    for fname in src.meta_files():
        content = src.read_file(fname)
        bid = store.put([content], what=f"{fname} of {ref}")
        files[fname] = bid
        blobs.setdefault(bid, {"size": len(content), "file": fname})
    if "config.json" not in files:
        raise CheckpointError(f"{src.describe()} has no config.json")

    experts: list[list[str] | None] = []
    for layer in range(plan.num_layers):
        experts.append([ids[f"expert.{layer}.{e}"] for e in range(plan.num_experts)]
                       if (layer, 0) in plan.experts else None)
    dense = {g: ids[f"dense.{g}"] for g in groups}
    size_of = {bid: b["size"] for bid, b in blobs.items()}
    expert_ids = {bid for row in experts if row for bid in row}
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "architecture": str((hf.get("architectures") or [hf.get("model_type", "")])[0]),
        "config": hf,
        "dtype": hf.get("dtype") or hf.get("torch_dtype"),
        "quantization": hf.get("quantization_config"),
        "source": src.describe(),
        "tensors": {n: {"file": t.file, "range": [t.begin, t.end], "dtype": t.dtype, "shape": list(t.shape)}
                    for n, t in sorted(tensors.items())},
        "dense": dense,
        "experts": experts,
        "files": files,
        "blobs": blobs,
        "sizes": {"dense": sum(size_of[b] for b in set(dense.values())),
                  "experts": sum(size_of[b] for b in expert_ids),
                  "files": sum(size_of[b] for b in set(files.values())),
                  "total": sum(size_of.values())},
    }
    m = Manifest.build(data)
    store.save_manifest(m)
    name = alias or m.default_alias()
    store.set_alias(name, m.id)
    return summarize(store, m, name, fetched=src.bytes_read, stored=len(todo),
                     skipped=len(jobs) - len(todo))


def parse_experts(spec: str, m: Manifest,
                  assigned: Callable[[Manifest], list[tuple[int, int]]] | None = None) -> list[tuple[int, int]]:
    """``--experts``: ``L:E,L:E,…``, a fraction in (0, 1] (a deterministic choice by hash), or ``assigned`` (what
    the placement over the running mesh gives this peer: ``assigned(manifest)``, provided by the node level)."""
    addresses = sorted(m.expert_ids())
    spec = spec.strip()
    if spec == "assigned":
        if assigned is None:
            raise ConfigError("--experts assigned needs the running mesh node of this EKMESH_HOME (`ekmesh join`)")
        return sorted(set(assigned(m)))
    if ":" in spec:
        out = []
        for item in spec.split(","):
            try:
                layer, e = (int(x) for x in item.strip().split(":"))
            except ValueError as exc:
                raise ConfigError(f"--experts: {item!r} is not LAYER:EXPERT") from exc
            if (layer, e) not in m.expert_ids():
                raise ConfigError(f"--experts: ({layer}, {e}) is not a routed expert of model {m.id}")
            out.append((layer, e))
        return sorted(set(out))
    try:
        frac = float(spec)
    except ValueError as exc:
        raise ConfigError(f"--experts must be LAYER:EXPERT,…, a fraction like 0.25, or 'assigned'; "
                          f"got {spec!r}") from exc
    if not 0.0 < frac <= 1.0:
        raise ConfigError(f"--experts fraction must be in (0, 1], got {frac}")
    n = max(1, round(frac * len(addresses)))
    ranked = sorted(addresses, key=lambda a: blake3.blake3(f"{m.id}:{a[0]}:{a[1]}".encode()).digest())
    return sorted(ranked[:n])


def partial_blobs(m: Manifest, chosen: Iterable[tuple[int, int]]) -> list[str]:
    """The blobs a partial import of ``chosen`` needs: files, dense, then those experts (unique, in order)."""
    ids = list(m.file_ids().values()) + list(m.dense_ids().values())
    ex = m.expert_ids()
    ids += [ex[a] for a in chosen]
    return list(dict.fromkeys(ids))


def source_of(m: Manifest) -> Source:
    src = m.data["source"]
    if src["kind"] == "hub":
        return open_hub(src["repo"], src["revision"])
    return DirSource(src["path"])


def find_manifest(store: Store, ref: str, revision: str | None = None) -> Manifest:
    """A local manifest for ``ref``: a model id / alias, else the newest one imported from that repo or dir."""
    try:
        return store.load_manifest(store.resolve(ref))
    except ShardMissingError:
        pass
    path = str(Path(ref).expanduser().resolve()) if Path(ref).expanduser().is_dir() else None
    found = []
    for mid in store.models():
        m = store.load_manifest(mid)
        s = m.data["source"]
        if (s["kind"] == "hub" and s["repo"] == ref and revision in (None, s["revision"])) or \
                (s["kind"] == "dir" and s["path"] == path):
            found.append((store.manifest_path(mid).stat().st_mtime_ns, mid, m))
    if not found:
        raise ShardMissingError(f"a manifest for {ref!r}", "a partial import needs the model's manifest: import "
                                "it fully once (here or on another machine, then copy store/manifests/<id>.json "
                                "into this store)")
    return max(found)[2]


def import_partial(ref: str, spec: str, revision: str | None = None, alias: str | None = None,
                   store: Store | None = None, progress: Progress | None = None,
                   assigned: Callable[[Manifest], list[tuple[int, int]]] | None = None) -> ImportResult:
    store = store or Store()
    store.clean_tmp()
    m = find_manifest(store, ref, revision)
    chosen = parse_experts(spec, m, assigned)
    need = partial_blobs(m, chosen)
    todo = [b for b in need if not still_good(store, b)]
    derived = [b for b in todo if m.is_derived(b)]
    if derived:
        raise ShardMissingError(f"blob {derived[0]}", f"model {m.id} has quantized experts, which no source holds: "
                                "`ekmesh import` its parent with --quantize, or let `ekmesh join` fetch them from "
                                "peers")
    src = source_of(m) if todo else None
    tensors = {n: TensorEntry(t["file"], t["range"][0], t["range"][1], t["dtype"], tuple(t["shape"]))
               for n, t in m.data["tensors"].items()}
    if progress is not None:
        progress.start(sum(m.size(b) for b in todo), len(todo))
    for bid in todo:
        assert src is not None
        info = m.data["blobs"][bid]
        if "file" in info:
            data = src.read_file(info["file"])
            if progress is not None:
                progress.advance(len(data))
            store.put([data], expected_id=bid)
        else:
            store.put(_metered(stream_blob(parts_for(info["keys"], tensors), src), progress), expected_id=bid)
        _delay()
    store.save_manifest(m)
    name = alias or next((a for a, mid in store.aliases().items() if mid == m.id), m.default_alias())
    store.set_alias(name, m.id)
    return summarize(store, m, name, fetched=src.bytes_read if src else 0, stored=len(todo),
                     skipped=len(need) - len(todo))


def summarize(store: Store, m: Manifest, alias: str, fetched: int = 0, stored: int = 0,
              skipped: int = 0) -> ImportResult:
    present = {b for b in m.blob_ids() if store.has(b)}
    ex = m.expert_ids()
    return ImportResult(model_id=m.id, alias=alias, bytes=sum(m.size(b) for b in present), blobs=len(present),
                        experts_present=sum(1 for b in ex.values() if b in present), experts_total=len(ex),
                        fetched=fetched, stored=stored, skipped=skipped, format=m.experts_format_name())
