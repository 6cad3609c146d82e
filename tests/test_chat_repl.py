"""REPL driven through text streams (as from a pipe): commands, streaming, history."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv4lib import repl
from dsv4lib.generate import generate
from dsv4lib.tokenizer import load_tokenizer
from text_standin import RNNStandin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ROOT / "data" / "tokenizer")


def test_repl_commands_and_history(tok):
    model = RNNStandin(tok.vocab_size, dim=32, seed=3)
    script = "hello\n/think\n/temp 0.5\n/max 7\nwhat now?\n/temp x\n/bogus\n/reset\n\nagain\n/quit\nnever sent\n"
    out = io.StringIO()
    s = repl.run_repl(model, tok, io.StringIO(script), out, repl.ChatSession(max_new_tokens=5, seed=1))
    assert s.thinking and s.temperature == 0.5 and s.max_new_tokens == 7
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.messages[0]["content"] == "again"
    text = out.getvalue()
    for marker in ("[thinking mode on]", "[temperature 0.5]", "[max new tokens 7]", "[bad argument for /temp",
                   "[unknown command /bogus", "[conversation reset]"):
        assert marker in text
    assert "never sent" not in text


def test_streamed_reply_equals_generate_and_history_feeds_next_turn(tok):
    model = RNNStandin(tok.vocab_size, dim=32, seed=5)
    out = io.StringIO()
    s = repl.ChatSession(max_new_tokens=6)
    repl.run_repl(model, tok, io.StringIO("first question\nsecond question\n"), out, s)
    first = generate(model, tok, [{"role": "user", "content": "first question"}], max_new_tokens=6)
    hist = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": first.text},
            {"role": "user", "content": "second question"}]
    second = generate(model, tok, hist, max_new_tokens=6)
    assert out.getvalue() == first.text + "\n" + second.text + "\n"
    assert s.messages[1]["content"] == first.text and s.messages[3]["content"] == second.text
    assert s.last.prompt_ids == second.prompt_ids


def test_thinking_reply_split_into_reasoning_and_content(tok):
    model = RNNStandin(tok.vocab_size, dim=32, seed=6)
    s = repl.ChatSession(thinking=True, max_new_tokens=8)
    res = repl.chat_turn(model, tok, s, "hi", io.StringIO())
    msg = s.messages[-1]
    if "</think>" in res.text:
        assert msg["reasoning_content"] + "</think>" + msg["content"] == res.text
    else:
        assert msg["reasoning_content"] == res.text and msg["content"] == ""


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "data" / "tiny-v4" / "config.json").is_file(), reason="embedded model not built yet")
def test_cli_chat_through_a_pipe():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DSV4_REF", None), env.pop("DSV4_INT2", None)
    p = subprocess.run([sys.executable, "-m", "dsv4lib", "chat", "--max-new-tokens", "8", "--device", "cpu"],
                       input="Tell me a fortune.\n/think\nWhy?\n/quit\n", capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "[thinking mode on]" in p.stdout and p.stdout.count("\n") >= 3
