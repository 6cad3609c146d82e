"""Quality report of a (small) release: held-out perplexity against the same architecture with
random weights, routing statistics on held-out tokens, greedy continuations of fixed prompts.

Used for the embedded model's card (data/README.md, ``scripts/embedded_report.py``) and its test.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_PROMPTS = ("ROMEO:", "And God said", "The Python interpreter", "A fool and his money")


@dataclass(frozen=True)
class LayerRouting:
    layer: int
    hash_layer: bool
    counts: tuple[int, ...]          # selections per expert over the held-out tokens

    @property
    def n_used(self) -> int:
        return sum(c > 0 for c in self.counts)

    @property
    def max_over_mean(self) -> float:
        mean = sum(self.counts) / len(self.counts)
        return max(self.counts) / mean if mean else float("nan")


@torch.inference_mode()
def routing_stats(model, ids: torch.Tensor, batch_size: int = 4) -> list[LayerRouting]:
    """Expert selection counts per MoE layer (main layers and MTP excluded) over ``ids [N, S]``."""
    cfg = model.config
    counts: dict[int, torch.Tensor] = {}

    def hook(layer_idx, ev):
        c = torch.bincount(ev.idx.reshape(-1).cpu(), minlength=cfg.n_routed_experts)
        counts[layer_idx] = counts.get(layer_idx, 0) + c

    handle = model.add_moe_hook(hook)
    try:
        dev = next(model.parameters()).device
        for s in range(0, ids.shape[0], batch_size):
            model(ids[s:s + batch_size].to(dev))
    finally:
        handle.remove()
    return [LayerRouting(i, cfg.is_hash_layer(i), tuple(int(x) for x in counts[i]))
            for i in range(cfg.num_hidden_layers)]


def english_word_fraction(text: str, vocabulary: set[str]) -> float:
    """Fraction of alphabetic words of ``text`` that occur in ``vocabulary`` (lower-cased)."""
    words = re.findall(r"[A-Za-z]+", text)
    return sum(w.lower() in vocabulary for w in words) / len(words) if words else 0.0


def corpus_vocabulary(texts: Sequence[str]) -> set[str]:
    return {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}


def embedded_report(ref_dir, n_windows: int = 8, seq_len: int = 256, prompts: Sequence[str] = DEFAULT_PROMPTS,
                    max_new_tokens: int = 32, seed: int = 0) -> dict:
    """Everything the embedded model's card states, measured on ``ref_dir`` as ``load_model`` reads it."""
    from dsv4lib.checkpoint import load_model
    from dsv4lib.corpus import load_split
    from dsv4lib.eval.perplexity import perplexity, text_windows
    from dsv4lib.generate import generate
    from dsv4lib.model import DeepseekV4
    from dsv4lib.tokenizer import load_tokenizer

    tok = load_tokenizer(ref_dir)
    model = load_model(ref_dir)
    es = text_windows(tok, load_split("valid"), seq_len, n_windows, seed, name="valid")
    random_model = DeepseekV4(model.config)
    random_model.reset_parameters(seed=seed)
    vocab = corpus_vocabulary(load_split("train"))
    samples = []
    for p in prompts:
        text = generate(model, tok, p, max_new_tokens=max_new_tokens, temperature=0.0).text
        samples.append({"prompt": p, "continuation": text, "english_fraction": english_word_fraction(text, vocab)})
    rnd = generate(random_model, tok, prompts[0], max_new_tokens=max_new_tokens, temperature=0.0).text
    return {
        "valid_tokens": int(es.mask.sum()),
        "ppl": perplexity(model, es),
        "ppl_random_weights": perplexity(random_model, es),
        "routing": routing_stats(model, es.ids),
        "samples": samples,
        "random_sample": {"prompt": prompts[0], "continuation": rnd,
                          "english_fraction": english_word_fraction(rnd, vocab)},
    }


def format_report(rep: dict) -> str:
    """Markdown for the model card."""
    lines = [f"- held-out perplexity (valid split, {rep['valid_tokens']} scored tokens): **{rep['ppl']:.2f}**; "
             f"same architecture with random weights: {rep['ppl_random_weights']:.0f}",
             "", "| layer | routing | experts used | max load / mean |", "|---|---|---|---|"]
    for r in rep["routing"]:
        lines.append(f"| {r.layer} | {'hash' if r.hash_layer else 'score'} | {r.n_used}/{len(r.counts)} | "
                     f"{r.max_over_mean:.2f} |")
    lines += ["", "Greedy continuations (32 tokens):", ""]
    for s in rep["samples"]:
        lines.append(f"- `{s['prompt']}` → {s['continuation']!r}")
    r = rep["random_sample"]
    lines.append(f"- random weights, `{r['prompt']}` → {r['continuation']!r}")
    return "\n".join(lines)
