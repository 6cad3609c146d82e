"""Embedded byte-level BPE tokenizer (data/tokenizer) and the dsv4lib.tokenizer wrapper."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer as Backend, models, pre_tokenizers

from dsv4lib import tokenizer as T

TOK_DIR = Path(__file__).resolve().parents[1] / "data" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return T.load_tokenizer(TOK_DIR)


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == 4096
    assert [tok.token_id(s) for s in T.SPECIAL_TOKENS] == list(range(15))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    assert all("\uff5c" in s for s in T.SPECIAL_TOKENS if s not in (T.THINK, T.END_THINK))
    assert "\u2581" in T.BOS and "\u2581" in T.EOS
    cfg = json.loads((TOK_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False and "chat_template" not in cfg
    assert cfg["bos_token"]["content"] == T.BOS and cfg["eos_token"]["content"] == cfg["pad_token"]["content"] == T.EOS


def test_specials_are_single_tokens_and_no_bos_is_added(tok):
    text = "".join(T.SPECIAL_TOKENS)
    assert tok.encode(text) == list(range(15))
    ids = tok.encode("hello")
    assert ids and ids[0] != tok.bos_id and tok.eos_id not in ids
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.token_id("<｜nope｜>")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_and_streaming_decode(text):
    tok = _TOK
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    dec = tok.incremental_decoder()
    chunks = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks) or "\ufffd" in text


_TOK = T.load_tokenizer(TOK_DIR)


def test_streaming_holds_back_partial_utf8(tok):
    text = "景太郎 says ünïcödé"
    ids = tok.encode(text)
    raw = [tok.token_bytes(i) for i in ids]
    assert any(not _valid_utf8(b) for b in raw)                 # some token splits a character
    dec = tok.incremental_decoder()
    out = [dec.push(i) for i in ids]
    assert "".join(out) + dec.flush() == text and "" in out and all("\ufffd" not in c for c in out)
    assert b"".join(raw) == text.encode("utf-8")


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_matches_transformers_fast_tokenizer(tok):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(TOK_DIR))
    text = f"{T.BOS}Sys.{T.USER}What is 12345 + 6?{T.ASSISTANT}{T.THINK}ok{T.END_THINK}7{T.EOS}"
    assert hf(text, add_special_tokens=True)["input_ids"] == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text)) == text


def test_generic_incremental_decoder_on_non_byte_level_tokenizer():
    vocab = {"[UNK]": 0, "a": 1, "b": 2, T.BOS: 3, T.EOS: 4}
    be = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    be.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk = T.Tokenizer(be)
    assert not tk.byte_level and (tk.bos_id, tk.eos_id) == (3, 4)
    dec = tk.incremental_decoder()
    assert "".join(dec.push(i) for i in [1, 2, 1]) + dec.flush() == tk.decode([1, 2, 1])


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        T.load_tokenizer(tmp_path)
