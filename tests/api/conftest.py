"""Fixtures shared by the API's tests: the one-process built-in model, loaded once per session."""

from __future__ import annotations

import pytest

from ekmesh.api import local


@pytest.fixture(scope="session")
def builtin_engine() -> local.LocalEngine:
    return local.LocalEngine("builtin", "cpu", "fp32")
