#!/usr/bin/env python3
"""Offline English text: the Debian ``fortunes`` and ``fortunes-min`` collections, split three ways.

Downloads the two ``.deb`` packages with ``apt-get download`` and unpacks them with ``dpkg-deb -x``
into ``benchmarks/_work/fortunes/`` (nothing is installed), reads every fortune file (entries
separated by ``%`` lines), joins each entry's lines into one line, and keeps entries of
``--min-words`` words up to ``--max-chars`` characters that are mostly letters (no ASCII art).
Duplicates are dropped, the rest shuffled with ``--seed`` and written as ``train.txt``,
``val.txt`` and ``test.txt`` (one text a line) plus ``splits.json`` with the counts. Choices made
on validation text, results reported on test text.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.text.models import WORK  # noqa: E402

PACKAGES = ("fortunes", "fortunes-min")
OUT = WORK / "fortunes"
FORTUNE_DIR = Path("usr/share/games/fortunes")


def fetch(out: Path) -> Path:
    """Download and unpack the packages under ``out`` (once); return the folder of fortune files."""
    unpacked = out / "root"
    if (unpacked / FORTUNE_DIR / "fortunes").is_file():
        return unpacked / FORTUNE_DIR
    debs = out / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
    return unpacked / FORTUNE_DIR


def entries(folder: Path) -> list[tuple[str, str]]:
    """(collection, text) for every fortune, its lines joined by single spaces."""
    found = []
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.suffix in (".dat", ".u8") or file.is_symlink():
            continue
        text = file.read_bytes().decode("utf-8", errors="replace")
        for chunk in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            line = " ".join(chunk.split())
            if line:
                found.append((file.name, line))
    return found


def keep(text: str, min_words: int, max_chars: int) -> bool:
    letters = sum(c.isalpha() for c in text)
    return (len(text.split()) >= min_words and len(text) <= max_chars and letters >= 0.6 * len(text)
            and "\ufffd" not in text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-words", type=int, default=4)
    parser.add_argument("--max-chars", type=int, default=400)
    parser.add_argument("--val", type=float, default=0.1, help="fraction for validation")
    parser.add_argument("--test", type=float, default=0.1, help="fraction for test")
    args = parser.parse_args()
    folder = fetch(args.out)
    texts = list(dict.fromkeys(t for _, t in entries(folder) if keep(t, args.min_words, args.max_chars)))
    random.Random(args.seed).shuffle(texts)
    n_val, n_test = int(len(texts) * args.val), int(len(texts) * args.test)
    splits = {"val": texts[:n_val], "test": texts[n_val:n_val + n_test], "train": texts[n_val + n_test:]}
    for name, lines in splits.items():
        (args.out / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = {"packages": list(PACKAGES), "seed": args.seed, "min_words": args.min_words,
               "max_chars": args.max_chars, **{name: len(lines) for name, lines in splits.items()},
               "mean_chars": round(sum(map(len, texts)) / max(len(texts), 1), 1)}
    (args.out / "splits.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
