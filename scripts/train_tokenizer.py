#!/usr/bin/env python
"""Train the embedded model's byte-level BPE tokenizer (spec §4) on the corpus train split.

Vocabulary: 4096 entries IN TOTAL, of which the first 15 ids are the V4 special tokens in
:data:`dsv4lib.tokenizer.SPECIAL_TOKENS` order (BOS = 0, EOS = 1, then ``<｜User｜>``,
``<｜Assistant｜>``, ``<think>``, ``</think>``, ``｜DSML｜`` and the quick-instruction tokens), then the
256 byte symbols, then the merges.  Like the real release: byte-level pre-tokenizer and decoder, no
normalizer, no post-processor (the tokenizer never adds BOS by itself), ``tokenizer_config.json``
with ``add_bos_token``/``add_eos_token`` false, pad = EOS, and no ``chat_template``.

Training input: every document of ``data/corpus/train.jsonl.gz`` plus the train chat conversations
rendered with the V4 chat template, in file order.  BPE training in ``tokenizers`` is
deterministic (ties broken by pair order), so a rerun gives a byte-identical ``tokenizer.json``.

Usage::

    python scripts/train_tokenizer.py --out data/tokenizer
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # run from a checkout without install

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4lib.chat import encode_messages
from dsv4lib.corpus import load_chats, load_split
from dsv4lib.tokenizer import BOS, EOS, SPECIAL_TOKENS

VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 1048576


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),      # digits in groups of ≤ 3
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"trained vocab has {tok.get_vocab_size()} entries, wanted {vocab_size}")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise SystemExit(f"special token {t!r} got id {tok.token_to_id(t)}, wanted {i}")
    return tok


def tokenizer_config() -> dict:
    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False}
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": added(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": added(EOS),
        "legacy": True,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": added(EOS),
        "sp_model_kwargs": {},
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
        "use_default_system_prompt": False,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "tokenizer")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args()
    texts = [d for d in load_split("train")]
    texts += [encode_messages(c["messages"], thinking=c["thinking"], add_generation_prompt=False)
              for c in load_chats("train")]
    tok = train(texts, args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"), pretty=True)
    (args.out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        p = args.out / name
        print(f"{name:24s} {p.stat().st_size:>9,d}  {hashlib.sha256(p.read_bytes()).hexdigest()}")
    n_chars = sum(len(t) for t in texts)
    n_tok = sum(len(e.ids) for e in tok.encode_batch(texts))
    print(f"train text: {n_chars:,d} chars -> {n_tok:,d} tokens ({n_chars / n_tok:.2f} chars/token)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
