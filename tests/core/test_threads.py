"""``core/threads.py``: the thread-count policy, its refusals, and that the entry points apply it (a real
``ekmesh generate`` subprocess, and the environment ``ekmesh demo`` gives its peers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ekmesh.cli import localmesh as demo
from ekmesh.core import threads
from ekmesh.core.errors import ConfigError


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 1), (3, 1), (4, 2), (16, 8), (64, 32)])
def test_default_is_half_the_cpus(cpus, expected):
    assert threads.plan({}, cpus) == expected
    assert threads.plan({"EKMESH_THREADS": "auto"}, cpus) == expected
    assert threads.plan({"EKMESH_THREADS": " AUTO "}, cpus) == expected


@pytest.mark.parametrize(("cpus", "processes", "expected"), [(16, 3, 2), (2, 3, 1), (16, 1, 8), (8, 4, 1)])
def test_processes_of_one_machine_share_it(cpus, processes, expected):
    assert threads.auto_threads(cpus, processes) == expected


def test_explicit_count_wins_and_omp_is_left_to_torch():
    assert threads.plan({"EKMESH_THREADS": "3"}, 16) == 3
    assert threads.plan({"EKMESH_THREADS": " 12 "}, 2) == 12  # an explicit count may oversubscribe: the user said so
    assert threads.plan({"OMP_NUM_THREADS": "6"}, 16) is None
    assert threads.plan({"OMP_NUM_THREADS": "6", "EKMESH_THREADS": "2"}, 16) == 2
    assert threads.plan({"OMP_NUM_THREADS": "", "EKMESH_THREADS": ""}, 16) == 8  # empty counts as unset


@pytest.mark.parametrize("value", ["0", "-1", "1025", "2.5", "four", "nan"])
def test_bad_values_are_refused_naming_the_variable(value):
    with pytest.raises(ConfigError) as e:
        threads.plan({"EKMESH_THREADS": value}, 16)
    assert str(e.value) == f"EKMESH_THREADS must be 'auto' or a number of threads in [1, 1024], got {value!r}"


def test_configure_sets_torch_and_reports_the_count():
    before = torch.get_num_threads()
    try:
        assert threads.configure(torch, {"EKMESH_THREADS": "1"}) == 1
        assert torch.get_num_threads() == 1
        assert threads.configure(torch, {"EKMESH_THREADS": "2"}) == 2
        assert torch.get_num_threads() == 2
        assert threads.configure(torch, {"OMP_NUM_THREADS": "7"}) == 2  # left as it is
    finally:
        torch.set_num_threads(before)


def _generate(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("EKMESH_THREADS", "OMP_NUM_THREADS")}
    return subprocess.run([sys.executable, "-m", "ekmesh.cli", "generate", "builtin", "--prompt-ids", "1,2",
                           "--max-tokens", "2", "--json"], capture_output=True, text=True, timeout=120,
                          env={**full, **env})


def test_generate_runs_with_the_configured_threads_and_refuses_a_bad_value():
    r = _generate({"EKMESH_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["threads"] == 1
    r = _generate({})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["threads"] == threads.auto_threads(threads.usable_cpus())
    r = _generate({"EKMESH_THREADS": "zero"})
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == ("ekmesh: error: EKMESH_THREADS must be 'auto' or a number of threads in "
                                "[1, 1024], got 'zero'")


def test_demo_peers_get_their_share_unless_the_user_chose(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("EKMESH_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = demo._child_env(tmp_path, 3)
    assert env["EKMESH_THREADS"] == str(threads.auto_threads(threads.usable_cpus(), 3))
    assert env["EKMESH_HOME"] == str(tmp_path)
    assert "EKMESH_THREADS" not in demo._child_env(tmp_path)  # one process (the chat client): nothing to share
    monkeypatch.setenv("EKMESH_THREADS", "5")
    assert demo._child_env(tmp_path, 3)["EKMESH_THREADS"] == "5"
    monkeypatch.delenv("EKMESH_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert "EKMESH_THREADS" not in demo._child_env(tmp_path, 3)
