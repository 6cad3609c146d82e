"""``python -m dsv4lib generate``: one prompt -> streamed continuation (dsv4lib.generate)."""
from __future__ import annotations

import argparse
import os
import sys


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--ref / --int2 / --device (shared by generate, chat, mmlu)."""
    p.add_argument("--ref", help="release dir (default: $DSV4_REF or the embedded data/tiny-v4)")
    p.add_argument("--int2", help="INT2 expert dir (default: $DSV4_INT2; none = the release's own experts)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def load_model_and_tokenizer(args: argparse.Namespace):
    """Resolve the model dirs (explicit > env > embedded), load model + tokenizer from the release dir."""
    import torch

    from dsv4lib.checkpoint import load_model
    from dsv4lib.paths import resolve_model_dirs
    from dsv4lib.tokenizer import load_tokenizer
    ref, int2 = resolve_model_dirs(args.ref, args.int2, environ=os.environ)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(ref, int2, device=device).eval()
    return model, load_tokenizer(ref)


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--think", action="store_true", help="thinking mode (chat prompts)")
    p.add_argument("--decoder", default="auto", choices=["auto", "eager", "static", "graph"],
                   help="decode step: auto = CUDA graph when the model allows it (INT2 experts on CUDA), else eager")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    p.add_argument("--raw", action="store_true", help="continue raw text (BOS + prompt) instead of a chat turn")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def run(args: argparse.Namespace) -> int:
    from dsv4lib.generate import generate
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    model, tok = load_model_and_tokenizer(args)
    target = prompt if args.raw else [{"role": "user", "content": prompt}]
    res = generate(model, tok, target, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed, thinking=args.think, stop=args.stop,
                   stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()), decoder=args.decoder)
    sys.stdout.write("\n")
    if args.stats:
        print(f"[prompt {res.n_prompt} tokens, {res.n_new} new, {res.tokens_per_s:.1f} tok/s, "
              f"prefill {res.prefill_s:.2f} s, stop: {res.stop_reason}]", file=sys.stderr)
    return 0
