"""The ``demo`` subcommand (registered into ``ekmesh.cli`` by ``register``): a local mesh on the built-in model.

``ekmesh demo [--peers N] [--prompt TEXT] [--temperature T] [--max-tokens N] [--seed S] [--keep]`` starts N peers
on 127.0.0.1 that divide the built-in model's experts, waits until they can answer, and opens ``ekmesh chat`` on
one of them (``cli.localmesh`` does the work). Progress goes to stderr, one line per step; stdout carries only what
the chat prints, so ``ekmesh demo --prompt ... > answer.txt`` captures the answer alone.

Exit codes: the chat's (0 after an answer or a normal end of the chat), 1 when the demo fails (``ekmesh demo:
<message>``, and where the peers' logs were kept), 130 on Ctrl-C, 128 + N on signal N (SIGTERM, SIGHUP). Every
process the demo started is stopped and its temporary state removed in each case.

Imports nothing heavy at import time (``ekmesh --help`` stays instant); ``ekmesh.cli.localmesh`` itself avoids torch and
libp2p, so the demo's own process starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ekmesh.core.errors import EkmeshError


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo", help="start a mesh of local peers on the built-in model and chat with it",
        description="Start N peers on this machine (loopback, private homes, a random mesh key) that divide the "
                    "built-in model's experts so that none holds them all, wait until every expert is ready, and "
                    "open `ekmesh chat` on one of them. Ctrl-C stops every peer and removes the demo's state.")
    demo.add_argument("--peers", type=int, default=3, metavar="N",
                      help="peers to start, at least 2 (default 3; from 3 peers on each expert is kept on 2)")
    demo.add_argument("--prompt", metavar="TEXT", help="answer this once and exit (default: an interactive chat)")
    demo.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (default: ekmesh chat's)")
    demo.add_argument("--max-tokens", type=int, default=96, metavar="N", help="tokens per answer (default 96)")
    demo.add_argument("--seed", type=int, metavar="S", help="sampling seed")
    demo.add_argument("--keep", action="store_true",
                      help="keep the demo's temporary directory (homes, logs) and print its path")
    demo.add_argument("--timeout", type=float, default=120.0, metavar="S",
                      help="give up if the mesh is not ready this many seconds after the start (default 120)")
    demo.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                      help="more logging in the peers' logs (see --keep)")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ekmesh.cli.localmesh import Demo, DemoConfig, DemoInterrupted

    def progress(text: str) -> None:
        print(f"ekmesh demo: {text}", file=sys.stderr, flush=True)

    demo: Demo | None = None
    try:
        config = DemoConfig(peers=args.peers, prompt=args.prompt, temperature=args.temperature,
                            max_tokens=args.max_tokens, seed=args.seed, keep=args.keep,
                            verbose=getattr(args, "verbose", 0), ready_timeout=args.timeout)
        demo = Demo(config, progress)
        return demo.run()
    except EkmeshError as exc:
        kept = demo.logs_kept if demo is not None else None
        print(f"ekmesh demo: {exc}" + (f"\nekmesh demo: the peers' logs are in {kept}" if kept else ""),
              file=sys.stderr)
        return 1
    except DemoInterrupted as exc:  # the demo has said so and stopped everything
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130
