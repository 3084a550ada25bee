"""llmquant.export.tokenizer against llama.cpp itself.

Each case writes a GGUF holding only llama hyper-parameters plus the tokenizer,
loads it vocab-only in llama.cpp and checks that llama.cpp produces exactly the
token ids the HF tokenizer produces on real English text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from pydoc_data.topics import topics

import gguf
import llama_cpp
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

from llmquant.errors import LlmquantError
from llmquant.export.tokenizer import TokenizerInfo, add_tokenizer

LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PLAIN_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def _corpus() -> str:
    """All of pydoc's topics: plain English with code, digits and whitespace runs."""
    return "\n".join(topics[key] for key in sorted(topics))


def _sample_text() -> str:
    """About 6000 characters with digits, punctuation, indentation and blank lines.

    It starts with a letter: for text that *starts* with a space, HF's Metaspace skips the
    dummy prefix while SentencePiece and llama.cpp add it, a difference no GGUF can express.
    """
    extra = "Totals: 12345, 3.14159 and 1e-9; x  =  42\n\n\n\tindented:    four spaces  é ü — done!\n"
    return topics["integers"] + topics["for"] + topics["formatstrings"][:3000] + extra


def _export(model_dir: Path, out_dir: Path, vocab_size: int) -> tuple[TokenizerInfo, Path]:
    """A tensor-less llama GGUF: hyper-parameters plus our tokenizer keys."""
    path = out_dir / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(2048)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_rope_dimension_count(16)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab_size)
    info = add_tokenizer(writer, model_dir, vocab_size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return info, path


def _load(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _assert_same_ids(llm: llama_cpp.Llama, model_dir: Path) -> None:
    text = _sample_text()
    hf_ids = AutoTokenizer.from_pretrained(model_dir).encode(text, add_special_tokens=False)
    cpp_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    assert len(hf_ids) > 1000
    assert cpp_ids == hf_ids


def _token_types(path: Path) -> list[int]:
    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.token_type")
    assert field is not None
    return [int(field.parts[i][0]) for i in field.data]


def test_smollm2_matches_llama_cpp(smollm2_dir: Path, tmp_path: Path) -> None:
    info, path = _export(smollm2_dir, tmp_path, 49152)
    assert (info.model, info.pre, info.n_tokens) == ("gpt2", "smollm", 49152)
    assert (info.bos_id, info.eos_id, info.add_bos, info.has_chat_template) == (1, 2, False, True)
    llm = _load(path)
    _assert_same_ids(llm, smollm2_dir)
    assert (llm.token_bos(), llm.token_eos(), llm.n_vocab()) == (1, 2, 49152)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
    assert "<|im_start|>" in llm.metadata["tokenizer.chat_template"]
    # special tokens are CONTROL: split out only when special parsing is on
    assert llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)[0] == 1
    assert 1 not in llm.tokenize(b"<|im_start|>user", add_bos=False, special=False)


@pytest.fixture(scope="module")
def spm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A byte-fallback SentencePiece BPE trained on pydoc, saved the HF way, with and without tokenizer.model."""
    root = tmp_path_factory.mktemp("spm")
    lines = [line for line in _corpus().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(root / "sp"), vocab_size=1000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )
    (root / "src").mkdir()
    shutil.copy(root / "sp.model", root / "src" / "tokenizer.model")
    json_only, with_model = root / "json_only", root / "with_model"
    LlamaTokenizer.from_pretrained(root / "src").save_pretrained(json_only)
    (json_only / "config.json").write_text(json.dumps({"vocab_size": 1000, "bos_token_id": 1, "eos_token_id": 2}))
    shutil.copytree(json_only, with_model)
    shutil.copy(root / "sp.model", with_model / "tokenizer.model")
    return {"json_only": json_only, "with_model": with_model}


@pytest.mark.parametrize("variant", ["json_only", "with_model"])
def test_sentencepiece_matches_llama_cpp(spm_dirs: dict[str, Path], variant: str, tmp_path: Path) -> None:
    model_dir = spm_dirs[variant]
    info, path = _export(model_dir, tmp_path, 1000)
    assert (info.model, info.pre, info.n_tokens, info.bos_id, info.eos_id) == ("llama", "default", 1000, 1, 2)
    llm = _load(path)
    _assert_same_ids(llm, model_dir)
    assert llm.metadata["tokenizer.ggml.add_space_prefix"] == "true"
    types = _token_types(path)
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3:259] == [gguf.TokenType.BYTE] * 256


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2-style byte-level BPE (plain ByteLevel pre-tokenizer) trained on pydoc."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = _corpus()
    tok.train_from_iterator((text[i:i + 2000] for i in range(0, len(text), 2000)), trainer)
    out = tmp_path_factory.mktemp("gpt2")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>").save_pretrained(out)
    (out / "config.json").write_text(json.dumps({"vocab_size": 832, "bos_token_id": 0, "eos_token_id": 0}))
    return out


def test_gpt2_bytelevel_matches_llama_cpp_and_pads(gpt2_dir: Path, tmp_path: Path) -> None:
    info, path = _export(gpt2_dir, tmp_path, 832)  # config vocab larger than the tokenizer's 800
    assert (info.model, info.pre, info.n_tokens, info.add_bos) == ("gpt2", "gpt-2", 832, False)
    llm = _load(path)
    _assert_same_ids(llm, gpt2_dir)
    assert llm.n_vocab() == 832
    types = _token_types(path)
    assert types[0] == gguf.TokenType.CONTROL
    assert types[800:] == [gguf.TokenType.UNUSED] * 32
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "false"


def _rewrite_pre(src: Path, dst: Path, pre_tokenizer: dict, ignore_merges: bool = False) -> Path:
    """Copy a tokenizer folder with a different pre-tokenizer / ignore_merges in tokenizer.json."""
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    data["pre_tokenizer"] = pre_tokenizer
    data["model"]["ignore_merges"] = ignore_merges
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return dst


def _split_then_bytes(regex: str) -> dict:
    split = {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}
    return {"type": "Sequence", "pretokenizers": [split, PLAIN_BYTELEVEL]}


@pytest.mark.parametrize(("regex", "ignore_merges", "expected"), [
    (LLAMA3_RE, True, "llama-bpe"),
    (LLAMA3_RE, False, "smaug-bpe"),
    (QWEN2_RE, False, "qwen2"),
])
def test_split_regex_pre_tokenizers_match_llama_cpp(gpt2_dir: Path, tmp_path: Path, regex: str,
                                                    ignore_merges: bool, expected: str) -> None:
    model_dir = _rewrite_pre(gpt2_dir, tmp_path / "tok", _split_then_bytes(regex), ignore_merges)
    info, path = _export(model_dir, tmp_path, 832)
    assert info.pre == expected
    _assert_same_ids(_load(path), model_dir)


@pytest.mark.parametrize("pre_tokenizer", [
    {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": False}, PLAIN_BYTELEVEL]},
    _split_then_bytes(r"\p{L}+|\p{N}+|[^\p{L}\p{N}]+"),
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
])
def test_unknown_pre_tokenizer_raises(gpt2_dir: Path, tmp_path: Path, pre_tokenizer: dict) -> None:
    model_dir = _rewrite_pre(gpt2_dir, tmp_path / "tok", pre_tokenizer)
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(LlmquantError, match="pre-tokenizer") as err:
        add_tokenizer(writer, model_dir, 832)
    assert str(model_dir) in str(err.value) and "\n" not in str(err.value)


def test_missing_tokenizer_raises(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10}))
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(LlmquantError, match=f"no tokenizer in {tmp_path}"):
        add_tokenizer(writer, tmp_path, 10)


def test_unigram_sentencepiece_raises(tmp_path: Path) -> None:
    lines = [line for line in topics["for"].splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=150, model_type="unigram", num_threads=1, minloglevel=2)
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(LlmquantError, match="unigram"):
        add_tokenizer(writer, tmp_path, 150)


def _kv_bytes(writer_class: type[gguf.GGUFWriter], path: Path, add) -> bytes:
    writer = writer_class(str(path), "llama")
    add(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("folder", ["smollm2", "spm_json_only", "spm_with_model", "gpt2"])
def test_array_writer_writes_gguf_s_bytes(folder, smollm2_dir, spm_dirs, gpt2_dir, tmp_path, monkeypatch) -> None:
    """The tokenizer's keys (texts, scores, types, merges), and arrays of every item type, packed
    whole by ArrayWriter are the bytes gguf packs item by item."""
    from llmquant.export.gguf_file import ArrayWriter

    model_dir, vocab = {"smollm2": (smollm2_dir, 49152), "spm_json_only": (spm_dirs["json_only"], 1000),
                        "spm_with_model": (spm_dirs["with_model"], 1000), "gpt2": (gpt2_dir, 832)}[folder]

    def add(writer):
        add_tokenizer(writer, model_dir, vocab)
        writer.add_array("test.floats", [0.5, -1e30, 3.0])
        writer.add_array("test.ints", [gguf.TokenType.NORMAL, 7, -2])
        writer.add_array("test.bools", [True, False])
        writer.add_array("test.bytes", [b"\xff\x00", "é", b""])
        writer.add_array("test.one", ["x"])
        writer.add_array("test.nested", [[1, 2], [3]])

    calls = []
    item_by_item = gguf.GGUFWriter._pack_val
    monkeypatch.setattr(gguf.GGUFWriter, "_pack_val", lambda self, *a, **k: calls.append(1) or item_by_item(self, *a, **k))
    ours = _kv_bytes(ArrayWriter, tmp_path / "ours.gguf", add)
    assert len(calls) < 200  # the vocabulary's arrays did not go item by item
    assert ours == _kv_bytes(gguf.GGUFWriter, tmp_path / "gguf.gguf", add)
    assert len(calls) > vocab
    assert len(ours) > 4 * vocab


@pytest.mark.parametrize("values", [[1, 2.0], [1.0, 2], [1, True], ["a", 1]])
def test_array_writer_refuses_mixed_arrays_as_gguf_does(values, tmp_path) -> None:
    from llmquant.export.gguf_file import ArrayWriter

    for writer_class in (gguf.GGUFWriter, ArrayWriter):
        with pytest.raises(ValueError, match="same type"):
            _kv_bytes(writer_class, tmp_path / "o.gguf", lambda w: w.add_array("test.mixed", values))


def _post_processed(bos: bool, eos: bool) -> Tokenizer:
    """A word-level tokenizer whose template adds <s> first and/or </s> last."""
    from tokenizers import processors

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    tok.add_special_tokens(["<s>", "</s>"])
    single = " ".join([*(["<s>"] if bos else []), "$A", *(["</s>"] if eos else [])])
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    return tok


@pytest.mark.parametrize("bos,eos", [(True, False), (False, True), (True, True), (False, False)])
def test_encode_probe_adds_what_the_whole_tokenizer_adds(bos, eos) -> None:
    from llmquant.export.tokenizer import _encode_probe

    tok = _post_processed(bos, eos)
    probe = _encode_probe(json.loads(tok.to_str()), Path("tokenizer.json"))
    whole = tok.encode("a", add_special_tokens=True).ids
    assert (probe[0] == 1, probe[-1] == 2) == (whole[0] == 1, whole[-1] == 2) == (bos, eos)


def test_encode_probe_on_the_default_model(smollm2_dir) -> None:
    from llmquant.export.tokenizer import _encode_probe

    tj = json.loads((smollm2_dir / "tokenizer.json").read_text())
    whole = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")).encode("a", add_special_tokens=True).ids
    probe = _encode_probe(tj, smollm2_dir / "tokenizer.json")
    specials = {a["id"] for a in tj["added_tokens"]}
    assert [i in specials for i in probe] == [i in specials for i in whole]
    assert len(probe) == len(whole)


@pytest.mark.parametrize("form", ["pairs", "pairs_with_spaces", "strings"])
def test_merges_are_the_ones_gguf_reads(form, smollm2_dir, gpt2_dir, tmp_path) -> None:
    """The merges written from this run's parse of tokenizer.json are gguf's SpecialVocab's own
    reading of the file: pairs joined by a space, a space inside a part as U+0120."""
    from llmquant.export.tokenizer import _merge_strings

    for src in (smollm2_dir, gpt2_dir):
        tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        merges = tj["model"]["merges"]
        pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
        if form == "pairs_with_spaces":
            pairs[1], pairs[-1] = [" " + pairs[1][0], pairs[1][1]], [pairs[-1][0], "a b"]
        tj["model"]["merges"] = [" ".join(p) for p in pairs] if form == "strings" else pairs
        folder = tmp_path / f"{src.name}-{form}"
        folder.mkdir()
        (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
        expected = gguf.SpecialVocab(folder, load_merges=True).merges
        assert len(expected) == len(merges) > 100
        assert _merge_strings(tj["model"]["merges"]) == expected
