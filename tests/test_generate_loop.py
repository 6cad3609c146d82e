"""dsv4lib.generate: greedy == full-forward argmax loop, sampling, stops, streaming, batches."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv4lib import generate as G
from dsv4lib.tokenizer import load_tokenizer
from text_standin import RNNStandin


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(Path(__file__).resolve().parents[1] / "data" / "tokenizer")


@pytest.fixture(scope="module")
def model(tok):
    return RNNStandin(tok.vocab_size, dim=48, seed=1).eval()


def _argmax_loop(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def test_greedy_equals_full_forward_argmax_and_is_deterministic(model, tok):
    prompt = "To be, or not to be"
    r1 = G.generate(model, tok, prompt, max_new_tokens=24, stop_ids=(), loop_repeats=None)
    r2 = G.generate(model, tok, prompt, max_new_tokens=24, stop_ids=(), loop_repeats=None)
    ref = _argmax_loop(model, [tok.bos_id, *tok.encode(prompt)], 24)
    assert r1.ids == r2.ids == ref and r1.n_new == 24 and r1.stop_reason == "length"
    assert r1.n_prompt == 1 + len(tok.encode(prompt)) and r1.prompt_ids[0] == tok.bos_id
    assert r1.text == tok.decode(ref) and r1.tokens_per_s > 0


def test_one_model_call_per_token(tok):
    m = RNNStandin(tok.vocab_size, seed=2)
    G.generate(m, tok, [5, 6, 7], max_new_tokens=10, stop_ids=(), loop_repeats=None)
    assert m.calls == 10                                 # 1 prefill + 9 decode steps


def test_sampling_is_seeded_and_respects_top_k(model, tok):
    kw = dict(max_new_tokens=16, temperature=1.0, stop_ids=(), loop_repeats=None)
    a = G.generate(model, tok, "Hello", seed=7, **kw).ids
    b = G.generate(model, tok, "Hello", seed=7, **kw).ids
    c = G.generate(model, tok, "Hello", seed=8, **kw).ids
    assert a == b and a != c
    greedy = G.generate(model, tok, "Hello", max_new_tokens=16, stop_ids=(), loop_repeats=None).ids
    assert G.generate(model, tok, "Hello", seed=3, top_k=1, **kw).ids == greedy      # top-k 1 == argmax
    assert G.generate(model, tok, "Hello", seed=3, top_p=1e-6, **kw).ids == greedy   # tiny top-p == argmax


def test_sample_next_distribution_and_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    cfg = G.SamplingConfig(temperature=1.0, top_k=2)
    draws = torch.stack([G.sample_next(logits, cfg, g) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {2, 3}
    frac3 = (draws == 3).float().mean().item()
    assert abs(frac3 - torch.tensor([2.0, 3.0]).softmax(0)[1].item()) < 0.08
    cfg = G.SamplingConfig(temperature=1.0, top_p=0.7)          # p(3)=0.64 < 0.7 -> {3, 2}
    assert set(torch.stack([G.sample_next(logits, cfg, g) for _ in range(200)]).flatten().tolist()) == {2, 3}
    pen = G.SamplingConfig(repetition_penalty=4.0)
    assert int(G.sample_next(logits, pen, context=torch.tensor([[3]]))) == 2        # 3/4 < 2
    with pytest.raises(ValueError):
        G.SamplingConfig(top_p=0.0)


def test_stops_eos_stop_string_loop_and_streaming(model, tok):
    free = G.generate(model, tok, "The", max_new_tokens=30, stop_ids=(), loop_repeats=None)
    first = free.ids[3]
    r = G.generate(model, tok, "The", max_new_tokens=30, stop_ids=[first], loop_repeats=None)
    assert r.stop_reason == "eos" and r.ids == free.ids[:4]
    # stop string: text cut right before it, and the stream never shows it
    target = free.text[5:8]
    assert target and target not in free.text[:5]
    chunks: list[str] = []
    s = G.generate(model, tok, "The", max_new_tokens=30, stop=[target], stream=chunks.append,
                   stop_ids=(), loop_repeats=None)
    assert s.stop_reason == "stop" and s.text == free.text[: free.text.find(target)]
    assert "".join(chunks) == s.text
    chunks2: list[str] = []
    s2 = G.generate(model, tok, "The", max_new_tokens=30, stream=chunks2.append, stop_ids=(), loop_repeats=None)
    assert "".join(chunks2) == s2.text == free.text
    assert G.find_loop([1, 2, 3, 4, 5, 4, 5, 4, 5], max_period=4, repeats=3) == 2
    assert G.find_loop([1, 2, 3, 4], max_period=4, repeats=2) == 0
    looped = G.generate(model, tok, "The", max_new_tokens=200, stop_ids=(), loop_repeats=3, loop_period=40)
    if looped.stop_reason == "loop":
        assert G.find_loop(looped.ids, 40, 3)
    else:
        assert looped.n_new == 200 and not any(G.find_loop(looped.ids[:k], 40, 3) for k in range(1, 201))


def test_chat_messages_prompt(model, tok):
    msgs = [{"role": "user", "content": "Tell me a fortune."}]
    r = G.generate(model, tok, msgs, max_new_tokens=5, thinking=True, stop_ids=(), loop_repeats=None)
    assert tok.decode(r.prompt_ids).endswith("<｜Assistant｜><think>") and r.prompt_ids[0] == tok.bos_id


def test_batch_groups_equal_lengths_and_matches_single(model, tok):
    prompts = ["Hello there", "Good night", "To be, or not to be", [9, 10, 11]]
    lens = [len(G.prompt_to_ids(tok, p)) for p in prompts]
    assert len(set(lens)) < len(lens)                  # at least one shared-length group
    batch = G.generate_batch(model, tok, prompts, max_new_tokens=12, stop_ids=(), loop_repeats=None)
    for p, rb in zip(prompts, batch):
        rs = G.generate(model, tok, p, max_new_tokens=12, stop_ids=(), loop_repeats=None)
        assert rb.ids == rs.ids and rb.prompt_ids == rs.prompt_ids
