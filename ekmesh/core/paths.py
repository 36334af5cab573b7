"""Where ekmesh keeps its state on disk.

The state root (``ekmesh_home()``) holds the node identity key, the running node's control file and, later, the
registry. It is ``$EKMESH_HOME`` if set, else ``$XDG_DATA_HOME/ekmesh``, else ``~/.local/share/ekmesh``. It is
created on first use with mode 0700, because it holds a private key.
"""

from __future__ import annotations

import os
from pathlib import Path


def ekmesh_home() -> Path:
    """Return the state root, creating it (mode 0700) if it does not exist yet."""
    env = os.environ.get("EKMESH_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_DATA_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
        root = base / "ekmesh"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root
