"""Fixtures shared by the API's tests: the one-process built-in model, loaded once per session, and an ``openai``
client of a module's ``server`` fixture."""

from __future__ import annotations

from typing import Any

import pytest

from ekmesh.api import local
from ekmesh.api import server as api


@pytest.fixture(scope="session")
def builtin_engine() -> local.LocalEngine:
    return local.LocalEngine("builtin", "cpu", "fp32")


@pytest.fixture(scope="module")
def client(server: api.ApiServer) -> Any:
    """The official ``openai`` client of the module's ``server``."""
    import openai

    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
