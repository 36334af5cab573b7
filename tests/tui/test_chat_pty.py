"""``ekmesh chat`` driven in a pseudo-terminal (pexpect), and ``chat --prompt`` / ``generate --mesh`` as real
subprocesses, all against the real API server (``python -m ekmesh.api --model builtin``, a one-process model).
Greedy decoding is deterministic, so what the chat streams must equal the API's non-streamed answer to the same
request."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 60  # every wait on a child: pexpect timeouts, subprocess timeouts
PROMPT = "you> "
STATUS = r"[\d.]+ tok/s · first token [\d.]+ s · [^\r\n]*tokens?"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
QUESTION = "Who was Moses?"  # greedy, the built-in model answers it for more than 1500 tokens
LONG = 200  # tokens: an answer streams for a few seconds, long enough to be stopped with Ctrl-C


def env(home: Path) -> dict[str, str]:
    return dict(os.environ, EKMESH_HOME=str(home), PYTHONPATH=str(REPO), TERM="xterm-256color", COLUMNS="200")


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[str]:
    """The real API server on port 0; yields its api_url."""
    home = tmp_path_factory.mktemp("api-home")
    proc = subprocess.Popen([sys.executable, "-m", "ekmesh.api", "--model", "builtin", "--port", "0"], cwd=REPO,
                            env=env(home), stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(target=lambda: lines.put(out.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=DEADLINE)
        assert line, f"the API server exited with {proc.wait(10)}"
        yield json.loads(line)["api_url"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=DEADLINE) as resp:
        return json.loads(resp.read())


def reference(api: str, messages: list[dict[str, str]], max_tokens: int = 24) -> dict[str, Any]:
    """The API's non-streamed greedy answer."""
    return post(api + "/chat/completions", {"messages": messages, "max_tokens": max_tokens, "temperature": 0})


def words(text: str) -> str:
    return " ".join(ANSI.sub("", text).split())


def spawn_chat(api: str, home: Path, max_tokens: int = 24) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "ekmesh.cli", "chat", "--api", api, "--temperature", "0",
                                           "--max-tokens", str(max_tokens)], cwd=str(REPO), env=env(home),
                          encoding="utf-8", timeout=DEADLINE, dimensions=(50, 200))
    child.expect_exact(PROMPT)
    return child


def ask(child: pexpect.spawn, line: str) -> str:
    """Send ``line``, wait for the next prompt; returns what the app printed in between."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return str(child.before)


def last_frame(output: str) -> str:
    """The last frame the live view drew before the status line: the answer rendered as Markdown."""
    before_status = re.split(STATUS, output)[0]
    return words(before_status.rsplit("\x1b[2K", 1)[-1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chat_in_a_terminal(api, tmp_path):
    child = spawn_chat(api, tmp_path, max_tokens=LONG)
    try:
        # Ctrl-C while the answer streams: the answer stops, the prompt comes back, the partial text is kept
        child.sendline(QUESTION)
        child.expect(r"\x1b\[2K[A-Za-z]")  # the live view drew a first piece of the answer
        child.sendintr()
        child.expect(r"first token [\d.]+ s · [^\r\n]*tokens? · stopped")  # measured here: the API sent no stats
        child.expect_exact(PROMPT)
        stats = ask(child, "/stats")
        assert "stopped" in words(stats) and "2 messages in the conversation" in words(stats)

        child.sendline("/temperature 0.5")
        child.expect_exact("temperature 0.5")
        child.expect_exact(PROMPT)
        assert "temperature 0.5" in words(ask(child, "/stats"))
        ask(child, "/temperature 0")
        assert "conversation cleared" in words(ask(child, "/clear"))
        child.sendline("/max")
        child.expect_exact("unknown command /max")
        child.expect_exact(PROMPT)

        # still answers, and a cleared conversation sends only the new question: the API's greedy answer
        out = ask(child, QUESTION)
        ref = reference(api, [{"role": "user", "content": QUESTION}], LONG)
        assert re.search(STATUS, out), out
        assert last_frame(out) == words(ref["choices"][0]["message"]["content"]), out
        assert f"{ref['usage']['completion_tokens']} tokens · cut at max tokens" in words(out)

        # the history goes with the next question
        follow = "And Aaron?"
        out = ask(child, follow)
        ref2 = reference(api, [{"role": "user", "content": QUESTION},
                               {"role": "assistant", "content": ref["choices"][0]["message"]["content"]},
                               {"role": "user", "content": follow}], LONG)
        assert last_frame(out) == words(ref2["choices"][0]["message"]["content"]), out
        assert "4 messages in the conversation" in words(ask(child, "/stats"))

        # Ctrl-C at the prompt asks first; /exit quits with status 0
        child.sendintr()
        child.expect_exact("Ctrl-C again, Ctrl-D or /exit quits")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("keys", ["ctrl-d", "ctrl-c twice"])
def test_chat_quits_on_ctrl_d_and_on_two_ctrl_c(api, tmp_path, keys):
    child = spawn_chat(api, tmp_path)
    try:
        if keys == "ctrl-d":
            child.sendeof()
        else:
            child.sendintr()
            child.expect_exact(PROMPT)
            child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None


def run_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ekmesh.cli", *args], cwd=REPO, env=env(home),
                          capture_output=True, text=True, timeout=DEADLINE)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_chat_prompt_prints_the_answer_or_json(api, tmp_path):
    ref = reference(api, [{"role": "system", "content": "You are brief."}, {"role": "user", "content": QUESTION}])
    args = ("chat", "--api", api, "--prompt", QUESTION, "--system", "You are brief.", "--temperature", "0",
            "--max-tokens", "24")
    r = run_cli(tmp_path, *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref["choices"][0]["message"]["content"] + "\n"
    assert re.fullmatch(r"[\d.]+ tok/s · first token [\d.]+ s · experts local · 24 tokens · cut at max tokens\n",
                        r.stderr), r.stderr
    r = run_cli(tmp_path, *args, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["text"] == ref["choices"][0]["message"]["content"]
    assert out["finish_reason"] == "length" and out["usage"] == ref["usage"]
    assert set(out["ekmesh"]) >= {"ttft_s", "tokens_per_s", "tokens", "peers", "mean_layer_rtt_ms"}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_generate_mesh_goes_through_the_node_api(api, tmp_path):
    (tmp_path / "node.json").write_text(json.dumps({"pid": os.getpid(), "peer_id": "x", "url": "http://127.0.0.1:1",
                                                    "token": "t", "api_url": api}))
    prompt = "In the beginning"
    local = run_cli(tmp_path, "generate", "builtin", "--prompt", prompt, "--max-tokens", "24")
    assert local.returncode == 0, local.stderr
    r = run_cli(tmp_path, "generate", "builtin", "--mesh", "--prompt", prompt, "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert r.stdout == local.stdout  # same text, same format as in this process
    ref = post(api + "/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0})
    assert r.stdout == ref["choices"][0]["text"] + "\n"

    r = run_cli(tmp_path, "generate", "builtin", "--mesh", "--chat", "--prompt", QUESTION, "--max-tokens", "24",
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ref = reference(api, [{"role": "user", "content": QUESTION}])
    assert out["text"] == ref["choices"][0]["message"]["content"]
    assert out["finish_reason"] == "length" and out["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    assert out["completion_tokens"] == 24 and out["tokens_per_s"] > 0 and out["time_to_first_token_s"] > 0
    assert out["peers"] == [] and out["api_url"] == api and out["model"] == "builtin"

    # token ids in and out, as in this process
    local = run_cli(tmp_path, "generate", "builtin", "--prompt-ids", "1,2,3", "--max-tokens", "8", "--json")
    r = run_cli(tmp_path, "generate", "builtin", "--mesh", "--prompt-ids", "1,2,3", "--max-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == json.loads(local.stdout)["token_ids"]
    r = run_cli(tmp_path, "generate", "builtin", "--mesh", "--chat", "--prompt-ids", "1,2,3")
    assert r.returncode == 1 and "--prompt-ids with --chat" in r.stderr
    r = run_cli(tmp_path, "generate", "nosuchmodel", "--mesh", "--prompt", "x")
    assert r.returncode == 1 and "HTTP 404" in r.stderr and "'nosuchmodel' is not served" in r.stderr


@pytest.mark.timeout(120)
def test_without_a_node_chat_and_generate_mesh_say_how_to_start_one(tmp_path):
    for args in (("chat",), ("chat", "--prompt", "hi"), ("generate", "builtin", "--mesh", "--prompt", "hi")):
        r = run_cli(tmp_path, *args)
        assert r.returncode == 1, (args, r.stderr)
        assert f"no ekmesh node is running for {tmp_path}" in r.stderr
        assert "`ekmesh join --model ID`" in r.stderr and "`ekmesh demo`" in r.stderr
    (tmp_path / "node.json").write_text(json.dumps({"pid": 1, "peer_id": "x", "url": "http://127.0.0.1:1",
                                                    "token": "t"}))
    r = run_cli(tmp_path, "chat", "--prompt", "hi")
    assert r.returncode == 1 and "serves no HTTP API (its node.json has no api_url)" in r.stderr
    r = run_cli(tmp_path, "chat", "--json")
    assert r.returncode == 2 and "--json needs --prompt" in r.stderr
