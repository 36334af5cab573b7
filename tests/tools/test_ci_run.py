"""``.ci/run`` stops when the system packages the tests need cannot be had (issue 16, item 8).

The script runs from a copy of the repository's layout in a temporary directory, with ``apt-get``, ``id``,
``dpkg-query`` and ``python3`` replaced by small scripts on ``PATH`` (a test cannot make the real package manager
fail, and must not install anything). Each replacement logs its call, so the test sees how far the script went:
``python3`` (making the virtual environment) is the first step after the packages. As root, a failed ``apt-get``
stops CI with an error naming the packages; not as root, packages that are missing stop it with an error that says
they are required; when they are installed it carries on.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("iproute2", "sword-text-kjv")

pytestmark = pytest.mark.timeout(60)


def _run_ci(tmp_path: Path, uid: int, apt_rc: int, installed: bool) -> tuple[int, str, list[str]]:
    """Runs a copy of ``.ci/run`` with the stand-ins; returns (exit status, stderr, the commands it called)."""
    repo, fake, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "calls.log"
    (repo / ".ci").mkdir(parents=True)
    (repo / ".ci" / "run").write_bytes((REPO / ".ci" / "run").read_bytes())
    (repo / "README.md").write_bytes((REPO / "README.md").read_bytes())
    fake.mkdir()
    scripts = {
        "id": f'echo "id $*" >> "{log}"; [ "$1" = -u ] && echo {uid} || exec /usr/bin/id "$@"',
        "apt-get": f'echo "apt-get $*" >> "{log}"; exit {apt_rc}',
        "dpkg-query": f'echo "dpkg-query $*" >> "{log}"; '
                      + ("printf installed; exit 0" if installed else "echo 'no packages found' >&2; exit 1"),
        "python3": f'echo "python3 $*" >> "{log}"; exit 3',
    }
    for name, body in scripts.items():
        path = fake / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    env = {"PATH": f"{fake}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path)}
    out = subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return out.returncode, out.stderr, [c.split()[0] for c in calls]


def test_as_root_a_failed_install_stops_ci(tmp_path: Path) -> None:
    rc, err, calls = _run_ci(tmp_path, uid=0, apt_rc=100, installed=False)
    assert rc != 0
    assert "apt-get" in calls and "python3" not in calls, f"CI carried on after the install failed: {calls}"
    assert all(p in err for p in PACKAGES), err


def test_not_as_root_missing_packages_stop_ci_with_a_clear_error(tmp_path: Path) -> None:
    rc, err, calls = _run_ci(tmp_path, uid=1000, apt_rc=0, installed=False)
    assert rc != 0
    assert "apt-get" not in calls and "python3" not in calls, calls
    assert "required" in err and all(p in err for p in PACKAGES), err


@pytest.mark.parametrize("uid", [0, 1000])
def test_with_the_packages_installed_ci_carries_on(tmp_path: Path, uid: int) -> None:
    rc, err, calls = _run_ci(tmp_path, uid=uid, apt_rc=0, installed=True)
    assert calls[-1] == "python3", (calls, err)  # the virtual environment is next (the stand-in then fails)
    assert rc == 3, err
