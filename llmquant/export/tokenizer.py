"""Write the ``tokenizer.*`` GGUF keys llama.cpp needs, from an HF checkpoint folder.

llama.cpp re-implements tokenization in C++, so the GGUF must describe the HF
tokenizer in llama.cpp's own terms: a vocabulary kind ("gpt2" = byte-level BPE
with merges, "llama" = SentencePiece-style pieces with scores), token types, and
for BPE the name of a pre-tokenizer whose regexes llama.cpp hard-codes.

llama.cpp's converter finds that name by hashing the ids of a fixed probe text
against a table of known models. We instead read the *structure* of
tokenizer.json's pre-tokenizer and map it to the llama.cpp name whose regexes are
the same; anything else raises, because a wrong pre-tokenizer silently changes
every tokenization the quantized model sees.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from ..errors import LlmquantError

T = gguf.TokenType

# HF's (?i:...) contraction group and llama.cpp's case-expanded equivalent.
_CONTRACTIONS_HF = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_CONTRACTIONS_CPP = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (_CONTRACTIONS_HF + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (_CONTRACTIONS_HF + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's "llama" vocab merges pieces by score; a unigram vocab lacks the intermediate
# pieces, so that yields about twice as many tokens as SentencePiece (measured).
_UNIGRAM = "{}: unigram SentencePiece models are not supported (llama.cpp's llama vocab is BPE-only)"

_BYTELEVEL_REGEX = ("bytelevel", True)  # ByteLevel that applies the GPT-2 regex itself
_BYTELEVEL_PLAIN = ("bytelevel", False)
_DIGITS = ("digits", True)  # Digits(individual_digits=True) == llama.cpp's "\p{N}" pass

# (model.ignore_merges, pre-tokenizer steps) -> llama.cpp pre name with the same regexes
# and the same merge behaviour (llama-bpe skips merges for whole-word vocab hits).
_PRE_NAMES: dict[tuple[bool, tuple[tuple[Any, ...], ...]], str] = {
    (False, (_BYTELEVEL_REGEX,)): "gpt-2",
    (False, (("split", _GPT2_RE), _BYTELEVEL_PLAIN)): "gpt-2",
    (False, (_DIGITS, _BYTELEVEL_REGEX)): "smollm",
    (False, (_DIGITS, ("split", _GPT2_RE), _BYTELEVEL_PLAIN)): "smollm",
    (True, (("split", _LLAMA3_RE), _BYTELEVEL_PLAIN)): "llama-bpe",
    (False, (("split", _LLAMA3_RE), _BYTELEVEL_PLAIN)): "smaug-bpe",
    (False, (("split", _QWEN2_RE), _BYTELEVEL_PLAIN)): "qwen2",
}


@dataclass(frozen=True)
class TokenizerInfo:
    """What was written, for reports: vocabulary kind, pre-tokenizer, size, specials."""

    model: str  # "gpt2" or "llama"
    pre: str
    n_tokens: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    has_chat_template: bool


def check_tokenizer_files(model_dir: Path) -> dict[str, Any] | None:
    """Fail before any weight is read when the folder holds no tokenizer llama.cpp could use,
    or one whose fields have the wrong shape (one line naming the field); returns the parsed
    tokenizer.json (None without one), which is large enough that parsing it twice shows."""
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").is_file():
        raise LlmquantError(f"no tokenizer in {model_dir}: expected tokenizer.json or tokenizer.model")
    tj = _read_json(model_dir / "tokenizer.json")
    if tj is not None:
        _check_tokenizer_json(tj, model_dir / "tokenizer.json")
    _read_json(model_dir / "tokenizer_config.json")
    if (model_dir / "tokenizer.model").is_file() and (tj is None or not _is_byte_level_bpe(tj)):  # the one used
        _read_sp_model(model_dir / "tokenizer.model")
    return tj


def _check_tokenizer_json(tj: dict[str, Any], path: Path) -> None:
    """The fields this module reads, with the types it reads them as."""
    def bad(field: str, value, expected: str) -> LlmquantError:
        return LlmquantError(f"{path} has {field}={json.dumps(value)[:60]}; expected {expected}")

    model = tj.get("model")
    if not isinstance(model, dict):
        raise bad("model", model, "an object")
    vocab = model.get("vocab")
    if model.get("type") == "Unigram":
        return  # refused by name later
    # a few C-level passes (map, set) per field: Gemma 3's file has 262k tokens and 515k merges
    if not isinstance(vocab, dict) or set(map(type, vocab.values())) - {int} or min(vocab.values(), default=0) < 0:
        raise bad("model.vocab", vocab, "an object mapping token texts to ids >= 0")
    merges = model.get("merges", [])
    if not isinstance(merges, list) or not _merges_well_formed(merges):
        raise bad("model.merges", merges, "a list of 'left right' strings or [left, right] pairs")
    added = tj.get("added_tokens", [])
    if not isinstance(added, list) or not all(
            isinstance(a, dict) and type(a.get("id")) is int and a["id"] >= 0 and isinstance(a.get("content"), str)
            for a in added):
        raise bad("added_tokens", added, "a list of objects with an id and a content")
    for key in ("pre_tokenizer", "normalizer", "decoder"):
        if not isinstance(tj.get(key), (dict, type(None))):
            raise bad(key, tj[key], "an object or null")


def _merges_well_formed(merges: list) -> bool:
    """Every merge a 'left right' string, or every merge a [left, right] pair of strings."""
    kinds = set(map(type, merges))
    if kinds == {str}:
        return all(map(str.__contains__, merges, itertools.repeat(" ")))
    if kinds == {list}:
        return set(map(len, merges)) == {2} and set(map(type, itertools.chain.from_iterable(merges))) == {str}
    return not merges


def _merge_strings(merges: list) -> list[str]:
    """tokenizer.json's merges (this run's parse) as gguf's SpecialVocab stores them: "left right",
    [left, right] pairs (transformers >= 4.45) joined by a space, a space inside a part as U+0120."""
    if not merges or isinstance(merges[0], str):
        return list(merges)
    if " " not in "".join(itertools.chain.from_iterable(merges)):  # the usual case, in C-level passes
        return list(map(" ".join, merges))
    shift = str.maketrans(" ", chr(ord(" ") + 256))
    return [f"{a.translate(shift)} {b.translate(shift)}" for a, b in merges]


def _read_sp_model(path: Path):
    """tokenizer.model as a SentencePiece ModelProto, or a one-line error."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (OSError, DecodeError) as exc:
        raise LlmquantError(f"cannot read {path}: not a SentencePiece model ({exc})") from None
    if not proto.pieces:
        raise LlmquantError(f"cannot read {path}: a SentencePiece model without pieces")
    return proto


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int,
                  tokenizer_json: dict[str, Any] | None = None) -> TokenizerInfo:
    """Add every tokenizer key for the checkpoint in ``model_dir`` to ``writer``.

    ``vocab_size`` is the embedding row count (config.json); the token list is padded
    with UNUSED ``[PAD{i}]`` entries up to it, because llama.cpp indexes logits by id.
    ``tokenizer_json``: what ``check_tokenizer_files`` returned for this folder, where the
    caller checked it already (a 262k-token tokenizer.json takes most of a second to parse).
    """
    model_dir = Path(model_dir)
    tj = tokenizer_json if tokenizer_json is not None else check_tokenizer_files(model_dir)
    sp_file = model_dir / "tokenizer.model"
    name = f"the tokenizer in {model_dir}"
    if tj is not None and _is_byte_level_bpe(tj):
        model, pre = "gpt2", _detect_pre(tj, name)
        tokens, types = _gpt2_tokens(tj, vocab_size, name)
        scores = None
    else:
        model, pre = "llama", "default"
        if sp_file.is_file():
            tokens, scores, types = _spm_tokens_from_model(sp_file, vocab_size, name)
        else:
            tokens, scores, types = _spm_tokens_from_json(model_dir, tj or {}, vocab_size, name)
        _overlay_added_tokens(model_dir, tj, tokens, scores, types)
    _check_unique(tokens, name)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_add_space_prefix(model_dir, tj))
    writer.add_token_types(types)
    return _add_specials(writer, model_dir, tj, model, pre, len(tokens))


def _read_json(path: Path) -> dict[str, Any] | None:
    """Parse a JSON file, or None when absent (optional HF files are common)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlmquantError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise LlmquantError(f"{path} is not a JSON object")
    return data


def _is_byte_level_bpe(tj: dict[str, Any]) -> bool:
    """GPT-2 style: BPE over byte-mapped characters, no byte_fallback pieces."""
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback", False):
        return False
    kinds = {step.get("type") for step in _flatten(tj.get("pre_tokenizer"))}
    return "ByteLevel" in kinds or (tj.get("decoder") or {}).get("type") == "ByteLevel"


def _flatten(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Pre-tokenizer / normalizer steps in order, with Sequence nodes expanded."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        children = node.get("pretokenizers", node.get("normalizers", []))
        return [step for child in children for step in _flatten(child)]
    return [node]


def _step_signature(step: dict[str, Any]) -> tuple[Any, ...]:
    """Reduce one pre-tokenizer step to the parts that change how text is split."""
    kind = step.get("type")
    if kind == "ByteLevel":
        if step.get("add_prefix_space", False):
            return ("bytelevel-add-prefix-space",)  # llama.cpp never prepends a space here
        return ("bytelevel", step.get("use_regex", True))
    if kind == "Digits":
        return ("digits", step.get("individual_digits", False))
    if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert", False):
        pattern = step.get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String", ""))
        regex = regex.replace(_CONTRACTIONS_CPP, _CONTRACTIONS_HF)
        if regex == _GPT2_RE.removesuffix(r"|\s+"):
            regex = _GPT2_RE  # unmatched whitespace becomes its own piece either way
        return ("split", regex)
    return (str(kind), json.dumps(step, sort_keys=True))


def _detect_pre(tj: dict[str, Any], name: str) -> str:
    """Map tokenizer.json's normalizer + pre-tokenizer structure to a llama.cpp pre name."""
    norm = tj.get("normalizer")
    if norm and norm.get("type") != "NFC":  # llama.cpp's BPE path has no normalizers (NFC: as upstream)
        raise LlmquantError(f"{name}: unsupported byte-level BPE normalizer {norm.get('type')!r}")
    steps = tuple(_step_signature(s) for s in _flatten(tj.get("pre_tokenizer")))
    key = (bool(tj["model"].get("ignore_merges", False)), steps)
    if key not in _PRE_NAMES:
        kinds = [s[0] for s in steps]
        raise LlmquantError(f"{name}: pre-tokenizer {kinds} matches no llama.cpp pre-tokenizer we know")
    return _PRE_NAMES[key]


def _looks_special(text: str) -> bool:
    """Added tokens some models forget to flag special but llama.cpp must treat as control."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _padded(vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Placeholder tokens for every id; real ones overwrite them, the rest stay UNUSED."""
    return [f"[PAD{i}]" for i in range(vocab_size)], [-1000.0] * vocab_size, [T.UNUSED] * vocab_size


def _check_range(token_id: int, vocab_size: int, name: str) -> None:
    """A token id past the embedding rows cannot be written: llama.cpp would index out of range."""
    if token_id >= vocab_size:
        raise LlmquantError(f"{name}: token id {token_id} is outside the model's vocab_size {vocab_size}")


def _gpt2_tokens(tj: dict[str, Any], vocab_size: int, name: str) -> tuple[list[str], list[int]]:
    """Byte-level vocab: model tokens NORMAL, added tokens CONTROL or USER_DEFINED."""
    tokens, _, types = _padded(vocab_size)
    for text, token_id in tj["model"]["vocab"].items():
        _check_range(token_id, vocab_size, name)
        tokens[token_id], types[token_id] = text, T.NORMAL
    for added in tj.get("added_tokens", []):
        token_id, text = added["id"], added["content"]
        _check_range(token_id, vocab_size, name)
        if added.get("special") or _looks_special(text):
            tokens[token_id], types[token_id] = text, T.CONTROL
        else:  # llama.cpp matches user-defined tokens on raw text: undo SentencePiece spaces
            tokens[token_id], types[token_id] = text.replace("\u2581", " "), T.USER_DEFINED
    return tokens, types


def _spm_tokens_from_model(path: Path, vocab_size: int, name: str) -> tuple[list[str], list[float], list[int]]:
    """tokenizer.model pieces with their exact scores; proto piece types equal gguf's."""
    proto = _read_sp_model(path)
    if proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:
        raise LlmquantError(_UNIGRAM.format(name))
    tokens, scores, types = _padded(vocab_size)
    for token_id, piece in enumerate(proto.pieces):
        _check_range(token_id, vocab_size, name)
        tokens[token_id], scores[token_id], types[token_id] = piece.piece, piece.score, int(piece.type)
    return tokens, scores, types


def _spm_tokens_from_json(model_dir: Path, tj: dict[str, Any], vocab_size: int,
                          name: str) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style tokenizer.json (BPE with byte_fallback) as scored pieces.

    llama.cpp's "llama" tokenizer merges the adjacent pair whose result has the highest
    score, so a BPE merge of rank r becomes score -r; pieces no merge produces score below
    every merge so they never win over a real merge.
    """
    model = tj.get("model", {})
    if model.get("type") == "Unigram":
        raise LlmquantError(_UNIGRAM.format(name))
    if model.get("type") != "BPE" or not model.get("byte_fallback", False):
        raise LlmquantError(f"{name}: tokenizer model {model.get('type')!r} is neither byte-level BPE "
                            "nor SentencePiece-style BPE")
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    floor = -float(len(ranks) + 1)
    unk_text = model.get("unk_token") or (_read_json(model_dir / "tokenizer_config.json") or {}).get("unk_token")
    unk_id = model["vocab"].get(unk_text) if isinstance(unk_text, str) else None
    tokens, scores, types = _padded(vocab_size)
    for text, token_id in model["vocab"].items():
        _check_range(token_id, vocab_size, name)
        is_byte = len(text) == 6 and text.startswith("<0x") and text.endswith(">")
        tokens[token_id], scores[token_id] = text, -float(ranks[text]) if text in ranks else floor
        types[token_id] = T.UNKNOWN if token_id == unk_id else T.BYTE if is_byte else T.NORMAL
    return tokens, scores, types


def _overlay_added_tokens(model_dir: Path, tj: dict[str, Any] | None, tokens: list[str],
                          scores: list[float], types: list[int]) -> None:
    """Mark HF added tokens CONTROL/USER_DEFINED so llama.cpp splits them out of raw text first."""
    if tj is not None:
        added = tj.get("added_tokens", [])
    else:
        config = _read_json(model_dir / "tokenizer_config.json") or {}
        added = [{"id": int(i), **d} for i, d in config.get("added_tokens_decoder", {}).items()]
        extra = _read_json(model_dir / "added_tokens.json") or {}
        added += [{"id": i, "content": t} for t, i in extra.items() if i >= len(tokens) or types[i] == T.UNUSED]
    for entry in added:
        token_id, text = entry["id"], entry["content"]
        if token_id >= len(tokens):
            raise LlmquantError(f"added token {text!r} has id {token_id}, past vocab_size {len(tokens)}")
        if types[token_id] not in (T.NORMAL, T.UNUSED) and tokens[token_id] == text:
            continue  # keep the piece's own UNKNOWN/CONTROL/BYTE type
        special = entry.get("special") or _looks_special(text)
        tokens[token_id] = text if special else text.replace("\u2581", " ")
        types[token_id] = T.CONTROL if special else T.USER_DEFINED
        scores[token_id] = -1000.0


def _add_space_prefix(model_dir: Path, tj: dict[str, Any] | None) -> bool:
    """Whether HF prepends a space (as "▁") to the text, which llama.cpp must mimic."""
    if tj is not None:
        for step in _flatten(tj.get("pre_tokenizer")):
            if step.get("type") == "Metaspace":
                if "prepend_scheme" in step:
                    return step["prepend_scheme"] != "never"
                return bool(step.get("add_prefix_space", True))
        norms = _flatten(tj.get("normalizer"))
        if any(n.get("type") == "Prepend" for n in norms):
            return True
        if norms:
            return False
    config = _read_json(model_dir / "tokenizer_config.json") or {}
    if isinstance(config.get("add_prefix_space"), bool):
        return config["add_prefix_space"]
    return True  # SentencePiece's add_dummy_prefix default, and llama.cpp's


def _add_specials(writer: gguf.GGUFWriter, model_dir: Path, tj: dict[str, Any] | None,
                  model: str, pre: str, n_tokens: int) -> TokenizerInfo:
    """Special ids, add_bos/add_eos, merges and chat template via gguf.SpecialVocab.

    When tokenizer_config.json does not state add_bos/add_eos we ask the HF
    post-processor itself, so llama.cpp adds exactly what HF adds.
    """
    _read_json(model_dir / "tokenizer_config.json")  # SpecialVocab reads it too, with no clear error
    # gguf-py logs its reading of HF post-processor templates to stderr (Gemma's "<bos> A <bos> B" pair
    # template: "Unknown separator token"); what it concludes is in the file, its notes stay off our output
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)
    try:
        own = None if tj is None else tj["model"].get("merges") or None  # merges.txt where tokenizer.json has none
        special = gguf.SpecialVocab(model_dir, load_merges=model == "gpt2" and own is None, n_vocab=n_tokens)
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise LlmquantError(f"cannot read the tokenizer files in {model_dir}: {exc}") from None
    finally:
        vocab_log.setLevel(level)
    if model == "gpt2" and own is not None:
        special.merges = _merge_strings(own)
    if model == "gpt2" and not special.merges:
        raise LlmquantError(f"no BPE merges in {model_dir}: llama.cpp cannot load a gpt2 vocab without them")
    ids = special.special_token_ids
    if tj is not None and not {"bos", "eos"} <= special.add_special_token.keys():
        probe = _encode_probe(tj, model_dir / "tokenizer.json")
        special.add_special_token.setdefault("bos", bool(probe) and probe[0] == ids.get("bos"))
        special.add_special_token.setdefault("eos", bool(probe) and probe[-1] == ids.get("eos"))
    if special.chat_template is None:
        special.chat_template = _chat_template(model_dir)
    special.add_to_gguf(writer, quiet=True)
    add_bos = special.add_special_token.get("bos", model == "llama" or pre == "llama-bpe")
    return TokenizerInfo(model=model, pre=pre, n_tokens=n_tokens, bos_id=ids.get("bos"), eos_id=ids.get("eos"),
                         add_bos=add_bos, add_eos=special.add_special_token.get("eos", False),
                         has_chat_template=special.chat_template is not None)


def _encode_probe(tj: dict[str, Any], path: Path) -> list[int]:
    """The ids HF's tokenizer gives ``"a"`` with its special tokens added: whether its
    post-processor puts bos first and eos last.

    Asked of the tokenizer's own normalizer, pre-tokenizer, added tokens and
    post-processor over a one-word vocabulary: building the real BPE model (half a
    million merges in Gemma 3's) costs as much as parsing its JSON, and the word's id
    never is a special token's (it lies past every id the file names).
    """
    from tokenizers import Tokenizer

    vocab = tj["model"].get("vocab") or {}
    above = 1 + max([len(vocab), *vocab.values(), *(a["id"] for a in tj.get("added_tokens", []))])
    slim = {**tj, "model": {"type": "WordLevel", "vocab": {"[probe]": above}, "unk_token": "[probe]"}}
    try:
        return Tokenizer.from_str(json.dumps(slim)).encode("a", add_special_tokens=True).ids
    except Exception as exc:  # the Rust library raises a bare Exception on a malformed file
        raise LlmquantError(f"the tokenizers library cannot load {path}: {exc}") from None


def _chat_template(model_dir: Path) -> str | None:
    """Chat template from tokenizer_config.json or chat_template.jinja (SpecialVocab needs the config)."""
    config = _read_json(model_dir / "tokenizer_config.json") or {}
    if isinstance(config.get("chat_template"), str):
        return config["chat_template"]
    jinja = model_dir / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _check_unique(tokens: list[str], name: str) -> None:
    """llama.cpp refuses a vocabulary with a repeated token text; say so at export time."""
    dupes = [text for text, count in Counter(tokens).items() if count > 1]
    if dupes:
        raise LlmquantError(f"{name}: token text {dupes[0]!r} appears more than once in the vocabulary")
