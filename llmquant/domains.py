"""Evaluation texts from domains other than the built-in Python docs.

A quantizer calibrated on one text should also hold up on text it never saw
from other domains, so the benchmark evaluates on three offline English texts:

- ``builtin``: the held-out part of the built-in Python-docs corpus
  (:func:`llmquant.text.default_text` ``("eval")``).
- ``news``: the Lee corpus (``gensim/test/test_data/lee_background.cor``),
  300 news articles, one per line, which gensim describes as the background
  corpus of Lee, Pincombe & Welsh (2005), drawn from the Australian
  Broadcasting Corporation's news mail service: "An empirical evaluation of models of text
  document similarity" (CogSci 2005). It ships with gensim without a separate
  license note; gensim itself is LGPL-2.1. The articles stay ABC's; we use
  them for evaluation only and never redistribute them.
- ``wiki``: plain text of the English Wikipedia dump sample
  (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``),
  main-namespace articles only, redirects skipped, markup stripped with
  mwparserfromhell; cut at an article boundary after :data:`WIKI_MAX_CHARS`
  characters so evaluation cost stays bounded. Wikipedia text is CC BY-SA.

Both come from pinned packages (``gensim==4.4.0``, installed ``--no-deps``
and never imported, since it needs scipy; ``mwparserfromhell==0.7.2``), so
they are identical on every machine and need no download. They are for
evaluation only, never calibration: tests check they share no paragraph and
no 12-word run with the built-in calibration text. Each text is built once
per process (:func:`functools.cache`); building all three takes ~1-2 s.
"""

from __future__ import annotations

import bz2
import importlib.util
import re
import xml.etree.ElementTree as ET
from functools import cache
from pathlib import Path

from .errors import LlmquantError
from .text import default_text

EVAL_DOMAINS = ("builtin", "news", "wiki")
# The wiki text stops at the first article boundary past this many characters.
WIKI_MAX_CHARS = 400_000
GENSIM_PIN = "gensim==4.4.0"
MWPARSER_PIN = "mwparserfromhell==0.7.2"
_DATA = "test/test_data"
_NEWS_FILE = "lee_background.cor"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Tags whose contents are not prose: references, tables, galleries, math, ...
_DROP_TAGS = frozenset({"ref", "table", "gallery", "math", "timeline", "score", "imagemap"})
_MIN_WORDS = 6  # shorter lines are headings, captions or list stubs
_EMPTY_PARENS = re.compile(r"\s*\(\s*[,;]?\s*\)")
# References the parser leaves as text (malformed in the source), and stray bold/italic quotes.
_LEFTOVERS = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<[^<>\n]{1,40}>|'{2,}", re.DOTALL)
# Trailing sections that list sources rather than prose.
_DROP_SECTIONS = re.compile(
    r"\s*(references|notes|see also|further reading|external links|bibliography|sources|citations|works)\s*",
    re.IGNORECASE,
)


def _install_hint(pin: str) -> str:
    return f".venv/bin/python -m pip install --no-deps {pin}"


def _gensim_file(name: str) -> Path:
    """A data file shipped in the gensim wheel, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _DATA / name
        if path.is_file():
            return path
    raise LlmquantError(f"text domain data {name} not found; install it: {_install_hint(GENSIM_PIN)}")


def _news() -> str:
    lines = _gensim_file(_NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return "\n\n".join(line.strip() for line in lines if line.strip())


def _plain(wikitext: str) -> str:
    """Article prose: no references/tables/templates, no short or table-like lines."""
    import mwparserfromhell

    code = mwparserfromhell.parse(_LEFTOVERS.sub("", wikitext))
    for section in code.get_sections(
        levels=[2], matches=lambda title: _DROP_SECTIONS.fullmatch(str(title)) is not None
    ):
        code.remove(section)
    for tag in code.filter_tags(recursive=False):
        if str(tag.tag).strip().lower() in _DROP_TAGS:
            code.remove(tag)
    kept = []
    for line in _LEFTOVERS.sub("", code.strip_code()).splitlines():
        line = _EMPTY_PARENS.sub("", line).strip()
        if any(c in line for c in "|{}\\") or line.startswith(("+", "!", "*", "#", ":", ";", "Category:")):
            continue
        if len(line.split()) >= _MIN_WORDS:
            kept.append(line)
    return "\n".join(kept)


def _wiki() -> str:
    if importlib.util.find_spec("mwparserfromhell") is None:
        raise LlmquantError(
            f"the wiki domain needs mwparserfromhell; install it: {_install_hint(MWPARSER_PIN)}"
        )
    articles: list[str] = []
    size = 0
    with bz2.open(_gensim_file(_WIKI_FILE)) as dump:
        for _, element in ET.iterparse(dump):
            if not element.tag.endswith("}page"):
                continue
            if element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None:
                article = _plain(element.findtext("{*}revision/{*}text") or "")
                if article:
                    articles.append(article)
                    size += len(article) + 2
            element.clear()
            if size >= WIKI_MAX_CHARS:
                break
    return "\n\n".join(articles)


@cache
def domain_text(name: str) -> str:
    """The evaluation text of domain ``name`` (one of :data:`EVAL_DOMAINS`)."""
    if name == "builtin":
        return default_text("eval")
    if name == "news":
        return _news()
    if name == "wiki":
        return _wiki()
    raise LlmquantError(f"unknown text domain {name!r}; use one of {', '.join(EVAL_DOMAINS)}")
