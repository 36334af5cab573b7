"""``ekmesh.hf`` against a real experts relay in this process (sockets on 127.0.0.1; its backend holds the
checkpoint's experts, ``LocalExperts``): what needs no mesh. Every family through real nodes, pipelines and PEFT are
in ``test_hf_mesh.py``.

``AutoModelForCausalLM.from_pretrained(path, experts_implementation="ekmesh")`` (transformers' own loader); a
connection the relay closed while idle is reopened. Failure paths on a real relay: a wrong token, an oversized
frame, a model the node does not serve, a connection that never says hello and a source over its pending cap
(bounds before authentication); no node running; a node that serves no model.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ekmesh.hf
from ekmesh.core.errors import (
    ModelNotServedError,
    NodeNotRunningError,
    RelayAuthError,
    RelayError,
)
from ekmesh.core.limits import ListenerLimits
from ekmesh.core.relaywire import HELLO, MAX_FRAME_BYTES, Refusal, RelayTimeouts, encode_hello
from ekmesh.infer.dataplane.frames import HEADER, HEADER_SIZE, MAGIC, VERSION, Kind, ModelLimits, decode
from ekmesh.infer.experts import LocalExperts
from ekmesh.infer.loader import Checkpoint, load_experts
from ekmesh.node.experts_relay import ExpertsRelay, RelayTarget
from tests.discovery.meshproc import wait_until
from tests.tiny_models import make_tiny, random_prompt

TOL = 1e-4


def _write_node_json(home: Path, relay: ExpertsRelay | None) -> None:
    """What a node running for ``home`` writes in node.json (its control endpoint's fields, and its relay's)."""
    home.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"pid": os.getpid(), "peer_id": "test", "url": "http://127.0.0.1:9", "token": "t"}
    if relay is not None:
        info.update(relay.node_json())
    fd = os.open(home / "node.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)


def _local_relay(src: Path, **relay_args: Any) -> ExpertsRelay:
    """A started relay whose backend holds every expert of checkpoint ``src`` and which serves only its
    fingerprint (as ``serving_resolver`` does for a node's manifest)."""
    ck = Checkpoint.open(src)
    local = LocalExperts(ck.config.expert_spec(), torch.device("cpu"), torch.float32)
    load_experts(ck, local)
    mine = ekmesh.hf.open_model(src).fingerprint
    target = RelayTarget(local, ModelLimits.from_config(ck.config), torch.float32)

    def resolve(fp: bytes) -> RelayTarget:
        if fp != mine:
            raise ModelNotServedError(f"the local node serves {src}, not this checkpoint")
        return target

    return ExpertsRelay(resolve, **relay_args).start()


# --- in-process: transformers' own loader, a relay connection closed while idle ----------------------------------

@pytest.mark.timeout(120)
def test_automodel_with_experts_implementation_ekmesh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' own loader, ``experts_implementation="ekmesh"``: the experts it loaded are not used (the relay
    computes every MoE layer), the node is the one of ``$EKMESH_HOME``."""
    from transformers import AutoModelForCausalLM

    src, ref = make_tiny("qwen2_moe", tmp_path / "ckpt")
    with _local_relay(src) as relay:
        _write_node_json(tmp_path / "home", relay)
        monkeypatch.setenv("EKMESH_HOME", str(tmp_path / "home"))
        model = AutoModelForCausalLM.from_pretrained(src, experts_implementation="ekmesh", dtype=torch.float32)
        model.eval()
        ids = torch.tensor([random_prompt(ref.config.vocab_size)])
        with torch.no_grad():
            diff = (model(ids).logits - ref(ids).logits).abs().max().item()
        assert diff <= TOL, diff
        moe_layers = sum(1 for n, _ in model.named_modules() if n.endswith("mlp.experts"))
        assert relay.stats.requests == moe_layers == 3  # one request per MoE layer of the one forward
        link = ekmesh.hf.experts.bound_link(model)
        assert link is not None and link.calls == moe_layers


@pytest.mark.timeout(60)
def test_a_connection_the_relay_closed_while_idle_is_reopened(tmp_path: Path) -> None:
    src, ref = make_tiny("mixtral", tmp_path / "ckpt")
    with _local_relay(src, timeouts=RelayTimeouts(idle_s=0.5)) as relay:
        _write_node_json(tmp_path / "home", relay)
        model = ekmesh.hf.from_pretrained(src, home=tmp_path / "home")
        ids = torch.tensor([random_prompt(ref.config.vocab_size)])
        with torch.no_grad():
            first = model(ids).logits
            wait_until(lambda: relay.gate.authenticated() == 0, 10, "the relay closing the idle connection")
            again = model(ids).logits
        link = ekmesh.hf.experts.bound_link(model)
        assert link is not None and link.connects == 2 and relay.stats.accepted == 2
        assert torch.equal(first, again)


# --- refusals, bounds, no node --------------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, ExpertsRelay]]:
    src, _ref = make_tiny("qwen3_moe", tmp_path / "ckpt")
    with _local_relay(src, listen=ListenerLimits(handshake_s=1.0, max_unauth_per_source=2)) as relay:
        _write_node_json(tmp_path / "home", relay)
        yield src, relay


def _recv_frame(sock: socket.socket, limits: ModelLimits) -> Any:
    buf = b""
    while len(buf) < HEADER_SIZE:
        chunk = sock.recv(65536)
        assert chunk, "closed before a whole frame header"
        buf += chunk
    n = HEADER.unpack(buf[:HEADER_SIZE])[-1]
    while len(buf) < HEADER_SIZE + n:
        chunk = sock.recv(65536)
        assert chunk, "closed inside a frame"
        buf += chunk
    return decode(buf, limits)


def _closed(sock: socket.socket) -> bool:
    return sock.recv(1) == b""


@pytest.mark.timeout(60)
def test_relay_refuses_a_wrong_token(served: tuple[Path, ExpertsRelay], tmp_path: Path) -> None:
    src, relay = served
    info = json.loads((tmp_path / "home" / "node.json").read_text())
    info["experts_relay"]["token"] = "00" * 32
    (tmp_path / "home" / "node.json").write_text(json.dumps(info))
    with pytest.raises(RelayAuthError, match="wrong relay token"):
        ekmesh.hf.from_pretrained(src, home=tmp_path / "home")
    assert relay.stats.by_refusal == {"TOKEN": 1}
    # (the relay's connection thread releases its ticket after the client has read the refusal)
    wait_until(lambda: relay.gate.pending() == 0, 10, "the refused connection to leave the gate")


@pytest.mark.timeout(60)
def test_relay_refuses_a_model_it_does_not_serve(served: tuple[Path, ExpertsRelay], tmp_path: Path) -> None:
    _src, relay = served
    other, _ = make_tiny("qwen3_moe", tmp_path / "other")  # the same tensors; its config differs below
    (other / "config.json").write_text(json.dumps({**json.loads((other / "config.json").read_text()),
                                                   "rope_theta": 12345.0}))
    with pytest.raises(ModelNotServedError, match="not this checkpoint"):
        ekmesh.hf.from_pretrained(other, home=tmp_path / "home")
    assert relay.stats.by_refusal == {"MODEL": 1}


@pytest.mark.timeout(60)
def test_relay_refuses_an_oversized_frame_before_reading_it(served: tuple[Path, ExpertsRelay]) -> None:
    src, relay = served
    ck = Checkpoint.open(src)
    limits = ModelLimits.from_config(ck.config)
    with socket.create_connection(relay.address, timeout=10) as s:
        s.sendall(encode_hello(relay.token, ekmesh.hf.open_model(src).fingerprint))
        assert _recv_frame(s, limits).kind is Kind.PONG
        size = 1 << 40  # a header announcing a 1 TiB payload: refused from the header, nothing allocated
        assert size > MAX_FRAME_BYTES
        s.sendall(HEADER.pack(MAGIC, VERSION, Kind.REQUEST, 3, 0, 1, 0, 4, 8, limits.hidden, 0, size))
        err = _recv_frame(s, limits)
        assert err.kind is Kind.ERROR and err.aux == Refusal.PROTOCOL and "exceeds the limit" in err.message
        assert _closed(s)
    wait_until(lambda: relay.gate.authenticated() == 0, 10, "the refused connection to leave the gate")
    assert relay.stats.failed == 1 and relay.stats.requests == 0


@pytest.mark.timeout(60)
def test_relay_bounds_connections_before_authentication(served: tuple[Path, ExpertsRelay]) -> None:
    """A source holds at most 2 pending connections (this relay's cap); a third is closed at once; a connection
    that never says hello is closed at the handshake deadline; a malformed hello is told why."""
    src, relay = served
    a = socket.create_connection(relay.address, timeout=10)
    b = socket.create_connection(relay.address, timeout=10)
    try:
        wait_until(lambda: relay.gate.pending() == 2, 10, "two pending connections")
        with socket.create_connection(relay.address, timeout=10) as c:
            assert _closed(c)  # over the per-source cap: closed without a hello
        assert relay.gate.refused == 1
        assert _closed(a) and _closed(b)  # no hello within handshake_s (1 s)
        wait_until(lambda: relay.gate.pending() == 0, 10, "the silent connections to leave the gate")
    finally:
        a.close()
        b.close()
    with socket.create_connection(relay.address, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n" + b"x" * (HELLO.size - 16))
        err = _recv_frame(s, ModelLimits.from_config(Checkpoint.open(src).config))
        assert err.kind is Kind.ERROR and err.aux == Refusal.PROTOCOL and "magic" in err.message
    assert relay.stats.accepted == 0


@pytest.mark.timeout(60)
def test_no_node_running_is_a_clear_error(tmp_path: Path) -> None:
    src, _ = make_tiny("olmoe", tmp_path / "ckpt")
    with pytest.raises(NodeNotRunningError, match="no ekmesh node is running"):
        ekmesh.hf.from_pretrained(src, home=tmp_path / "empty")
    # a node.json left behind by a node that died: nothing listens at its relay's address
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "node.json").write_text(json.dumps({
        "url": "http://127.0.0.1:9", "token": "t", "experts_relay": {"addr": f"127.0.0.1:{port}",
                                                                     "token": "00" * 32}}))
    with pytest.raises(NodeNotRunningError, match="no ekmesh node answers"):
        ekmesh.hf.from_pretrained(src, home=tmp_path / "stale")
    _write_node_json(tmp_path / "nomodel", None)  # a node that serves no model has no relay
    with pytest.raises(RelayError, match="serves no model"):
        ekmesh.hf.from_pretrained(src, home=tmp_path / "nomodel")
