"""Train, evaluate and time the built-in model's dense draft for speculative decoding (docs/BUILTIN_MODEL.md).

Role: the command line that makes ``builtin-draft``, a small transformers ``Qwen3ForCausalLM`` with the built-in
model's tokenizer, distilled from the shipped built-in model; ``tools/package_draft.py`` then imports it into the
package's store. Not part of the package and not run by the tests (they use ``tools/draft_figures.py``):

    python -m tools.train_builtin prepare --data .train --rounds 1   # CPU: the built-in's tokenizer, token streams
    python -m tools.train_draft train --data .train --out /tmp/draft --budget 180 --report draft.json   # GPU
    python -m tools.train_draft eval /tmp/draft --data .train     # CPU, fp32, ekmesh's code for both models
    python -m tools.train_draft speed                             # CPU: ms per decode step of candidate shapes

``train`` refuses a ``--data`` whose tokenizer files are not byte-identical to the shipped store's. The loss is
(1 - alpha) KL(teacher || student) + alpha CE per position (temperature 1, ``--alpha`` default 0); the teacher is
the shipped built-in run by ekmesh's own code without gradients (bf16 on CUDA, fp32 on the CPU; batched once a
batch is checked to equal row-by-row results, else row by row). Every ``--eval-every`` steps the student's
bf16-rounded weights, in fp32 (TF32 off), are compared with the fp32 teacher's log-probabilities over the held-out
windows (greedy agreement and KL, ``draft_figures``); the best state (``--select``) is saved as a Hugging Face
directory in bf16 with the shipped tokenizer files; training stops after ``--patience`` steps without
improvement, at ``--time-limit``, or at the step count that ``--budget`` fixes from the speed measured at step
``BUDGET_PROBE`` (while still in warm-up, so the run equals one started with that ``--steps``): the schedule of
``tools/schedule.py``, which ``train_builtin`` uses too.

Invariants: seeded (weights, data windows; GPU kernels are not bitwise deterministic); the held-out figure that
selects the saved state is computed from the bf16 weights that are saved; nothing here writes into the package.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.draft_figures import (
    TOKENIZER_FILES,
    batch_check,
    check_tokenizer,
    chunks,
    compare,
    ekmesh_forward,
    evaluate_pair,
    heldout_figures,
    load_pair,
    ms_per_token,
    open_teacher,
)
from tools.schedule import BUDGET_PROBE, Schedule
from tools.train_builtin import log

SHAPE: dict[str, Any] = dict(  # the draft's config; --hidden, --layers, --heads, --kv-heads, --head-dim, --intermediate
    hidden_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
    intermediate_size=768, vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=2048,
    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.02,
    attention_dropout=0.0, bos_token_id=None, eos_token_id=2, pad_token_id=0, use_cache=True,
)


def evaluate(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    check_tokenizer(Path(args.data), Path(args.checkpoint))
    windows = json.loads((Path(args.data) / "heldout.json").read_text())
    res = evaluate_pair(*load_pair(args.checkpoint), windows, args.prompts, args.gen_tokens)
    if args.report:
        Path(args.report).write_text(json.dumps(res, indent=1))


def speed(args: argparse.Namespace) -> None:
    """ms per decode step of random-initialised drafts of several shapes against the target (CPU, fp32)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    target = ekmesh_forward(open_teacher(), "cpu", torch.float32)
    context = list(range(3, 131))
    log(f"{torch.get_num_threads()} torch threads, fp32, one token a step after a {len(context)}-token prefill")
    for spec in args.shapes.split(","):
        hidden, layers = (int(x) for x in spec.split("x"))
        cfg = {**SHAPE, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
               "num_key_value_heads": max(1, hidden // 128), "intermediate_size": 3 * hidden}
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            Qwen3ForCausalLM(Qwen3Config(**cfg)).save_pretrained(tmp)
            draft = ekmesh_forward(tmp, "cpu", torch.float32)
            ms = ms_per_token({"draft": draft, "target": target}, context)
            n = sum(p.numel() for p in draft.model.parameters())  # the tied head counts once
        log(f"draft hidden {hidden} x {layers} layers ({n / 1e6:.2f} M params): {ms['draft']:.3f} ms per token, "
            f"target {ms['target']:.3f} ms: {ms['draft'] / ms['target']:.3f} of the target's")


# ------------------------------------------------------------------------------------------------------------- train
def train(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import Qwen3Config, Qwen3ForCausalLM

    t_start = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    data = Path(args.data)
    teacher_ckpt = open_teacher()
    check_tokenizer(data, Path(teacher_ckpt.path))
    stream = torch.frombuffer(bytearray((data / "train.u16").read_bytes()), dtype=torch.int16)  # ids < 4096
    stream = stream.to(device=device, dtype=torch.long)
    windows = json.loads((data / "heldout.json").read_text())
    track = windows[:: max(1, len(windows) // args.eval_windows)] if args.eval_windows else windows
    seq_len, batch_size, n_tokens = args.seq_len, args.batch, stream.numel()
    log(f"device {device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), torch {torch.__version__}, "
        f"{n_tokens} training tokens, {len(windows)} held-out windows ({len(track)} tracked every "
        f"{args.eval_every} steps)")

    # Teacher: bf16 on CUDA for training; its held-out log-probabilities once, in fp32 without TF32.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    reference = ekmesh_forward(teacher_ckpt, device, torch.float32)
    teacher = ekmesh_forward(teacher_ckpt, device, torch.bfloat16) if cuda else reference
    probe_ids = stream[:2 * 257].view(2, 257)
    batched = batch_check(teacher, probe_ids, 0.5 if cuda else 1e-3)
    held = [(ids, valid, F.log_softmax(reference(ids[:, :-1]).float(), -1)) for ids, valid in
            chunks(track, 8, device)]

    def teach(ids: Any) -> Any:  # [B, T] -> teacher log-probabilities [B, T, V], fp32
        out = teacher(ids) if batched else torch.cat([teacher(ids[i : i + 1]) for i in range(ids.shape[0])])
        return F.log_softmax(out.float(), -1)

    shape = {**SHAPE, "hidden_size": args.hidden, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
             "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim, "intermediate_size": args.intermediate}
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(Qwen3Config(**shape)).to(device=device, dtype=torch.float32)
    evaluator = Qwen3ForCausalLM(Qwen3Config(**shape)).to(device=device, dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"draft: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads of {args.head_dim}, "
        f"intermediate {args.intermediate}, tied embeddings; {n_params:,} parameters; loss (1 - {args.alpha}) KL + "
        f"{args.alpha} CE; teacher batched: {batched}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=cuda)
    warmup = args.warmup
    probe = min(BUDGET_PROBE, max(2, warmup - 1))

    def snapshot() -> dict[str, Any]:
        return {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}

    def measure(state: dict[str, Any]) -> dict[str, float]:
        evaluator.load_state_dict(state)  # bf16 -> fp32, exact
        agree = n = 0
        kl = 0.0
        with torch.no_grad():
            for ids, valid, t_logp in held:
                a, c, k = compare(evaluator(input_ids=ids[:, :-1], use_cache=False).logits, t_logp, valid)
                agree, n, kl = agree + a, n + c, kl + k
        return {"agreement": agree / n, "kl": kl / n}

    def better(m: dict[str, float], b: dict[str, float]) -> bool:
        return (m["kl"] < b["kl"]) if args.select == "kl" else (m["agreement"], -m["kl"]) > (b["agreement"], -b["kl"])

    gen = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(seq_len + 1, device=device)
    curve: list[dict[str, float]] = []
    best: dict[str, Any] = {"m": {"agreement": -1.0, "kl": math.inf}, "step": -1, "state": None}
    sched = Schedule(args.lr, warmup, args.steps, probe, probe + 1, args.budget, args.time_limit, args.patience,
                     args.eval_every, log)
    t_train, step, stop = sched.t_train, 0, ""
    while True:
        evaluated = sched.evaluates(step)
        if evaluated:
            t0 = time.time()
            state = snapshot()
            m = measure(state)
            curve.append({"step": step, **m})
            if better(m, best["m"]):
                best = {"m": m, "step": step, "state": state}
            sched.evaluated(t0)
            log(f"eval step {step:5d}  held-out agreement {m['agreement']:.4f}  KL {m['kl']:.4f}  (best "
                f"{best['m']['agreement']:.4f} / {best['m']['kl']:.4f} at {best['step']})  "
                f"{time.time() - t_train:.0f}s")
        stop = sched.stop(step, best["step"], evaluated)
        if stop:
            break
        sched.before_update(step, torch.cuda.synchronize if cuda else None)  # (--budget: the step count)
        model.train()
        for g in opt.param_groups:
            g["lr"] = sched.lr_at(step)
        starts = torch.randint(0, n_tokens - seq_len - 1, (batch_size,), generator=gen).to(device)
        batch = stream[starts[:, None] + offsets]  # [B, seq_len + 1]
        t_logp = teach(batch[:, :-1])  # [B, T, V]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        s_logp = F.log_softmax(logits.float(), -1)  # [B, T, V]
        kl = F.kl_div(s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")
        ce = F.nll_loss(s_logp.flatten(0, 1), batch[:, 1:].reshape(-1))
        loss = (1 - args.alpha) * kl + args.alpha * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == sched.total_steps:
            agree = (s_logp.argmax(-1) == t_logp.argmax(-1)).float().mean().item()
            el = time.time() - t_train
            log(f"step {step:5d}  kl {kl.item():.4f}  ce {ce.item():.4f}  batch agreement {agree:.4f}  "
                f"lr {sched.lr_at(step - 1):.2e}  {step * batch_size * seq_len / el / 1e3:.0f}k tok/s  {el:.0f}s")
    train_time = time.time() - t_train
    log(f"stopped after {step} steps ({stop}); best held-out agreement {best['m']['agreement']:.4f} "
        f"(KL {best['m']['kl']:.4f}) at step {best['step']}")

    model.load_state_dict(best["state"])
    model.eval().to(torch.bfloat16)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model.generation_config.update(eos_token_id=[2, 0], pad_token_id=0, bos_token_id=None, do_sample=False)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:  # the shipped files, byte-identical to data/tokenizer/ (checked above)
        shutil.copyfile(Path(teacher_ckpt.path) / name, out / name)
    held.clear()
    t0 = time.time()
    student = ekmesh_forward(out, device, torch.float32)
    final = heldout_figures(student, reference, windows, device, batch=8)
    log(f"saved {out}: held-out greedy agreement {final['greedy_agreement']:.4f} ({final['agree']}/"
        f"{final['positions']}), KL {final['kl']:.4f} over every window (ekmesh fp32 on {device}, "
        f"{time.time() - t0:.0f}s)")
    size = sum(f.stat().st_size for f in out.iterdir())
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "transformers": sys.modules["transformers"].__version__, "shape": {k: shape[k] for k in list(SHAPE)[:8]},
              "params": n_params, "checkpoint_bytes": size, "seed": args.seed, "steps": step,
              "best_step": best["step"], "stop": stop, "select": args.select, "batch": batch_size, "seq_len": seq_len,
              "tokens_seen": step * batch_size * seq_len, "lr": args.lr, "warmup": warmup, "alpha": args.alpha,
              "weight_decay": args.weight_decay, "teacher_dtype": "bf16" if cuda else "fp32",
              "teacher_batched": batched, "eval_curve": curve, "heldout": final, "tracked_windows": len(track),
              "train_seconds": train_time, "eval_seconds": sched.t_eval, "wall_seconds": time.time() - t_start,
              "argv": sys.argv[1:]}
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1))
    log(f"best step {best['step']} of {step}; {step} steps in {train_time:.0f}s ({sched.t_eval:.0f}s evaluating); "
        f"checkpoint {size / 1e6:.1f} MB; wall {report['wall_seconds']:.0f}s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.train_draft", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pt = sub.add_parser("train", help="distil the draft from the shipped built-in (GPU; CPU for a smoke test)")
    pt.add_argument("--data", default=".train")
    pt.add_argument("--out", default=".train/draft")
    pt.add_argument("--steps", type=int, default=10000, help="training steps (at most, with --budget)")
    pt.add_argument("--budget", type=float, default=None,
                    help=f"seconds of training: fix the step count from the speed measured at step {BUDGET_PROBE}")
    pt.add_argument("--time-limit", type=float, default=270.0, help="stop training after this many seconds")
    pt.add_argument("--device", default=None)
    pt.add_argument("--seed", type=int, default=1234)
    pt.add_argument("--report", default=None, help="write a JSON report here")
    pt.add_argument("--alpha", type=float, default=0.0, help="weight of the next-token cross-entropy (KL: 1 - alpha)")
    pt.add_argument("--select", choices=("agreement", "kl"), default="agreement", help="what the best state maximises")
    pt.add_argument("--batch", type=int, default=32)
    pt.add_argument("--seq-len", type=int, default=512)
    pt.add_argument("--lr", type=float, default=3e-3)
    pt.add_argument("--weight-decay", type=float, default=0.1)
    pt.add_argument("--warmup", type=int, default=100)
    pt.add_argument("--eval-every", type=int, default=100)
    pt.add_argument("--eval-windows", type=int, default=0, help="track about this many held-out windows (0: all)")
    pt.add_argument("--patience", type=int, default=600, help="stop after this many steps without improvement")
    pt.add_argument("--log-every", type=int, default=100)
    for name, default in (("hidden", 256), ("layers", 1), ("heads", 4), ("kv-heads", 2), ("head-dim", 64),
                          ("intermediate", 768)):
        pt.add_argument(f"--{name}", type=int, default=default)
    pe = sub.add_parser("eval", help="agreement, speculation figures and CPU timing of a saved draft (fp32)")
    pe.add_argument("checkpoint")
    pe.add_argument("--data", default=".train")
    pe.add_argument("--prompts", type=int, default=8, help="held-out prompts for the exact greedy replay")
    pe.add_argument("--gen-tokens", type=int, default=64)
    pe.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    pe.add_argument("--report", default=None)
    ps = sub.add_parser("speed", help="CPU ms per decode step of random drafts of several shapes vs the target")
    ps.add_argument("--shapes", default="128x1,192x1,256x1,384x1,128x2,256x2", help="HIDDENxLAYERS,...")
    ps.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    {"train": train, "eval": evaluate, "speed": speed}[args.cmd](args)


if __name__ == "__main__":
    main()
