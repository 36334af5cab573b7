"""LAN discovery over mDNS / DNS-SD, with zeroconf.

Each node registers a ``_ekmesh._udp.local.`` service whose TXT record carries its peer id and the public tag of
its mesh (``MeshKey.tag``), and browses for the others; peers of another mesh (another tag) are skipped before
any dial. Found peers are handed to ``on_found(peer_id, addrs)`` in the trio thread; the membership protocol
dials them, and the mesh key (libp2p psk) still decides admission.

zeroconf runs its own threads: registration (which blocks ~2 s for probing) and shutdown run in a worker
thread, and browser callbacks hand results back through ``trio.from_thread``. Not a hard dependency of a
working node: if multicast is unavailable the node logs a warning and runs without mDNS.
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
import zeroconf
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from ekmesh.discovery.config import MeshTimeouts

log = logging.getLogger(__name__)

SERVICE_TYPE = "_ekmesh._udp.local."


class MdnsDiscovery:
    def __init__(self, peer_id: str, tag: str, ips: list[str], port: int, timeouts: MeshTimeouts,
                 on_found: Callable[[str, list[multiaddr.Multiaddr]], None]) -> None:
        self.peer_id = peer_id
        self.tag = tag
        self.ips = ips
        self.port = port
        self.timeouts = timeouts
        self.on_found = on_found
        self.instance = f"{peer_id[-20:]}-{secrets.token_hex(4)}.{SERVICE_TYPE}"
        self._zc: Zeroconf | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        info = ServiceInfo(
            SERVICE_TYPE, self.instance, port=self.port,
            addresses=[socket.inet_aton(ip) for ip in self.ips],
            properties={"id": self.peer_id, "mesh": self.tag, "v": "1"},
            server=f"ekmesh-{self.peer_id[-12:].lower()}.local.",
        )
        try:
            self._zc = await trio.to_thread.run_sync(lambda: Zeroconf(ip_version=IPVersion.V4Only))
            browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
            await trio.to_thread.run_sync(self._zc.register_service, info)
        except (OSError, zeroconf.Error) as exc:
            log.warning("mDNS discovery is off: %s", exc)
            task_status.started()
            if self._zc is not None:
                await trio.to_thread.run_sync(self._zc.close)
            return
        log.debug("mDNS: registered %s on %s port %d", self.instance, self.ips, self.port)
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                browser.cancel()
                await trio.to_thread.run_sync(self._close, info)

    def _close(self, info: ServiceInfo) -> None:
        assert self._zc is not None
        try:
            self._zc.unregister_service(info)
        except (OSError, zeroconf.Error) as exc:
            log.debug("mDNS unregister failed: %s", exc)
        self._zc.close()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        """Runs in zeroconf's browser thread."""
        if state_change is ServiceStateChange.Removed or name == self.instance:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=int(self.timeouts.mdns_timeout * 1000))
        if info is None or info.port is None:
            return
        props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                 for k, v in (info.properties or {}).items()}
        peer_id = props.get("id", "")
        if props.get("mesh") != self.tag:
            log.debug("mDNS: ignoring %s of another mesh", name)
            return
        if not peer_id or peer_id == self.peer_id or len(peer_id) > 128:
            return
        addrs = []
        for ip in info.parsed_addresses(IPVersion.V4Only):
            addrs.append(multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{info.port}"))
        if not addrs or self._token is None:
            return
        try:
            trio.from_thread.run_sync(self.on_found, peer_id, addrs, trio_token=self._token)
        except trio.RunFinishedError:
            pass  # the node is shutting down
