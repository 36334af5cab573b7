"""Layering: the terminal side never pulls in libp2p or torch; the mesh layer never pulls in torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = "import sys, {mod}; bad = [m for m in sys.modules if m.split('.')[0] in {banned!r}]; print(bad); " \
        "sys.exit(1 if bad else 0)"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mod,banned", [
    ("ekmesh.tui.status", ("libp2p", "torch", "trio")),
    ("ekmesh.cli.main", ("libp2p", "torch")),  # `ekmesh --help`
    ("ekmesh.cli.mesh", ("libp2p", "torch")),
    ("ekmesh.node.node", ("torch",)),
])
def test_imports_stay_in_their_layer(mod, banned):
    res = subprocess.run([sys.executable, "-c", CHECK.format(mod=mod, banned=banned)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, f"{mod} imports {res.stdout.strip()} {res.stderr}"
