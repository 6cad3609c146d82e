"""``python -m dsv4lib ppl``: perplexity, KL(ref‖other) and top-1 agreement, one table.

Default comparison: the release with its own (MXFP4) experts vs the same release with the INT2
experts of ``--int2``; or ``--other DIR`` for two release dirs.  The two models are loaded one
after the other (reference log-probs are kept on CPU), so only one is in memory at a time.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", help="reference release dir (default: $DSV4_REF or the embedded data/tiny-v4)")
    p.add_argument("--int2", help="INT2 expert dir for the second model (default: $DSV4_INT2)")
    p.add_argument("--other", help="a second release dir instead of --int2")
    p.add_argument("--device", default=None)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=16, help="text windows per corpus source")
    p.add_argument("--chats", type=int, default=64, help="valid chat conversations")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ref-dtype", choices=["float32", "float16"], default=None,
                   help="storage of the reference log-probs (default: float16 when the vocab is > 32k)")
    p.add_argument("--out", default=None, help="write the table as JSON here")


def run(args: argparse.Namespace) -> int:
    import torch

    from dsv4lib.checkpoint import load_model
    from dsv4lib.eval import perplexity as P
    from dsv4lib.paths import resolve_model_dirs
    from dsv4lib.tokenizer import load_tokenizer
    ref, int2 = resolve_model_dirs(args.ref, args.int2, environ=os.environ)
    if args.other is None and int2 is None:
        raise SystemExit("ppl: give --int2 DIR (or $DSV4_INT2) or --other DIR to compare against")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(ref)
    sets = P.default_sets(tok, args.seq_len, args.windows, args.chats)
    ref_dtype = getattr(torch, args.ref_dtype) if args.ref_dtype else (
        torch.float16 if tok.vocab_size > 32768 else torch.float32)
    model = load_model(ref, None, device=device).eval()
    refs = P.reference_pass(model, sets, args.batch_size, ref_dtype)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    other = load_model(args.other, None, device=device) if args.other else load_model(ref, int2, device=device)
    rows = P.compare_pass(other.eval(), sets, refs, args.batch_size)
    names = ("ref", "other" if args.other else "int2")
    print(P.format_table(rows, names))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"a": str(ref), "b": str(args.other or int2),
                                              "rows": [r.__dict__ for r in rows]}, indent=1) + "\n")
    return 0
