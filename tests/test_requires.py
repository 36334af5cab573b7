"""Tests that need system packages fail without them, never skip (``tests/requires.py``): with ``ip`` off PATH
or the KJV module elsewhere, the checks those tests run first fail the test and name what to install."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import requires
from tools import kjv


@pytest.mark.timeout(10)
def test_without_iproute2_a_netns_test_fails_and_says_what_to_install(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    requires.require_netns()  # this machine (CI: root, iproute2 installed) can make namespaces
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"iproute2 \(`apt-get install -y iproute2`\)"):
        requires.require_netns()


@pytest.mark.timeout(10)
def test_without_sword_text_kjv_a_corpus_test_fails_and_says_what_to_install(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    requires.require_kjv()  # installed here (CI installs it)
    monkeypatch.setattr(kjv, "MODULE_DIR", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y sword-text-kjv"):
        requires.require_kjv()
