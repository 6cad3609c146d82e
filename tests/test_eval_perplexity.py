"""Perplexity / KL / top-1 between two models, against direct full-softmax references."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dsv4lib.chat import encode_messages
from dsv4lib.eval import perplexity as P
from dsv4lib.tokenizer import load_tokenizer
from text_standin import PerturbedStandin, RNNStandin


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(Path(__file__).resolve().parents[1] / "data" / "tokenizer")


@pytest.fixture(scope="module")
def sets(tok):
    return P.default_sets(tok, seq_len=48, n_windows=3, n_chats=6)


def test_sets_shapes_and_chat_mask(tok, sets):
    assert [s.name for s in sets] == ["valid/shakespeare", "valid/kjv", "valid/pydoc", "valid/fortunes", "valid/chat"]
    for s in sets[:4]:
        assert s.ids.shape == (3, 48) and bool(s.mask.all())
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans", "reasoning_content": "r"}]
    ids = tok.encode(encode_messages(msgs, thinking=True, add_generation_prompt=False))
    mask = P.assistant_target_mask(ids, tok)
    scored = [ids[t + 1] for t in range(len(ids) - 1) if mask[t]]
    assert tok.decode(scored) == "r</think>ans<｜end▁of▁sentence｜>"
    chat = sets[-1]
    assert chat.ids.shape == (6, 48) and 0 < int(chat.mask.sum()) < chat.mask.numel()
    from dsv4lib.corpus import chat_token_ids, load_chats
    for row, ids in enumerate(chat_token_ids(tok, load_chats("valid")[:6])):
        L = min(len(ids), 48)
        assert not bool(chat.mask[row, L - 1:].any())                      # padding is never scored
        assert chat.ids[row, :L].tolist() == ids[:L]


@torch.no_grad()
def _direct(model_a, model_b, es):
    la = torch.log_softmax(model_a(es.ids)[:, :-1].float(), -1)[es.mask]
    lb = torch.log_softmax(model_b(es.ids)[:, :-1].float(), -1)[es.mask]
    tgt = es.ids[:, 1:][es.mask]
    return (math.exp(float(-la.gather(1, tgt[:, None]).mean())), math.exp(float(-lb.gather(1, tgt[:, None]).mean())),
            float((la.exp() * (la - lb)).sum(-1).mean()), float((la.argmax(-1) == lb.argmax(-1)).float().mean()))


def test_compare_matches_direct_computation_and_identity(tok, sets):
    a = RNNStandin(tok.vocab_size, dim=32, seed=4)
    b = PerturbedStandin(a, noise=0.3)
    rows = P.compare_models(a, b, sets, batch_size=2)
    for es, r in zip(sets, rows):
        ppl_a, ppl_b, kl, top1 = _direct(a, b, es)
        assert r.n_tokens == int(es.mask.sum())
        assert r.ppl_a == pytest.approx(ppl_a, rel=1e-4) and r.ppl_b == pytest.approx(ppl_b, rel=1e-4)
        assert r.kl == pytest.approx(kl, rel=1e-3, abs=1e-6) and r.top1 == pytest.approx(top1)
        assert r.kl > 0 and r.top1 < 1
        assert P.perplexity(a, es) == pytest.approx(ppl_a, rel=1e-4)
    same = P.compare_models(a, a, sets[:2])
    assert all(abs(r.kl) < 1e-6 and r.top1 == 1.0 and r.ppl_a == pytest.approx(r.ppl_b) for r in same)
    table = P.format_table(rows, ("ref", "int2"))
    assert "valid/chat" in table and "ALL" in table
    with pytest.raises(ValueError, match="does not match"):
        P.compare_pass(b, sets[1:2], P.reference_pass(a, sets[:1]))
