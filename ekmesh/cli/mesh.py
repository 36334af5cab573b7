"""The ``join`` and ``status`` subcommands (registered into ``ekmesh.cli`` by ``register``).

This module imports neither libp2p nor torch at import time: ``ekmesh.node.node`` is imported inside the ``join``
handler, and ``status`` only talks HTTP to the running node's local control endpoint.

``ekmesh join`` prints the peer id and full listen multiaddrs first (``--json``: one line
``{"peer_id": ..., "addrs": [...]}``), then one line per membership event (``--json``: one JSON object per
line with an ``event`` key: ``joined``, ``down``, ``left``). Exit codes: 0 after a clean shutdown
(Ctrl-C / SIGTERM), 1 on an ekmesh error (bad option, node already running, no node running for ``status``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from ekmesh.core.constants import API_PORT, P2P_PORT, SPECULATIVE, SPECULATIVE_MODES, STATUS_PATH, VERIFY_FRACTION
from ekmesh.core.errors import EkmeshError
from ekmesh.core.paths import ekmesh_home


def _fraction(text: str) -> float:
    try:
        f = float(text)
    except ValueError:
        f = -1.0
    if not 0.0 <= f <= 1.0:
        raise argparse.ArgumentTypeError(f"--verify takes a fraction from 0 to 1, got {text!r}")
    return f


def register(subparsers: Any) -> None:
    join = subparsers.add_parser(
        "join", help="run a peer of the mesh in the foreground",
        description="Run a peer: discover the mesh, advertise this node, keep a live view of who is up.")
    join.add_argument("--listen", action="append", default=[], metavar="MULTIADDR",
                      help=f"address to listen on (repeatable; default /ip4/0.0.0.0/tcp/{P2P_PORT}, a free port if "
                           "taken)")
    join.add_argument("--peer", action="append", default=[], metavar="MULTIADDR",
                      help="bootstrap peer, a full address as `ekmesh join` prints it (repeatable)")
    key = join.add_mutually_exclusive_group()
    key.add_argument("--mesh-key", metavar="KEY", help="shared secret of a private mesh (default: open mesh)")
    key.add_argument("--mesh-key-file", metavar="PATH", help="read the mesh key from a file")
    join.add_argument("--name", help="name shown to other peers (default: host name)")
    join.add_argument("--memory", type=float, metavar="GB", help="memory offered to the mesh, in GiB")
    join.add_argument("--model", metavar="ID_OR_NAME",
                      help="claim a share of this model's experts: fetch them from peers, verify them, advertise them "
                           "ready (a model id or name the store lacks: the model a live peer advertises under that "
                           "name, waited for up to a minute, and its manifest come from the mesh)")
    join.add_argument("--replicas", type=int, default=2, metavar="R",
                      help="copies of each expert the mesh keeps where memory allows (with --model; default 2)")
    attention = join.add_mutually_exclusive_group()
    attention.add_argument("--attention", dest="attention", action="store_true", default=None,
                           help="host attention for --model (default: when its dense part fits in half the free "
                                "memory)")
    attention.add_argument("--no-attention", dest="attention", action="store_false",
                           help="do not host attention for --model (no dense part here; the API answers 503)")
    join.add_argument("--no-experts", action="store_true",
                      help="hold none of --model's experts (an attention host that uses the mesh's)")
    join.add_argument("--api-port", type=int, default=API_PORT, metavar="PORT",
                      help=f"port of the OpenAI-compatible API on 127.0.0.1 (default {API_PORT}; 0: any free port; "
                           "a taken port falls back to a free one)")
    join.add_argument("--no-api", action="store_true", help="do not serve the OpenAI-compatible API")
    join.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps (default: best available)")
    join.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: bf16 on cuda, else fp32)")
    join.add_argument("--verify", type=_fraction, default=VERIFY_FRACTION, metavar="FRACTION",
                      help="as attention host, recompute this fraction of the expert results peers return (on another "
                           "replica or here) and ban a peer whose results are wrong (0: off; default "
                           f"{VERIFY_FRACTION})")
    join.add_argument("--speculative", choices=SPECULATIVE_MODES, default=None,
                      help="as attention host, how answers are decoded unless a request says otherwise: draft tokens "
                           "with a draft model (draft) or by prompt lookup (ngram) and check them in one forward "
                           "(fewer round trips per token, the same output), or one token a step (off); default: "
                           f"draft when a draft model is loaded, else {SPECULATIVE}")
    join.add_argument("--draft", default=None, metavar="MODEL",
                      help="as attention host, the draft model (a directory, model id or alias with the model's "
                           "tokenizer; default: the model's own by name, e.g. builtin-draft; none: no draft model)")
    join.add_argument("--exit-with-parent", action="store_true",
                      help="leave the mesh and exit when the process that started this one ends (for launchers)")
    join.add_argument("--no-mdns", action="store_true", help="do not discover peers on the LAN with mDNS")
    join.add_argument("--no-dht", action="store_true", help="do not use the Kademlia DHT rendezvous")
    join.add_argument("--no-relay", action="store_true",
                      help="do not relay connections for other peers (circuit relay v2; on by default)")
    join.add_argument("--relay-via", action="append", default=[], metavar="MULTIADDR",
                      help="reserve a relay slot on this peer too (repeatable; implies --peer); by default every "
                           "--peer is used as a relay, so peers that cannot dial this node reach it through one")
    join.add_argument("--no-reserve", action="store_true",
                      help="reserve no relay slot: only peers that can dial this node directly reach it")
    join.add_argument("--advert-interval", type=float, metavar="S", help="seconds between adverts and pings")
    join.add_argument("--down-after", type=float, metavar="S",
                      help="mark a peer down after this many seconds without adverts (default 10)")
    join.add_argument("--json", action="store_true", help="machine-readable output, one JSON object per line")
    join.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: libp2p too)")
    join.set_defaults(func=cmd_join)

    status = subparsers.add_parser(
        "status", help="show the mesh as seen by the running node",
        description="Peers, devices, memory, load, latency and the shard map, from the node of this EKMESH_HOME.")
    status.add_argument("--json", action="store_true", help="print the status snapshot as JSON")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh period for --watch")
    status.set_defaults(func=cmd_status)


def _not_libp2p(record: logging.LogRecord) -> bool:
    return "/libp2p/" not in record.pathname


def _setup_logging(verbose: int) -> None:
    root = logging.getLogger()
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    if root.handlers:  # ``ekmesh.cli.main`` configured it already
        root.setLevel(min(root.level, level))
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:
        # py-libp2p logs routine network events (a refused dial, a reset stream) as warnings and errors, some
        # on the root logger; ekmesh reports what matters itself.
        for handler in root.handlers:
            handler.addFilter(_not_libp2p)


def _tame_libp2p_logging(verbose: int) -> None:
    """Call after importing libp2p, whose import resets its logger (propagate off, level WARNING)."""
    lp = logging.getLogger("libp2p")
    if verbose >= 2:
        lp.setLevel(logging.DEBUG)
        lp.propagate = True
    else:
        lp.setLevel(logging.CRITICAL)


def cmd_join(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    import dataclasses

    import trio

    from ekmesh.core import threads
    from ekmesh.discovery.config import MeshKey, MeshTimeouts
    from ekmesh.node.node import Node, NodeConfig

    _tame_libp2p_logging(args.verbose)
    try:
        threads.plan(os.environ, threads.usable_cpus())  # a bad EKMESH_THREADS fails here, not once serving starts
        overrides = {}
        if args.advert_interval is not None:
            overrides["advert_interval"] = args.advert_interval
        if args.down_after is not None:
            overrides["down_after"] = args.down_after
        timeouts = dataclasses.replace(MeshTimeouts(), **overrides)
        config = NodeConfig(
            home=ekmesh_home(), listen=args.listen, peers=args.peer,
            mesh_key=MeshKey.from_options(args.mesh_key, args.mesh_key_file), name=args.name,
            memory_gib=args.memory, mdns=not args.no_mdns, dht=not args.no_dht, relay=not args.no_relay,
            relay_via=args.relay_via, reserve=not args.no_reserve, timeouts=timeouts, model=args.model,
            replicas=args.replicas, attention=args.attention, experts=not args.no_experts,
            api_port=None if args.no_api else args.api_port, device=args.device, dtype=args.dtype,
            verify=args.verify, speculative=args.speculative, draft=args.draft,
            exit_with_parent=args.exit_with_parent)
        node = Node(config, on_event=lambda ev: _print_event(ev, args.json))
        trio.run(node.run)
    except EkmeshError as exc:
        print(f"ekmesh join: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # trio's nurseries group what a part raised (e.g. the claim's ModelNameError)
        found = _ekmesh_error(exc)
        if found is None:
            raise
        print(f"ekmesh join: {found}", file=sys.stderr)
        return 1
    return 0


def _ekmesh_error(exc: BaseException) -> EkmeshError | None:
    """The first ``EkmeshError`` inside ``exc`` and the exception groups it nests."""
    if isinstance(exc, EkmeshError):
        return exc
    for inner in getattr(exc, "exceptions", ()):
        found = _ekmesh_error(inner)
        if found is not None:
            return found
    return None


def _print_event(ev: dict[str, Any], as_json: bool) -> None:
    if ev["event"] == "started":
        if as_json:
            print(json.dumps({"event": "started", "peer_id": ev["peer_id"], "addrs": ev["addrs"],
                              "api_url": ev.get("api_url")}), flush=True)
        else:
            print(f"peer id   {ev['peer_id']}")
            print("listening " + "\n          ".join(ev["addrs"]))
            print(f"mesh      {ev['mesh']}")
            print(f"control   {ev['control']}  (`ekmesh status` talks to it)")
            if ev.get("api_url"):
                print(f"api       {ev['api_url']}  (OpenAI-compatible; `ekmesh chat` talks to it)")
            print(end="", flush=True)
        return
    if as_json:
        print(json.dumps({**ev, "time": round(time.time(), 3)}), flush=True)
        return
    mark = {"joined": "+", "down": "-", "left": "-"}.get(ev["event"], " ")
    detail = f": {ev['detail']}" if ev.get("detail") and ev["event"] != "left" else ""
    print(f"{time.strftime('%H:%M:%S')} {mark} {ev['event']:<6} {ev['name']} ({_short(ev['peer_id'])}){detail}",
          flush=True)


def _short(peer_id: str) -> str:
    return peer_id[-8:]


def cmd_status(args: argparse.Namespace) -> int:
    _setup_logging(0)
    from ekmesh.discovery.config import MeshTimeouts
    from ekmesh.discovery.control import get_json

    home = ekmesh_home()
    timeout = MeshTimeouts().control_timeout
    try:
        snapshot = get_json(home, STATUS_PATH, timeout)
        if args.json and not args.watch:
            print(json.dumps(snapshot, indent=2))
            return 0
        if args.json:
            while True:
                print(json.dumps(snapshot), flush=True)
                time.sleep(args.interval)
                snapshot = get_json(home, STATUS_PATH, timeout)
        from rich.console import Console

        from ekmesh.tui.status import render_status

        console = Console()
        if not args.watch:
            console.print(render_status(snapshot))
            return 0
        from rich.live import Live

        with Live(render_status(snapshot), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                snapshot = get_json(home, STATUS_PATH, timeout)
                live.update(render_status(snapshot), refresh=True)
    except EkmeshError as exc:
        print(f"ekmesh status: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
