"""Generation and eval plumbing on the real DeepseekV4 (tiny config with the embedded 4096 vocab,
random weights)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dsv4lib import generate as G
from dsv4lib.config import ModelConfig
from dsv4lib.eval import mmlu as M
from dsv4lib.eval import perplexity as P
from dsv4lib.model import DeepseekV4
from dsv4lib.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(Path(__file__).resolve().parents[1] / "data" / "tokenizer")


@pytest.fixture(scope="module")
def model(tok):
    cfg = dataclasses.replace(ModelConfig.tiny(), vocab_size=tok.vocab_size)
    m = DeepseekV4(cfg)
    m.reset_parameters(seed=0)
    return m.eval()


def test_greedy_cached_decode_equals_full_forward_argmax(model, tok):
    text = "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath."
    prompt = [tok.bos_id, *tok.encode(text)]
    assert len(prompt) >= 24
    res = G.generate(model, tok, prompt, max_new_tokens=10, stop_ids=(), loop_repeats=None)
    ids, ref = list(prompt), []
    with torch.no_grad():
        for _ in range(10):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            ref.append(t)
            ids.append(t)
    assert res.ids == ref


def test_chat_generation_and_batch(model, tok):
    msgs = [{"role": "user", "content": "Tell me a fortune."}]
    r = G.generate(model, tok, msgs, max_new_tokens=6, thinking=True, stop_ids=(), loop_repeats=None)
    b = G.generate_batch(model, tok, [msgs, msgs], max_new_tokens=6, thinking=True, stop_ids=(), loop_repeats=None)
    assert b[0].ids == b[1].ids == r.ids and r.n_new == 6


def test_mmlu_right_padded_batch_equals_one_by_one(model, tok):
    qs = M.by_subject(M.load_mmlu())["astronomy"][:3]
    prompts = [tok.encode(M.build_prompt(q, (), "chat")) for q in qs]
    assert len({len(p) for p in prompts}) > 1
    letters = M.letter_ids(tok, "chat")
    batched = M.score_prompts(model, prompts, letters, tok.pad_id, max_batch_tokens=10**6)
    single = torch.stack([M.score_prompts(model, [p], letters, tok.pad_id)[0] for p in prompts])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_perplexity_of_a_model_against_itself(model, tok):
    sets = P.default_sets(tok, seq_len=40, n_windows=1, n_chats=2)[3:]
    rows = P.compare_models(model, model, sets, batch_size=2)
    assert all(abs(r.kl) < 1e-5 and r.top1 == 1.0 and r.ppl_a == pytest.approx(r.ppl_b, rel=1e-5) for r in rows)
    assert all(r.ppl_a > 1 for r in rows)
