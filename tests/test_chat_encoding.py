"""V4 chat encoding (spec §4): the published id sequence, multi-turn, thinking, system, Think-Max."""
from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer as Backend, models

from dsv4lib import chat
from dsv4lib.tokenizer import (ASSISTANT, BOS, END_THINK, EOS, SPECIAL_TOKENS, THINK, USER, Tokenizer,
                               load_tokenizer)

# Real V4 ids of the special tokens (spec §4, [TOK]).
REAL_IDS = {BOS: 0, EOS: 1, USER: 128803, ASSISTANT: 128804, THINK: 128821, END_THINK: 128822}


@pytest.fixture(scope="module")
def spec_tok() -> Tokenizer:
    """A tokenizer holding exactly the ids of the spec example (WordLevel + added special tokens)."""
    vocab = {"<unk>": 2, "你好": 30594, "推理": 36101, "答案": 7624, **REAL_IDS}
    be = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    be.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in REAL_IDS])
    return Tokenizer(be)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(Path(__file__).resolve().parents[1] / "data" / "tokenizer")


def test_spec_example_ids(spec_tok):
    msgs = [{"role": "user", "content": "你好"},
            {"role": "assistant", "content": "答案", "reasoning_content": "推理"}]
    text = chat.encode_messages(msgs, thinking=True, add_bos=False)
    assert text == "<｜User｜>你好<｜Assistant｜><think>推理</think>答案<｜end▁of▁sentence｜>"
    assert chat.chat_ids(spec_tok, msgs, thinking=True, add_bos=False) == \
        [128803, 30594, 128804, 128821, 36101, 128822, 7624, 1]
    assert chat.chat_ids(spec_tok, msgs, thinking=True)[:2] == [0, 128803]


def test_generation_prompt_chat_and_thinking_with_system():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert chat.encode_messages(msgs) == f"{BOS}Be brief.{USER}hi{ASSISTANT}{END_THINK}"
    assert chat.encode_messages(msgs, thinking=True) == f"{BOS}Be brief.{USER}hi{ASSISTANT}{THINK}"
    assert chat.encode_messages(msgs, add_generation_prompt=False) == f"{BOS}Be brief.{USER}hi"


def test_multi_turn_drops_earlier_reasoning_unless_tools_or_asked():
    msgs = [{"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
            {"role": "user", "content": "q2"}]
    think = chat.encode_messages(msgs, thinking=True)
    assert think == f"{BOS}{USER}q1{ASSISTANT}{END_THINK}a1{EOS}{USER}q2{ASSISTANT}{THINK}"
    kept = f"{BOS}{USER}q1{ASSISTANT}{THINK}r1{END_THINK}a1{EOS}{USER}q2{ASSISTANT}{THINK}"
    assert chat.encode_messages(msgs, thinking=True, drop_thinking=False) == kept
    assert chat.encode_messages(msgs, thinking=True, tools=[{"type": "function"}]) == kept
    # chat mode never renders reasoning
    assert chat.encode_messages(msgs) == f"{BOS}{USER}q1{ASSISTANT}{END_THINK}a1{EOS}{USER}q2{ASSISTANT}{END_THINK}"
    # the last (complete) assistant turn keeps its reasoning in thinking mode
    full = msgs + [{"role": "assistant", "content": "a2", "reasoning_content": "r2"}]
    assert chat.encode_messages(full, thinking=True).endswith(f"{USER}q2{ASSISTANT}{THINK}r2{END_THINK}a2{EOS}")


def test_think_max_prefix_tool_results_and_errors():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}]
    out = chat.encode_messages(msgs, thinking=True, reasoning_effort="max")
    assert out.startswith(BOS + "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert out.endswith("left unchecked.\n\nS" + f"{USER}x{ASSISTANT}{THINK}")
    assert chat.encode_messages(msgs, reasoning_effort="max") == chat.encode_messages(msgs)   # chat mode: no prefix
    tool = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "calling"},
            {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]
    assert chat.encode_messages(tool).endswith(
        f"{EOS}{USER}<tool_result>1</tool_result><tool_result>2</tool_result>{ASSISTANT}{END_THINK}")
    with pytest.raises(ValueError, match="unknown role"):
        chat.encode_messages([{"role": "robot", "content": "x"}])


def test_chat_ids_on_embedded_bpe_places_special_ids(tok):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What does Genesis 1:1 say?"},
            {"role": "assistant", "content": "In the beginning God created the heaven and the earth.",
             "reasoning_content": "Recall the verse."},
            {"role": "user", "content": "And the next verse?"}]
    ids = chat.chat_ids(tok, msgs, thinking=True)
    special = [i for i in ids if i < len(SPECIAL_TOKENS)]
    sid = tok.token_id
    assert special == [sid(BOS), sid(USER), sid(ASSISTANT), sid(END_THINK), sid(EOS), sid(USER), sid(ASSISTANT),
                       sid(THINK)]
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert tok.decode(ids) == chat.encode_messages(msgs, thinking=True)


def test_parse_completion():
    assert chat.parse_completion("why</think>because" + EOS + "junk", thinking=True) == \
        {"role": "assistant", "reasoning_content": "why", "content": "because"}
    assert chat.parse_completion("still thinking", thinking=True)["content"] == ""
    assert chat.parse_completion("plain" + EOS)["content"] == "plain"
