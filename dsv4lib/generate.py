"""Autoregressive generation on the model's explicit cache (CONTRACTS "Model", spec §2.10, §4).

One prefill call ``model(prompt, cache=cache)`` and then one decode step per new token: with
``decoder="auto"`` (default) a CUDA-graph replay of the whole step when the model allows it
(``graphed.graph_capturable``: CUDA, INT2 experts, no hooks), else ``model(next_token, cache=cache)``;
``"eager"`` / ``"static"`` (the static-cache step uncaptured, any device) / ``"graph"`` force one. Sampling (greedy / temperature / top-k / top-p, optional repetition penalty) runs
on CPU in fp32 with a seeded ``torch.Generator`` so results do not depend on the device.

Stops on: EOS (or any id in ``stop_ids``), a stop string in the decoded text (text is cut before
it), ``max_new_tokens``, or the loop guard (the tail of the output is one block of ≤ ``loop_period``
tokens repeated ``loop_repeats`` times — greedy decoding of small models falls into such loops).

Batches (:func:`generate_batch`): the cache keeps every row of a batch at the same position
(left-aligned, no padding), so prompts are grouped by token length and each group runs as one
batch; finished rows keep decoding (their output is ignored) until the whole group stops.
Sampling in a batch draws from one generator, so sampled (not greedy) rows depend on the group.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dsv4lib.chat import chat_ids
from dsv4lib.logits import logits_at

PromptLike = str | Sequence[dict] | Sequence[int] | torch.Tensor
DECODERS = ("auto", "eager", "static", "graph")


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.  ``temperature == 0`` means greedy (argmax)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0          # CTRL-style: >1 discourages tokens already in the context

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(f"invalid sampling config {self}")


@dataclass(frozen=True)
class GenerationResult:
    text: str                   # decoded new tokens (special tokens kept, EOS and stop string removed)
    ids: list[int]              # new token ids (including a final EOS when it stopped on EOS)
    n_prompt: int
    n_new: int
    tokens_per_s: float         # decode speed: new tokens after the first / decode time
    stop_reason: str = "length"  # "eos" | "stop" | "length" | "loop"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_ids: list[int] = field(default_factory=list, repr=False)


def prompt_to_ids(tokenizer, prompt: PromptLike, *, thinking: bool = False, add_bos: bool = True,
                  **chat_kwargs) -> list[int]:
    """str -> BOS + encode(str); list of message dicts -> V4 chat ids; ids -> as given."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        return [tokenizer.bos_id, *ids] if add_bos and (not ids or ids[0] != tokenizer.bos_id) else ids
    if isinstance(prompt, torch.Tensor):
        return [int(i) for i in prompt.flatten().tolist()]
    if len(prompt) and isinstance(prompt[0], dict):
        return chat_ids(tokenizer, prompt, thinking, **chat_kwargs)
    return [int(i) for i in prompt]


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (int64, CPU).  ``context`` [B, T] ids for the repetition penalty."""
    x = logits.detach().float().cpu()                                        # [B, V]
    if cfg.repetition_penalty != 1.0 and context is not None and context.numel():
        ctx = context.cpu()
        seen = torch.gather(x, 1, ctx)                                       # [B, T]
        seen = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
        x = x.scatter(1, ctx, seen)
    if cfg.temperature == 0.0:
        return x.argmax(dim=-1)
    x = x / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[:, -1:]                # [B, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)             # [B, V]
        probs = sorted_x.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p                          # keep the smallest set reaching top_p
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)
    return torch.multinomial(x.softmax(-1), 1, generator=generator).squeeze(1)


def find_loop(ids: Sequence[int], max_period: int = 32, repeats: int = 6) -> int:
    """Period p (≥ 1) if the tail of ``ids`` is one block of p tokens repeated ``repeats`` times, else 0."""
    n = len(ids)
    for p in range(1, max_period + 1):
        if p * repeats > n:
            break
        tail = ids[n - p * repeats:]
        if all(tail[i] == tail[i % p] for i in range(p, len(tail))):
            return p
    return 0


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class _StopStringFilter:
    """Streams text, holding back any tail that could still become a stop string."""

    def __init__(self, stop: Sequence[str], stream: Callable[[str], None] | None) -> None:
        self.stop, self.stream = [s for s in stop if s], stream
        self.text, self.emitted = "", 0
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def feed(self, chunk: str) -> bool:
        """Append text; returns True once a stop string has appeared (text is then cut before it)."""
        self.text += chunk
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self._emit(len(self.text))
            return True
        self._emit(max(self.emitted, len(self.text) - self.hold))
        return False

    def finish(self, tail: str = "") -> None:
        self.text += tail
        self._emit(len(self.text))

    def _emit(self, upto: int) -> None:
        if self.stream is not None and upto > self.emitted:
            self.stream(self.text[self.emitted:upto])
        self.emitted = max(self.emitted, upto)


@torch.inference_mode()
def generate(model, tokenizer, prompt_or_messages: PromptLike, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             stop: Sequence[str] = (), stop_ids: Sequence[int] | None = None,
             stream: Callable[[str], None] | None = None, seed: int | None = None, thinking: bool = False,
             loop_repeats: int | None = 6, loop_period: int = 32, decoder: str = "auto",
             **chat_kwargs) -> GenerationResult:
    """Generate a continuation of one prompt (text, chat messages or ids); see the module docstring."""
    return generate_batch(model, tokenizer, [prompt_or_messages], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty, stop=stop, stop_ids=stop_ids,
                          streams=[stream] if stream else None, seed=seed, thinking=thinking,
                          loop_repeats=loop_repeats, loop_period=loop_period, decoder=decoder, **chat_kwargs)[0]


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: Sequence[PromptLike], *, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   repetition_penalty: float = 1.0, stop: Sequence[str] = (), stop_ids: Sequence[int] | None = None,
                   streams: Sequence[Callable[[str], None] | None] | None = None, seed: int | None = None,
                   thinking: bool = False, loop_repeats: int | None = 6, loop_period: int = 32,
                   decoder: str = "auto", **chat_kwargs) -> list[GenerationResult]:
    """Generate for several prompts; equal-length prompts share one batched cache (results in input order)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    cfg = SamplingConfig(temperature, top_p, top_k, repetition_penalty)
    all_ids = [prompt_to_ids(tokenizer, p, thinking=thinking, **chat_kwargs) for p in prompts]
    if any(not ids for ids in all_ids):
        raise ValueError("empty prompt")
    gen = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator().manual_seed(
        int(torch.randint(0, 2**62, (1,)).item()))
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(all_ids):
        groups.setdefault(len(ids), []).append(i)
    results: list[GenerationResult | None] = [None] * len(prompts)
    for length, members in groups.items():
        out = _generate_group(model, tokenizer, [all_ids[i] for i in members], cfg, gen, max_new_tokens,
                              stop, set(stop_ids) if stop_ids is not None else {tokenizer.eos_id},
                              [streams[i] if streams else None for i in members], loop_repeats, loop_period,
                              decoder)
        for i, r in zip(members, out):
            results[i] = r
    return results                                                                # type: ignore[return-value]


def _decode_step(model, cache, max_len: int, decoder: str, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """ids [B,1] -> logits [B, V] for the tokens after the prefill already in ``cache``."""
    from dsv4lib.model.graphed import StaticDecoder, graph_capturable
    from dsv4lib.model.static_cache import static_from_cache

    def eager(ids):
        return model(ids, cache=cache)[:, -1]
    if decoder == "eager" or (decoder == "auto" and not graph_capturable(model, device)):
        return eager
    if decoder == "graph" and not graph_capturable(model, device):
        raise ValueError("decoder='graph' needs a CUDA model with INT2 experts, no low-precision sim and no MoE hooks")
    try:
        # the eager cache is left untouched: a failed capture under "auto" falls back to it
        return StaticDecoder(model, static_from_cache(model, cache, max_len), capture=decoder != "static").step
    except Exception as e:  # noqa: BLE001 -- "auto" must not make generation fail
        if decoder != "auto":
            raise
        warnings.warn(f"generate: CUDA-graph decode unavailable ({e!r:.200}); using the eager step")
        return eager


def _generate_group(model, tokenizer, prompts: list[list[int]], cfg: SamplingConfig, gen: torch.Generator,
                    max_new: int, stop: Sequence[str], stop_ids: set[int], streams, loop_repeats, loop_period,
                    decoder: str = "auto"):
    B, S = len(prompts), len(prompts[0])
    device = _model_device(model)
    x = torch.tensor(prompts, dtype=torch.long, device=device)                    # [B, S]
    cache = model.new_cache(B, S + max_new)
    t0 = time.perf_counter()
    logits = logits_at(model, x, torch.full((B,), S - 1), cache)                  # [B, V]
    step_fn = _decode_step(model, cache, S + max_new, decoder, device) if max_new > 1 else None
    t1 = time.perf_counter()
    new: list[list[int]] = [[] for _ in range(B)]
    reason = ["length"] * B
    done = [False] * B
    decoders = [tokenizer.incremental_decoder() for _ in range(B)]
    filters = [_StopStringFilter(stop, s) for s in streams]
    context = x.cpu()
    steps = 0
    for step in range(max_new):
        nxt = sample_next(logits, cfg, gen, context if cfg.repetition_penalty != 1.0 else None)   # [B]
        for b in range(B):
            if done[b]:
                continue
            t = int(nxt[b])
            new[b].append(t)
            if t in stop_ids:
                done[b], reason[b] = True, "eos"
                continue
            if filters[b].feed(decoders[b].push(t)):
                done[b], reason[b] = True, "stop"
            elif loop_repeats and find_loop(new[b], loop_period, loop_repeats):
                done[b], reason[b] = True, "loop"
        if all(done) or step == max_new - 1:
            break
        context = torch.cat([context, nxt[:, None]], dim=1)
        logits = step_fn(nxt[:, None].to(device))
        steps += 1
    t2 = time.perf_counter()
    out = []
    for b in range(B):
        if reason[b] != "stop":
            filters[b].finish(decoders[b].flush())
        decode_s = t2 - t1
        tps = steps / decode_s if steps and decode_s > 0 else (len(new[b]) / (t1 - t0) if t1 > t0 else 0.0)
        out.append(GenerationResult(text=filters[b].text, ids=new[b], n_prompt=S, n_new=len(new[b]),
                                    tokens_per_s=tps, stop_reason=reason[b], prefill_s=t1 - t0,
                                    decode_s=decode_s, prompt_ids=list(prompts[b])))
    return out
