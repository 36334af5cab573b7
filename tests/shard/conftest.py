from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Every registry test gets its own state root and HF cache; the host's hub variables never leak in."""
    monkeypatch.setenv("EKMESH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "HF_HUB_CACHE", "EKMESH_TEST_IMPORT_DELAY_S"):
        monkeypatch.delenv(var, raising=False)
