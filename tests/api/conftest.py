"""Fixtures shared by the API's tests: the one-process built-in model, loaded once per session, a real ``ApiServer``
on 127.0.0.1 port 0 over it for a module (``server``; a module that needs another engine or scope defines its own,
with ``rawhttp.serving``), and an ``openai`` client of a module's ``server`` fixture."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ekmesh.api import local
from ekmesh.api import server as api
from tests.api.rawhttp import serving


@pytest.fixture(scope="session")
def builtin_engine() -> local.LocalEngine:
    return local.LocalEngine("builtin", "cpu", "fp32")


@pytest.fixture(scope="module")
def server(builtin_engine: local.LocalEngine) -> Iterator[api.ApiServer]:
    with serving(builtin_engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: api.ApiServer) -> Any:
    """The official ``openai`` client of the module's ``server``."""
    import openai

    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
