"""Train the embedded V4-architecture model from the committed corpus and ship it as an upstream release.

``python -m dsv4lib train --out data/tiny-v4`` reproduces ``data/tiny-v4`` (issue 4): next-token
cross-entropy on the corpus train split plus the V4 chat conversations, the MTP head's t+2 loss
(weight ``mtp_weight``), AdamW with warm-up + cosine decay, and DeepSeek's **auxiliary-loss-free load
balancing** for the score-routed layers (V3 report §2.1.2, used unchanged by V4): after every step each
layer's selection bias moves by ``±bias_update_speed`` toward under-loaded experts. The bias only
selects experts; it never enters the routing weights, so balancing costs no gradient interference.
Hash-routed layers are balanced by construction (``balanced_tid2eid``).

The export goes through :func:`dsv4lib.checkpoint.save_release` (FP8 attention/shared experts,
MXFP4 routed experts, BF16/F32 rest) plus the tokenizer files, so the shipped model is read back
by the same loader as the real checkpoint.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .model import DeepseekV4


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 32
    seq_len: int = 256              # context per training window
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bias_update_speed: float = 1e-3  # aux-loss-free balancing step (V3 uses 1e-3)
    mtp_weight: float = 0.3
    chat_repeat: int = 2            # how many times the chat conversations enter the training stream
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500
    eval_windows: int = 64
    time_budget_s: float = 0.0      # > 0: after 20 steps, shrink `steps` so training ends within this time

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 8:
            raise ValueError(f"bad TrainConfig: steps={self.steps}, batch={self.batch_size}, seq_len={self.seq_len}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def balanced_tid2eid(vocab_size: int, n_experts: int, k: int, seed: int) -> torch.Tensor:
    """``[V, k]`` hash table: k distinct experts per token id, each expert listed V·k/E times (±1).

    Token ids take the rows of a round-robin deal (``(r·k + j) mod E``) in random order, and the
    expert labels are permuted, so neighbouring ids share nothing. The *token-weighted* load still
    follows the corpus' token frequencies, as with the real model's hash layers.
    """
    if k > n_experts:
        raise ValueError(f"need k <= n_experts, got k={k}, E={n_experts}")
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(vocab_size, generator=g)                              # [V]
    rot = (rows[:, None] * k + torch.arange(k)[None, :]) % n_experts            # [V, k] distinct per row
    return torch.randperm(n_experts, generator=g)[rot]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def build_streams(tokenizer, chat_repeat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train stream, valid stream) of token ids: documents as BOS+text+EOS, then chats."""
    from .corpus import chat_token_ids, document_ids, load_chats, load_split, token_stream
    g = torch.Generator().manual_seed(1234)
    train_pieces = document_ids(tokenizer, load_split("train")) + \
        chat_token_ids(tokenizer, load_chats("train")) * chat_repeat
    order = torch.randperm(len(train_pieces), generator=g).tolist()
    train = token_stream([train_pieces[i] for i in order])
    valid = token_stream(document_ids(tokenizer, load_split("valid")))
    return train, valid


def init_for_training(model: DeepseekV4, seed: int) -> None:
    """Random init (model default) with depth-scaled output projections and balanced hash tables."""
    cfg = model.config
    model.reset_parameters(seed=seed)
    scale = 1.0 / math.sqrt(2 * (cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn.wo_b.weight", "shared_experts.w2.weight", "experts.w2")):
                p.mul_(scale)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(balanced_tid2eid(b.shape[0], cfg.n_routed_experts, b.shape[1], seed + 7))


class LoadTracker:
    """MoE hook collecting per-layer expert loads of one step (for the bias update and stats)."""

    def __init__(self, n_experts: int) -> None:
        self.n_experts = n_experts
        self.counts: dict[int, torch.Tensor] = {}

    def __call__(self, layer_idx: int, ev) -> None:
        c = torch.bincount(ev.idx.reshape(-1), minlength=self.n_experts)
        self.counts[layer_idx] = self.counts.get(layer_idx, 0) + c

    def reset(self) -> None:
        self.counts = {}


@torch.no_grad()
def update_router_bias(model: DeepseekV4, counts: dict[int, torch.Tensor], speed: float) -> None:
    """Aux-loss-free balancing: bias_e += speed · sign(mean load − load_e) on score-routed layers."""
    for layer_idx, c in counts.items():
        gate = model.moe_layer(layer_idx).gate
        if gate.bias is None:
            continue
        c = c.float()
        gate.bias.add_(speed * torch.sign(c.mean() - c))


def lm_losses(model: DeepseekV4, batch: torch.Tensor, mtp: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """batch [B, S+2] -> (next-token CE, MTP t+2 CE or None)."""
    V = model.config.vocab_size
    inp = batch[:, :-2]
    hidden = model.forward_hidden(inp)                                       # [B, S, hc, D]
    logits = model.logits_from_hidden(hidden)                                # [B, S, V]
    loss = F.cross_entropy(logits.reshape(-1, V), batch[:, 1:-1].reshape(-1))
    loss_mtp = None
    if mtp:
        mt = model.mtp_logits(hidden, batch[:, 1:-1])                        # predicts t+2
        loss_mtp = F.cross_entropy(mt.reshape(-1, V), batch[:, 2:].reshape(-1))
    return loss, loss_mtp


@torch.no_grad()
def evaluate(model: DeepseekV4, stream: torch.Tensor, seq_len: int, n_windows: int, batch_size: int = 16,
             device: str | torch.device = "cpu") -> float:
    """Held-out perplexity over the first ``n_windows`` non-overlapping windows of ``stream``."""
    V = model.config.vocab_size
    n = min(n_windows, stream.numel() // (seq_len + 1))
    if n < 1:
        raise ValueError(f"valid stream of {stream.numel()} tokens is shorter than one window of {seq_len + 1}")
    wins = stream[: n * (seq_len + 1)].view(n, seq_len + 1)
    tot, cnt = 0.0, 0
    was_training = model.training
    model.eval()
    for s in range(0, n, batch_size):
        b = wins[s:s + batch_size].to(device)
        logits = model(b[:, :-1])
        tot += F.cross_entropy(logits.reshape(-1, V), b[:, 1:].reshape(-1), reduction="sum").item()
        cnt += b[:, 1:].numel()
    model.train(was_training)
    return math.exp(tot / cnt)


def train(model: DeepseekV4, train_stream: torch.Tensor, valid_stream: torch.Tensor, cfg: TrainConfig,
          device: str | torch.device = "cpu", log: Callable[[str], None] = print) -> list[dict]:
    """Train in place; returns the log history (one dict per ``log_every`` steps and per eval)."""
    model.to(device).train()
    mtp = model.config.num_nextn_predict_layers > 0
    tracker = LoadTracker(model.config.n_routed_experts)
    handle = model.add_moe_hook(tracker)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.endswith("gate.bias"):
            p.requires_grad_(False)          # moved by the balancing rule, not by the optimizer
            continue
        (decay if p.dim() >= 2 and not name.endswith("_fn") else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    n_win = train_stream.numel() // (cfg.seq_len + 2)
    windows = train_stream[: n_win * (cfg.seq_len + 2)].view(n_win, cfg.seq_len + 2)
    g = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    t0 = time.time()
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, desc="train", unit="step", mininterval=5.0)
        step = 0
        while step < cfg.steps:
            if step == 20 and cfg.time_budget_s > 0:
                fit = int(cfg.time_budget_s / ((time.time() - t0) / 20))
                if fit < cfg.steps:
                    cfg = replace(cfg, steps=max(fit, 21))      # cosine schedule re-targeted to the budget
                    bar.total = cfg.steps
                    log(json.dumps({"time_budget_s": cfg.time_budget_s, "steps": cfg.steps}))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = windows[torch.randint(0, n_win, (cfg.batch_size,), generator=g)].to(device)
            tracker.reset()
            loss, loss_mtp = lm_losses(model, batch, mtp)
            total = loss + (cfg.mtp_weight * loss_mtp if loss_mtp is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            total.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            update_router_bias(model, tracker.counts, cfg.bias_update_speed)
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                skew = max((c.max().float() / c.float().mean()).item() for c in tracker.counts.values())
                rec = {"step": step, "loss": round(loss.item(), 4),
                       "loss_mtp": round(loss_mtp.item(), 4) if loss_mtp is not None else None,
                       "grad_norm": round(float(gnorm), 3), "lr": lr_at(step, cfg),
                       "max_load_over_mean": round(skew, 3), "elapsed_s": round(time.time() - t0, 1)}
                history.append(rec)
                bar.set_postfix(loss=rec["loss"], skew=rec["max_load_over_mean"])
                log(json.dumps(rec))
            if (cfg.eval_every and step and step % cfg.eval_every == 0) or step == cfg.steps - 1:
                ppl = evaluate(model, valid_stream, cfg.seq_len, cfg.eval_windows, device=device)
                history.append({"step": step, "valid_ppl": round(ppl, 3)})
                log(json.dumps(history[-1]))
            step += 1
            bar.update(1)
        bar.close()
    finally:
        handle.remove()
    model.eval()
    return history


def export_release(model: DeepseekV4, tokenizer_dir: str | Path, out_dir: str | Path,
                   train_cfg: TrainConfig | None = None, history: list[dict] | None = None) -> Path:
    """save_release + tokenizer files + training record (``training.json``)."""
    from .checkpoint import save_release
    out_dir = Path(out_dir)
    save_release(model.float().cpu(), out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    if train_cfg is not None:
        rec = {"train_config": asdict(train_cfg), "history": history or []}
        (out_dir / "training.json").write_text(json.dumps(rec, indent=1) + "\n")
    return out_dir


def run_training(out_dir: str | Path, cfg: TrainConfig, model_config: ModelConfig | None = None,
                 device: str | None = None, tokenizer_dir: str | Path | None = None,
                 log: Callable[[str], None] = print) -> tuple[DeepseekV4, list[dict]]:
    """End to end: tokenizer + corpus → trained model → release in ``out_dir``."""
    from .paths import DATA_DIR
    from .tokenizer import load_tokenizer
    tokenizer_dir = Path(tokenizer_dir or DATA_DIR / "tokenizer")
    tok = load_tokenizer(tokenizer_dir)
    model_config = model_config or ModelConfig.embedded()
    if tok.vocab_size > model_config.vocab_size:
        raise ValueError(f"{tokenizer_dir}: tokenizer has {tok.vocab_size} ids > model vocab {model_config.vocab_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    train_stream, valid_stream = build_streams(tok, cfg.chat_repeat)
    log(json.dumps({"train_tokens": train_stream.numel(), "valid_tokens": valid_stream.numel(), "device": device}))
    model = DeepseekV4(model_config)
    init_for_training(model, cfg.seed)
    history = train(model, train_stream, valid_stream, cfg, device=device, log=log)
    export_release(model, tokenizer_dir, out_dir, cfg, history)
    return model, history
