"""``ekmesh chat`` and ``ekmesh generate --mesh``: the command line side of a node's OpenAI-compatible HTTP API.

Both find the API through the running node's control file (``<EKMESH_HOME>/node.json``, key ``api_url``) unless
``chat --api URL`` names one, and talk to it with ``ekmesh.tui.api_client.ApiClient``. Nothing heavy at import time:
``ekmesh.tui.chat`` (rich) and ``ekmesh.discovery.control`` (trio) are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ekmesh.core.errors import ConfigError, NodeNotRunningError

if TYPE_CHECKING:
    from ekmesh.tui.api_client import Answer, AnswerStream


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers: Any) -> None:
    c = subparsers.add_parser("chat", help="chat in the terminal with a model the mesh serves (through the local "
                                           "node's HTTP API)")
    c.add_argument("--model", help="model id, unique id prefix or alias (default: the node's model)")
    c.add_argument("--api", metavar="URL", help="the OpenAI-compatible API to use, e.g. http://127.0.0.1:8000/v1 "
                                                "(default: the local node's, from EKMESH_HOME/node.json)")
    c.add_argument("--prompt", help="answer this one message and exit: the answer on stdout, figures on stderr")
    c.add_argument("--system", help="system message")
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    c.add_argument("--max-tokens", type=_positive_int, default=512, help="longest answer in tokens (default 512)")
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--json", action="store_true", help="with --prompt: print one JSON object "
                                                       "{text, finish_reason, usage, ekmesh}")
    c.set_defaults(func=cmd_chat)


def local_api_url() -> str:
    """The API URL of the node running for this ``EKMESH_HOME``; ``NodeNotRunningError`` if there is none."""
    from ekmesh.core.paths import ekmesh_home
    from ekmesh.discovery.control import read_control_file
    from ekmesh.tui.api_client import START_HINT

    home = ekmesh_home()
    try:
        info = read_control_file(home)
    except NodeNotRunningError as exc:
        raise NodeNotRunningError(f"no ekmesh node is running for {home}: {START_HINT}, or pass --api URL") from exc
    url = info.get("api_url")
    if not isinstance(url, str) or not url:
        raise NodeNotRunningError(f"the node running for {home} (pid {info.get('pid', '?')}) serves no HTTP API "
                                  "(its node.json has no api_url): restart it with this version of ekmesh")
    return url


def cmd_chat(args: argparse.Namespace) -> int:
    from ekmesh.tui.api_client import ApiClient
    from ekmesh.tui.chat import ChatState, run_chat

    if args.json and args.prompt is None:
        print("ekmesh chat: --json needs --prompt", file=sys.stderr)
        return 2
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    client = ApiClient(args.api or local_api_url())
    state = ChatState(model=args.model, temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed,
                      system=args.system)
    if args.prompt is None:
        from rich.console import Console

        return run_chat(client, state, Console())
    state.history.append({"role": "user", "content": args.prompt})
    return _print_answer(client.stream_chat(state.request()), as_json=args.json, json_of=None)


def generate_via_api(args: argparse.Namespace) -> int:
    """``ekmesh generate MODEL --mesh``: the generation runs on the local node, through its HTTP API: plain
    ``--prompt`` (or ``--prompt-ids``) as a text completion, ``--chat`` as a chat completion. Output as without
    ``--mesh``, except that ``--json`` has no device or dtype (the node decides) and adds the mesh's figures."""
    from ekmesh.tui.api_client import ApiClient

    if args.prompt_ids is not None and args.chat:
        raise ConfigError("--prompt-ids with --chat: a chat needs text; give --prompt")
    if args.device is not None or args.dtype is not None:
        raise ConfigError("--device and --dtype choose how this process runs the model; with --mesh the node "
                          "decides, drop them")
    client = ApiClient(local_api_url())
    body: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                            "top_p": args.top_p, "return_token_ids": True}
    for key, value in (("seed", args.seed), ("stop", args.stop), ("top_k", args.top_k or None),
                       ("speculative", args.speculative), ("presence_penalty", args.presence_penalty or None),
                       ("frequency_penalty", args.frequency_penalty or None)):
        if value is not None:
            body[key] = value
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        stream = client.stream_chat({**body, "messages": system + [{"role": "user", "content": args.prompt}]})
    else:
        prompt = args.prompt if args.prompt_ids is None else args.prompt_ids
        stream = client.stream_completion({**body, "prompt": prompt})
    return _print_answer(stream, as_json=args.json, json_of=lambda a: {
        "token_ids": a.stats.get("token_ids"),
        "text": a.text,
        "finish_reason": a.finish_reason,
        "prompt_tokens": a.usage.get("prompt_tokens"),
        "completion_tokens": a.usage.get("completion_tokens", a.stats.get("tokens")),
        "time_to_first_token_s": _round(a.stats.get("ttft_s"), 6),
        "tokens_per_s": _round(a.stats.get("tokens_per_s"), 3),
        "peers": a.stats.get("peers"),
        "mean_layer_rtt_ms": a.stats.get("mean_layer_rtt_ms"),
        **{key: a.stats.get(key) for key in ("speculative", "steps", "drafted", "accepted", "round_trips")},
        "model": args.model,
        "api_url": client.api_url,
    })


def _round(value: Any, digits: int) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def _print_answer(stream: AnswerStream, as_json: bool,
                  json_of: Callable[[Answer], dict[str, Any]] | None) -> int:
    """Stream the answer's text to stdout (newline at the end, figures on stderr), or print it as one JSON object
    (``json_of(answer)``, default ``Answer.to_json``) once complete."""
    from ekmesh.tui.chat import status_line

    with stream:
        for delta in stream:
            if not as_json:
                sys.stdout.write(delta)
                sys.stdout.flush()
    answer = stream.answer
    assert answer is not None
    if as_json:
        print(json.dumps(json_of(answer) if json_of else answer.to_json()))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(status_line(answer).plain, file=sys.stderr)
    return 0
