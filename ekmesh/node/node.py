"""The node: the one place where ekmesh's parts are wired together.

For now a node is: a persistent identity, a Noise-only libp2p host, discovery (``--peer`` bootstrap, mDNS,
Kademlia rendezvous), circuit relay (relaying for others, reserving a slot on its bootstrap and ``--relay-via``
peers and advertising the ``/p2p-circuit`` addresses, dialing peers through relays: see ``discovery.relay``),
membership (signed adverts, failure detection, leave on shutdown) and the local control endpoint that
``ekmesh status`` talks to; with ``--model``, claiming (``node.claim``: this node's share of the model's experts,
fetched from peers over blob exchange, loaded on the device and only then advertised ready) and serving
(``node.serving``: the expert server for them and, as attention host, generation over the mesh); and on every
node the OpenAI-compatible API on localhost (``ekmesh.api``; its URL is in node.json as ``api_url``); with
``--model``, the experts relay through which ``ekmesh.hf`` computes a transformers model's experts on the mesh
(``node.experts_relay``; its address and token are in node.json, mode 0600).

Wiring: every part gets its collaborators as constructor arguments, built in dependency order (the TLS identity,
then ``Serving``, then the ``Claimer`` with ``Serving`` as its hooks); none is handed to another by assigning an
attribute, and no two parts hold each other. What one part needs of another at run time, the node's own loops pass
as arguments (``Serving.refresh(adverts, placement, banned)``, ``load_attention(claimer.fetch_now)``). The parts
that listen learn their addresses through ``open(bind_host, advertise_host)`` once the libp2p host has started.

Lifecycle: ``run`` locks ``EKMESH_HOME`` (one node per home), starts everything, reports ``started`` (peer id and
full listen addresses) through ``on_event``, then runs until SIGINT/SIGTERM (or ``stop()``), announces its leave
to every connected peer and shuts down. Events (``started``, ``joined``, ``down``, ``left``) are plain dicts so
the CLI can print or JSON-encode them.
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import multiaddr
import psutil
import trio
from libp2p.peer.id import ID

from ekmesh import __version__
from ekmesh.api.server import ApiServer
from ekmesh.api.types import ServedModel
from ekmesh.core.constants import API_PORT, STATUS_PATH, VERIFY_FRACTION
from ekmesh.core.errors import ConfigError
from ekmesh.core.ids import Endpoint, PeerId
from ekmesh.core.tls import TlsIdentity
from ekmesh.discovery import host as hostlib
from ekmesh.discovery.advert import MAX_ADDRS, Advert, Device, ModelReady, SignedAdvert, sign_advert
from ekmesh.discovery.config import MeshKey, MeshTimeouts
from ekmesh.discovery.control import ControlServer, acquire_home_lock
from ekmesh.discovery.identity import load_or_create_identity, peer_id_of
from ekmesh.discovery.mdns import MdnsDiscovery
from ekmesh.discovery.membership import Membership
from ekmesh.discovery.relay import Relay
from ekmesh.discovery.rendezvous import Rendezvous
from ekmesh.discovery.snapshot import build_snapshot
from ekmesh.discovery.view import MeshView, ViewEvent
from ekmesh.node.claim import ClaimConfig, Claimer
from ekmesh.shard.store import Store

if TYPE_CHECKING:
    from ekmesh.node.experts_relay import ExpertsRelay
    from ekmesh.node.serving import Serving

log = logging.getLogger(__name__)

Event = dict[str, Any]
GIB = 1 << 30


@dataclass
class NodeConfig:
    home: Path
    listen: list[str] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    mesh_key: MeshKey = field(default_factory=MeshKey.open)
    name: str | None = None
    memory_gib: float | None = None
    mdns: bool = True
    dht: bool = True
    relay: bool = True
    """Serve as a circuit relay for other members (hop); off with ``--no-relay``."""
    relay_via: list[str] = field(default_factory=list)
    """Relays to reserve a slot on, besides the bootstrap peers; they are dialed like ``--peer`` ones."""
    reserve: bool = True
    """Reserve a slot on the bootstrap and ``relay_via`` peers and advertise the circuit addresses."""
    timeouts: MeshTimeouts = field(default_factory=MeshTimeouts)
    model: str | None = None
    """Claim a share of this model's experts (``node.claim``); None: claim nothing, serve no blobs."""
    replicas: int = 2
    attention: bool | None = None
    """Host attention for ``model`` (fetch and load its dense part, answer the API): True (``--attention``), False
    (``--no-attention``) or None: when the dense part fits in half the free memory of the device."""
    experts: bool = True
    """Take a share of ``model``'s experts; off with ``--no-experts`` (an attention host that holds none)."""
    api_port: int | None = API_PORT
    """Port of the OpenAI-compatible API on 127.0.0.1 (0: any free port; taken: any free port; None: no API)."""
    device: str | None = None
    dtype: str | None = None
    verify: float = VERIFY_FRACTION
    """As attention host, the fraction of remote expert results recomputed to catch a lying member (``--verify``)."""
    speculative: str | None = None
    """As attention host, how answers are decoded unless a request says otherwise (``--speculative``; None: with
    a draft model if one is loaded, else ``SPECULATIVE``)."""
    draft: str | None = None
    """As attention host, the draft model (``--draft``: a directory, model id or alias; None: the model's own by
    name, e.g. ``builtin-draft``; "none": no draft model)."""
    exit_with_parent: bool = False
    """Leave and exit when the parent process ends (``ekmesh demo``'s peers: none outlives a killed demo)."""


class Node:
    def __init__(self, config: NodeConfig, on_event: Callable[[Event], None] = lambda _e: None) -> None:
        if config.memory_gib is not None and not config.memory_gib > 0:
            raise ConfigError(f"--memory must be positive, got {config.memory_gib}")
        config.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.config = config
        self.on_event = on_event
        self.bootstrap = [hostlib.split_peer_addr(p) for p in config.peers]  # validate before starting
        self.relay_via = [hostlib.split_peer_addr(p) for p in config.relay_via]
        for peer_id, addr in self.relay_via:
            if "/p2p-circuit" in str(addr):
                raise ConfigError(f"--relay-via {addr}/p2p/{peer_id}: a relay must be reachable directly")
        self.key_pair = load_or_create_identity(config.home)
        self.peer_id = PeerId(peer_id_of(self.key_pair).to_base58())
        self.name = config.name or socket.gethostname()
        self.addrs: list[str] = []
        self.models: dict[str, ModelReady] = {}
        self.data_addr: Endpoint | None = None
        self.speed: float | None = None
        total = psutil.virtual_memory().total
        self.devices = [Device("cpu", platform.processor() or platform.machine(), total)]
        self.view: MeshView | None = None
        self.relay: Relay | None = None
        self.claimer: Claimer | None = None
        self.serving: Serving | None = None
        self.api: ApiServer | None = None
        self.experts_relay: ExpertsRelay | None = None  # with --model: the local experts relay (``ekmesh.hf``)
        if config.model is not None:
            if config.attention is False and not config.experts:
                raise ConfigError("--no-attention with --no-experts leaves this node nothing to do for --model")
            from ekmesh.node.serving import Serving  # torch: only a node that serves a model loads it

            store = Store(config.home / "store")
            claim_cfg = ClaimConfig(config.model, config.replicas, experts=config.experts,
                                    dense=config.attention is not False,
                                    meet_s=10.0 if config.peers or config.relay_via else 0.0)
            identity = TlsIdentity.generate(self.peer_id)  # blob exchange and the data plane are pinned on it
            self.serving = Serving(self.peer_id, store, identity, config.attention, self.set_data_addr,
                                   config.device, config.dtype, config.verify, self.mesh_warning,
                                   config.speculative, config.draft)
            self.claimer = Claimer(self.peer_id, store, claim_cfg, identity, self._live_adverts, self.set_models,
                                   hooks=self.serving)
        self._membership: Membership | None = None
        self._incarnation = 0
        self._seq = 0
        self._stop = trio.Event()

    # -- what other parts publish about this node --------------------------------------------------------

    def set_models(self, models: dict[str, ModelReady]) -> None:
        self.models = dict(models)

    def set_data_addr(self, addr: Endpoint | None) -> None:
        self.data_addr = addr

    def snapshot(self) -> dict[str, Any]:
        assert self.view is not None, "snapshot() before run() started"
        mesh = self.config.mesh_key
        snap = build_snapshot(self.view, self.addrs, mesh.is_open, mesh.key_id)
        relay = self.relay
        # Beside the schema-1 fields of ``build_snapshot``: whether this node relays for others, the circuit
        # addresses it advertises (live reservations), and the peers it reaches only through a relay.
        snap["relay"] = {
            "serving": bool(relay and relay.serve),
            "circuit_addrs": relay.circuit_addrs() if relay else [],
            "relayed_peers": relay.relayed_peers() if relay else [],
        }
        # With ``--model`` only: ``claim`` (see ``Claimer.status``) and, per peer, ``assigned``: {model id: experts
        # the placement (as this node computes it) gives that peer}, beside ``models`` (experts ready).
        if self.claimer is not None:
            claim = snap["claim"] = self.claimer.status()
            for p in snap["peers"]:
                p["assigned"] = {claim["model"]: claim["assigned"].get(p["peer_id"], 0)}
        if self.serving is not None:
            snap["serving"] = {**self.serving.status(), "api_url": self.api.url if self.api else None,
                               "relay_addr": self.experts_relay.addr if self.experts_relay else None}
        snap["bootstrap"] = self._membership.bootstrap_status() if self._membership is not None else []
        return snap

    def mesh_warning(self) -> str | None:
        """When this node is alone although it was given bootstrap peers, and why (each answer of its API says so:
        it answers from what it holds, not from the mesh it was pointed at)."""
        membership, view = self._membership, self.view
        if membership is None or view is None or view.peers("up"):
            return None
        failing = [b for b in membership.bootstrap_status() if b["state"] in ("refused", "unreachable")]
        if not failing:
            return None
        return "this node is alone: " + "; ".join(f"bootstrap peer {b['peer_id']} {b['state']}: {b['reason']}"
                                                  for b in failing)

    # -- the API's engine --------------------------------------------------------------------------------------

    def served(self) -> list[ServedModel]:
        return self.serving.served() if self.serving is not None else []

    def why_not(self) -> str:
        if self.serving is None:
            return "this node serves no model; start it with `ekmesh join --model ID` (or try `ekmesh demo`)"
        if self.claimer is not None and self.claimer.manifest is None:  # e.g. no live peer has the manifest
            return f"this node is not ready to answer yet ({self.claimer.state})"
        return self.serving.why_not()

    def stop(self) -> None:
        self._stop.set()

    # -- running -----------------------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        lock_fd = acquire_home_lock(cfg.home)
        try:
            self._incarnation = _next_incarnation(cfg.home)
            host = hostlib.build_host(self.key_pair, cfg.mesh_key)
            listen = hostlib.listen_addrs(cfg.listen)
            async with host.run(listen):
                await self._run_parts(host, handle_signals, task_status)
        finally:
            os.close(lock_fd)

    async def _run_parts(self, host: Any, handle_signals: bool, task_status: Any) -> None:
        cfg = self.config
        self.addrs = hostlib.public_addrs(host)
        if self.claimer is not None:
            bind = cfg.listen[0].split("/")[2] if cfg.listen else "0.0.0.0"  # listen_addrs checked the form
            advertise = _advertised_ip(bind, [a.split("/")[2] for a in self.addrs])
            await trio.to_thread.run_sync(self.claimer.open, bind, advertise)
            if self.serving is not None:
                self.serving.open(bind, advertise)
        if cfg.api_port is not None:
            self.api = ApiServer(self, port=cfg.api_port).start()
        if self.serving is not None:
            from ekmesh.node.experts_relay import ExpertsRelay  # torch: only a node that serves a model loads it

            self.experts_relay = ExpertsRelay.for_serving(self.serving).start()
        try:
            await self._run_parts_with_api(host, handle_signals, task_status)
        finally:
            with trio.CancelScope(shield=True):
                if self.api is not None:
                    await trio.to_thread.run_sync(self.api.stop)
                if self.experts_relay is not None:  # before serving: it computes through serving's backend
                    await trio.to_thread.run_sync(self.experts_relay.stop)
                if self.serving is not None:
                    await trio.to_thread.run_sync(self.serving.close)

    async def _run_parts_with_api(self, host: Any, handle_signals: bool, task_status: Any) -> None:
        cfg, timeouts = self.config, self.config.timeouts
        self.view = MeshView(self._advert("up"), timeouts)
        rendezvous = Rendezvous(host, cfg.mesh_key.rendezvous, timeouts, self._found) if cfg.dht else None
        relay = self.relay = Relay(host, cfg.mesh_key.psk_hex, timeouts, serve=cfg.relay)
        membership = Membership(host, self.view, timeouts, self._advert, self._events,
                                on_connected=rendezvous.peer_connected if rendezvous else lambda _p: None,
                                dial_circuit=relay.dial)
        for peer_id, addr in self.bootstrap + self.relay_via:
            membership.add_bootstrap(peer_id, addr)
            if cfg.reserve:
                relay.add_relay(peer_id, addr)
        self._membership = membership
        control = ControlServer(cfg.home, self.peer_id, self._control, timeouts.control_timeout,
                                extra={**({"api_url": self.api.url} if self.api else {}),
                                       **(self.experts_relay.node_json() if self.experts_relay else {})})
        async with trio.open_nursery() as nursery:
            await nursery.start(control.run)
            await nursery.start(relay.run)
            nursery.start_soon(membership.run)
            if rendezvous is not None:
                nursery.start_soon(rendezvous.run)
            if self.claimer is not None:
                nursery.start_soon(self.claimer.run)
            if self.serving is not None and self.claimer is not None:
                nursery.start_soon(self._serve_loop, self.serving, self.claimer)
            if cfg.exit_with_parent:
                nursery.start_soon(self._watch_parent, os.getppid())
            if cfg.mdns:
                ips = [a.split("/")[2] for a in self.addrs if not a.startswith("/ip4/127.")]
                port = int(multiaddr.Multiaddr(self.addrs[0]).value_for_protocol("tcp"))
                mdns = MdnsDiscovery(self.peer_id, cfg.mesh_key.tag, ips, port, timeouts, self._found)
                nursery.start_soon(mdns.run)
            self.on_event({"event": "started", "peer_id": self.peer_id, "addrs": list(self.addrs),
                           "mesh": "open" if cfg.mesh_key.is_open else f"private (key id {cfg.mesh_key.key_id})",
                           "control": control.url, "api_url": self.api.url if self.api else None})
            log.info("node %s started on %s", self.peer_id, ", ".join(self.addrs))
            task_status.started(self)
            await self._wait_for_stop(handle_signals)
            log.info("leaving the mesh")
            await membership.announce_leave()
            nursery.cancel_scope.cancel()

    async def _serve_loop(self, serving: Serving, claimer: Claimer) -> None:
        """Keeps the serving holder map in step with the view and the claim (placement, banned peers); loads the
        attention part once the dense blobs are verified here."""
        while True:
            serving.refresh(self._live_adverts(), claimer.placement, claimer.banned())
            if serving.can_load_attention(claimer.dense_ready):
                await trio.to_thread.run_sync(serving.load_attention, claimer.fetch_now)
            await trio.sleep(0.2)

    async def _watch_parent(self, parent: int) -> None:
        while os.getppid() == parent:
            await trio.sleep(0.5)
        log.info("the parent process %d ended; leaving", parent)
        self.stop()

    async def _wait_for_stop(self, handle_signals: bool) -> None:
        if not handle_signals:
            await self._stop.wait()
            return
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("got %s", signal.Signals(signum).name)
                        break
                    nursery.cancel_scope.cancel()

                async def on_stop() -> None:
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(on_signal)
                nursery.start_soon(on_stop)

    # -- callbacks ---------------------------------------------------------------------------------------

    def _advert(self, state: str) -> SignedAdvert:
        self._seq += 1
        vm = psutil.virtual_memory()
        total = int(self.config.memory_gib * GIB) if self.config.memory_gib is not None else vm.total
        load1 = os.getloadavg()[0] / (os.cpu_count() or 1)
        advert = Advert(
            peer_id=self.peer_id, incarnation=self._incarnation, seq=self._seq, state=state,
            name=self.name[:64], version=__version__, addrs=self._advert_addrs(), devices=tuple(self.devices),
            memory_total=total, memory_free=min(total, vm.available), speed=self.speed,
            data_addr=self.data_addr, models=dict(self.models), load=round(load1, 3),
            blob_addr=self.claimer.blob_addr if self.claimer else None,
            tls_fp=self.claimer.tls_fp if self.claimer else None,
            names=dict(self.claimer.names) if self.claimer else {},
        )
        return sign_advert(advert, self.key_pair.private_key)

    def _advert_addrs(self) -> tuple[str, ...]:
        """Direct addresses first (peers dial in order), then relayed ones; at most ``MAX_ADDRS``."""
        circuits = self.relay.circuit_addrs()[:MAX_ADDRS // 2] if self.relay is not None else []
        return tuple(self.addrs[:MAX_ADDRS - len(circuits)] + circuits)

    def _live_adverts(self) -> list[Advert]:
        assert self.view is not None
        return [e.signed.advert for e in self.view.peers("self", "up")]

    def _found(self, peer_id: str, addrs: list[multiaddr.Multiaddr]) -> None:
        try:
            ID.from_base58(peer_id)
        except ValueError:
            log.debug("ignoring discovered peer with a malformed id %r", peer_id)
            return
        assert self._membership is not None
        self._membership.add_candidate(peer_id, addrs, "discovery")

    def _events(self, events: list[ViewEvent]) -> None:
        for ev in events:
            log.info("peer %s %s (%s)%s", ev.name, ev.kind, ev.peer_id, f": {ev.detail}" if ev.detail else "")
            self.on_event({"event": ev.kind, "peer_id": ev.peer_id, "name": ev.name, "detail": ev.detail})

    async def _control(self, method: str, target: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if method == "GET" and target.split("?")[0] == STATUS_PATH:
            return 200, self.snapshot()
        return 404, {"error": f"no such endpoint: {method} {target}"}


def _advertised_ip(bind: str, ips: list[str]) -> str:
    """The IP other peers should dial for this node's blob and data-plane listeners (they advertise one address
    each): the bound one, or for a wildcard bind the address of the interface that holds the default route when it
    is one of ours (a machine's first interface by name may be a container bridge no peer can reach), else the
    first of ``ips`` (non-loopback first)."""
    if bind != "0.0.0.0":
        return bind
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: picks the route, sends nothing
            primary = s.getsockname()[0]
    except OSError:
        primary = None
    return primary if primary in ips else ips[0]


def _next_incarnation(home: Path) -> int:
    """A number larger than any earlier run's, so this run's adverts supersede the old ones everywhere."""
    path = home / "incarnation"
    try:
        previous = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        previous = 0
    incarnation = max(previous + 1, int(time.time() * 1000))
    tmp = path.with_name(f".incarnation.{os.getpid()}.tmp")
    tmp.write_text(str(incarnation))
    os.replace(tmp, path)
    return incarnation
