"""Text sources shared by evaluation and calibration.

Calibration and evaluation must never see the same text, or a quantizer that
overfits its calibration set would look better than it is. The default text is
therefore one fixed corpus cut into two disjoint parts: ``calib`` (the first
~70%) and ``eval`` (the rest). It comes from Python's own stdlib
(``pydoc_data.topics``: ~465K characters of English prose about Python), so it
is available offline, identical on every machine, and needs no download.

The topics repeat each other (e.g. "specialnames" contains "context-managers"
verbatim), so a plain cut would put copies of calibration passages into the
held-out part. Paragraphs are therefore deduplicated first (first occurrence
kept, ~20% dropped), which leaves ~366K characters.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .errors import LlmquantError

CALIB_FRACTION = 0.7
PARTS = ("calib", "eval")
# Short names for common evaluation sets -> (dataset path, config name).
DATASET_ALIASES = {
    "wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-2": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-103-raw-v1": ("wikitext", "wikitext-103-raw-v1"),
}
# Which split of a Hugging Face dataset each part reads.
DATASET_SPLITS = {"calib": "train", "eval": "test"}
# How the user names the text file and the dataset for each part (quantize, perplexity)
FLAGS = {"calib": ("--calib-text", "--calib-dataset"), "eval": ("--text", "--dataset")}


@lru_cache(maxsize=1)
def _corpus() -> str:
    """All pydoc topics in sorted key order, each paragraph once (see module docstring)."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    paragraphs = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = para.strip("\n")
            if para.strip() and para not in seen:
                seen.add(para)
                paragraphs.append(para)
    return "\n\n".join(paragraphs)


def _cut() -> int:
    """Index of the calib/eval boundary: the paragraph break nearest after 70%."""
    text = _corpus()
    target = int(len(text) * CALIB_FRACTION)
    cut = text.find("\n\n", target)
    return target if cut < 0 else cut


def default_text(part: str = "eval") -> str:
    """The built-in text: ``"calib"`` (first ~70%) or ``"eval"`` (the held-out rest)."""
    if part not in PARTS:
        raise LlmquantError(f"unknown text part {part!r}; use one of {', '.join(PARTS)}")
    text, cut = _corpus(), _cut()
    return text[:cut] if part == "calib" else text[cut:].lstrip("\n")


def load_text(text_file: Path | str | None, dataset: str | None, split: str = "eval") -> str:
    """The text to use: a UTF-8 file, a Hugging Face dataset, or the default part ``split``.

    ``split`` is ``"calib"`` or ``"eval"``; for a dataset it selects the
    ``train`` or ``test`` split respectively.
    """
    if split not in PARTS:
        raise LlmquantError(f"unknown text part {split!r}; use one of {', '.join(PARTS)}")
    text_flag, dataset_flag = FLAGS[split]
    if text_file is not None and dataset is not None:
        raise LlmquantError(f"pass either {text_flag} FILE or {dataset_flag} NAME, not both")
    if text_file is not None:
        return _read_file(Path(text_file))
    if dataset is not None:
        return _load_dataset(dataset, DATASET_SPLITS[split], text_flag)
    return default_text(split)


def _read_file(path: Path) -> str:
    """Read a text file, turning every way it can fail into one clear line."""
    if not path.exists():
        raise LlmquantError(f"text file {path} does not exist")
    if path.is_dir():  # pipes such as /dev/stdin are fine
        raise LlmquantError(f"text file {path} is a folder, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LlmquantError(f"text file {path} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except OSError as exc:
        raise LlmquantError(f"cannot read text file {path}: {exc.strerror or exc}") from exc
    if not text.strip():
        raise LlmquantError(f"text file {path} is empty")
    return text


def _load_dataset(name: str, split: str, text_flag: str = "--text") -> str:
    """Rows of a Hugging Face dataset's text column, joined as one document.

    ``name`` is an alias from DATASET_ALIASES or ``path[:config]``. ``datasets``
    is optional and imported only here; any failure (not installed, offline,
    no such dataset) becomes one LlmquantError that points at ``text_flag`` (--text, --calib-text).
    """
    path, config = DATASET_ALIASES.get(name, (name.split(":", 1) + [None])[:2])
    try:
        import datasets

        data = datasets.load_dataset(path, config, split=split)
        column = "text" if "text" in data.column_names else data.column_names[0]
        rows = [row for row in data[column] if isinstance(row, str)]
    except Exception as exc:  # noqa: BLE001 - any failure has the same remedy
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmquantError(f"cannot load dataset {name} ({split} split): {reason}; pass {text_flag} FILE") from exc
    # wikitext rows carry their own newlines: joining with "" gives the raw file
    # (wiki.test.raw) that llama-perplexity users evaluate on.
    sep = "" if all(not r or r.endswith("\n") for r in rows) else "\n\n"
    text = sep.join(rows)
    if not text.strip():
        raise LlmquantError(f"cannot load dataset {name} ({split} split): no text; pass {text_flag} FILE")
    return text
