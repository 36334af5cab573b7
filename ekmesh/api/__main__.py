"""``python -m ekmesh.api --model MODEL [--port P]``: one model served in this process over the OpenAI-compatible
API (a node serves the same API over the mesh)."""

from __future__ import annotations

import argparse
import json
import logging

from ekmesh.api.local import LocalEngine
from ekmesh.api.server import ApiServer
from ekmesh.core.constants import API_PORT
from ekmesh.core.errors import ConfigError


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m ekmesh.api", description="Serve one model in this process over "
                                 "the OpenAI-compatible API (a node serves the same API over the mesh).")
    ap.add_argument("--model", required=True, help="checkpoint directory, model id or alias (e.g. builtin)")
    ap.add_argument("--port", type=int, default=API_PORT)
    ap.add_argument("--device")
    ap.add_argument("--dtype")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from ekmesh.core import threads

    try:
        threads.configure(torch)
    except ConfigError as exc:
        ap.error(str(exc))
    server = ApiServer(LocalEngine(args.model, args.device, args.dtype), port=args.port)
    print(json.dumps({"api_url": server.url}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
