"""Multi-turn chat REPL over :func:`dsv4lib.generate.generate` (spec §4 chat encoding).

Reads one user message per line from any text stream (a terminal or a pipe) and streams the
reply.  Commands: ``/reset`` (forget the conversation), ``/think`` (toggle thinking mode),
``/temp X`` (temperature, 0 = greedy), ``/max N`` (max new tokens), ``/system TEXT``, ``/help``,
``/quit`` (or end of input).  In thinking mode the reasoning is streamed too (up to ``</think>``);
the stored history keeps it separately, so earlier turns' reasoning is dropped by the encoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

from dsv4lib.chat import parse_completion
from dsv4lib.generate import GenerationResult, generate

HELP = ("commands: /reset  /think  /temp X  /max N  /system TEXT  /help  /quit\n"
        "anything else is sent as a user message")


@dataclass
class ChatSession:
    thinking: bool = False
    temperature: float = 0.0
    max_new_tokens: int = 256
    top_p: float = 1.0
    system: str | None = None
    seed: int | None = None
    messages: list[dict] = field(default_factory=list)
    last: GenerationResult | None = None

    def conversation(self) -> list[dict]:
        sys = [{"role": "system", "content": self.system}] if self.system else []
        return sys + self.messages


def _command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Apply a /command; returns False when the REPL should stop."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if cmd == "/quit" or cmd == "/exit":
            return False
        if cmd == "/reset":
            session.messages.clear()
            out.write("[conversation reset]\n")
        elif cmd == "/think":
            session.thinking = not session.thinking
            out.write(f"[thinking mode {'on' if session.thinking else 'off'}]\n")
        elif cmd == "/temp":
            t = float(arg)
            if t < 0:
                raise ValueError("temperature must be >= 0")
            session.temperature = t
            out.write(f"[temperature {t:g}]\n")
        elif cmd == "/max":
            n = int(arg)
            if n < 1:
                raise ValueError("max tokens must be >= 1")
            session.max_new_tokens = n
            out.write(f"[max new tokens {n}]\n")
        elif cmd == "/system":
            session.system = arg or None
            out.write(f"[system prompt {'set' if arg else 'cleared'}]\n")
        elif cmd == "/help":
            out.write(HELP + "\n")
        else:
            out.write(f"[unknown command {cmd}; /help lists them]\n")
    except ValueError as exc:
        out.write(f"[bad argument for {cmd}: {exc}]\n")
    return True


def chat_turn(model, tokenizer, session: ChatSession, user_text: str, out: TextIO) -> GenerationResult:
    """Send one user message, stream the reply to ``out``, append both turns to the history."""
    session.messages.append({"role": "user", "content": user_text})

    def stream(chunk: str) -> None:
        out.write(chunk)
        out.flush()

    res = generate(model, tokenizer, session.conversation(), max_new_tokens=session.max_new_tokens,
                   temperature=session.temperature, top_p=session.top_p, thinking=session.thinking,
                   seed=session.seed, stream=stream)
    msg = parse_completion(res.text, session.thinking)
    session.messages.append({"role": "assistant", "content": msg["content"],
                             **({"reasoning_content": msg["reasoning_content"]} if session.thinking else {})})
    session.last = res
    out.write("\n")
    return res


def run_repl(model, tokenizer, inp: TextIO, out: TextIO, session: ChatSession | None = None,
             prompt: str = "", show_stats: bool = False) -> ChatSession:
    """Read lines from ``inp`` until /quit or EOF; ``prompt`` is printed before each read (use ``""``
    for pipes).  Returns the session (its history) for inspection."""
    session = session or ChatSession()
    while True:
        if prompt:
            out.write(prompt)
            out.flush()
        line = inp.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(session, line.strip(), out):
                break
            continue
        res = chat_turn(model, tokenizer, session, line, out)
        if show_stats:
            out.write(f"[{res.n_new} tokens, {res.tokens_per_s:.1f} tok/s, stop: {res.stop_reason}]\n")
    return session
