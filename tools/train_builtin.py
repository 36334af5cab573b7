"""Train ekmesh's built-in model: a small Qwen3-MoE on the King James Bible, chat-shaped (docs/BUILTIN_MODEL.md).

Role: the command line that makes the built-in checkpoint. Three steps, each its own subcommand, then
``tools/package_builtin.py`` imports the result into the package's read-only store:

    python -m tools.train_builtin prepare --data .train      # CPU; needs Debian's sword-text-kjv
    python -m tools.train_builtin train --data .train --out .train/checkpoint --report report.json   # GPU, ~2 min
    python -m tools.train_builtin eval .train/checkpoint --data .train   # held-out loss on CPU (transformers)

``prepare`` writes the tokenizer and the token streams (``tools/builtin_data.py``), so the GPU machine needs no
corpus; ``train`` trains transformers' ``Qwen3MoeForCausalLM`` (a tools-only dependency; ekmesh never imports it),
measures the held-out loss every ``--eval-every`` steps, keeps the best state and saves it as a Hugging Face
checkpoint in bf16 with the tokenizer files (early stopping after ``--patience`` steps without improvement);
``eval`` recomputes the held-out loss of a saved checkpoint in fp32 on the CPU. This script is not part of the
package and is not run by the tests. The checkpoint directory is never shipped (only the store is).

Invariants: training is seeded (weights, dropout, data windows); every held-out figure, during training and at
the end, is the mean next-token cross-entropy over ``builtin_data.heldout_windows`` computed in fp32 from the
bf16 rounding of the weights, i.e. of the weights that are saved, so it is the figure a test recomputes from the
shipped files; the saved state is the one with the lowest such figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

from tools.schedule import BUDGET_PROBE, Schedule

SAMPLE_PROMPTS = ("Genesis 1", "Recite Psalm 23", "Tell me about light.", "Continue: In the beginning",
                  "Who was Moses?", "John 11:35")

MODEL: dict[str, Any] = dict(
    vocab_size=4096, hidden_size=384, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    head_dim=48, intermediate_size=1024, moe_intermediate_size=160, num_experts=12, num_experts_per_tok=2,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=2048,
    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
    router_aux_loss_coef=0.01, output_router_logits=True, initializer_range=0.02, bos_token_id=None,
    eos_token_id=2, pad_token_id=0, use_cache=True,
)


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------------- prepare
def prepare(args: argparse.Namespace) -> None:
    from tools import builtin_data as bd
    from tools import kjv

    t0 = time.time()
    verses = kjv.read_verses(Path(args.module))
    train, held = bd.split(verses)
    log(f"{len(verses)} verses; training {len(train)} chapters, held out {len(held)} chapters "
        f"({sum(map(len, held))} verses)")
    tok = bd.train_tokenizer(train)
    data = Path(args.data)
    bd.write_tokenizer_files(tok, data / "tokenizer")
    stream = array("H")
    for r in range(args.rounds):
        stream.extend(bd.encode_stream(tok, bd.chat_documents(train, seed=1 + r)))
    with open(data / "train.u16", "wb") as f:
        stream.tofile(f)
    windows = bd.heldout_windows(tok, held, args.seq_len)
    (data / "heldout.json").write_text(json.dumps(windows))
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", kjv.DEBIAN_PACKAGE], capture_output=True,
                             text=True, check=False).stdout.strip() or "unknown"
    meta = {"package": kjv.DEBIAN_PACKAGE, "package_version": version, "verses": len(verses),
            "train_chapters": len(train), "heldout_chapters": len(held),
            "heldout_refs": [bd.chapter_name(c[0].book, c[0].chapter) for c in held],
            "heldout_tokens": sum(len(w) - 1 for w in windows), "rounds": args.rounds,
            "train_tokens": len(stream), "vocab_size": tok.get_vocab_size(), "seq_len": args.seq_len}
    (data / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"prepared in {time.time() - t0:.1f}s: {json.dumps({k: v for k, v in meta.items() if k != 'heldout_refs'})}")


# ------------------------------------------------------------------------------------------------------------- train
def build_model(experts_impl: str):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**MODEL)
    config._experts_implementation = experts_impl
    model = Qwen3MoeForCausalLM(config)
    return model.to(torch.float32)


def pick_experts_impl(device: str, seed: int) -> str:
    """grouped_mm where it runs forward and backward and agrees with eager, else eager (the reference loop)."""
    import torch

    if device == "cpu":
        return "eager"
    x = torch.randint(0, MODEL["vocab_size"], (2, 64), device=device)
    grads = {}
    for impl in ("eager", "grouped_mm"):
        torch.manual_seed(seed)
        model = build_model(impl).to(device)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(input_ids=x, labels=x)
            out.loss.backward()
        except (RuntimeError, NotImplementedError, TypeError, ValueError, KeyError) as exc:
            log(f"experts implementation {impl} failed ({type(exc).__name__}: {exc}); using eager")
            return "eager"
        grads[impl] = (out.loss.item(), model.model.layers[0].mlp.experts.down_proj.grad.float().clone())
    diff = (grads["eager"][1] - grads["grouped_mm"][1]).abs().max().item()
    log(f"experts check: loss eager {grads['eager'][0]:.5f} grouped_mm {grads['grouped_mm'][0]:.5f}, "
        f"max grad diff {diff:.2e}")
    return "grouped_mm" if abs(grads["eager"][0] - grads["grouped_mm"][0]) < 1e-2 else "eager"


def heldout_loss(model, windows: list[list[int]], device: str, batch: int = 64) -> tuple[float, int]:
    """Mean next-token cross-entropy over the held-out windows, fp32.

    Windows are right-padded into batches of ``batch``; the model is causal, so a window's logits do not depend on
    the padding after it, and padded positions are left out of the loss (label -100): the figure is the one of
    running each window alone."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            chunk = windows[i : i + batch]
            width = max(len(w) for w in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)  # [B, T+1], 0 = <|endoftext|> as pad
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for r, w in enumerate(chunk):
                ids[r, : len(w)] = torch.tensor(w)
                labels[r, : len(w)] = torch.tensor(w)
            ids, labels = ids.to(device), labels.to(device)
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits.float()  # [B, T, V]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += sum(len(w) - 1 for w in chunk)
    return total / count, count


def add_residual_dropout(model, p: float) -> None:
    """Dropout on each attention and MoE block output before it joins the residual stream (training only).

    Forward hooks, so the saved model and its config are unchanged: inference never sees them."""
    import torch.nn.functional as F

    if p <= 0:
        return

    def hook(module, args, out):  # attention: (hidden [B, T, D], weights); MoE block: hidden or (hidden, logits)
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, module.training), *out[1:])
        return F.dropout(out, p, module.training)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def generate_samples(model, tok_dir: Path, device: str, max_new_tokens: int) -> list[dict[str, str]]:
    import torch
    from tokenizers import Tokenizer

    from tools.builtin_data import IM_START

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    out = []
    for prompt in SAMPLE_PROMPTS:
        text = f"{IM_START}user\n{prompt}<|im_end|>\n{IM_START}assistant\n"
        ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids], device=device)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[2, 0],
                                 pad_token_id=0)
        answer = tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        out.append({"prompt": prompt, "answer": answer})
        log(f"--- {prompt!r}\n{answer}")
    return out


def train_windows(stream, n: int, seq_len: int, seed: int) -> list[list[int]]:
    """``n`` fixed training windows (seeded offsets) to measure the train loss the way the held-out loss is."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len - 1, (n,), generator=gen).tolist()
    host = stream.cpu()
    return [host[s : s + seq_len + 1].tolist() for s in starts]


def train(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    t_start = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = Path(args.data)
    raw = (data / "train.u16").read_bytes()
    # Token ids are < 4096, so reading the uint16 stream as int16 is exact.
    stream = torch.frombuffer(bytearray(raw), dtype=torch.int16).to(device=device, dtype=torch.long)
    windows = json.loads((data / "heldout.json").read_text())
    # Tracking during training may use a fixed subset (every k-th window); the final figure is always the full set.
    track = windows[:: max(1, len(windows) // args.eval_windows)] if args.eval_windows else windows
    train_probe = train_windows(stream, args.train_eval_windows, args.seq_len, args.seed + 1)
    n_tokens, seq_len, batch_size = stream.numel(), args.seq_len, args.batch
    log(f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), "
        f"torch {torch.__version__}, {n_tokens} training tokens, {len(windows)} held-out windows "
        f"({len(track)} tracked every {args.eval_every} steps)")

    impl = args.experts_impl if args.experts_impl != "auto" else pick_experts_impl(device, args.seed)
    torch.manual_seed(args.seed)
    model = build_model(impl).to(device)
    add_residual_dropout(model, args.dropout)
    # The evaluator is a second fp32 copy (eager experts loop, the reference) loaded from the bf16 weights that
    # would be saved at that step, so every tracked figure is the shipped-weights figure.
    evaluator = build_model("eager").to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"experts implementation {impl}; {n_params:,} parameters ({2 * n_params / 1e6:.1f} MB in bf16); "
        f"residual dropout {args.dropout}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda"))
    warmup = args.warmup
    probe = min(BUDGET_PROBE, warmup - 1)  # the step count must be fixed while the schedule ignores it

    def snapshot() -> dict[str, Any]:
        return {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}

    def measure(state: dict[str, Any], which: list[list[int]]) -> float:
        evaluator.load_state_dict(state)  # bf16 -> fp32, exact
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            return heldout_loss(evaluator, which, device)[0]
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(seq_len + 1, device=device)
    use_amp = device.startswith("cuda")
    losses: list[float] = []
    curve: list[dict[str, float]] = []  # one entry per evaluation
    best: dict[str, Any] = {"loss": float("inf"), "step": -1, "state": None}
    sched = Schedule(args.lr, warmup, args.steps, probe, 2 * warmup, args.budget, args.time_limit, args.patience,
                     args.eval_every, log)
    t_train = sched.t_train
    steps_done = step = 0
    stop = ""
    while True:
        evaluated = sched.evaluates(step)
        if evaluated:
            t0 = time.time()
            state = snapshot()
            held = measure(state, track)
            entry = {"step": step, "heldout": held, "train_ce": losses[-1] if losses else float("nan")}
            curve.append(entry)
            if held < best["loss"]:
                best = {"loss": held, "step": step, "state": state}
            sched.evaluated(t0)
            log(f"eval step {step:5d}  held-out {held:.4f}  (best {best['loss']:.4f} at {best['step']})  "
                f"{time.time() - t_train:.0f}s")
        stop = sched.stop(step, best["step"], evaluated)
        if stop:
            break
        model.train()
        sched.before_update(step, torch.cuda.synchronize if use_amp else None)  # (--budget: the step count)
        for g in opt.param_groups:
            g["lr"] = sched.lr_at(step)
        starts = torch.randint(0, n_tokens - seq_len - 1, (batch_size,), generator=gen).to(device)
        batch = stream[starts[:, None] + offsets]  # [batch_size, seq_len + 1]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out = model(input_ids=batch[:, :-1], use_cache=False, output_router_logits=True)
            ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss = ce + MODEL["router_aux_loss_coef"] * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step = step + 1
        if step % 25 == 0 or step == sched.total_steps:  # step = updates done
            losses.append(ce.item())
            if step % args.log_every == 0 or step == sched.total_steps:
                el = time.time() - t_train
                log(f"step {step:5d}  ce {ce.item():.4f}  aux {out.aux_loss.item():.3f}  "
                    f"lr {sched.lr_at(step - 1):.2e}  "
                    f"{step * batch_size * seq_len / el / 1e3:.0f}k tok/s  {el:.0f}s")
    train_time = time.time() - t_train
    log(f"stopped after {steps_done} steps ({stop}); best held-out {best['loss']:.4f} at step {best['step']}")

    # Save the best state as bf16 and measure exactly those weights, in fp32, without TF32, on the full set.
    model.load_state_dict(best["state"])
    model.eval()
    model.to(torch.bfloat16)
    out_dir = Path(args.out)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.generation_config.update(eos_token_id=[2, 0], pad_token_id=0, bos_token_id=None, do_sample=False)
    model.config.output_router_logits = False
    model.save_pretrained(out_dir, max_shard_size=args.max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(data / "tokenizer" / name, out_dir / name)
    held = measure(best["state"], windows)
    held_tokens = sum(len(w) - 1 for w in windows)
    train_loss = measure(best["state"], train_probe)
    log(f"best step {best['step']}: held-out loss {held:.4f} over {held_tokens} tokens, train loss {train_loss:.4f} "
        f"over {len(train_probe)} fixed training windows (fp32 from the bf16 weights)")
    model.to(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    samples = generate_samples(model, data / "tokenizer", device, args.sample_tokens)
    size = sum(f.stat().st_size for f in out_dir.iterdir())
    report = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "experts_impl": impl, "params": n_params, "checkpoint_bytes": size, "seed": args.seed,
              "steps": steps_done, "best_step": best["step"], "stop": stop, "batch": batch_size, "seq_len": seq_len,
              "tokens_seen": steps_done * batch_size * seq_len,
              "tokens_at_best": best["step"] * batch_size * seq_len, "lr": args.lr,
              "warmup": warmup, "weight_decay": args.weight_decay, "dropout": args.dropout,
              "train_loss_at_best": train_loss, "train_eval_windows": len(train_probe), "train_curve": losses,
              "eval_curve": curve, "heldout_loss": held, "heldout_tokens": held_tokens,
              "tracked_windows": len(track), "train_seconds": train_time, "eval_seconds": sched.t_eval,
              "wall_seconds": time.time() - t_start, "samples": samples, "argv": sys.argv[1:]}
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    log(f"best step {best['step']} of {steps_done}: train loss {train_loss:.4f}; held-out loss {held:.4f}; "
        f"{steps_done} steps in {train_time:.0f}s ({sched.t_eval:.0f}s evaluating); checkpoint {size / 1e6:.1f} MB; "
        f"wall {report['wall_seconds']:.0f}s")


# -------------------------------------------------------------------------------------------------------------- eval
def evaluate(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    windows = json.loads((Path(args.data) / "heldout.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    model.eval()
    held, count = heldout_loss(model, windows, "cpu")
    log(f"held-out loss {held:.4f} over {count} tokens (transformers, fp32, cpu)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.train_builtin", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="corpus -> tokenizer + token streams (CPU)")
    pp.add_argument("--data", default=".train")
    pp.add_argument("--module", default="/usr/share/sword/modules/texts/ztext/engKJV2006eb")
    pp.add_argument("--rounds", type=int, default=4, help="differently shaped copies of the training documents")
    pp.add_argument("--seq-len", type=int, default=512)
    pt = sub.add_parser("train", help="train on the GPU, save the checkpoint")
    pt.add_argument("--data", default=".train")
    pt.add_argument("--out", default=".train/checkpoint")
    pt.add_argument("--steps", type=int, default=1600, help="training steps (at most, with --budget)")
    pt.add_argument("--budget", type=float, default=None,
                    help="seconds of training: fix the step count from the speed measured at step 40")
    pt.add_argument("--batch", type=int, default=32)
    pt.add_argument("--seq-len", type=int, default=512)
    pt.add_argument("--lr", type=float, default=2e-3)
    pt.add_argument("--weight-decay", type=float, default=0.1)
    pt.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warm-up")
    pt.add_argument("--dropout", type=float, default=0.1, help="residual dropout on attention and MoE outputs")
    pt.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    pt.add_argument("--eval-windows", type=int, default=0,
                    help="track a fixed subset of about this many held-out windows (0: all)")
    pt.add_argument("--train-eval-windows", type=int, default=32, help="fixed training windows for the train loss")
    pt.add_argument("--patience", type=int, default=400, help="stop after this many steps without improvement")
    pt.add_argument("--max-shard-size", default="15MB", help="safetensors shard size of the saved checkpoint")
    pt.add_argument("--seed", type=int, default=1234)
    pt.add_argument("--time-limit", type=float, default=270.0, help="stop training early after this many seconds")
    pt.add_argument("--experts-impl", default="auto", choices=("auto", "eager", "grouped_mm"))
    pt.add_argument("--device", default=None)
    pt.add_argument("--log-every", type=int, default=100)
    pt.add_argument("--sample-tokens", type=int, default=80)
    pt.add_argument("--report", default=None, help="write a JSON report here")
    pe = sub.add_parser("eval", help="held-out loss of a saved checkpoint (CPU, fp32)")
    pe.add_argument("checkpoint")
    pe.add_argument("--data", default=".train")
    args = p.parse_args(argv)
    {"prepare": prepare, "train": train, "eval": evaluate}[args.cmd](args)


if __name__ == "__main__":
    main()
