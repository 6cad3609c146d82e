"""Corpus files (data/corpus): integrity, fixed document splits, chat sets, token batching."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dsv4lib import corpus
from dsv4lib.chat import encode_messages
from dsv4lib.tokenizer import USER, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _build_script():
    spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "scripts" / "build_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def docs():
    return {s: corpus.load_documents(s) for s in corpus.SPLITS}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ROOT / "data" / "tokenizer")


def test_files_match_manifest_and_size_budget():
    digests = corpus.verify_corpus()
    assert set(digests) == {f"{p}{s}.jsonl.gz" for p in ("", "chat_") for s in corpus.SPLITS}
    total = sum((corpus.CORPUS_DIR / f).stat().st_size for f in digests)
    assert total < 6_000_000


def test_splits_are_disjoint_by_document_and_follow_the_sha256_rule(docs):
    keys = {s: {(d["source"], d["name"]) for d in v} for s, v in docs.items()}
    assert not keys["train"] & keys["valid"] and not keys["train"] & keys["calib"] and not keys["valid"] & keys["calib"]
    for s in corpus.SPLITS:
        assert {d["source"] for d in docs[s]} == set(corpus.SOURCES), s
    build = _build_script()
    for src in corpus.SOURCES:
        union = [d for s in corpus.SPLITS for d in docs[s] if d["source"] == src]
        again = build.split_documents(union)
        for s in corpus.SPLITS:
            assert {d["name"] for d in again[s]} == {n for (so, n) in keys[s] if so == src}, (src, s)
    # whole works / books are held out: no valid play's opening line appears in train
    train_text = "\n".join(d["text"] for d in docs["train"] if d["source"] == "shakespeare")
    for d in docs["valid"]:
        if d["source"] == "shakespeare":
            assert d["text"][:200] not in train_text


def test_manifest_counts_match_the_files(docs):
    manifest = json.loads((corpus.CORPUS_DIR / "manifest.json").read_text())
    for s in corpus.SPLITS:
        for src in corpus.SOURCES:
            mine = [d for d in docs[s] if d["source"] == src]
            assert manifest["splits"][s][src]["documents"] == len(mine)
            assert manifest["splits"][s][src]["chars"] == sum(len(d["text"]) for d in mine)
    assert sum(manifest["splits"][s]["kjv"]["documents"] for s in corpus.SPLITS) == 66
    assert sum(manifest["splits"][s]["shakespeare"]["documents"] for s in corpus.SPLITS) == 42


def test_load_split_sources_filter_and_errors():
    kjv = corpus.load_split("valid", sources=["kjv"])
    assert len(kjv) == 4 and all(t.split("\n", 1)[0] in ("1 Peter", "2 Peter", "Psalms", "Revelation") for t in kjv)
    with pytest.raises(ValueError, match="unknown split"):
        corpus.load_split("test")
    with pytest.raises(ValueError, match="unknown corpus sources"):
        corpus.load_split("valid", sources=["wiki"])
    with pytest.raises(FileNotFoundError, match="valid.jsonl.gz"):
        corpus.load_split("valid", corpus_dir=ROOT / "nonexistent")


def test_chats_are_built_from_their_own_split(docs):
    for s in ("valid", "calib"):
        chats = corpus.load_chats(s)
        assert len(chats) == 256 and {c["kind"] for c in chats} == {"qa", "fortune", "verse", "shakespeare", "pydoc"}
        assert any(c["thinking"] for c in chats) and any(not c["thinking"] for c in chats)
        own = "\n".join(d["text"] for d in docs[s])
        for c in chats:
            assert c["messages"][-1]["role"] == "assistant"
            if c["kind"] in ("shakespeare", "pydoc", "fortune"):
                assert c["messages"][-1]["content"] in own, (s, c["kind"])
            text = encode_messages(c["messages"], c["thinking"], add_generation_prompt=False)
            assert text.count(USER) == sum(m["role"] == "user" for m in c["messages"])


def test_strip_rest_removes_markup_keeps_prose_and_code():
    build = _build_script()
    src = (".. _label:\n\nTitle\n=====\n\nUse :func:`len` and ``x + 1`` with *care*, see `docs <https://x>`_.\n\n"
           ".. index:: single: foo\n\n.. note::\n   Be careful.\n\nExample::\n\n   >>> len([1])\n   1\n")
    out = build.strip_rest(src)
    assert out == ("Title\n\nUse len and x + 1 with care, see docs.\n\nNote:\n   Be careful.\n\n"
                   "Example:\n\n   >>> len([1])\n   1\n")


def test_iter_token_batches_covers_stream_and_is_seeded():
    stream = torch.arange(103)
    rows = list(corpus.iter_token_batches(stream, batch_size=4, seq_len=10, shuffle=False, drop_last=False))
    assert [r.shape for r in rows] == [(4, 10), (4, 10), (2, 10)]
    assert torch.equal(torch.cat(rows).flatten(), torch.arange(100))
    a = torch.cat(list(corpus.iter_token_batches(stream, 3, 10, seed=5)))
    b = torch.cat(list(corpus.iter_token_batches(stream, 3, 10, seed=5)))
    c = torch.cat(list(corpus.iter_token_batches(stream, 3, 10, seed=6)))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (9, 10)
    assert sorted(a[:, 0].tolist()) == sorted(set(a[:, 0].tolist()))          # windows not repeated
    assert all((r[1:] - r[:-1] == 1).all() for r in a)                           # contiguous windows
    two = list(corpus.iter_token_batches(stream, 10, 10, epochs=2))
    assert len(two) == 2
    with pytest.raises(ValueError, match="shorter than seq_len"):
        next(corpus.iter_token_batches(torch.arange(5), 1, 10))


def test_document_ids_and_calibration_batch(tok):
    ids = corpus.document_ids(tok, ["hello world", "abc"])
    assert ids[0][0] == tok.bos_id and ids[0][-1] == tok.eos_id and tok.decode(ids[1][1:-1]) == "abc"
    x = corpus.calibration_batch(tok, 8, 64, chat_fraction=0.5, seed=3)
    y = corpus.calibration_batch(tok, 8, 64, chat_fraction=0.5, seed=3)
    assert x.shape == (8, 64) and x.dtype == torch.long and torch.equal(x, y)
    assert (x[4:] == tok.token_id(USER)).any() and not (x[:4] == tok.token_id(USER)).any()
    assert int(x.max()) < tok.vocab_size
