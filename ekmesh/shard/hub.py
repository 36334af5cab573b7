"""The Hugging Face hub as an import ``Source``: file list from the model-info API, bytes by HTTP Range request.

Role: resolve ``repo`` at ``revision`` to a commit (``/api/models/<repo>/revision/<rev>``), then read byte ranges
of ``/<repo>/resolve/<commit>/<file>`` through huggingface_hub's session and headers. Environment: ``HF_ENDPOINT``
(read at call time, so a stand-in server works in-process too; likewise HF_HOME / HF_HUB_CACHE), ``HF_TOKEN``
(via ``build_hf_headers``), ``HF_HUB_OFFLINE`` (no network: the repo's snapshot in the local HF cache, read as a
directory).

Invariants: every request has a deadline (``HTTP_TIMEOUT_S``); a Range request must come back 206 with exactly the
asked length (or 200 for a range that is the whole file) — a server that ignores Range is refused, so a partial
import can never turn into a full download. HTTP and transport errors become ``ShardError`` with the URL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ekmesh.core.errors import ShardError, ShardMissingError
from ekmesh.shard.source import CHUNK, DirSource, Source

HTTP_TIMEOUT_S = 60.0


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's error base (huggingface_hub 1.x/2.x use httpx / httpx2) plus the hub's own errors."""
    from huggingface_hub.errors import HfHubHTTPError

    errs: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for mod in ("httpx2", "httpx", "requests"):
        try:
            m = __import__(mod)
        except ImportError:
            continue
        base = getattr(m, "HTTPError", None) or getattr(getattr(m, "exceptions", None), "RequestException", None)
        if isinstance(base, type) and issubclass(base, BaseException):
            errs.append(base)
    return tuple(errs)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _cache_dir() -> str | None:
    """HF_HUB_CACHE, else HF_HOME/hub, read at call time (huggingface_hub reads them once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def open_hub(repo: str, revision: str | None = None) -> Source:
    """The hub repo ``repo`` at ``revision`` (default ``main``) as a Source; offline: its local HF cache copy."""
    if offline():
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        errors: tuple[type[BaseException], ...] = (*_transport_errors(), LocalEntryNotFoundError, ValueError)
        try:
            path = snapshot_download(repo, revision=revision, local_files_only=True, cache_dir=_cache_dir())
        except errors as exc:
            raise ShardError(f"hub repo {repo!r} is not in the local HF cache, and HF_HUB_OFFLINE is set: "
                             f"{exc}") from exc
        assert isinstance(path, str)
        return DirSource(path, {"kind": "hub", "repo": repo, "revision": Path(path).name})
    return HubSource(repo, revision)


class HubSource(Source):
    """A hub repo pinned to one commit; reads by Range request."""

    def __init__(self, repo: str, revision: str | None = None) -> None:
        super().__init__()
        from huggingface_hub import HfApi
        from huggingface_hub.utils import build_hf_headers, get_session

        self.repo = repo
        self.endpoint = endpoint()
        self._session = get_session()
        self._headers = build_hf_headers()
        self._errors = _transport_errors()
        try:
            info = HfApi(endpoint=self.endpoint).model_info(repo, revision=revision or "main",
                                                            timeout=HTTP_TIMEOUT_S)
        except self._errors as exc:
            raise ShardError(f"cannot get hub repo {repo!r} at revision {revision or 'main'!r} from "
                             f"{self.endpoint}: {exc}") from exc
        if not info.sha:
            raise ShardError(f"{self.endpoint} did not give the commit of {repo!r} at {revision or 'main'!r}")
        self.revision: str = info.sha
        self._files = sorted(s.rfilename for s in (info.siblings or []))

    def describe(self) -> dict[str, Any]:
        return {"kind": "hub", "repo": self.repo, "revision": self.revision}

    def list_files(self) -> list[str]:
        return list(self._files)

    def url(self, file: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo, file, revision=self.revision, endpoint=self.endpoint)

    def _chunks(self, file: str, begin: int, end: int) -> Iterator[bytes]:
        url = self.url(file)
        headers = {**self._headers, "Range": f"bytes={begin}-{end - 1}", "Accept-Encoding": "identity"}
        try:
            with self._session.stream("GET", url, headers=headers, timeout=HTTP_TIMEOUT_S) as r:
                if r.status_code == 404:
                    raise ShardMissingError(url, "the hub answered 404")
                whole = r.status_code == 200 and begin == 0 and r.headers.get("content-length") == str(end)
                if r.status_code != 206 and not whole:
                    raise ShardError(f"{url}: range request {begin}-{end - 1} answered HTTP {r.status_code}"
                                     + (" (the server ignored Range)" if r.status_code == 200 else ""))
                length = r.headers.get("content-length")
                if length is not None and int(length) != end - begin:
                    raise ShardError(f"{url}: asked for {end - begin} bytes, server announces {length}")
                yield from r.iter_bytes(CHUNK)
        except self._errors as exc:
            raise ShardError(f"cannot read {url} (bytes {begin}-{end - 1}): {exc}") from exc

    def read_file(self, file: str) -> bytes:
        url = self.url(file)
        try:
            r = self._session.get(url, headers=self._headers, timeout=HTTP_TIMEOUT_S)
            if r.status_code == 404:
                raise ShardMissingError(url, "the hub answered 404")
            r.raise_for_status()
        except self._errors as exc:
            raise ShardError(f"cannot read {url}: {exc}") from exc
        self.bytes_read += len(r.content)
        return r.content
