"""The chat view rendered from fixed states into a recording console without colour, and the API client fed real
bytes over a real socket (a small ``http.server`` on 127.0.0.1 port 0): well-formed streams, malformed ones, HTTP
errors, a connection dropped mid-stream, a stalled server, and a close that must reach the server."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from rich.console import Console

from ekmesh.core.errors import (
    ConfigError,
    GenerationError,
    NodeNotRunningError,
    PeerClosedError,
    PeerError,
    ProtocolError,
)
from ekmesh.tui.api_client import Answer, ApiClient, ClientTimeouts
from ekmesh.tui.chat import (
    ChatState,
    help_view,
    models_view,
    resolve_model,
    run_chat,
    stats_view,
    status_line,
)

pytestmark = pytest.mark.timeout(60)
MODEL = "blake3:9063096d25488b374c2cb77631da968b88628e31b14fd14ae7a567d6eaacef95"
STATS = {"ttft_s": 0.214, "tokens_per_s": 12.34, "tokens": 64, "peers": ["p1", "p2", "p3"],
         "mean_layer_rtt_ms": 0.412}


def render(renderable: Any, width: int = 100) -> str:
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def answer(stats: dict[str, Any], finish: str | None = "stop", text: str = "hi") -> Answer:
    return Answer(text, finish, {"prompt_tokens": 7, "completion_tokens": stats.get("tokens", 0)}, stats, 2.0)


# ------------------------------------------------------------------------------------------------------- view


def test_status_line_shows_every_figure():
    assert render(status_line(answer(STATS))) == \
        "12.3 tok/s · first token 0.21 s · 3 peers · layer round trip 0.41 ms · 64 tokens\n"


def test_status_line_shows_tokens_per_step_when_drafting():
    drafted = {**STATS, "speculative": "draft", "steps": 19, "drafted": 140, "accepted": 44}
    want = "12.3 tok/s · first token 0.21 s · 3 peers · layer round trip 0.41 ms · 64 tokens · 3.2 per step (draft)\n"
    assert render(status_line(answer(drafted)), width=200) == want
    assert "per step" not in render(status_line(answer({**STATS, "speculative": "off", "steps": 63})))


def test_status_line_leaves_out_what_is_missing_and_says_why_an_answer_ended():
    local = {"ttft_s": 0.02, "tokens_per_s": 110.0, "tokens": 1, "peers": [], "mean_layer_rtt_ms": None}
    assert render(status_line(answer(local, "length"))) == \
        "110.0 tok/s · first token 0.02 s · experts local · 1 token · cut at max tokens\n"
    measured = {"ttft_s": 0.5, "tokens": 3}  # a stopped answer: what the client measured
    assert render(status_line(answer(measured, "cancelled"))) == "first token 0.50 s · 3 tokens · stopped\n"
    assert render(status_line(answer({"peers": ["p1"]}))) == "1 peer\n"


def test_stats_view_has_the_last_answer_and_session_totals():
    state = ChatState(model=MODEL, temperature=0.5)
    assert render(stats_view(state)).splitlines()[0] == "last answer: none yet"
    state.history += [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    state.record(answer(STATS))
    state.record(answer({**STATS, "tokens": 16}, "cancelled"))
    assert render(stats_view(state), width=140).splitlines() == [
        "last answer: 12.3 tok/s · first token 0.21 s · 3 peers · layer round trip 0.41 ms · 16 tokens · stopped",
        "session: 2 answers · 80 tokens generated · 14 prompt tokens · 4.0 s · 20.0 tok/s overall",
        f"model {MODEL} · temperature 0.5 · 2 messages in the conversation",
    ]


def test_models_view_marks_the_current_model():
    models = [{"id": MODEL, "aliases": ["builtin"]}, {"id": "blake3:ffff", "aliases": []}]
    assert render(models_view(models, MODEL)).splitlines() == [
        f"* {MODEL} (builtin)", "  blake3:ffff", "/model ID switches (an id, a unique id prefix or an alias)"]


def test_help_lists_every_command():
    text = render(help_view())
    for cmd in ("/model [ID]", "/temperature T", "/clear", "/stats", "/help", "/exit"):
        assert any(line.startswith(cmd) for line in text.splitlines()), cmd
    assert "Ctrl-C stops an answer" in text


def test_resolve_model_by_id_alias_and_unique_prefix():
    models = [{"id": MODEL, "aliases": ["builtin"]}, {"id": "blake3:90aa", "aliases": []}]
    assert resolve_model(models, MODEL) == MODEL
    assert resolve_model(models, "builtin") == MODEL
    assert resolve_model(models, "blake3:9063") == MODEL
    assert resolve_model(models, "9063") == MODEL
    with pytest.raises(ConfigError, match="several served models match '90'"):
        resolve_model(models, "90")
    with pytest.raises(ConfigError, match=r"no served model match 'qwen' \(served: blake3:9063"):
        resolve_model(models, "qwen")


def test_request_carries_the_system_message_and_history():
    state = ChatState(model=MODEL, temperature=0.0, max_tokens=24, seed=3, system="be brief")
    state.history.append({"role": "user", "content": "hello"})
    assert state.request() == {"model": MODEL, "temperature": 0.0, "max_tokens": 24, "seed": 3, "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]}
    assert "model" not in ChatState().request()


# ------------------------------------------------------------------------------------------ client, real socket

Script = Callable[[BaseHTTPRequestHandler], None]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self._run()

    def do_POST(self) -> None:  # noqa: N802
        self._run()

    def _run(self) -> None:
        n = int(self.headers.get("Content-Length", 0))
        srv: Any = self.server
        srv.requests.append((self.command, self.path, json.loads(self.rfile.read(n)) if n else None))
        srv.script(self)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[Script], tuple[Any, str]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(script: Script) -> tuple[Any, str]:
        srv: Any = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.script, srv.requests = script, []
        threading.Thread(target=srv.serve_forever, args=(0.02,), daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def sse_head(h: BaseHTTPRequestHandler, chunked: bool = False, kind: str = "text/event-stream") -> None:
    h.send_response(200)
    h.send_header("Content-Type", kind)
    h.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
    h.end_headers()


def send_chunk(h: BaseHTTPRequestHandler, data: bytes) -> None:
    h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
    h.wfile.flush()


def event(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def delta(text: str, finish: str | None = None) -> bytes:
    return event({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text},
                                                                   "finish_reason": finish}]})


USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_stream_chat_yields_deltas_then_the_answer_and_its_stats(serve):
    def script(h):
        sse_head(h, chunked=True)
        # CRLF line ends, a comment, an event split over two chunks, a two-line data field, other fields ignored
        send_chunk(h, b": keep-alive\r\n\r\n" + event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
        send_chunk(h, b"event: message\r\nid: 1\r\ndata: {\"choices\": [{\"delta\": ")
        send_chunk(h, b"{\"content\": \"Hel\"}}]}\r\n\r\n")
        send_chunk(h, b"data: {\"choices\": [{\"delta\": {\"content\": \"lo\\u00e9\"},\ndata: \"finish_reason\": "
                      b"null}]}\n\n" + delta("!", "stop"))
        send_chunk(h, event({"choices": [], "usage": USAGE, "ekmesh": STATS}) + b"data: [DONE]\n\n")
        send_chunk(h, b"")

    srv, url = serve(script)
    with ApiClient(url).stream_chat({"messages": [{"role": "user", "content": "hi"}], "temperature": 0}) as s:
        assert list(s) == ["Hel", "loé", "!"]
    assert s.answer == Answer("Helloé!", "stop", USAGE, STATS, s.answer.seconds)
    method, path, body = srv.requests[0]
    assert (method, path) == ("POST", "/v1/chat/completions")
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_stream_completion_reads_text_and_measures_when_the_api_sends_no_stats(serve):
    def script(h):
        sse_head(h)
        for i, t in enumerate(("a", "b", "c")):
            h.wfile.write(event({"choices": [{"index": 0, "text": t, "finish_reason": "length" if i == 2 else None}]}))
        h.wfile.write(b"data: [DONE]\n\n")

    srv, url = serve(script)
    s = ApiClient(url + "/").stream_completion({"prompt": "x", "max_tokens": 3})
    assert "".join(s) == "abc"
    assert s.answer is not None and s.answer.finish_reason == "length"
    assert s.answer.stats["tokens"] == 3 and s.answer.stats["ttft_s"] >= 0 and "tokens_per_s" in s.answer.stats
    assert srv.requests[0][1] == "/v1/completions"


def test_models_lists_the_served_models(serve):
    def script(h):
        body = json.dumps({"object": "list", "data": [{"id": MODEL, "aliases": ["builtin"]}]}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    _, url = serve(script)
    assert ApiClient(url).models() == [{"id": MODEL, "aliases": ["builtin"]}]


@pytest.mark.parametrize("raw,match", [
    (b"data: {not json\n\n", "other than JSON"),
    (b"data: [1, 2]\n\n", "not an object"),
    (b"data: {\"object\": \"chat.completion.chunk\"}\n\n", "no choices list"),
    (b"data: {\"choices\": [{\"delta\": {\"content\": 5}}]}\n\n", "text is not a string"),
    (b"data: \xff\xfe\n\n", "not UTF-8"),
])
def test_a_malformed_stream_is_a_protocol_error(serve, raw, match):
    def script(h):
        sse_head(h)
        h.wfile.write(delta("ok") + raw + b"data: [DONE]\n\n")

    _, url = serve(script)
    s = ApiClient(url).stream_chat({"messages": []})
    got = []
    with pytest.raises(ProtocolError, match=match):
        got += list(s)
    s.close()


def test_an_answer_that_is_not_an_event_stream_is_refused(serve):
    def script(h):
        sse_head(h, kind="text/html")
        h.wfile.write(b"<html>hello</html>")

    _, url = serve(script)
    with pytest.raises(ProtocolError, match="answered text/html, not an event stream"):
        ApiClient(url).stream_chat({"messages": []})


def error_script(status: int, body: bytes) -> Script:
    def script(h):
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return script


def test_http_errors_carry_the_apis_message(serve):
    err = {"error": {"message": "generation failed: expert (layer=1, expert=3) is unavailable",
                     "type": "server_error", "code": "mesh_unavailable"}}
    _, url = serve(error_script(500, json.dumps(err).encode()))
    with pytest.raises(PeerError, match=r"answered HTTP 500 Internal Server Error \(server_error\): generation "
                                        r"failed: expert \(layer=1, expert=3\) is unavailable"):
        ApiClient(url).stream_chat({"messages": []})
    bad = {"error": {"message": "'temperature' must be in [0.0, 2.0], got 7", "type": "invalid_request_error"}}
    _, url = serve(error_script(400, json.dumps(bad).encode()))
    with pytest.raises(GenerationError, match=r"HTTP 400 Bad Request \(invalid_request_error\): 'temperature'"):
        ApiClient(url).stream_chat({"messages": [], "temperature": 7})
    _, url = serve(error_script(502, b"upstream exploded"))
    with pytest.raises(PeerError, match="HTTP 502 Bad Gateway: upstream exploded"):
        ApiClient(url).models()


def test_an_error_event_in_the_stream_is_raised(serve):
    def script(h):
        sse_head(h)
        h.wfile.write(delta("so far") + event({"error": {"message": "generation failed: peer left",
                                                         "type": "server_error", "code": "mesh_unavailable"}}))

    _, url = serve(script)
    s = ApiClient(url).stream_chat({"messages": []})
    it = iter(s)
    assert next(it) == "so far"
    with pytest.raises(PeerError, match=r"failed in the middle of an answer \(server_error\): generation failed: "
                                        "peer left"):
        next(it)
    s.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_a_connection_dropped_mid_stream_is_a_clear_error(serve, chunked):
    def script(h):
        sse_head(h, chunked=chunked)
        if chunked:
            send_chunk(h, delta("partial"))
            h.wfile.write(b"40\r\ndata: {\"choi")  # a chunk cut short
        else:
            h.wfile.write(delta("partial") + b"data: {\"choi")
        h.wfile.flush()
        h.close_connection = True

    _, url = serve(script)
    s = ApiClient(url).stream_chat({"messages": []})
    got = []
    with pytest.raises(PeerClosedError, match="in the middle of an answer|ended before its end mark"):
        for d in s:
            got.append(d)
    assert got == ["partial"]
    s.close()
    assert s.answer is not None and s.answer.finish_reason == "cancelled" and s.answer.text == "partial"


def test_a_stalled_stream_hits_the_read_deadline(serve):
    release = threading.Event()

    def script(h):
        sse_head(h)
        h.wfile.write(delta("one"))
        h.wfile.flush()
        release.wait(30)

    _, url = serve(script)
    s = ApiClient(url, ClientTimeouts(read_timeout=0.3)).stream_chat({"messages": []})
    try:
        with pytest.raises(PeerClosedError, match="no data for 0.3 s in the middle of an answer"):
            list(s)
    finally:
        release.set()
        s.close()


def test_closing_a_stream_closes_the_connection_on_the_server(serve):
    server_saw_close = threading.Event()

    def script(h):
        sse_head(h)
        try:
            for _ in range(100_000):  # the client closes long before; each write fails once it has
                h.wfile.write(delta("tok "))
                h.wfile.flush()
                if server_saw_close.wait(0.005):
                    return
        except OSError:
            server_saw_close.set()

    _, url = serve(script)
    s = ApiClient(url).stream_chat({"messages": []})
    first = next(iter(s))
    s.close()
    assert server_saw_close.wait(20), "the server never saw the client close"
    assert first == "tok " and s.answer is not None and s.answer.finish_reason == "cancelled"


def test_nothing_listening_means_no_node():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(NodeNotRunningError, match=r"connection refused.*`ekmesh join --model ID`.*`ekmesh demo`"):
        ApiClient(f"http://127.0.0.1:{port}/v1").models()
    with pytest.raises(ConfigError, match="looks like http://127.0.0.1:PORT/v1"):
        ApiClient("127.0.0.1:8000")


def test_run_chat_streams_answers_keeps_history_and_runs_commands(serve):
    def script(h):
        if h.command == "GET":
            error_script(200, json.dumps({"object": "list", "data": [{"id": MODEL, "aliases": ["builtin"]}]})
                         .encode())(h)
            return
        sse_head(h)
        h.wfile.write(delta("**bold** answer", "stop") + event({"choices": [], "usage": USAGE, "ekmesh": STATS})
                      + b"data: [DONE]\n\n")

    srv, url = serve(script)
    lines = iter(["hello", "/temperature 0.25", "/temperature hot", "again", "/stats", "/clear", "/nope"])

    def read_line(prompt: str) -> str:
        assert prompt == "you> "
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    console = Console(width=160, record=True, color_system=None, force_terminal=False)
    state = ChatState(model="builtin", temperature=0.0)
    assert run_chat(ApiClient(url), state, console, read_line) == 0
    out = console.export_text()
    assert f"ekmesh chat · model builtin (blake3:906309…) · {url}" in out  # by name, the id shortened
    # shown as Markdown (no asterisks), then the status line
    assert len(re.findall(r"\nbold answer *\n12\.3 tok/s · first token 0\.21 s · 3 peers", out)) == 2
    assert "error: /temperature takes a number from 0 to 2, got 'hot'" in out
    assert "session: 2 answers · 128 tokens generated" in out
    assert "conversation cleared" in out and "unknown command /nope" in out
    posts = [body for method, _, body in srv.requests if method == "POST"]
    assert posts[0]["model"] == MODEL and posts[0]["temperature"] == 0.0
    assert posts[1]["temperature"] == 0.25 and posts[1]["messages"] == [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "**bold** answer"},
        {"role": "user", "content": "again"}]
    assert state.history == []
