"""``ekmesh chat``: a client of a node's OpenAI-compatible HTTP API, its session state, its view and its loop.

- the HTTP side lives in ``tui.api_client`` (``ApiClient``, ``AnswerStream``, ``Answer``), re-exported here;
- ``ChatState`` holds the conversation; ``status_line``, ``stats_view``, ``models_view``, ``help_view`` are pure
  functions of it (no I/O, no clock), so a fixed state renders to fixed text; ``header`` names the model as the user
  knows it (``tui.names``: ``tinyds (blake3:9063ab…)``).
- ``run_chat`` is the interactive loop: readline input, tokens streamed through ``rich.live.Live`` and re-rendered
  as Markdown when the answer is complete, slash commands. Ctrl-C while an answer streams stops that answer (the
  partial text stays in the history, as the user saw it); Ctrl-C at the prompt asks, a second one in a row exits.

Not responsible for finding the node (the CLI reads ``node.json``) or running a model. No torch, libp2p or trio.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

from ekmesh.core.errors import ConfigError, EkmeshError
from ekmesh.tui.api_client import Answer, AnswerStream, ApiClient
from ekmesh.tui.names import model_label

PROMPT = "you> "
REFRESH_S = 0.05  # redraw the streaming answer at most 20 times a second

# ---------------------------------------------------------------------------------------------------- state, view


@dataclass
class SessionTotals:
    answers: int = 0
    prompt_tokens: int = 0
    tokens: int = 0
    seconds: float = 0.0


@dataclass
class ChatState:
    """One chat session. ``history`` holds the user and assistant messages (the system message is separate and
    survives ``/clear``); ``model`` None means the node's model."""

    model: str | None = None
    temperature: float = 0.7
    max_tokens: int | None = None
    seed: int | None = None
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    last: Answer | None = None
    totals: SessionTotals = field(default_factory=SessionTotals)

    def request(self) -> dict[str, Any]:
        """The chat completion request for the conversation so far."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {"messages": system + list(self.history), "temperature": self.temperature}
        for key, value in (("model", self.model), ("max_tokens", self.max_tokens), ("seed", self.seed)):
            if value is not None:
                body[key] = value
        return body

    def record(self, answer: Answer) -> None:
        self.last = answer
        t = self.totals
        t.answers += 1
        t.prompt_tokens += _int(answer.usage.get("prompt_tokens"))
        t.tokens += _int(answer.stats.get("tokens", answer.usage.get("completion_tokens")))
        t.seconds += answer.seconds


def _int(v: Any) -> int:
    return v if isinstance(v, int) else 0


def status_line(answer: Answer) -> Text:
    """``12.3 tok/s · first token 0.21 s · 3 peers · layer round trip 0.41 ms · 64 tokens · 3.2 per step (draft)``;
    a figure the stats lack is left out, and an answer that did not end by itself says why."""
    s = answer.stats
    parts = []
    if isinstance(s.get("tokens_per_s"), (int, float)):
        parts.append(f"{s['tokens_per_s']:.1f} tok/s")
    if isinstance(s.get("ttft_s"), (int, float)):
        parts.append(f"first token {s['ttft_s']:.2f} s")
    if isinstance(s.get("peers"), list):
        n = len(s["peers"])
        parts.append("experts local" if n == 0 else "1 peer" if n == 1 else f"{n} peers")
    if isinstance(s.get("mean_layer_rtt_ms"), (int, float)):
        parts.append(f"layer round trip {s['mean_layer_rtt_ms']:.2f} ms")
    if isinstance(s.get("tokens"), int):
        parts.append(f"{s['tokens']} token" + ("" if s["tokens"] == 1 else "s"))
        steps = s.get("steps")
        if isinstance(steps, int) and steps > 0 and s.get("speculative") not in (None, "off"):
            # tokens per target step: what drafting saved (a step is one round trip per MoE layer on a mesh)
            parts.append(f"{s['tokens'] / (steps + 1):.1f} per step ({s['speculative']})")
    if answer.finish_reason == "length":
        parts.append("cut at max tokens")
    elif answer.finish_reason == "cancelled":
        parts.append("stopped")
    return Text(" · ".join(parts), style="dim")


def stats_view(state: ChatState) -> Text:
    """``/stats``: the last answer's figures and the session's totals."""
    t = state.totals
    text = Text.assemble(("last answer: ", "bold"))
    text.append_text(status_line(state.last) if state.last else Text("none yet"))
    text.append("\nsession: ", style="bold")
    text.append(f"{t.answers} answer{'' if t.answers == 1 else 's'} · {t.tokens} tokens generated · "
                f"{t.prompt_tokens} prompt tokens · {t.seconds:.1f} s")
    if t.seconds > 0 and t.tokens:
        text.append(f" · {t.tokens / t.seconds:.1f} tok/s overall")
    model = state.model or "(the node's)"
    text.append(f"\nmodel {model} · temperature {state.temperature:g} · "
                f"{len(state.history)} messages in the conversation")
    return text


def models_view(models: list[dict[str, Any]], current: str | None) -> Text:
    """``/model``: the served models, the current one marked with ``*``, aliases in brackets."""
    text = Text()
    for m in models:
        mark = "*" if m["id"] == current else " "
        aliases = [a for a in m.get("aliases", []) if isinstance(a, str)]
        text.append(f"{mark} {m['id']}", style="bold" if mark == "*" else "")
        text.append(f" ({', '.join(aliases)})\n" if aliases else "\n")
    text.append("/model ID switches (an id, a unique id prefix or an alias)", style="dim")
    return text


def help_view() -> Text:
    rows = [("/model [ID]", "show the served models, or switch to one"),
            ("/temperature T", "sampling temperature (0 = greedy)"),
            ("/clear", "forget the conversation (the system message stays)"),
            ("/stats", "figures of the last answer and of this session"),
            ("/help", "this list"),
            ("/exit", "quit (also Ctrl-D)")]
    text = Text()
    for cmd, what in rows:
        text.append(f"{cmd:<16}", style="bold")
        text.append(f"{what}\n")
    text.append("Ctrl-C stops an answer (its text so far stays in the conversation); at the prompt, "
                "Ctrl-C twice quits.", style="dim")
    return text


def label_of(models: list[dict[str, Any]], model_id: str | None, wanted: str | None = None) -> str:
    """How the chat names ``model_id``: its name (``wanted`` if that is one) with the id shortened."""
    if model_id is None:
        return "(the node's)"
    aliases: list[Any] = next((m.get("aliases", []) for m in models if m.get("id") == model_id), [])
    return model_label(model_id, [a for a in aliases if isinstance(a, str)], wanted)


def header(models: list[dict[str, Any]], model_id: str | None, api_url: str, wanted: str | None = None) -> Text:
    """The chat's first line: the model by name (id shortened) and the API it talks to."""
    return Text.assemble(("ekmesh chat", "bold"), f" · model {label_of(models, model_id, wanted)} · {api_url}")


def resolve_model(models: list[dict[str, Any]], wanted: str) -> str:
    """The id of the served model that ``wanted`` names: an id, an alias, or a unique prefix of an id (with or
    without its ``blake3:`` part). ``ConfigError`` if none or several match."""
    for m in models:
        if wanted == m["id"] or wanted in m.get("aliases", []):
            return str(m["id"])
    hits = [m["id"] for m in models if m["id"].startswith(wanted) or m["id"].partition(":")[2].startswith(wanted)]
    if len(hits) == 1:
        return str(hits[0])
    served = ", ".join(m["id"] for m in models) or "nothing"
    raise ConfigError(f"{'several' if hits else 'no'} served model{'s' if hits else ''} match {wanted!r} "
                      f"(served: {served})")


# ------------------------------------------------------------------------------------------------ interactive loop


def run_chat(client: ApiClient, state: ChatState, console: Console,
             read_line: Callable[[str], str] = input) -> int:
    """Chat until ``/exit``, Ctrl-D or two Ctrl-C in a row at the prompt; returns the exit code (0)."""
    models = client.models()
    wanted = state.model
    if state.model is not None:
        state.model = resolve_model(models, state.model)
    elif models:
        state.model = str(models[0]["id"])
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    console.print(header(models, state.model, client.api_url, wanted),
                  Text("/help lists the commands, /exit or Ctrl-D quits", style="dim"), sep="\n")
    asked = False
    while True:
        try:
            line = read_line(PROMPT).strip()
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print()
            if asked:
                return 0
            console.print(Text("(Ctrl-C again, Ctrl-D or /exit quits)", style="dim"))
            asked = True
            continue
        asked = False
        try:
            if line.startswith("/"):
                if _command(line, client, state, console):
                    return 0
            elif line:
                _turn(line, client, state, console)
        except EkmeshError as exc:
            console.print(Text(f"error: {exc}", style="red"))
        except KeyboardInterrupt:
            console.print(Text("\n(interrupted)", style="dim"))


def _command(line: str, client: ApiClient, state: ChatState, console: Console) -> bool:
    """Run one slash command; True means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return True
    if name == "/help":
        console.print(help_view())
    elif name == "/clear":
        state.history.clear()
        console.print(Text("conversation cleared", style="dim"))
    elif name == "/stats":
        console.print(stats_view(state))
    elif name == "/temperature":
        if arg:
            try:
                value = float(arg)
            except ValueError:
                value = -1.0
            if not 0.0 <= value <= 2.0:
                raise ConfigError(f"/temperature takes a number from 0 to 2, got {arg!r}")
            state.temperature = value
        console.print(Text(f"temperature {state.temperature:g}", style="dim"))
    elif name == "/model":
        models = client.models()
        if arg:
            state.model = resolve_model(models, arg)
            console.print(Text(f"model {label_of(models, state.model, arg)}", style="dim"))
        else:
            console.print(models_view(models, state.model))
    else:
        console.print(Text(f"unknown command {name}; /help lists the commands", style="yellow"))
    return False


def _turn(prompt: str, client: ApiClient, state: ChatState, console: Console) -> None:
    """Ask ``prompt``, stream the answer, keep both in the history. A failed answer leaves no trace in the
    history; a stopped one keeps its partial text (if any arrived), as the user saw it."""
    state.history.append({"role": "user", "content": prompt})
    try:
        answer = _show_stream(client.stream_chat(state.request()), console)
    except BaseException:
        state.history.pop()
        raise
    if answer.finish_reason == "cancelled" and not answer.text:
        state.history.pop()
    else:
        state.history.append({"role": "assistant", "content": answer.text})
    state.record(answer)
    console.print(status_line(answer))


def _show_stream(stream: AnswerStream, console: Console) -> Answer:
    """Stream the answer as plain text, then show it as Markdown (not a terminal: only the Markdown). Ctrl-C
    closes the stream (cancelling the generation on the node) and keeps what arrived."""
    text = ""
    live = Live(Text(""), console=console, auto_refresh=False, vertical_overflow="visible")
    with stream, live if console.is_terminal else contextlib.nullcontext():
        shown = 0.0
        try:
            for delta in stream:
                text += delta
                if console.is_terminal and time.monotonic() - shown >= REFRESH_S:
                    live.update(Text(text), refresh=True)
                    shown = time.monotonic()
        except KeyboardInterrupt:
            stream.close()
        if console.is_terminal:
            live.update(Markdown(text) if text else Text(""), refresh=True)
    if not console.is_terminal and text:
        console.print(Markdown(text))
    assert stream.answer is not None
    return stream.answer
