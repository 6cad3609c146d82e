"""The committed text corpus (``data/corpus/``; built by ``scripts/build_corpus.py``).

Files: ``{train,valid,calib}.jsonl.gz`` — one document per line (``source``, ``name``, ``text``;
sources ``shakespeare``, ``fortunes``, ``kjv``, ``pydoc``), split by document with a fixed
sha256 order (see data/README.md); ``chat_{train,valid,calib}.jsonl.gz`` — question/answer
conversations (``messages`` in the V4 chat format of :mod:`dsv4lib.chat`, ``thinking`` flag) built
from the same split's documents; ``manifest.json`` — counts and sha256 of every file.

Token helpers: documents become ``BOS + text + EOS`` streams; chat conversations become
``chat_ids`` (BOS included, the EOS closing each assistant turn included).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from dsv4lib.chat import chat_ids
from dsv4lib.paths import DATA_DIR

CORPUS_DIR = DATA_DIR / "corpus"
SPLITS = ("train", "valid", "calib")
SOURCES = ("shakespeare", "fortunes", "kjv", "pydoc")


def _read_jsonl_gz(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus file missing (see data/README.md)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _check_split(name: str) -> None:
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")


def load_documents(name: str, corpus_dir: str | Path | None = None,
                   sources: Sequence[str] | None = None) -> list[dict]:
    """Documents of a split as dicts (``source``, ``name``, ``text``, …), in file order."""
    _check_split(name)
    docs = _read_jsonl_gz(Path(corpus_dir or CORPUS_DIR) / f"{name}.jsonl.gz")
    if sources is not None:
        unknown = set(sources) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown corpus sources {sorted(unknown)}; expected some of {SOURCES}")
        docs = [d for d in docs if d["source"] in sources]
    return docs


def load_split(name: str, corpus_dir: str | Path | None = None,
               sources: Sequence[str] | None = None) -> list[str]:
    """Texts of the documents of split ``name`` (``train`` / ``valid`` / ``calib``)."""
    return [d["text"] for d in load_documents(name, corpus_dir, sources)]


def load_chats(name: str, corpus_dir: str | Path | None = None) -> list[dict]:
    """Chat conversations of a split: dicts with ``messages``, ``thinking``, ``kind``."""
    _check_split(name)
    return _read_jsonl_gz(Path(corpus_dir or CORPUS_DIR) / f"chat_{name}.jsonl.gz")


def verify_corpus(corpus_dir: str | Path | None = None) -> dict[str, str]:
    """Check every file against ``manifest.json``; returns name -> sha256, raises on mismatch."""
    corpus_dir = Path(corpus_dir or CORPUS_DIR)
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    out = {}
    for fname, meta in manifest["files"].items():
        digest = hashlib.sha256((corpus_dir / fname).read_bytes()).hexdigest()
        if digest != meta["sha256"]:
            raise ValueError(f"{corpus_dir / fname}: sha256 {digest} != manifest {meta['sha256']}")
        out[fname] = digest
    return out


# ----------------------------------------------------------------------------- token streams
def document_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """``[BOS] + encode(text) + [EOS]`` per document."""
    return [[tokenizer.bos_id, *ids, tokenizer.eos_id] for ids in tokenizer.encode_batch(list(texts))]


def chat_token_ids(tokenizer, chats: Sequence[dict]) -> list[list[int]]:
    """Each conversation rendered with the V4 template (complete turns, no generation prompt)."""
    return [chat_ids(tokenizer, c["messages"], c.get("thinking", False), add_generation_prompt=False)
            for c in chats]


def token_stream(pieces: Sequence[Sequence[int]]) -> torch.Tensor:
    """Concatenate id lists into one int64 stream ``[N]``."""
    return torch.tensor([i for p in pieces for i in p], dtype=torch.long)


def iter_token_batches(stream: torch.Tensor, batch_size: int, seq_len: int, *, shuffle: bool = True,
                       seed: int = 0, epochs: int | None = 1, drop_last: bool = True) -> Iterator[torch.Tensor]:
    """Cut a token stream into non-overlapping windows of ``seq_len`` and yield ``[B, seq_len]`` batches.

    For next-token training ask for ``seq_len = context + 1`` and use ``x[:, :-1]`` / ``x[:, 1:]``.
    ``shuffle`` permutes the windows with ``torch.Generator().manual_seed(seed + epoch)``;
    ``epochs=None`` loops forever.
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    n_win = stream.numel() // seq_len
    if n_win == 0:
        raise ValueError(f"stream of {stream.numel()} tokens is shorter than seq_len={seq_len}")
    windows = stream[: n_win * seq_len].view(n_win, seq_len)                  # [W, S]
    epoch = 0
    while epochs is None or epoch < epochs:
        order = (torch.randperm(n_win, generator=torch.Generator().manual_seed(seed + epoch))
                 if shuffle else torch.arange(n_win))
        for s in range(0, n_win, batch_size):
            idx = order[s:s + batch_size]
            if drop_last and idx.numel() < batch_size:
                break
            yield windows[idx]                                                 # [B, S]
        epoch += 1


def calibration_batch(tokenizer, n_seqs: int, seq_len: int, *, chat_fraction: float = 0.25, seed: int = 0,
                      corpus_dir: str | Path | None = None, split: str = "calib") -> torch.Tensor:
    """``[n_seqs, seq_len]`` calibration windows: ``round(chat_fraction·n)`` rows from the chat stream
    (V4 template, so the special tokens are exercised), the rest from the document stream; each window
    starts at a seeded random offset (windows may overlap when the split is small)."""
    if not 0.0 <= chat_fraction <= 1.0:
        raise ValueError(f"chat_fraction must be in [0, 1], got {chat_fraction}")
    rng = random.Random(seed)
    n_chat = round(chat_fraction * n_seqs)
    rows: list[torch.Tensor] = []
    for n, pieces in ((n_seqs - n_chat, lambda: document_ids(tokenizer, load_split(split, corpus_dir))),
                      (n_chat, lambda: chat_token_ids(tokenizer, load_chats(split, corpus_dir)))):
        if n == 0:
            continue
        stream = token_stream(pieces())
        if stream.numel() < seq_len:
            raise ValueError(f"{split} stream has {stream.numel()} tokens < seq_len={seq_len}")
        for _ in range(n):
            start = rng.randrange(stream.numel() - seq_len + 1)
            rows.append(stream[start:start + seq_len])
    return torch.stack(rows)                                                     # [N, S]
