"""``python -m dsv4lib chat``: multi-turn REPL (dsv4lib.repl); works through a pipe."""
from __future__ import annotations

import argparse
import sys

from dsv4lib.commands.generate import add_model_arguments, load_model_and_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (change with /temp X)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--think", action="store_true", help="start in thinking mode (toggle with /think)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--stats", action="store_true", help="print tokens/s after each reply")


def run(args: argparse.Namespace) -> int:
    from dsv4lib.repl import HELP, ChatSession, run_repl
    model, tok = load_model_and_tokenizer(args)
    session = ChatSession(thinking=args.think, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                          top_p=args.top_p, system=args.system, seed=args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP)
    run_repl(model, tok, sys.stdin, sys.stdout, session, prompt="> " if interactive else "", show_stats=args.stats)
    return 0
