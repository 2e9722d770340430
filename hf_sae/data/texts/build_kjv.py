"""Rebuild the shipped KJV sample (maintainers only; not imported by the library).

Needs Debian's ``bible-kjv`` + ``bible-kjv-text`` packages::

    apt-get install bible-kjv bible-kjv-text
    python hf_sae/data/texts/build_kjv.py

Writes ``kjv-1.jsonl.gz`` (Genesis-Psalms) and ``kjv-2.jsonl.gz`` (Proverbs-Revelation), one
JSON record per chapter: ``{"book": "Genesis", "chapter": 1, "text": "In the beginning ..."}``
with the verses of a chapter joined by single spaces and the verse references removed.
"""
import gzip
import io
import json
import re
import subprocess
from pathlib import Path

BOOKS = [  # (abbreviation printed by `bible`, full name), canonical order
    ("Ge", "Genesis"), ("Exo", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deu", "Deuteronomy"), ("Josh", "Joshua"), ("Jdgs", "Judges"), ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"), ("2Sm", "2 Samuel"), ("1Ki", "1 Kings"), ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"), ("Neh", "Nehemiah"),
    ("Est", "Esther"), ("Job", "Job"), ("Psa", "Psalms"), ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("SSol", "Song of Solomon"), ("Isa", "Isaiah"), ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"), ("Eze", "Ezekiel"), ("Dan", "Daniel"), ("Hos", "Hosea"),
    ("Joel", "Joel"), ("Amos", "Amos"), ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"),
    ("Nahum", "Nahum"), ("Hab", "Habakkuk"), ("Zep", "Zephaniah"), ("Hag", "Haggai"),
    ("Zec", "Zechariah"), ("Mal", "Malachi"), ("Mat", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"),
    ("John", "John"), ("Acts", "Acts"), ("Rom", "Romans"), ("1Cor", "1 Corinthians"),
    ("2Cor", "2 Corinthians"), ("Gal", "Galatians"), ("Eph", "Ephesians"), ("Phi", "Philippians"),
    ("Col", "Colossians"), ("1Th", "1 Thessalonians"), ("2Th", "2 Thessalonians"),
    ("1Tim", "1 Timothy"), ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phmn", "Philemon"),
    ("Heb", "Hebrews"), ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1Jn", "1 John"),
    ("2Jn", "2 John"), ("3Jn", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
]
SPLIT_AT = "Proverbs"  # first book of the second file


def main():
    raw = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    names = dict(BOOKS)
    verse = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
    chapters: dict = {}
    order = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        m = verse.match(line)
        if m is None:
            raise ValueError(f"unexpected line: {line!r}")
        key = (names[m.group(1)], int(m.group(2)))
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(m.group(4).strip())
    here = Path(__file__).parent
    # mtime=0 and a fixed header name make the files byte-for-byte reproducible.
    raw_files = [open(here / name, "wb") for name in ("kjv-1.jsonl.gz", "kjv-2.jsonl.gz")]
    files = [io.TextIOWrapper(gzip.GzipFile(filename="", mode="wb", compresslevel=9, mtime=0, fileobj=r),
                              encoding="utf-8") for r in raw_files]
    part = 0
    for book, ch in order:
        if book == SPLIT_AT:
            part = 1
        rec = {"book": book, "chapter": ch, "text": " ".join(chapters[(book, ch)])}
        files[part].write(json.dumps(rec, ensure_ascii=False) + "\n")
    for f, r in zip(files, raw_files):
        f.close()
        r.close()


if __name__ == "__main__":
    main()
