"""Tokenizer wrapper: a ``tokenizers`` byte-level BPE plus the V4 special tokens (spec §4).

Works on any release dir holding ``tokenizer.json`` (+ optional ``tokenizer_config.json`` for the
bos/eos/pad names): the embedded tiny model's 4096-entry BPE and the real 129,280-entry V4 vocab
alike.  Like the real release, encoding never adds BOS/EOS by itself — the chat encoder
(:mod:`dsv4lib.chat`) writes the BOS *text*, which is matched as a special token.

Streaming: :class:`IncrementalDecoder` turns ids into text one at a time and holds back partial
UTF-8 sequences (a multi-byte character split over two byte-level tokens), so a streaming
callback never prints U+FFFD for text that will complete on the next token.
"""
from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer as _Backend

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
ACTION = "<｜action｜>"
QUERY = "<｜query｜>"
AUTHORITY = "<｜authority｜>"
DOMAIN = "<｜domain｜>"
TITLE = "<｜title｜>"
EXTRACTED_URL = "<｜extracted_url｜>"
READ_URL = "<｜read_url｜>"
# Order = ids in the embedded tokenizer (BOS 0, EOS 1, ...); the real V4 vocab puts the
# non-BOS/EOS ones at 128803.. (spec §4).
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK, DSML, LATEST_REMINDER,
                                   ACTION, QUERY, AUTHORITY, DOMAIN, TITLE, EXTRACTED_URL, READ_URL)


def _byte_level_table() -> dict[str, int]:
    """The byte-level BPE alphabet: printable Latin-1 bytes map to themselves, the other bytes to
    U+0100 upwards in byte order.  Returns char -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in keep}
    extra = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + extra)] = b
            extra += 1
    return table


@dataclass
class IncrementalDecoder:
    """Feed token ids one at a time; :meth:`push` returns only text that is complete."""
    tokenizer: "Tokenizer"
    skip_special_tokens: bool = False
    _utf8: codecs.IncrementalDecoder = field(init=False, repr=False)
    _ids: list[int] = field(init=False, default_factory=list, repr=False)
    _emitted: int = field(init=False, default=0, repr=False)

    def __post_init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        if tok.byte_level:
            if self.skip_special_tokens and token_id in tok.special_ids:
                return ""
            return self._utf8.decode(tok.token_bytes(token_id))
        # Generic path: decode the whole prefix, emit the new suffix once it has no dangling U+FFFD.
        self._ids.append(token_id)
        text = tok.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self._emitted = text[self._emitted:], len(text)
        return new

    def flush(self) -> str:
        """Text still held back (an incomplete UTF-8 tail is rendered as U+FFFD)."""
        if self.tokenizer.byte_level:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self._ids, skip_special_tokens=self.skip_special_tokens)
        new, self._emitted = text[self._emitted:], len(text)
        return new


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` with the V4 conventions (no automatic BOS)."""

    def __init__(self, backend: _Backend, bos_token: str = BOS, eos_token: str = EOS,
                 pad_token: str | None = None, source: str = "<memory>") -> None:
        self.backend = backend
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.bos_id = self.token_id(bos_token)
        self.eos_id = self.token_id(eos_token)
        self.pad_id = self.token_id(self.pad_token)
        spec = json.loads(backend.to_str())
        dec = spec.get("decoder") or {}
        self.byte_level = dec.get("type") == "ByteLevel"
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        self.special_ids = frozenset(i for i, t in added.items() if t.get("special"))
        self._bytes: dict[int, bytes] | None = None
        self._added = {i: t["content"] for i, t in added.items()}

    # -- basic API -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings inside it become their ids.  No BOS added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        i = self.backend.token_to_id(token)
        if i is None:
            raise KeyError(f"{self.source}: token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, token_id: int) -> str:
        t = self.backend.id_to_token(int(token_id))
        if t is None:
            raise KeyError(f"{self.source}: id {token_id} is outside the vocabulary ({self.vocab_size})")
        return t

    # -- streaming ---------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a byte-level token stands for (added tokens: their UTF-8 text)."""
        if not self.byte_level:
            raise ValueError(f"{self.source}: token_bytes needs a byte-level tokenizer")
        if self._bytes is None:
            table = _byte_level_table()
            vocab = self.backend.get_vocab(with_added_tokens=True)
            self._bytes = {i: (self._added[i].encode("utf-8") if i in self._added
                               else bytes(table[c] for c in tok)) for tok, i in vocab.items()}
        return self._bytes[int(token_id)]

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(release_dir: str | Path) -> Tokenizer:
    """``release_dir/tokenizer.json`` (+ ``tokenizer_config.json`` for bos/eos/pad if present)."""
    release_dir = Path(release_dir)
    path = release_dir / "tokenizer.json" if release_dir.is_dir() else release_dir
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (expected in the release dir)")
    try:
        backend = _Backend.from_file(str(path))
    except Exception as exc:                                    # tokenizers raises plain Exception
        raise ValueError(f"{path}: cannot parse tokenizer.json ({exc})") from exc
    cfg_path = path.parent / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    if cfg.get("add_bos_token") or cfg.get("add_eos_token"):
        raise ValueError(f"{cfg_path}: add_bos_token/add_eos_token must be false (the chat encoder adds BOS)")
    return Tokenizer(backend, bos_token=_token_name(cfg.get("bos_token")) or BOS,
                     eos_token=_token_name(cfg.get("eos_token")) or EOS,
                     pad_token=_token_name(cfg.get("pad_token")), source=str(path))
