"""A long English text made offline from Debian packages, for the multi-million-token
perplexity stream (bench/ppl_long.py). Nothing generated, nothing downloaded but the
packages:

1. the King James Bible, whole (`bible-kjv`), one verse a line without references;
2. The Debian Administrator's Handbook, English HTML (`debian-handbook`);
3. the Python 3.11 documentation, HTML (`python3.11-doc`): tutorial, how-tos, reference;
4. the PostgreSQL 15 manual, HTML (`postgresql-doc-15`).

HTML keeps the text of paragraphs, list items, headings and definitions; code blocks
(`pre`), scripts, styles and navigation are left out. Files are read in sorted order,
so the text is the same on every machine with the same package versions.

    python3 bench/long_text.py [--out .cache/long-english.txt]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

HTML_BOOKS = {  # package -> its English HTML
    "debian-handbook": Path("/usr/share/doc/debian-handbook/html/en-US"),
    "python3.11-doc": Path("/usr/share/doc/python3.11/html"),
    "postgresql-doc-15": Path("/usr/share/doc/postgresql-doc-15/html"),
}
PACKAGES = ("bible-kjv", *HTML_BOOKS)
KEPT = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "td", "blockquote"}
SKIPPED = {"pre", "script", "style", "nav", "head"}


class _Paragraphs(HTMLParser):
    """Text of the KEPT elements outside SKIPPED ones, one paragraph a line."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._skip = 0  # depth inside SKIPPED elements
        self._open = 0  # depth inside KEPT elements
        self._parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in SKIPPED:
            self._skip += 1
        elif tag in KEPT:
            self._flush()
            self._open += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in SKIPPED:
            self._skip = max(self._skip - 1, 0)
        elif tag in KEPT:
            self._flush()
            self._open = max(self._open - 1, 0)

    def handle_data(self, data: str) -> None:
        if self._open and not self._skip:
            self._parts.append(data)

    def _flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self._parts)).strip()
        self._parts = []
        if len(text.split()) >= 3:  # not a lone label or number
            self.paragraphs.append(text)


def html_text(path: Path) -> str:
    parser = _Paragraphs()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return "\n".join(parser.paragraphs)


def bible() -> str:
    out = subprocess.run(
        ["bible", "-f", "Gen1:1-Rev22:21"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return re.sub(r"(?m)^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ ", "", out)


def html_books() -> Iterator[str]:
    for root in HTML_BOOKS.values():
        if not root.is_dir():
            raise SystemExit(f"{root} is missing: is its package installed?")
        for path in sorted(root.rglob("*.html")):
            if "index" in path.name or path.name == "search.html":
                continue  # indexes: lists of names, not text
            if text := html_text(path):
                yield text


def install() -> None:
    missing = [p for p in PACKAGES if not _installed(p)]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def _installed(package: str) -> bool:
    if package == "bible-kjv":
        return shutil.which("bible") is not None
    return HTML_BOOKS[package].is_dir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".cache/long-english.txt"))
    args = ap.parse_args()
    install()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    parts = [bible(), *html_books()]
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    words = sum(len(p.split()) for p in parts)
    print(f"{args.out}: {len(parts)} parts, {words:,} words")


if __name__ == "__main__":
    main()
