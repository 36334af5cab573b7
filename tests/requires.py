"""What some tests need of the machine beyond Python packages, checked at their start: without it they FAIL, saying
what to install, and never skip (a skipped test keeps CI green while it tests nothing; issue 16, item 8).

- network namespaces: root and iproute2's ``ip`` (``tests/netns.py``, the netns tests of ``discovery`` and
  ``node``);
- Debian's ``sword-text-kjv``: the built-in model's corpus (``tools/kjv.py``).

``.ci/run`` installs both packages and stops when it cannot. Tests that need CUDA still skip without it (CI has no
GPU; they run on the lent accelerator machine).
"""

from __future__ import annotations

import os
import shutil

import pytest

from tools import kjv


def require_netns() -> None:
    """Fails the calling test unless this process can make network namespaces (root, and ``ip`` on PATH)."""
    missing = [what for what, ok in (("root", os.geteuid() == 0),
                                     ("iproute2 (`apt-get install -y iproute2`)", shutil.which("ip") is not None))
               if not ok]
    if missing:
        pytest.fail(f"this test makes network namespaces and needs {' and '.join(missing)}; CI runs it as root "
                    "and .ci/run installs iproute2", pytrace=False)


def require_kjv() -> None:
    """Fails the calling test unless Debian's sword-text-kjv is installed (its module files are present)."""
    if not kjv.installed(kjv.MODULE_DIR):
        pytest.fail(f"this test reads Debian's sword-text-kjv, which is not installed at {kjv.MODULE_DIR}: "
                    f"{kjv.CI_INSTALL} (.ci/run installs it)", pytrace=False)
