"""The ``ekmesh`` command line: parses arguments, configures logging, renders results.

No torch or libp2p at import time: each command imports what it runs inside its handler, so ``ekmesh --help``
is instant and the terminal layer stays free of the heavy layers. Exit codes: 0 ok, 1 an ekmesh error (printed as
one clear line on stderr), 2 bad usage (argparse).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from ekmesh import __version__
from ekmesh.cli import chat as cli_chat
from ekmesh.cli import demo as cli_demo
from ekmesh.cli import mesh as cli_mesh
from ekmesh.cli import plan as cli_plan
from ekmesh.cli import registry as cli_registry
from ekmesh.core.constants import SPECULATIVE_MODES
from ekmesh.core.errors import EkmeshError


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(p) for p in text.replace(" ", "").split(",") if p != ""]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from exc
    if not ids:
        raise argparse.ArgumentTypeError("--prompt-ids is empty")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    if args.mesh:
        return cli_chat.generate_via_api(args)
    import torch

    from ekmesh.core import threads
    from ekmesh.infer.generate import SamplingParams
    from ekmesh.infer.session import LocalModel
    from ekmesh.registry.lookup import draft_of, open_model, resolve_store

    n_threads = threads.configure(torch)
    draft = args.draft
    if draft is None and args.speculative == "draft" and not os.path.isdir(args.model):
        draft = draft_of(resolve_store(args.model).resolve(args.model))  # e.g. builtin -> builtin-draft
    lm = LocalModel.open(open_model(args.model), device=args.device, dtype=args.dtype,
                         draft=None if draft is None else open_model(draft))
    ids = args.prompt_ids if args.prompt_ids is not None else lm.encode_prompt(args.prompt, chat=args.chat,
                                                                               system=args.system)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop or ()),
                            speculative=args.speculative, presence_penalty=args.presence_penalty,
                            frequency_penalty=args.frequency_penalty)
    if args.json:
        res = lm.generator.generate(ids, params)
        out = {
            "token_ids": res.token_ids,
            "text": res.text,
            "finish_reason": res.finish_reason,
            "prompt_ids": list(ids),
            "prompt_tokens": res.prompt_tokens,
            "time_to_first_token_s": round(res.time_to_first_token_s, 6),
            "tokens_per_s": round(res.decode_tokens_per_s, 3),
            "device": str(lm.device),
            "dtype": str(lm.dtype).removeprefix("torch."),
            "threads": n_threads,
            "speculative": res.stats.speculative,
            "steps": res.stats.steps,
            "drafted": res.stats.drafted,
            "accepted": res.stats.accepted,
        }
        print(json.dumps(out))
        return 0
    tokens: list[int] = []
    for ev in lm.generator.stream(ids, params):
        if lm.tokenizer is None:
            if not (ev.finish == "stop" and ev.token_id in lm.generator.default_stop_ids):
                tokens.append(ev.token_id)
            continue
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    if lm.tokenizer is None:
        sys.stdout.write(",".join(map(str, tokens)))
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ekmesh", description="Serve Mixture-of-Experts models on a mesh of machines.")
    p.add_argument("--version", action="version", version=f"ekmesh {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text in this process from a checkpoint directory or the registry")
    g.add_argument("model", help="a Hugging Face checkpoint directory (config.json + safetensors), or a model id or "
                                 "alias in the registry (`ekmesh models`)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    src.add_argument("--prompt-ids", type=_parse_ids, help="prompt as comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--chat", action="store_true", help="wrap --prompt as a user message with the chat template")
    g.add_argument("--system", help="system message for --chat")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                   help="minus P from the logit of every token already generated (-2..2, OpenAI's; default 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="minus F times how often a token was generated from its logit (-2..2; default 0)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--speculative", choices=SPECULATIVE_MODES, default=None,
                   help="ngram: draft tokens by prompt lookup, draft: with a draft model (--draft), and check them in "
                        "one forward (the same output); off: one token a step (default: off in this process; with "
                        "--mesh, the node's --speculative)")
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="draft model for --speculative draft (a directory, model id or alias with the same "
                        "tokenizer; default: the model's own, e.g. builtin-draft for builtin)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: best available)")
    g.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: bf16 on cuda, fp16 on mps, else fp32)")
    g.add_argument("--json", action="store_true", help="print one JSON object with token_ids and text")
    g.add_argument("--mesh", action="store_true", help="generate on the local node (`ekmesh join`) through its HTTP "
                                                       "API instead of loading the model in this process")
    g.set_defaults(func=cmd_generate)

    cli_registry.register(sub)
    cli_chat.register(sub)
    cli_demo.register(sub)
    cli_mesh.register(sub)
    cli_plan.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except EkmeshError as exc:
        print(f"ekmesh: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

