"""Perplexity, KL divergence and top-1 agreement between a reference model A and a model B
(e.g. MXFP4-expert release vs the same release with INT2 experts) on held-out text and chat.

Evaluation sets are fixed token windows ``[N, S]`` with a target mask ``[N, S-1]`` (which next-token
predictions count): held-out text windows per corpus source (valid split), and chat conversations
(valid chats, V4 template) where only the assistant tokens — reasoning, answer and the closing EOS
— are scored.  Padding is never scored.

Two passes, so the two models never need to be in memory together (the full-size model fills
the GPU): :func:`reference_pass` runs A and keeps its log-probabilities (``ref_dtype``, CPU) and
NLLs; :func:`compare_pass` runs B against them.  Per set: ``ppl_a``, ``ppl_b`` (exp of the mean
NLL over scored tokens), ``kl`` = mean over scored positions of KL(P_A ‖ P_B) in nats, ``top1`` =
fraction of scored positions where argmax A == argmax B.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4lib.corpus import chat_token_ids, document_ids, load_chats, load_documents


@dataclass(frozen=True)
class EvalSet:
    name: str
    ids: torch.Tensor            # [N, S] int64 (right-padded with the pad id)
    mask: torch.Tensor           # [N, S-1] bool: position t predicts ids[:, t+1] and is scored

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.mask.shape != (self.ids.shape[0], self.ids.shape[1] - 1):
            raise ValueError(f"{self.name}: ids {tuple(self.ids.shape)} / mask {tuple(self.mask.shape)} mismatch")


@dataclass(frozen=True)
class Reference:
    name: str
    logp: torch.Tensor           # [M, V] log-probs of A at the scored positions (ref_dtype, CPU)
    nll: torch.Tensor            # [M] fp32
    top1: torch.Tensor           # [M] int64


@dataclass(frozen=True)
class Comparison:
    name: str
    n_tokens: int
    ppl_a: float
    ppl_b: float
    kl: float
    top1: float


def text_windows(tokenizer, texts: Sequence[str], seq_len: int, n_windows: int, seed: int = 0,
                 name: str = "text") -> EvalSet:
    """``n_windows`` windows at seeded offsets of the ``BOS text EOS`` stream; every target scored."""
    stream = torch.tensor([i for d in document_ids(tokenizer, texts) for i in d], dtype=torch.long)
    if stream.numel() < seq_len:
        raise ValueError(f"{name}: {stream.numel()} tokens < seq_len {seq_len}")
    rng = random.Random(f"{seed}/{name}")
    starts = sorted(rng.sample(range(stream.numel() - seq_len + 1), n_windows))
    ids = torch.stack([stream[s:s + seq_len] for s in starts])                         # [N, S]
    return EvalSet(name, ids, torch.ones(n_windows, seq_len - 1, dtype=torch.bool))


def assistant_target_mask(ids: Sequence[int], tokenizer) -> list[bool]:
    """For each position t < len-1: is ids[t+1] part of an assistant turn (after the think opener,
    up to and including its EOS)?"""
    from dsv4lib.tokenizer import ASSISTANT, END_THINK, THINK
    a, think, end_think = (tokenizer.token_id(t) for t in (ASSISTANT, THINK, END_THINK))
    inside, skip_opener, marks = False, False, []
    for t in ids:
        if skip_opener and t in (think, end_think):
            skip_opener = False
            marks.append(False)
            inside = True
            continue
        skip_opener = False
        marks.append(inside)
        if t == a:
            skip_opener, inside = True, False
        elif t == tokenizer.eos_id:
            inside = False
    return marks[1:]


def chat_windows(tokenizer, chats: Sequence[dict], seq_len: int, name: str = "chat") -> EvalSet:
    """One row per conversation (truncated to ``seq_len``, right-padded); assistant tokens scored."""
    rows, masks = [], []
    for ids in chat_token_ids(tokenizer, chats):
        ids = ids[:seq_len]
        m = assistant_target_mask(ids, tokenizer)
        pad = seq_len - len(ids)
        rows.append(ids + [tokenizer.pad_id] * pad)
        masks.append(m + [False] * pad)
    return EvalSet(name, torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool))


def default_sets(tokenizer, seq_len: int = 256, n_windows: int = 16, n_chats: int = 64, seed: int = 0,
                 corpus_dir=None) -> list[EvalSet]:
    """Valid-split text windows per source + valid chat conversations."""
    docs = load_documents("valid", corpus_dir)
    sets = [text_windows(tokenizer, [d["text"] for d in docs if d["source"] == src], seq_len, n_windows, seed,
                         name=f"valid/{src}")
            for src in ("shakespeare", "kjv", "pydoc", "fortunes")]
    sets.append(chat_windows(tokenizer, load_chats("valid", corpus_dir)[:n_chats], seq_len, name="valid/chat"))
    return sets


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.inference_mode()
def _scored_logp(model, es: EvalSet, batch_size: int):
    """Yield (log-probs [m, V] fp32, targets [m]) of the scored positions, batch by batch."""
    dev = _device(model)
    for s in range(0, es.ids.shape[0], batch_size):
        x = es.ids[s:s + batch_size]
        m = es.mask[s:s + batch_size]
        logits = model(x.to(dev))[:, :-1].float()                                     # [b, S-1, V]
        lp = torch.log_softmax(logits[m.to(dev)], dim=-1).cpu()                       # [m, V]
        yield lp, x[:, 1:][m]


def reference_pass(model, sets: Sequence[EvalSet], batch_size: int = 4,
                   ref_dtype: torch.dtype = torch.float32) -> list[Reference]:
    out = []
    for es in sets:
        lps, nll, top = [], [], []
        for lp, tgt in _scored_logp(model, es, batch_size):
            lps.append(lp.to(ref_dtype))
            nll.append(-lp.gather(1, tgt[:, None]).squeeze(1))
            top.append(lp.argmax(-1))
        out.append(Reference(es.name, torch.cat(lps), torch.cat(nll), torch.cat(top)))
    return out


def compare_pass(model, sets: Sequence[EvalSet], refs: Sequence[Reference], batch_size: int = 4) -> list[Comparison]:
    rows = []
    for es, ref in zip(sets, refs):
        if es.name != ref.name:
            raise ValueError(f"set {es.name!r} does not match reference {ref.name!r}")
        nll_b, kl, agree, i = 0.0, 0.0, 0, 0
        for lp, tgt in _scored_logp(model, es, batch_size):
            la = ref.logp[i:i + lp.shape[0]].float()                                  # [m, V]
            nll_b += float(-lp.gather(1, tgt[:, None]).sum())
            kl += float((la.exp() * (la - lp)).sum())
            agree += int((lp.argmax(-1) == ref.top1[i:i + lp.shape[0]]).sum())
            i += lp.shape[0]
        n = ref.nll.numel()
        rows.append(Comparison(es.name, n, math.exp(float(ref.nll.mean())), math.exp(nll_b / max(1, n)),
                               kl / max(1, n), agree / max(1, n)))
    return rows


def compare_models(model_a, model_b, sets: Sequence[EvalSet], batch_size: int = 4) -> list[Comparison]:
    """Both models in memory at once (small models); otherwise call the two passes yourself."""
    return compare_pass(model_b, sets, reference_pass(model_a, sets, batch_size), batch_size)


def perplexity(model, es: EvalSet, batch_size: int = 4) -> float:
    nll, n = 0.0, 0
    for lp, tgt in _scored_logp(model, es, batch_size):
        nll += float(-lp.gather(1, tgt[:, None]).sum())
        n += tgt.numel()
    return math.exp(nll / max(1, n))


def overall(rows: Sequence[Comparison], name: str = "ALL") -> Comparison:
    """Token-weighted combination of per-set rows (ppl from the mean NLL over all scored tokens)."""
    n = sum(r.n_tokens for r in rows)
    if not n:
        return Comparison(name, 0, float("nan"), float("nan"), float("nan"), float("nan"))
    avg = lambda f: sum(f(r) * r.n_tokens for r in rows) / n                        # noqa: E731
    return Comparison(name, n, math.exp(avg(lambda r: math.log(r.ppl_a))), math.exp(avg(lambda r: math.log(r.ppl_b))),
                      avg(lambda r: r.kl), avg(lambda r: r.top1))


def format_table(rows: Sequence[Comparison], names: tuple[str, str] = ("A", "B")) -> str:
    a, b = names
    head = f"{'set':18s} {'tokens':>7s} {'ppl ' + a:>10s} {'ppl ' + b:>10s} {'KL(A||B)':>9s} {'top-1':>7s}"
    lines = [head]
    for r in rows:
        lines.append(f"{r.name:18s} {r.n_tokens:7d} {r.ppl_a:10.3f} {r.ppl_b:10.3f} {r.kl:9.4f} {r.top1:7.2%}")
    if sum(r.n_tokens for r in rows):
        t = overall(rows)
        lines.append(f"{'ALL (token-weighted)':18s} {t.n_tokens:7d} {t.ppl_a:10.3f} {t.ppl_b:10.3f} {t.kl:9.4f} "
                     f"{t.top1:7.2%}")
    return "\n".join(lines)
