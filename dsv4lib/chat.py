"""DeepSeek-V4 chat encoding (spec §4; DeepSeek's ``encoding/README.md``).

Layout of a prompt (strings; the tokenizer turns the special-token texts into their ids)::

    BOS [Think-Max paragraph] {system}<｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>
                                    <｜User｜>{user}<｜Assistant｜><think>          ← turn being generated

* chat mode: every ``<｜Assistant｜>`` is followed by ``</think>`` (thinking closed at once).
* thinking mode: the turn(s) after the LAST user message open ``<think>``; a completed one renders
  ``{reasoning}</think>{answer}<｜end▁of▁sentence｜>``.  Earlier turns drop their reasoning and
  render as ``</think>{answer}<｜end▁of▁sentence｜>`` — unless tools are present or
  ``drop_thinking=False``, then every turn keeps ``<think>{reasoning}</think>``.
* Think-Max (``reasoning_effort="max"``, thinking mode only): a fixed paragraph right after BOS,
  before the system prompt, separated by a blank line (the separator is **[UNCONFIRMED]**).
* roles: system / developer (content verbatim), user, tool (``<tool_result>…</tool_result>``
  merged into the user turn), latest_reminder (``<｜latest_reminder｜>{content}``), assistant.
  Tool *calls* (DSML blocks) are not rendered here.
"""
from __future__ import annotations

from collections.abc import Sequence

from dsv4lib.tokenizer import ASSISTANT, BOS, END_THINK, EOS, LATEST_REMINDER, THINK, USER

THINK_MAX_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve "
    "the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked."
)
_ROLES = {"system", "developer", "user", "tool", "latest_reminder", "assistant"}


def encode_messages(messages: Sequence[dict], thinking: bool = False, *, add_bos: bool = True,
                    add_generation_prompt: bool = True, drop_thinking: bool = True,
                    reasoning_effort: str | None = None, tools: Sequence[dict] | None = None) -> str:
    """Render ``messages`` (dicts with ``role``, ``content``, optional ``reasoning_content``) as text.

    ``add_generation_prompt``: when the conversation ends on a user/tool turn, append
    ``<｜Assistant｜>`` + ``<think>`` (thinking) or ``</think>`` (chat) for the turn to generate.
    """
    for i, m in enumerate(messages):
        if m.get("role") not in _ROLES:
            raise ValueError(f"message {i}: unknown role {m.get('role')!r} (expected one of {sorted(_ROLES)})")
    has_tools = bool(tools) or any(m.get("tools") for m in messages)
    keep_reasoning = has_tools or not drop_thinking
    user_idx = [i for i, m in enumerate(messages) if m["role"] in ("user", "tool")]
    last_user = user_idx[-1] if user_idx else -1

    def opener(turn_user: int) -> str:
        return THINK if thinking and (keep_reasoning or turn_user >= last_user) else END_THINK

    parts: list[str] = [BOS] if add_bos else []
    if reasoning_effort == "max" and thinking:
        parts.append(THINK_MAX_PREFIX + "\n\n")
    elif reasoning_effort not in (None, "high", "max"):
        raise ValueError(f"reasoning_effort must be None, 'high' or 'max', got {reasoning_effort!r}")
    pending: str | None = None        # opener emitted after the latest <｜Assistant｜>, None if not open
    prev_role = None
    current_user = -1
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role in ("system", "developer"):
            parts.append(content)
        elif role == "latest_reminder":
            parts.append(LATEST_REMINDER + content)
        elif role in ("user", "tool"):
            text = f"<tool_result>{content}</tool_result>" if role == "tool" else content
            parts.append(text if (role == "tool" and prev_role == "tool") else USER + text)
            current_user = i
            nxt = messages[i + 1]["role"] if i + 1 < len(messages) else None
            if nxt == "assistant" or (nxt is None and add_generation_prompt):
                pending = opener(i)
                parts.append(ASSISTANT + pending)
        elif role == "assistant":
            if pending is None:                                   # assistant without a user turn before it
                pending = opener(current_user)
                parts.append(ASSISTANT + pending)
            if pending == THINK:
                parts.append((m.get("reasoning_content") or "") + END_THINK)
            parts.append(content + EOS)
            pending = None
        prev_role = role
    return "".join(parts)


def chat_ids(tokenizer, messages: Sequence[dict], thinking: bool = False, **kwargs) -> list[int]:
    """Token ids of :func:`encode_messages` (BOS is the special token id, never added twice)."""
    return tokenizer.encode(encode_messages(messages, thinking, **kwargs))


def parse_completion(text: str, thinking: bool = False) -> dict:
    """Split generated text (after the prompt) into ``reasoning_content`` and ``content``.

    In thinking mode the prompt ended with ``<think>``, so everything before the first ``</think>``
    is reasoning.  A trailing EOS (and anything after it) is removed.
    """
    text = text.split(EOS, 1)[0]
    reasoning = ""
    if thinking and END_THINK in text:
        reasoning, text = text.split(END_THINK, 1)
    elif thinking:
        reasoning, text = text, ""
    return {"role": "assistant", "reasoning_content": reasoning, "content": text}
