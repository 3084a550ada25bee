"""The evaluation domains: sizable English prose, clean, disjoint from calibration, deterministic."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections import Counter

import pytest

from llmquant.domains import EVAL_DOMAINS, domain_text
from llmquant.errors import LlmquantError
from llmquant.text import default_text

NGRAM = 12


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _ngrams(words: list[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    return set(zip(*(words[i:] for i in range(n)), strict=False))


def _paragraphs(text: str) -> set[str]:
    return {p.strip() for p in text.split("\n\n") if len(p.strip()) >= 40}


@pytest.mark.parametrize("name", EVAL_DOMAINS)
def test_domain_is_sizable_english_prose(name: str) -> None:
    text = domain_text(name)
    assert len(text) >= 100_000
    top = [w for w, _ in Counter(_words(text)).most_common(10)]
    assert "the" in top[:3] and {"of", "and", "to"} <= set(top)
    letters = sum(c.isascii() and c.isalpha() for c in text)
    assert letters / len(text) > 0.6  # builtin ~0.63 (indented code), news/wiki ~0.8
    assert text == text.strip() and "\n\n\n" not in text


def test_wiki_has_no_markup_leftovers() -> None:
    text = domain_text("wiki")
    for junk in ("[[", "]]", "{{", "}}", "<ref", "</", "'''", "''", "|", "thumb|", "Category:", "&nbsp;"):
        assert junk not in text, junk


def test_wiki_is_capped_at_an_article_boundary() -> None:
    from llmquant.domains import WIKI_MAX_CHARS

    text = domain_text("wiki")
    last = text.rsplit("\n\n", 1)[0]
    assert len(last) < WIKI_MAX_CHARS <= len(text)


@pytest.mark.parametrize("name", ["news", "wiki"])
def test_domain_is_disjoint_from_calibration(name: str) -> None:
    calib, text = default_text("calib"), domain_text(name)
    assert not _paragraphs(calib) & _paragraphs(text)
    shared = _ngrams(_words(calib)) & _ngrams(_words(text))
    assert not shared, sorted(shared)[:5]


def test_builtin_is_disjoint_from_calibration() -> None:
    calib, text = default_text("calib"), domain_text("builtin")
    assert not _paragraphs(calib) & _paragraphs(text)


def test_domains_are_deterministic() -> None:
    script = (
        "import hashlib\n"
        "from llmquant.domains import EVAL_DOMAINS, domain_text\n"
        "for d in EVAL_DOMAINS: print(hashlib.sha256(domain_text(d).encode()).hexdigest())\n"
    )
    fresh = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    here = [hashlib.sha256(domain_text(d).encode()).hexdigest() for d in EVAL_DOMAINS]
    assert fresh.stdout.split() == here
    domain_text.cache_clear()
    assert [hashlib.sha256(domain_text(d).encode()).hexdigest() for d in EVAL_DOMAINS] == here


def test_unknown_domain_names_the_domains() -> None:
    with pytest.raises(LlmquantError, match="unknown text domain 'poetry'; use one of builtin, news, wiki"):
        domain_text("poetry")
