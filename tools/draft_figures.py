"""Measuring a draft model against the shipped built-in model (speculative decoding; docs/BUILTIN_MODEL.md).

Role: the figures ``tools/train_draft.py`` tracks and reports, ``tools/package_draft.py`` writes into
``ekmesh/builtin/card.json`` and ``tests/tools/test_builtin_model.py`` recomputes; and opening the teacher (the
packaged store's ``builtin``) and checking that a data directory was tokenized with its tokenizer. It trains
nothing and writes nothing into the package.

Definitions (every figure over every position of the held-out windows, ``tools/builtin_data.heldout_windows``):
- greedy agreement: the fraction of positions where argmax(draft logits) == argmax(target logits), both
  teacher-forced on the window (padding after a window changes none of its logits: both models are causal and
  routing is per token); KL: the mean of KL(target || draft) at temperature 1, nats per position;
- ``iid_tokens_per_step``: tokens per target forward with k drafted tokens if each were accepted independently
  with the agreement's probability a: 1 + a + ... + a^k;
- ``greedy_speculation``: greedy speculative decoding replayed exactly on the target's own greedy continuations
  of held-out prompts (a drafted token is accepted while it equals the target's greedy token, and every step adds
  the target's next token): tokens per target forward;
- ``ms_per_token``: one single-token decode step with a KV cache after a prefill, median of repeats.

Invariants: both models run through ekmesh's own code (``ekmesh.infer.loader.load_all``); the teacher is the
shipped store's ``builtin``, its blobs verified through ``ekmesh.shard.store`` when ``blake3`` is installed, else
(the GPU image) read straight from the store's folder with their sizes checked against its manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from tools.package_builtin import STORE
from tools.train_builtin import log

TEACHER = "builtin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
K_MAX = 8


# ------------------------------------------------------------------------------------------------- teacher, data
def open_teacher() -> Any:
    """The shipped built-in as an ekmesh ``Checkpoint`` (``ckpt.path`` holds its config and tokenizer files)."""
    try:
        from ekmesh.registry.lookup import open_checkpoint
        from ekmesh.shard.store import packaged_store
    except ImportError as exc:  # the GPU image has no blake3
        return _unverified_teacher(str(exc))
    store = packaged_store()
    if store is None:
        raise SystemExit(f"no packaged store at {STORE}: package the built-in model first")
    return open_checkpoint(TEACHER, store)


def _unverified_teacher(why: str) -> Any:
    from ekmesh.infer.loader import Checkpoint

    model_id = json.loads((STORE / "aliases.json").read_text())[TEACHER]
    manifest = json.loads((STORE / "manifests" / f"{model_id.split(':', 1)[1]}.json").read_text())
    files = Path(tempfile.mkdtemp(prefix="ekmesh-teacher-"))
    for bid, entry in manifest["blobs"].items():
        h = bid.split(":", 1)[1]
        path = STORE / "blobs" / "blake3" / h[:2] / h
        if path.stat().st_size != entry["size"]:
            raise SystemExit(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['size']}")
        if "file" in entry:
            shutil.copyfile(path, files / entry["file"])
        else:
            (files / f"{h}.safetensors").symlink_to(path)
    log(f"teacher {model_id} read from {STORE} without hash checks ({why}); sizes match its manifest")
    ckpt = Checkpoint.open(files)
    weakref.finalize(ckpt, shutil.rmtree, str(files), True)
    return ckpt


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def check_tokenizer(data: Path, teacher_files: Path) -> None:
    """Refuses (SystemExit) unless ``data/tokenizer/`` holds the shipped tokenizer files, byte for byte."""
    for name in TOKENIZER_FILES:
        mine, shipped = data / "tokenizer" / name, teacher_files / name
        if not mine.is_file():
            raise SystemExit(f"{mine} is missing: run `python -m tools.train_builtin prepare --data {data}`")
        a, b = mine.read_bytes(), shipped.read_bytes()
        if a != b:
            raise SystemExit(
                f"refusing {data}: its {name} ({_digest(a)}, {len(a)} bytes) is not the shipped built-in model's "
                f"({_digest(b)}, {len(b)} bytes), so its token streams were made with another tokenizer. Re-run "
                f"`python -m tools.train_builtin prepare --data {data}` with the corpus the built-in was made from.")
    digest = _digest((data / "tokenizer" / TOKENIZER_FILES[0]).read_bytes())
    log(f"tokenizer of {data} is the shipped built-in's ({digest})")


def ekmesh_forward(source: Any, device: str, dtype: Any) -> Any:
    """ids [B, T] -> logits [B, T, V] with ekmesh's one-process model (no gradients); ``.model`` / ``.experts``."""
    import torch

    from ekmesh.infer.loader import load_all

    _, model, experts = load_all(source, device, dtype)

    def fn(ids: Any) -> Any:
        with torch.no_grad():
            return model(ids, model.new_cache(), experts)

    fn.model, fn.experts = model, experts  # type: ignore[attr-defined]
    return fn


def batch_check(fn: Any, ids: Any, tol: float) -> bool:
    """Whether ``fn`` over a batch [B, T] gives what it gives row by row (else the caller loops over rows)."""
    import torch

    alone = torch.cat([fn(ids[i : i + 1]).float() for i in range(ids.shape[0])])  # [B, T, V]
    try:
        together = fn(ids).float()  # [B, T, V]
    except (RuntimeError, ValueError, IndexError) as exc:
        log(f"teacher batch check: batched forward failed ({type(exc).__name__}: {exc}); looping over rows")
        return False
    diff = (together - alone).abs().max().item() if together.shape == alone.shape else math.inf
    agree = (together.argmax(-1) == alone.argmax(-1)).float().mean().item() if diff < math.inf else 0.0
    log(f"teacher batch check, B={ids.shape[0]}: max |batched - row by row| logit {diff:.2e} (tolerance {tol:g}), "
        f"argmax agreement {agree:.4f}")
    return diff <= tol


# ------------------------------------------------------------------------------------------------------ measures
def chunks(windows: list[list[int]], batch: int, device: str) -> Any:
    """Right-padded batches: (ids [B, W] with token 0 as pad, valid [B, W-1]: the positions a window predicts)."""
    import torch

    for i in range(0, len(windows), batch):
        part = windows[i : i + batch]
        width = max(len(w) for w in part)
        ids = torch.zeros(len(part), width, dtype=torch.long)  # [B, W]
        valid = torch.zeros(len(part), width - 1, dtype=torch.bool)  # [B, W-1]
        for r, w in enumerate(part):
            ids[r, : len(w)] = torch.tensor(w)
            valid[r, : len(w) - 1] = True
        yield ids.to(device), valid.to(device)


def compare(draft_logits: Any, target_logp: Any, valid: Any) -> tuple[int, int, float]:
    """(positions where the argmaxes agree, positions, summed KL(target || draft)) over ``valid`` positions."""
    import torch.nn.functional as F

    d = F.log_softmax(draft_logits.float(), -1)  # [B, T, V]
    agree = (d.argmax(-1) == target_logp.argmax(-1)) & valid  # [B, T]
    kl = (target_logp.exp() * (target_logp - d)).sum(-1)  # [B, T]
    return int(agree.sum().item()), int(valid.sum().item()), float(kl[valid].sum().item())


def heldout_figures(draft: Any, target: Any, windows: list[list[int]], device: str = "cpu",
                    batch: int = 16) -> dict[str, Any]:
    """Greedy agreement and mean KL of ``draft`` against ``target`` (callables ids -> logits) over ``windows``
    (padding after a window changes none of its logits: both models are causal, routing is per token)."""
    import torch.nn.functional as F

    agree = n = 0
    kl = 0.0
    for ids, valid in chunks(windows, batch, device):
        a, c, k = compare(draft(ids[:, :-1]), F.log_softmax(target(ids[:, :-1]).float(), -1), valid)
        agree, n, kl = agree + a, n + c, kl + k
    return {"agree": agree, "positions": n, "greedy_agreement": agree / n, "kl": kl / n}


def iid_tokens_per_step(a: float, k_max: int = K_MAX) -> dict[str, float]:
    """Tokens per target forward with k drafts if each is accepted with probability ``a`` independently."""
    return {str(k): 1 + sum(a ** i for i in range(1, k + 1)) for k in range(1, k_max + 1)}


def greedy_speculation(draft: Any, target: Any, prompts: list[list[int]], n_tokens: int,
                       k_max: int = K_MAX) -> dict[str, Any]:
    """Greedy speculative decoding replayed exactly: the target's greedy continuation of each prompt (until an
    end token or ``n_tokens``), then the draft teacher-forced on it; a step accepts drafts while they equal the
    target's tokens and adds the target's own next token. Returns tokens per target forward for k = 1..k_max."""
    import torch

    model, experts = target.model, target.experts
    runs: list[list[bool]] = []
    with torch.inference_mode():
        for prompt in prompts:
            cache = model.new_cache()
            nxt = int(model(torch.tensor([prompt]), cache, experts)[0, -1].argmax())
            gen = [nxt]
            while len(gen) < n_tokens and nxt not in (0, 2):
                nxt = int(model(torch.tensor([[nxt]]), cache, experts)[0, -1].argmax())
                gen.append(nxt)
            full = torch.tensor([prompt + gen])
            guess = draft(full[:, :-1])[0, len(prompt) - 1 :].argmax(-1).tolist()  # draft's token for each gen[i]
            runs.append([g == t for g, t in zip(guess, gen, strict=True)])
    out: dict[str, float] = {}
    for k in range(1, k_max + 1):
        steps = 0
        for match in runs:
            p = 0
            while p < len(match):
                r = 0
                while r < k and p + r < len(match) and match[p + r]:
                    r += 1
                p, steps = p + r + 1, steps + 1
        out[str(k)] = sum(map(len, runs)) / steps
    return {"prompts": len(runs), "tokens": sum(map(len, runs)), "greedy_agreement": sum(map(sum, runs)) /
            sum(map(len, runs)), "tokens_per_step": out}


def ms_per_token(fns: dict[str, Any], context: list[int], steps: int = 32, repeats: int = 7) -> dict[str, float]:
    """Wall time of one single-token decode step (KV cache, greedy token fed back) after a prefill of ``context``,
    ms: the best of ``repeats`` means over ``steps`` steps, the models taking turns so that a busy machine slows
    each alike (the best is the least disturbed run)."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, fn in fns.items():
                model, experts = fn.model, fn.experts
                cache = model.new_cache()
                tok = model(torch.tensor([context]), cache, experts)[:, -1:].argmax(-1)  # [1, 1]
                t0 = time.perf_counter()
                for _ in range(steps):
                    tok = model(tok, cache, experts)[:, -1:].argmax(-1)
                times[name].append((time.perf_counter() - t0) / steps * 1e3)
    return {name: min(ts) for name, ts in times.items()}


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def cpu_timing(draft: Any, target: Any, windows: list[list[int]]) -> dict[str, Any]:
    import torch

    context = windows[0][:128]
    ms = ms_per_token({"draft": draft, "target": target}, context)
    res = {"draft_ms": round(ms["draft"], 3), "target_ms": round(ms["target"], 3),
           "ratio": round(ms["draft"] / ms["target"], 4), "threads": torch.get_num_threads(), "context": len(context),
           "cpu": cpu_name(), "torch": torch.__version__}
    log(f"CPU decode step (fp32, {res['threads']} torch threads, after a {len(context)}-token prefill, best of 7): "
        f"draft {ms['draft']:.2f} ms, target {ms['target']:.2f} ms per token (draft/target {res['ratio']:.3f})")
    return res


def load_pair(draft_source: Any, target_source: Any = None) -> tuple[Any, Any]:
    """(draft, target) forwards in fp32 on the CPU; the target defaults to the shipped built-in."""
    import torch

    target = ekmesh_forward(open_teacher() if target_source is None else target_source, "cpu", torch.float32)
    return ekmesh_forward(draft_source, "cpu", torch.float32), target


def evaluate_pair(draft: Any, target: Any, windows: list[list[int]], prompts: int = 8, gen_tokens: int = 64,
                  timing: bool = True) -> dict[str, Any]:
    """Every figure of a draft against its target (``load_pair``): held-out agreement and KL, both speculation
    estimates, the draft's parameters and (``timing``) the CPU decode-step timings."""
    t0 = time.time()
    res = heldout_figures(draft, target, windows)
    res["iid_tokens_per_step"] = iid_tokens_per_step(res["greedy_agreement"])
    log(f"held-out: greedy agreement {res['greedy_agreement']:.4f} ({res['agree']}/{res['positions']}), "
        f"KL {res['kl']:.4f} nats/token ({time.time() - t0:.0f}s); i.i.d. tokens per target forward: " +
        ", ".join(f"k={k} {v:.2f}" for k, v in res["iid_tokens_per_step"].items()))
    step = max(1, len(windows) // prompts)
    res["greedy_speculation"] = spec = greedy_speculation(draft, target, [w[:32] for w in windows[::step][:prompts]],
                                                          gen_tokens)
    log(f"greedy speculation on the target's own continuations of {spec['prompts']} held-out prompts "
        f"({spec['tokens']} tokens, agreement {spec['greedy_agreement']:.4f}): tokens per target forward " +
        ", ".join(f"k={k} {v:.2f}" for k, v in spec["tokens_per_step"].items()))
    if timing:
        res["cpu_timing"] = cpu_timing(draft, target, windows)
    res["params"] = sum(p.numel() for p in draft.model.parameters())  # a tied head counts once
    return res
