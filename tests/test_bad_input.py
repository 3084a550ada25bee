"""Bad input through the real CLI: a one-line error, exit code 2, and nothing left in the output folder.

Each case runs ``python -m llmquant.cli`` as a subprocess against a broken copy of one tiny
random model (built once for the module). A copy links every file of the good model and
replaces only the files its case breaks, so the cases stay cheap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny import build_tiny_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
SAFETENSORS = "model.safetensors"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmquant.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single non-empty stderr line, checked to be a one-line 'error:' with exit code 2."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def tiny(smollm2_dir, tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("bad-input") / "tiny", "llama", smollm2_dir)


def linked_copy(src: Path, dst: Path) -> Path:
    """dst with a symlink to every file of src; mutators replace a link, never write through it."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    return dst


def replace(path: Path, data: bytes | str) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def edit_config(**changes) -> Callable[[Path], None]:
    """A dotted key (rope_parameters.factor) is one inside that object, which is made if missing."""
    def mutate(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        for dotted, value in changes.items():
            parent, dot, key = dotted.rpartition(".")
            holder = cfg.setdefault(parent, {}) if dot else cfg
            if not isinstance(holder, dict):
                holder = cfg[parent] = {}
            if value is None:
                holder.pop(key, None)
            else:
                holder[key] = None if value == "NULL" else value  # "NULL": the key set to JSON null
        replace(d / "config.json", json.dumps(cfg))
    return mutate


def edit_tokenizer(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        tj = json.loads((d / "tokenizer.json").read_text())
        change(tj)
        replace(d / "tokenizer.json", json.dumps(tj))
    return mutate


def remove(*names: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        for name in names:
            (d / name).unlink()
    return mutate


def truncate_weights(d: Path) -> None:
    data = (d / SAFETENSORS).read_bytes()
    replace(d / SAFETENSORS, data[: len(data) // 2])


def garbage_header(d: Path) -> None:
    replace(d / SAFETENSORS, struct.pack("<Q", 32) + b"\x93\x00not json at all, just bytes\xff" + bytes(64))


def non_object_header(d: Path) -> None:
    header = b"[1, 2, 3]"
    replace(d / SAFETENSORS, struct.pack("<Q", len(header)) + header)


def missing_shard(d: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(d / SAFETENSORS), framework="pt") as f:
        names = list(f.keys())
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (d / SAFETENSORS).rename(d / first)
    weight_map = {n: (second if n.startswith("model.layers.1.") else first) for n in names}
    replace(d / "model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))


def only_pytorch_bin(d: Path) -> None:
    (d / SAFETENSORS).unlink()
    replace(d / "pytorch_model.bin", b"placeholder: not a real pickle")


def rewrite_tensor(name: str, change) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / SAFETENSORS)
        tensors[name] = change(tensors[name])
        (d / SAFETENSORS).unlink()
        save_file(tensors, d / SAFETENSORS, metadata={"format": "pt"})
    return mutate


def with_nan(t):
    t = t.clone()
    t[1, 2] = float("nan")
    return t


def with_inf(t):
    t = t.clone()
    t[0, 3] = float("-inf")
    return t


def to_int8(t):
    import torch

    return t.to(torch.int8)


def add_tensor(name: str, like: str | None = None, shape: tuple[int, ...] = (64,)) -> Callable[[Path], None]:
    """The checkpoint gains a tensor (random, or a copy of ``like`` plus noise)."""
    def mutate(d: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / SAFETENSORS)
        tensors[name] = tensors[like] + torch.randn_like(tensors[like]) if like else torch.randn(shape)
        (d / SAFETENSORS).unlink()
        save_file(tensors, d / SAFETENSORS, metadata={"format": "pt"})
    return mutate


def both(*mutators: Callable[[Path], None]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        for m in mutators:
            m(d)
    return mutate


def split_shards(duplicate: str | None = None, weight_map=None) -> Callable[[Path], None]:
    """Two shards and an index; ``duplicate`` is stored in both shards; ``weight_map`` replaces the real one."""
    def mutate(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / SAFETENSORS)
        first = {n: t for n, t in tensors.items() if not n.startswith("model.layers.1.")}
        second = {n: t for n, t in tensors.items() if n.startswith("model.layers.1.")}
        if duplicate:
            second[duplicate] = tensors[duplicate] * 2
        (d / SAFETENSORS).unlink()
        save_file(first, d / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
        save_file(second, d / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
        wm = {n: f"model-0000{1 if n in first else 2}-of-00002.safetensors" for n in tensors}
        replace(d / "model.safetensors.index.json", json.dumps({"weight_map": wm if weight_map is None else weight_map}))
    return mutate


@dataclass(frozen=True)
class Case:
    expect: str  # regex the error line must match: it names the problem
    model: str | None = None  # a literal model argument instead of a broken copy
    mutate: Callable[[Path], None] | None = None
    args: tuple[str, ...] = ()


NAN_TENSOR = "model.layers.1.mlp.down_proj.weight"

CASES = {
    "unknown-hub-id": Case(r"cannot fetch model 'nobody/does-not-exist-xyz' from the Hugging Face hub: .*local cache",
                           model="nobody/does-not-exist-xyz"),
    "missing-local-path": Case(r"model '\./no/such/dir' not found", model="./no/such/dir"),
    "no-config": Case(r"has no config\.json", mutate=remove("config.json")),
    "config-not-json": Case(r"cannot read .*config\.json: ", mutate=lambda d: replace(d / "config.json", "{not json")),
    "config-missing-key": Case(r"config\.json has no hidden_size", mutate=edit_config(hidden_size=None)),
    "unsupported-arch": Case(r"unsupported architecture GPT2LMHeadModel",
                             mutate=edit_config(architectures=["GPT2LMHeadModel"])),
    "truncated-safetensors": Case(r"truncated safetensors file model\.safetensors", mutate=truncate_weights),
    "garbage-safetensors-header": Case(r"corrupt safetensors file model\.safetensors", mutate=garbage_header),
    "garbage-safetensors-file": Case(r"corrupt safetensors file model\.safetensors: header length \d+ exceeds the file",
                                     mutate=lambda d: replace(d / SAFETENSORS, b"\xde\xad\xbe\xef" * 64)),
    "non-object-safetensors-header": Case(r"corrupt safetensors file model\.safetensors: header is not a JSON object",
                                          mutate=non_object_header),
    "missing-shard": Case(r"model\.safetensors\.index\.json names missing shard\(s\): model-00002-of-00002",
                          mutate=missing_shard),
    "only-pytorch-bin": Case(r"no safetensors weights in .*pytorch_model\.bin", mutate=only_pytorch_bin),
    "no-tokenizer": Case(r"no tokenizer in .*tokenizer\.json or tokenizer\.model",
                         mutate=remove("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")),
    "tokenizer-not-json": Case(r"cannot read .*tokenizer\.json: ",
                               mutate=lambda d: replace(d / "tokenizer.json", '{"model": ')),
    "tokenizer-config-not-json": Case(r"cannot read .*tokenizer_config\.json: ",
                                      mutate=lambda d: replace(d / "tokenizer_config.json", '{"bos_token": ')),
    "tokenizer-model-null": Case(r"tokenizer\.json has model=null; expected an object",
                                 mutate=edit_tokenizer(lambda tj: tj.update(model=None))),
    "tokenizer-vocab-absent": Case(r"tokenizer\.json has model\.vocab=null; expected an object mapping token texts to ids",
                                   mutate=edit_tokenizer(lambda tj: tj["model"].pop("vocab"))),
    "tokenizer-vocab-ids-strings": Case(r"tokenizer\.json has model\.vocab=\{.*; expected an object mapping",
                                        mutate=edit_tokenizer(lambda tj: tj["model"].update(vocab={"a": "0"}))),
    "tokenizer-merges-not-a-list": Case(r"tokenizer\.json has model\.merges=7; expected a list",
                                        mutate=edit_tokenizer(lambda tj: tj["model"].update(merges=7))),
    "tokenizer-added-tokens-mistyped": Case(r"tokenizer\.json has added_tokens=\[\{\"id\": \"x\".*; expected a list of objects",
                                            mutate=edit_tokenizer(lambda tj: tj.update(added_tokens=[{"id": "x"}]))),
    "garbage-tokenizer-model": Case(r"cannot read .*tokenizer\.model: ",
                                    mutate=both(remove("tokenizer.json"),
                                                lambda d: replace(d / "tokenizer.model", b"not a sentencepiece model\xff\xff"))),
    "vocab-size-mismatch": Case(r"model\.embed_tokens\.weight has shape \[49152, 64\] but config\.json says vocab_size=50000",
                                mutate=edit_config(vocab_size=50000)),
    "hidden-size-mismatch": Case(r"model\.embed_tokens\.weight has shape \[49152, 64\] .*hidden_size=128",
                                 mutate=edit_config(hidden_size=128)),
    "intermediate-size-mismatch": Case(r"model\.layers\.0\.mlp\.gate_proj\.weight has shape \[192, 64\] "
                                       r"but config\.json implies \[256, 64\]", mutate=edit_config(intermediate_size=256)),
    "head-count-mismatch": Case(r"model\.layers\.0\.self_attn\.q_proj\.weight has shape \[64, 64\] "
                                r"but config\.json implies \[80, 64\]", mutate=edit_config(num_attention_heads=5)),
    "too-few-layers-in-config": Case(r"more layers than num_hidden_layers=1", mutate=edit_config(num_hidden_layers=1)),
    "too-many-layers-in-config": Case(r"tensor model\.layers\.2\.input_layernorm\.weight is missing",
                                      mutate=edit_config(num_hidden_layers=3)),
    "nan-weight": Case(rf"tensor {re.escape(NAN_TENSOR)} holds NaN", mutate=rewrite_tensor(NAN_TENSOR, with_nan)),
    "inf-weight": Case(rf"tensor {re.escape(NAN_TENSOR)} holds NaN or Inf", mutate=rewrite_tensor(NAN_TENSOR, with_inf)),
    "int8-weight": Case(r"tensor model\.layers\.0\.self_attn\.q_proj\.weight in model\.safetensors has dtype I8",
                        mutate=rewrite_tensor("model.layers.0.self_attn.q_proj.weight", to_int8)),
    # silently wrong models: every tensor is written, skipped on purpose, or the run stops naming it
    "unknown-tensor": Case(r"tensor model\.layers\.0\.self_attn\.q_norm\.weight of the checkpoint has no place in "
                           r"llama\.cpp's llama layout; refusing", mutate=add_tensor("model.layers.0.self_attn.q_norm.weight")),
    "qwen2-o-proj-bias": Case(r"tensor model\.layers\.1\.self_attn\.o_proj\.bias of the checkpoint has no place in "
                              r"llama\.cpp's qwen2 layout",
                              mutate=both(edit_config(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
                                          add_tensor("model.layers.1.self_attn.o_proj.bias"))),
    "rms-norm-eps-null": Case(r"config\.json has rms_norm_eps=null; expected a positive number",
                              mutate=edit_config(rms_norm_eps="NULL")),
    "heads-a-string": Case(r"config\.json has num_attention_heads=\"4\"; expected a positive integer",
                           mutate=edit_config(num_attention_heads="4")),
    "architectures-a-string": Case(r"config\.json has architectures=\"LlamaForCausalLM\"; expected a list",
                                   mutate=edit_config(architectures="LlamaForCausalLM")),
    "hidden-act-gelu": Case(r"config\.json has hidden_act='gelu'; llama\.cpp's llama block computes silu only",
                            mutate=edit_config(hidden_act="gelu")),
    "linear-rope-without-factor": Case(r"config\.json has a linear rope_parameters with factor=None; expected a positive",
                                       mutate=edit_config(rope_parameters={"rope_type": "linear", "rope_theta": 1e4})),
    "rope-parameters-a-list": Case(r"config\.json has rope_parameters=\[1, 2\]; expected an object",
                                   mutate=edit_config(rope_parameters=[1, 2])),
    "safetensors-under-another-name": Case(r"has weights\.safetensors but neither model\.safetensors nor "
                                           r"model\.safetensors\.index\.json: transformers would not load it either",
                                           mutate=lambda d: (d / SAFETENSORS).rename(d / "weights.safetensors")),
    "tensor-in-two-shards": Case(r"tensor model\.norm\.weight is in both model-00001-of-00002\.safetensors and "
                                 r"model-00002-of-00002\.safetensors", mutate=split_shards(duplicate="model.norm.weight")),
    "weight-map-not-a-mapping": Case(r"model\.safetensors\.index\.json: weight_map must map tensor names to "
                                     r"\.safetensors files inside the folder", mutate=split_shards(weight_map=["a", "b"])),
    "weight-map-outside-the-folder": Case(r"weight_map must map tensor names to \.safetensors files inside the folder",
                                          mutate=split_shards(weight_map={"x": "../evil.safetensors"})),
    "calib-text-and-dataset": Case(r"pass either --calib-text FILE or --calib-dataset NAME, not both",
                                   args=("--method", "gptq", "--calib-text", "x.txt", "--calib-dataset", "d")),
    "calib-dataset-unavailable": Case(r"cannot load dataset nobody/nothing \(train split\): .*; pass --calib-text FILE$",
                                      args=("--method", "gptq", "--calib-dataset", "nobody/nothing")),
    "unknown-type": Case(r"unknown type 'q3_X'", args=("--type", "q3_X")),
    "unknown-method": Case(r"unknown method 'nosuch'", args=("--method", "nosuch")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_model_input(name, tiny, tmp_path):
    case = CASES[name]
    model = case.model
    if model is None:
        model_dir = linked_copy(tiny, tmp_path / "model")
        if case.mutate:
            case.mutate(model_dir)
        model = str(model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = cli("quantize", model, "--out", str(out_dir / "model.gguf"), *case.args, cwd=tmp_path)
    line = error_line(proc)
    assert re.search(case.expect, line), line
    assert list(out_dir.iterdir()) == []


def _config_cases():
    """Every config key each spec reads: null (where null means nothing), a wrong type, out of range, NaN."""
    from llmquant.export.arch import get_arch, supported_architectures

    for arch in supported_architectures():
        for key, rule in get_arch({"architectures": [arch]}).config_keys.items():
            bad = [] if rule.nullable else [("null", "NULL")]
            bad.append(("wrong-type", 3 if rule.kind in (str, bool, dict, list) else "3"))
            if rule.low is not None:
                bad.append(("out-of-range", rule.low if rule.above else rule.low - 1))
            if rule.kind in (int, float):
                bad.append(("nan", float("nan")))
            for label, value in bad:
                yield pytest.param(arch, key, value, id=f"{arch}-{key}={label}")


@pytest.mark.parametrize(("arch", "key", "value"), list(_config_cases()))
def test_config_value_refused_by_name(arch, key, value, tiny, tmp_path, capsys):
    """In process (the cases above run the real CLI): one line naming the key, exit 2, nothing written."""
    from llmquant.cli import main

    model_dir = linked_copy(tiny, tmp_path / "model")
    edit_config(architectures=[arch], **{key: value})(model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = main(["quantize", str(model_dir), "--out", str(out_dir / "m.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: config.json has {key}="), err
    assert list(out_dir.iterdir()) == []


# --- config features and tensors that are carried over: llama.cpp computes what transformers does --------


def copy_tensor(src: str, dst: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(d / SAFETENSORS)
        tensors[dst] = tensors[src].clone()
        (d / SAFETENSORS).unlink()
        save_file(tensors, d / SAFETENSORS, metadata={"format": "pt"})
    return mutate


def other_safetensors(d: Path) -> None:
    """A second file beside model.safetensors, no index: same names, other values (transformers ignores it)."""
    from safetensors.torch import load_file, save_file

    save_file({n: t * 3 for n, t in load_file(d / SAFETENSORS).items()}, d / "consolidated.safetensors",
              metadata={"format": "pt"})


@dataclass(frozen=True)
class Carried:
    arch: str
    config: dict
    mutate: Callable[[Path], None] | None = None
    tensor: str | None = None  # a GGUF tensor that must be in the file
    context: int | None = None  # the context length the file must declare
    warning: str | None = None  # regex of the one warning line the run prints


CARRIED = {
    "llama-attention-bias": Carried("llama", {"attention_bias": True}, tensor="blk.1.attn_output.bias"),
    "llama-mlp-bias": Carried("llama", {"mlp_bias": True}, tensor="blk.0.ffn_gate.bias"),
    "mistral-sliding-window": Carried("mistral", {"sliding_window": 16}, context=16,
                                      warning=r"sliding_window=16: llama\.cpp has no sliding-window attention .*"
                                              r"declares a context of 16 tokens"),
    "qwen2-sliding-window": Carried("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
                                    context=16, warning=r"sliding_window=16: "),
    "mistral-window-beyond-context": Carried("mistral", {"sliding_window": 4096}, context=512),
    "tied-head-stored-as-well": Carried("llama", {}, mutate=copy_tensor("model.embed_tokens.weight", "lm_head.weight"),
                                        warning=r"not written: lm_head\.weight \(the embedding's values: "
                                                r"tie_word_embeddings ties the head to it\)"),
    "tied-head-with-its-own-values": Carried("llama", {}, mutate=add_tensor("lm_head.weight", like="model.embed_tokens.weight"),
                                             tensor="output.weight"),
    "other-safetensors-without-index": Carried("llama", {}, mutate=other_safetensors,
                                               warning=r"ignoring consolidated\.safetensors in .*: without "
                                                       r"model\.safetensors\.index\.json, transformers reads only "
                                                       r"model\.safetensors"),
}


@pytest.mark.parametrize("name", list(CARRIED))
def test_carried_over_feature_matches_torch(name, smollm2_dir, tmp_path):
    """The f32 file gives transformers' logits in llama.cpp (16 tokens: within any declared window)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from llmquant.generate import load_llama
    from llmquant.inspect_gguf import open_gguf

    case = CARRIED[name]
    model_dir = build_tiny_model(tmp_path / "m", case.arch, smollm2_dir, **case.config)
    if case.mutate:
        case.mutate(model_dir)
    out = tmp_path / "m.gguf"
    proc = cli("quantize", str(model_dir), "--out", str(out), "--type", "f32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings_ = [line for line in proc.stderr.splitlines() if line.strip()]
    if case.warning:
        assert len(warnings_) == 1 and re.match("warning: " + case.warning, warnings_[0]), proc.stderr
    else:
        assert warnings_ == [], proc.stderr
    reader = open_gguf(out)
    if case.tensor:
        assert case.tensor in {t.name for t in reader.tensors}
    if case.context:
        field = reader.fields[f"{reader.fields['general.architecture'].contents()}.context_length"]
        assert field.contents() == case.context
    ids = [1, 504, 3458, 314, 2337, 282, 7493, 30, 4162, 2095, 28, 436, 1115, 253, 1345, 30]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    llm = load_llama(out, n_ctx=64, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()


# --- the output path -------------------------------------------------------------------------------


def _writable(folder: Path) -> bool:
    probe = folder / ".probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder the kernel refuses to create files in, for the user running the tests.

    chmod 0o500 is enough for a normal user. root ignores mode bits, so there we also set
    the immutable attribute (chattr +i, which stops root too); where the filesystem cannot
    do that, /sys (which refuses new files even from root) stands in.
    """
    d = tmp_path / "readonly"
    d.mkdir()
    d.chmod(0o500)
    immutable = False
    if _writable(d) and shutil.which("chattr"):  # root: mode bits do not apply
        immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
    try:
        if not _writable(d):
            yield d
        elif Path("/sys").is_dir() and not _writable(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.fail("cannot make a folder unwritable here (root, no chattr, /sys writable): install e2fsprogs")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        d.chmod(0o700)


def _snapshot(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_output_in_missing_folder(tiny, tmp_path):
    proc = cli("quantize", str(tiny), "--out", str(tmp_path / "missing" / "m.gguf"), cwd=tmp_path)
    assert re.search(r"output folder .*missing does not exist", error_line(proc))
    assert not (tmp_path / "missing").exists()


def test_output_is_a_folder(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    out.mkdir()
    proc = cli("quantize", str(tiny), "--out", str(out), cwd=tmp_path)
    assert re.search(r"output .*m\.gguf is a folder", error_line(proc))
    assert out.is_dir() and list(out.iterdir()) == []
    assert _snapshot(tmp_path) == {"m.gguf"}


@pytest.mark.parametrize("target", ["model.safetensors", "config.json"])
def test_output_equal_to_an_input_file(target, tiny, tmp_path):
    """Also when the model folder only links its files (as the hub cache does)."""
    model_dir = linked_copy(tiny, tmp_path / "model")
    before = (model_dir / target).read_bytes()
    proc = cli("quantize", str(model_dir), "--out", str(model_dir / target), cwd=tmp_path)
    assert re.search(rf"output .*{re.escape(target)} would overwrite a file of the input model", error_line(proc))
    assert (model_dir / target).read_bytes() == before
    assert _snapshot(model_dir) == _snapshot(tiny)


def test_row_length_the_type_cannot_hold_falls_back_to_f16(smollm2_dir, tmp_path):
    """hidden_size 48 is no multiple of q4_0's 32-weight block: those tensors are written f16, with a
    note (llama.cpp's own last fallback), the rest q4_0, and the file runs."""
    from llmquant.generate import generate
    from llmquant.inspect_gguf import open_gguf

    model = build_tiny_model(tmp_path / "w48", "llama", smollm2_dir, hidden=48, layers=2, tied=False)
    out = tmp_path / "w48.gguf"
    proc = cli("quantize", str(model), "--out", str(out), "--type", "q4_0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "note: q4_0 -> f16: row of 48 is not a multiple of 32 (llama.cpp's fallback) (" in proc.stdout, proc.stdout
    types = {t.name: t.tensor_type.name for t in open_gguf(out).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q4_0", types
    assert generate(out, "The capital of France is", max_tokens=4, threads=1)


def test_output_folder_not_writable(tiny, tmp_path, unwritable_dir):
    before = _snapshot(unwritable_dir)
    proc = cli("quantize", str(tiny), "--out", str(unwritable_dir / "m.gguf"), cwd=tmp_path)
    assert re.search(rf"output folder {re.escape(str(unwritable_dir))} is not writable", error_line(proc))
    assert _snapshot(unwritable_dir) == before


# --- every path a run writes (output, report, work folder, cache): one check before any work ----------


def _fifo(p: Path) -> Path:
    os.mkfifo(p)
    return p


def _socket(p: Path) -> Path:
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(p))  # the socket file stays after close
    sock.close()
    return p


def _file(p: Path, text: str = "keep me\n") -> Path:
    p.write_text(text)
    return p


def _kind(p: Path) -> str:
    import stat

    mode = os.stat(p).st_mode
    return next(k for k, test in (("dir", stat.S_ISDIR), ("chr", stat.S_ISCHR), ("fifo", stat.S_ISFIFO),
                                  ("sock", stat.S_ISSOCK), ("file", stat.S_ISREG)) if test(mode))


@dataclass(frozen=True)
class PathCase:
    expect: str  # regex the error line must match
    # (model folder, scratch folder) -> the arguments after `quantize MODEL` (must include --out)
    args: Callable[[Path, Path], list[str]]
    no_model: bool = False  # omit MODEL (the default model, from the cache)
    env: Callable[[Path], dict] | None = None


PATH_CASES = {
    "out-dev-null": PathCase(r"output /dev/null is a character device, not a regular file",
                             lambda m, t: ["--out", "/dev/null"]),
    "out-fifo": PathCase(r"output .*/fifo is a FIFO, not a regular file", lambda m, t: ["--out", str(_fifo(t / "fifo"))]),
    "out-socket": PathCase(r"output .*/sock is a socket, not a regular file",
                           lambda m, t: ["--out", str(_socket(t / "sock"))]),
    "out-link-to-dev-null": PathCase(r"output .*/null-link is a character device",
                                     lambda m, t: ["--out", str(_link(t / "null-link", "/dev/null"))]),
    "out-new-file-in-model-folder": PathCase(r"output .*/model/m\.bin is inside the input model's folder",
                                             lambda m, t: ["--out", str(m / "m.bin")]),
    "out-is-calib-text": PathCase(r"output .*/calib\.txt would overwrite the calibration text \(--calib-text\)",
                                  lambda m, t: ["--out", str(_file(t / "calib.txt")), "--method", "gptq",
                                                "--calib-text", str(t / "calib.txt")]),
    "out-is-imatrix": PathCase(r"output .*/im\.gguf would overwrite the importance matrix \(--imatrix\)",
                               lambda m, t: ["--out", str(_file(t / "im.gguf")), "--imatrix", str(t / "im.gguf")]),
    "card-in-model-folder": PathCase(r"model card \(--card\) .*/model/m\.md is inside the input model's folder",
                                     lambda m, t: ["--out", str(m / "m.gguf"), "--card"]),
    "work-folder-is-a-file": PathCase(r"m\.gguf\.llmquant-work exists and is not a work folder",
                                      lambda m, t: ["--out", str(t / "m.gguf"),
                                                    "--type", "q8_0"] if _file(t / "m.gguf.llmquant-work") else []),
    "report-equal-to-out": PathCase(r"--report .*/m\.gguf is the same file as --out",
                                    lambda m, t: ["--out", str(t / "m.gguf"), "--report", str(t / "m.gguf")]),
    "report-linked-to-out": PathCase(r"--report .*/r\.json is the same file as --out",
                                     lambda m, t: ["--out", str(t / "m.gguf"),
                                                   "--report", str(_link(t / "r.json", t / "m.gguf"))]),
    "report-is-a-model-file": PathCase(r"report .*/model/config\.json would overwrite a file of the input model",
                                       lambda m, t: ["--out", str(t / "m.gguf"), "--report", str(m / "config.json")]),
    "report-new-in-model-folder": PathCase(r"report .*/model/r\.json is inside the input model's folder",
                                           lambda m, t: ["--out", str(t / "m.gguf"), "--report", str(m / "r.json")]),
    "report-is-calib-text": PathCase(r"report .*/calib\.txt would overwrite the calibration text",
                                     lambda m, t: ["--out", str(t / "m.gguf"), "--method", "gptq",
                                                   "--calib-text", str(_file(t / "calib.txt")),
                                                   "--report", str(t / "calib.txt")]),
    "report-in-missing-folder": PathCase(r"report folder .*/missing does not exist",
                                         lambda m, t: ["--out", str(t / "m.gguf"), "--report", str(t / "missing/r.json")]),
    "report-is-a-folder": PathCase(r"report .*/r\.json is a folder; give a file name such as report\.json",
                                   lambda m, t: ["--out", str(t / "m.gguf"), "--report", str(_mkdir(t / "r.json"))]),
    "report-dev-null": PathCase(r"report /dev/null is a character device, not a regular file",
                                lambda m, t: ["--out", str(t / "m.gguf"), "--report", "/dev/null"]),
    "report-fifo": PathCase(r"report .*/fifo is a FIFO", lambda m, t: ["--out", str(t / "m.gguf"),
                                                                      "--report", str(_fifo(t / "fifo"))]),
    "report-in-work-folder": PathCase(r"--report .* is inside the work folder .*m\.gguf\.llmquant-work",
                                      lambda m, t: ["--out", str(t / "m.gguf"),
                                                    "--report", str(t / "m.gguf.llmquant-work" / "r.json")]),
    "cache-is-a-file": PathCase(r"cache folder \(\$LLMQUANT_CACHE\) .*/cache-file/SmolLM2-135M-Instruct cannot be "
                                r"created: .*/cache-file is not a folder",
                                lambda m, t: ["--out", str(t / "m.gguf")], no_model=True,
                                env=lambda t: {"LLMQUANT_CACHE": str(_file(t / "cache-file"))}),
}


def _link(p: Path, target) -> Path:
    p.symlink_to(target)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _state(folder: Path) -> dict[str, tuple[str, bytes | None]]:
    """Every entry of a folder (links not followed into) with its kind and, for files, its bytes."""
    out = {}
    for p in sorted(folder.rglob("*")):
        kind = "link" if p.is_symlink() else _kind(p)
        out[str(p.relative_to(folder))] = (kind, p.read_bytes() if kind == "file" else None)
    return out


@pytest.mark.parametrize("name", list(PATH_CASES))
def test_unsafe_write_path(name, tiny, tmp_path):
    """Refused before any work: nothing in the scratch folder or the model folder changes, devices stay devices."""
    case = PATH_CASES[name]
    model_dir = linked_copy(tiny, tmp_path / "model")
    scratch = tmp_path / "t"
    scratch.mkdir()
    extra = case.env(scratch) if case.env else {}
    args = case.args(model_dir, scratch)
    before = _state(scratch), _state(model_dir)
    cmd = ["quantize", *([] if case.no_model else [str(model_dir)]), *args]
    proc = subprocess.run([sys.executable, "-m", "llmquant.cli", *cmd], cwd=tmp_path, env={**ENV, **extra},
                          capture_output=True, text=True, timeout=300)
    line = error_line(proc)
    assert re.search(case.expect, line), line
    assert (_state(scratch), _state(model_dir)) == before
    assert _kind(Path("/dev/null")) == "chr"


def test_report_is_written_whole(tiny, tmp_path):
    """The JSON report lands at its path (replacing an older one), and no temporary file stays beside it."""
    report = _file(tmp_path / "r.json", "old")
    proc = cli("quantize", str(tiny), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0", "--report", str(report),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["out"] == str(tmp_path / "m.gguf") and data["checksum"].startswith("sha256:")
    assert _snapshot(tmp_path) == {"m.gguf", "r.json"}


# --- options: checked once in the API, so the CLI and llmquant.quantize agree ----------------------


@dataclass(frozen=True)
class OptionCase:
    expect: str  # regex for the message from its start (after "error: ")
    args: tuple[str, ...]  # the CLI arguments after MODEL --out FILE; () where only the API can say it
    api: dict | None = None  # the same mistake through llmquant.quantize; None: argparse stops it first


def _calib(**kw):
    from llmquant.calibration import CalibrationConfig

    return CalibrationConfig(**kw)


HELP = r"; see 'llmquant quantize --help'$"
OPTION_CASES = {
    "threads-negative": OptionCase(r"--threads must be between 1 and 1024, got -1$", ("--threads", "-1"), {"threads": -1}),
    "threads-zero": OptionCase(r"--threads must be between 1 and 1024, got 0$", ("--threads", "0"), {"threads": 0}),
    "threads-huge": OptionCase(r"--threads must be between 1 and 1024, got 100000$", ("--threads", "100000"),
                               {"threads": 100000}),
    "calib-samples-zero": OptionCase(r"--calib-samples must be at least 1, got 0$",
                                     ("--method", "gptq", "--calib-samples", "0"),
                                     {"method": "gptq", "calibration": _calib(samples=0)}),
    "calib-samples-negative": OptionCase(r"--calib-samples must be at least 1, got -3$",
                                         ("--method", "awq", "--calib-samples", "-3"),
                                         {"method": "awq", "calibration": _calib(samples=-3)}),
    "calib-seqlen-zero": OptionCase(r"--calib-seqlen must be at least 1, got 0$",
                                    ("--method", "gptq", "--calib-seqlen", "0"),
                                    {"method": "gptq", "calibration": _calib(seqlen=0)}),
    "seed-negative": OptionCase(r"--seed must be between 0 and 18446744073709551615, got -1$",
                                ("--method", "gptq", "--seed", "-1"), {"method": "gptq", "calibration": _calib(seed=-1)}),
    "damp-negative": OptionCase(r"--damp must be at least 0, got -1\.0$", ("--method", "gptq", "--damp", "-1"),
                                {"method": "gptq", "method_options": {"damp": -1.0}}),
    "damp-nan": OptionCase(r"--damp must be a finite number, got nan$", ("--method", "awq+gptq", "--damp", "nan"),
                           {"method": "awq+gptq", "method_options": {"damp": float("nan")}}),
    "damp-not-a-number": OptionCase(r"--damp must be a number, got 'x'$", (), {"method": "gptq", "method_options": {"damp": "x"}}),
    "awq-grid-zero": OptionCase(r"--awq-grid must be between 1 and 1000, got 0$", ("--method", "awq", "--awq-grid", "0"),
                                {"method": "awq", "method_options": {"n_grid": 0}}),
    "awq-grid-float": OptionCase(r"--awq-grid must be an integer, got 2\.5$", (),
                                 {"method": "awq", "method_options": {"n_grid": 2.5}}),
    "act-order-not-bool": OptionCase(r"--act-order is a switch \(True or False\), got 'yes'$", (),
                                     {"method": "gptq", "method_options": {"act_order": "yes"}}),
    "damp-with-rtn": OptionCase(r"--damp does not apply to --method rtn \(it takes no options\)$", ("--damp", "0.1"),
                                {"method_options": {"damp": 0.1}}),
    "awq-grid-with-gptq": OptionCase(r"--awq-grid does not apply to --method gptq \(it takes --damp, --act-order, "
                                     r"--no-scale-search, --gptq-target\)$", ("--method", "gptq", "--awq-grid", "4"),
                                     {"method": "gptq", "method_options": {"n_grid": 4}}),
    "gptq-options-with-awq": OptionCase(r"--damp, --act-order do not apply to --method awq \(it takes --awq-grid\)$",
                                        ("--method", "AWQ", "--damp", "0.1", "--act-order"),
                                        {"method": "AWQ", "method_options": {"damp": 0.1, "act_order": True}}),
    "no-scale-search-with-rtn": OptionCase(r"--no-scale-search does not apply to --method rtn", ("--no-scale-search",),
                                           {"method_options": {"scale_search": False}}),
    "unknown-method-option": OptionCase(r"dampp does not apply to --method gptq", (),
                                        {"method": "gptq", "method_options": {"dampp": 1}}),
    "calibration-with-rtn": OptionCase(r"--calib-samples, --seed do not apply to --method rtn \(it uses no calibration\)$",
                                       ("--calib-samples", "4", "--seed", "2"),
                                       {"calibration": _calib(samples=4, seed=2)}),
    "calib-text-with-rtn": OptionCase(r"--calib-text does not apply to --method rtn", ("--calib-text", "notes.txt"),
                                      {"calibration": _calib(text_file=Path("notes.txt"))}),
    "calib-source-unknown": OptionCase(r"--calib-source: unknown source 'web' in 'web:0\.5,builtin'; use builtin, "
                                       r"file:ARG, dataset:ARG, generated, chat, each with an optional :WEIGHT$",
                                       ("--method", "gptq", "--calib-source", "web:0.5,builtin"),
                                       {"method": "gptq", "calibration": _calib(source="web:0.5,builtin")}),
    "calib-source-zero-weight": OptionCase(r"--calib-source: the weight of generated must be a positive number, got 0\.0$",
                                           ("--method", "gptq", "--calib-source", "generated:0,builtin"),
                                           {"method": "gptq", "calibration": _calib(source="generated:0,builtin")}),
    "calib-source-file-no-path": OptionCase(r"--calib-source: file needs its path, as file:PATH$",
                                            ("--method", "gptq", "--calib-source", "file"),
                                            {"method": "gptq", "calibration": _calib(source="file")}),
    "calib-source-twice": OptionCase(r"--calib-source names builtin twice; give it one weight$",
                                     ("--method", "gptq", "--calib-source", "builtin:1,builtin:2"),
                                     {"method": "gptq", "calibration": _calib(source="builtin:1,builtin:2")}),
    "calib-source-and-text": OptionCase(r"pass either --calib-text or --calib-source, not both$",
                                        ("--method", "gptq", "--calib-source", "generated", "--calib-text", "notes.txt"),
                                        {"method": "gptq", "calibration": _calib(source="generated",
                                                                                 text_file=Path("notes.txt"))}),
    "calib-source-with-rtn": OptionCase(r"--calib-source does not apply to --method rtn", ("--calib-source", "generated"),
                                        {"calibration": _calib(source="generated")}),
    "threads-not-an-integer": OptionCase(r"argument --threads: invalid int value: 'x'" + HELP, ("--threads", "x")),
    "awq-grid-nan": OptionCase(r"argument --awq-grid: invalid int value: 'nan'" + HELP, ("--awq-grid", "nan")),
    "unknown-flag": OptionCase(r"unrecognized arguments: --dampp 1" + HELP, ("--dampp", "1")),
    "device-unknown": OptionCase(r"--device must be one of auto, cpu, cuda, got 'tpu'$", (), {"device": "tpu"}),
    "device-unknown-flag": OptionCase(r"argument --device: invalid choice: 'tpu'", ("--device", "tpu")),
    "imatrix-missing": OptionCase(r"cannot read the imatrix missing\.gguf: No such file or directory$",
                                  ("--imatrix", "missing.gguf"), {"imatrix": "missing.gguf"}),
    "imatrix-with-gptq": OptionCase(r"--imatrix weights rtn's searches; gptq weights its own by its calibration",
                                    ("--method", "gptq", "--imatrix", "missing.gguf"),
                                    {"method": "gptq", "imatrix": "missing.gguf"}),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_bad_option(name, tiny, tmp_path):
    """The real CLI gives one line; llmquant.quantize raises the very same message."""
    from llmquant import quantize
    from llmquant.errors import LlmquantError

    case = OPTION_CASES[name]
    out = tmp_path / "m.gguf"
    line = None
    if case.args:
        line = error_line(cli("quantize", str(tiny), "--out", str(out), *case.args, cwd=tmp_path))
        assert re.match("error: " + case.expect, line), line
    if case.api is not None:
        with pytest.raises(LlmquantError) as err:
            quantize(tiny, out, progress=False, **case.api)
        assert re.match(case.expect, str(err.value)), str(err.value)
        assert line is None or line == f"error: {err.value}"
    assert list(tmp_path.iterdir()) == []


def _numeric_flags() -> list[tuple[str, type]]:
    """Every int/float option of `llmquant quantize`, read from the parser itself."""
    from llmquant.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["quantize"]
    return [(a.option_strings[0], a.type) for a in sub._actions if a.option_strings and a.type in (int, float)]


def _generated_option_cases():
    """Each numeric option at 0, negative, huge and NaN, where that value is out of its range."""
    from llmquant.options import BOUNDS

    bounds = {b.flag: b for b in BOUNDS.values()}
    for opt, _ in _numeric_flags():
        b = bounds[opt]  # KeyError: a numeric option without a declared range
        method = "rtn" if opt == "--threads" else "awq" if opt == "--awq-grid" else \
            "tune" if opt.startswith("--tune-") else "gptq"
        values = ["-1", "nan", "inf"] + ([] if b.low is not None and b.low <= 0 else ["0"])
        values += ["1" + "0" * 30] if b.high is not None else []
        for v in values:
            yield pytest.param(opt, v, method, id=f"{opt[2:]}={v}")


@pytest.mark.parametrize(("opt", "value", "method"), list(_generated_option_cases()))
def test_numeric_option_out_of_range(opt, value, method, tiny, tmp_path, capsys):
    """In process (the subprocess cases above prove the wiring): one line naming the option, exit 2."""
    from llmquant.cli import main

    try:
        rc = main(["quantize", str(tiny), "--out", str(tmp_path / "m.gguf"), "--method", method, opt, value])
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and opt in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("method", "value", "expect"), [
    ("awq+gptq+tune", "everything", "error: --tune-target must be one of layer, model, got 'everything'"),
    ("gptq", "model", "error: --tune-target does not apply to --method gptq"),
    ("tune", "kld", "error: --tune-loss must be one of normed, hidden, got 'kld'"),
    ("awq", "normed", "error: --tune-loss does not apply to --method awq"),
    ("gptq", "everything", "error: --gptq-target must be one of layer, model, stream, got 'everything'"),
    ("awq", "model", "error: --gptq-target does not apply to --method awq"),
    ("awq+gptq", "hessian", "error: --awq-alpha-by must be one of gptq, rtn, got 'hessian'"),
    ("awq", "gptq", "error: --awq-alpha-by does not apply to --method awq"),
])
def test_word_option_outside_its_choices(method, value, expect, tiny, tmp_path, capsys):
    from llmquant.cli import main

    flag = expect.split()[1]
    rc = main(["quantize", str(tiny), "--out", str(tmp_path / "m.gguf"), "--method", method, flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(expect), err
    assert list(tmp_path.iterdir()) == []


def test_method_in_any_case(tiny, tmp_path):
    """--method RTN is --method rtn, as --type Q8_0 is q8_0."""
    proc = cli("quantize", str(tiny), "--out", str(tmp_path / "m.gguf"), "--method", "RTN", "--type", "Q8_0",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "method  rtn   type q8_0" in proc.stdout, proc.stdout


def test_every_argument_has_help():
    from llmquant.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, p in sub.choices.items()
               for a in p._actions if not a.help]
    assert missing == []


def test_top_level_help_describes_the_tool(tmp_path):
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "Quantize a Hugging Face causal language model into a GGUF file" in proc.stdout, proc.stdout
    assert "exit code" not in proc.stdout and "quantize" in proc.stdout and "perplexity" in proc.stdout


# --- Ctrl-C -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sig", "rc", "word", "wait_for"), [
    (signal.SIGINT, 130, "interrupted", "partial.gguf"),  # Ctrl-C, as soon as the run writes
    (signal.SIGTERM, 143, "terminated", "state.json"),  # docker stop, systemd, Slurm: after a finished layer
], ids=["ctrl-c", "sigterm"])
def test_stop_signal_leaves_nothing_behind(sig, rc, word, wait_for, smollm2_dir, tmp_path):
    """Nothing at the target path; the finished layers stay in the work folder, with how to resume."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    work = out_dir / "m.gguf.llmquant-work"
    args = [sys.executable, "-m", "llmquant.cli", "quantize", str(smollm2_dir), "--out", str(out_dir / "m.gguf"),
            "--type", "q8_0"]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background job (`cmd &`) runs with SIGINT ignored, which its children inherit
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not (work / wait_for).exists():
            assert proc.poll() is None, f"finished before {wait_for} was seen: {proc.communicate()}"
            assert time.monotonic() < deadline, f"no {wait_for} appeared"
            time.sleep(0.02)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == rc, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{word}; no output file was written"), stderr
    assert [p.name for p in out_dir.iterdir()] in ([], [work.name])
    if work.exists():  # interrupted after a layer boundary: resumable, and the message says how
        assert "--resume" in lines[0] and (work / "state.json").is_file(), stderr
    if sig == signal.SIGTERM:  # stopped after a layer: always resumable, and the resumed run completes
        assert work.exists(), stderr
        done = subprocess.run([*args, "--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "resumed after layer" in done.stdout and _snapshot(out_dir) == {"m.gguf"}, done.stdout


def test_stdout_closed_early_ends_quietly(tiny_gguf, tmp_path):
    """`llmquant inspect f.gguf | head` once head has exited: no BrokenPipeError, exit 141 as for SIGPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "llmquant.cli", "inspect", str(tiny_gguf)], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first write
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert stderr == ""


def test_piped_into_head(tiny_gguf, tmp_path):
    """A real pipeline: the first line arrives and nothing is printed on stderr, whatever the timing."""
    cmd = f"{sys.executable} -m llmquant.cli inspect {tiny_gguf} | head -n 1"
    proc = subprocess.run(["sh", "-c", cmd], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(str(tiny_gguf)) and proc.stderr == "", proc


# --- a damaged work folder: one line, and the folder is kept for the user to look at ------------------------


@pytest.fixture(scope="module")
def interrupted(smollm2_dir, tmp_path_factory) -> Path:
    """The work folder of a real run stopped by SIGTERM after its first layers."""
    d = tmp_path_factory.mktemp("interrupted")
    work = d / "m.gguf.llmquant-work"
    proc = subprocess.Popen([sys.executable, "-m", "llmquant.cli", "quantize", str(smollm2_dir), "--out",
                             str(d / "m.gguf"), "--type", "q8_0"], cwd=d, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (work / "state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.terminate()
    assert proc.wait(timeout=120) == 143
    return work


def _drop(name: str) -> Callable[[Path], None]:
    return lambda w: (w / name).unlink()


def _state_without(key: str) -> Callable[[Path], None]:
    def mutate(w: Path) -> None:
        state = json.loads((w / "state.json").read_text())
        del state[key]
        replace(w / "state.json", json.dumps(state))
    return mutate


def _cut_partial(w: Path) -> None:
    with open(w / "partial.gguf", "r+b") as fh:
        fh.truncate(100)


DAMAGED = {
    "fingerprint-missing": (_drop("fingerprint.json"), r"\(fingerprint\.json is missing\)"),
    "fingerprint-not-json": (lambda w: replace(w / "fingerprint.json", "{"), r"\(fingerprint\.json: Expecting"),
    "state-not-json": (lambda w: replace(w / "state.json", "[1, 2"), r"\(state\.json: Expecting"),
    "state-not-an-object": (lambda w: replace(w / "state.json", "[]"), r"\(state\.json is not a JSON object\)"),
    "state-without-offset": (_state_without("offset"), r"\(state\.json lacks valid offset\)"),
    "state-without-reports": (_state_without("reports"), r"\(state\.json lacks valid reports or hidden\)"),
    "partial-missing": (_drop("partial.gguf"), r"\(partial\.gguf is missing or shorter than the \d+ bytes state\.json"),
    "partial-truncated": (_cut_partial, r"\(partial\.gguf is missing or shorter than"),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_work_folder(name, interrupted, smollm2_dir, tmp_path):
    mutate, expect = DAMAGED[name]
    work = tmp_path / interrupted.name
    shutil.copytree(interrupted, work)
    mutate(work)
    before = _state(work)
    proc = cli("quantize", str(smollm2_dir), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0", "--resume",
               cwd=tmp_path)
    line = error_line(proc)
    assert re.search(rf"the work folder .*m\.gguf\.llmquant-work is damaged {expect}.*; delete it to start over$",
                     line), line
    assert _state(work) == before and _snapshot(tmp_path) == {work.name}


# --- llmquant inspect -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    from llmquant import quantize

    out = tmp_path_factory.mktemp("bad-inspect") / "tiny-f32.gguf"
    quantize(tiny, out, type="f32", progress=False)
    return out


def test_inspect_missing_file(tmp_path):
    proc = cli("inspect", str(tmp_path / "nothing.gguf"), cwd=tmp_path)
    assert re.search(r"no such file: .*nothing\.gguf", error_line(proc))


def test_inspect_not_gguf(tiny, tmp_path):
    proc = cli("inspect", str(tiny / "config.json"), cwd=tmp_path)
    assert re.search(r"config\.json is not a GGUF file", error_line(proc))


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_inspect_truncated_gguf(keep, tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    proc = cli("inspect", str(cut), cwd=tmp_path)
    assert re.search(r"cut\.gguf is (truncated|a damaged or truncated GGUF file)", error_line(proc))


def test_inspect_good_file_still_works(tiny_gguf, tmp_path):
    proc = cli("inspect", str(tiny_gguf), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "token_embd.weight" in proc.stdout


@pytest.mark.parametrize("json_flag", [(), ("--json",)], ids=["table", "json"])
def test_perplexity_of_non_finite_logits_is_an_error(json_flag, tiny_gguf, tmp_path):
    """A file whose logits are NaN gives one error line and exit 2, never a NaN perplexity (nor NaN in JSON)."""
    import gguf
    import numpy as np

    broken = tmp_path / "nan.gguf"
    shutil.copy(tiny_gguf, broken)
    reader = gguf.GGUFReader(broken, "r+")
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    norm.data[:] = np.nan
    reader.data.flush()
    del reader, norm
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and then it runs far away. " * 20)
    proc = cli("perplexity", str(broken), "--text", str(text), "--ctx", "16", "--windows", "1", "--threads", "1",
               "--no-progress", *json_flag, cwd=tmp_path)
    assert re.search(r"nan\.gguf gives logits that are not finite \(NaN or Inf\) in window 1", error_line(proc))
    assert proc.stdout == ""


GENERATE_CASES = {
    "empty-prompt": (("",), r"the prompt is empty; give the text to complete"),
    "blank-prompt": (("   ",), r"the prompt is empty"),
    "prompt-longer-than-ctx": (("word " * 40, "--ctx", "16"),
                               r"the prompt \(\d+ tokens\) does not fit the context of 16 tokens; give a larger --ctx"),
    "chat-template-overflows-ctx": (("word " * 10, "--ctx", "16", "--chat"),
                                    r"llama\.cpp cannot run the prompt \(\d+ tokens before the chat template\) in a "
                                    r"context of 16 tokens: .*; give a larger --ctx$"),
    "max-tokens-zero": (("Hello", "--max-tokens", "0"), r"--max-tokens must be at least 1, got 0"),
    "threads-huge": (("Hello", "--threads", "100000"), r"--threads must be between 1 and 1024, got 100000"),
    "ctx-zero": (("Hello", "--ctx", "0"), r"--ctx must be between 1 and 1048576, got 0"),
}


@pytest.mark.parametrize("name", list(GENERATE_CASES))
def test_bad_generate_input(name, tiny_gguf, tmp_path):
    args, expect = GENERATE_CASES[name]
    proc = cli("generate", str(tiny_gguf), *args, cwd=tmp_path)
    assert re.match("error: " + expect, error_line(proc)), proc.stderr
    assert proc.stdout == ""


# --- disk full ----------------------------------------------------------------------------------------


def run_on_small_disk(size: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The CLI writing into a fresh tmpfs of ``size``; its stderr and what the tmpfs holds afterwards.

    The tmpfs is mounted in a private mount namespace (unshare, as any user where user namespaces are
    enabled), so nothing outlives the command.
    """
    if not shutil.which("unshare"):
        pytest.fail("unshare (util-linux) is needed to make a small disk for the disk-full test")
    disk = cwd / "disk"
    disk.mkdir()
    script = (f'mount -t tmpfs -o size={size} tmpfs "$1" || exit 99; shift; "$@" 2>"$OLDPWD/stderr"; rc=$?; '
              'ls -A "$DISK" > "$OLDPWD/listing"; exit $rc')
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", str(disk), sys.executable, "-m",
                           "llmquant.cli", "quantize", *args, "--out", str(disk / "m.gguf")],
                          cwd=cwd, env={**ENV, "DISK": str(disk), "OLDPWD": str(cwd)}, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 99:
        pytest.fail(f"cannot mount a tmpfs in a user namespace here: {proc.stderr.strip()}")
    proc.stderr = (cwd / "stderr").read_text()
    return proc, (cwd / "listing").read_text().split()


def test_disk_full_before_any_layer(tiny, tmp_path):
    proc, left = run_on_small_disk("1m", str(tiny), "--type", "q8_0", cwd=tmp_path)
    assert re.search(r"no space left on the device while writing .*m\.gguf$", error_line(proc))
    assert left == []


def test_disk_full_after_some_layers_keeps_them(smollm2_dir, tmp_path):
    """Embedding and layers fit, the q8_0 head does not: the finished layers stay, and the error says
    how to continue once there is space."""
    model = build_tiny_model(tmp_path / "untied", "llama", smollm2_dir, tied=False)
    proc, left = run_on_small_disk("5m", str(model), "--type", "q4_0", cwd=tmp_path)
    line = error_line(proc)
    assert re.search(r"no space left on the device while writing .*m\.gguf; the finished layers are kept in "
                     r".*m\.gguf\.llmquant-work: run again with --resume", line), line
    assert left == ["m.gguf.llmquant-work"]


# --- property: random options and config mutations never give a traceback, another exit code, or stray files --


def _cli_runs():
    from hypothesis import strategies as st

    from llmquant.export.arch import get_arch

    keys = sorted(get_arch({"architectures": ["LlamaForCausalLM"]}).config_keys)
    option = st.sampled_from([
        ("--threads", "-1"), ("--threads", "0"), ("--threads", "1"), ("--threads", "100000"), ("--threads", "x"),
        ("--calib-samples", "-3"), ("--calib-samples", "0"), ("--calib-seqlen", "0"), ("--calib-seqlen", "nan"),
        ("--damp", "-1"), ("--damp", "nan"), ("--damp", "inf"), ("--damp", "0.05"), ("--awq-grid", "0"),
        ("--awq-grid", "3"), ("--seed", "-1"), ("--seed", "5"), ("--act-order",), ("--no-scale-search",),
        ("--pure",), ("--report", "r.json"), ("--report", "m.gguf"), ("--resume",), ("--bogus",),
    ])
    config = st.one_of(st.none(), st.tuples(st.sampled_from(keys), st.sampled_from(["NULL", "3", -1, 0, 2.5, [1]])))
    return st.tuples(st.sampled_from(["rtn", "RTN", "gptq", "awq", "awq+gptq", "nosuch"]),
                     st.sampled_from(["q8_0", "Q4_K_M", "f32", "q3_X"]), st.lists(option, max_size=4), config)


def test_cli_never_tracebacks_on_random_input(tiny, tmp_path_factory, capsys):
    """Valid and invalid options, and a mutated config, in any mix: exit 0 with only the output (and report)
    written, or exit 2 with one `error:` line and nothing written. Calibrated runs get a tiny calibration."""
    from hypothesis import HealthCheck, given, settings

    from llmquant.cli import main

    @settings(max_examples=40, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(_cli_runs())
    def run(case):
        method, qtype, options, config = case
        d = tmp_path_factory.mktemp("fuzz")
        model_dir = linked_copy(tiny, d / "model")
        if config is not None:
            edit_config(**{config[0]: config[1]})(model_dir)
        out_dir = d / "out"
        out_dir.mkdir()
        calib = ["--calib-samples", "2", "--calib-seqlen", "32"] if method.lower() != "rtn" else []
        args = [a if a not in ("r.json", "m.gguf") else str(out_dir / a) for o in options for a in o]
        argv = ["quantize", str(model_dir), "--out", str(out_dir / "m.gguf"), "--type", qtype, "--method", method,
                "--quiet", *calib, *args]
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
        if rc == 0:
            assert errors == [], err
            assert _snapshot(out_dir) <= {"m.gguf", "r.json"} and "m.gguf" in _snapshot(out_dir), argv
        else:
            assert rc == 2, (argv, err)
            assert len(errors) == 1 and errors[0].startswith("error: "), (argv, err)
            assert _snapshot(out_dir) == set(), (argv, _snapshot(out_dir))
        assert _snapshot(model_dir) == _snapshot(tiny)

    run()


@pytest.mark.parametrize(("repo", "fetched"), [
    ({"model.safetensors", "consolidated.safetensors"}, {"model.safetensors"}),
    ({"model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "consolidated.safetensors"}, {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}),
], ids=["single-file", "sharded"])
def test_hub_download_fetches_only_the_weights_transformers_loads(repo, fetched, tmp_path, monkeypatch):
    """A stand-in for the hub: snapshot_download copies the files its patterns match; consolidated.* never is."""
    import fnmatch

    import huggingface_hub

    from llmquant.loading.source import resolve_model

    files = {"config.json": "{}", "tokenizer.json": "{}", **dict.fromkeys(repo, "")}
    if "model.safetensors.index.json" in repo:
        files["model.safetensors.index.json"] = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                           "b": "model-00002-of-00002.safetensors"}})
    local = tmp_path / "snapshot"
    local.mkdir()

    def fake_snapshot(repo_id, allow_patterns):
        for name, text in files.items():
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (local / name).write_text(text)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert resolve_model("org/name") == local
    assert {p.name for p in local.glob("*.safetensors")} == fetched
