"""Random LlamaForCausalLM checkpoints of any size, written without holding the model in memory.

    python scripts/synthetic_model.py OUT --hidden 1024 --layers 8 [--intermediate N] [--heads N]
                                      [--kv-heads N] [--dtype float16] [--shard-mib 1024] [--seed 0]

Memory benchmarks need models larger than the memory limit they test, so the
builder itself must not need that memory: every shard's safetensors header is
written first (all shapes are known up front), then each tensor is generated
in row chunks of at most ~64 MiB of float32 and appended. Weights are
N(0, 0.02) from a seeded numpy generator, norms are ones; the tokenizer is the
default model's, so the checkpoint quantizes and runs like a real one (it only
says nothing about quality). The folder is built under a temporary name and
renamed when complete, so an existing folder is always a whole checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
DTYPES = {"float16": ("F16", 2), "bfloat16": ("BF16", 2), "float32": ("F32", 4)}
CHUNK_BYTES = 64 * 2**20  # float32 bytes generated at once
INFO_FILE = "synthetic.json"  # the builder's arguments, so callers can tell whether a folder matches


def default_intermediate(hidden: int) -> int:
    """Llama's FFN rule: 8/3 of hidden, rounded up to a multiple of 256 (4096 -> 11008)."""
    return 256 * -(-int(hidden * 8 / 3) // 256)


def llama_shapes(hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
                 vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of an untied llama checkpoint, HF names, in file order."""
    head_dim, kv = hidden // heads, (hidden // heads) * kv_heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
                   (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)),
                   (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
                   (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate))]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def tokenizer_vocab(tokenizer_dir: Path) -> int:
    """Token count including added tokens: the embedding must have a row for every id."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def _encode(x: np.ndarray, dtype: str) -> memoryview:
    """float32 -> the on-disk dtype's bytes; bf16 by round-to-nearest-even on the top 16 bits."""
    if dtype == "bfloat16":
        u = x.view(np.uint32)
        return memoryview(((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2"))
    return memoryview(x.astype("<f2" if dtype == "float16" else "<f4", copy=False))


def _write_tensor(fh, shape: tuple[int, ...], dtype: str, rng: np.random.Generator, norm: bool) -> None:
    """Append one tensor, generated in row chunks so memory stays at CHUNK_BYTES whatever its size."""
    if norm:
        fh.write(_encode(np.ones(shape, np.float32), dtype))
        return
    rows, cols = shape
    step = max(1, CHUNK_BYTES // (4 * cols))
    for r in range(0, rows, step):
        x = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
        x *= 0.02
        fh.write(_encode(x, dtype))


def _shards(shapes: list[tuple[str, tuple[int, ...]]], itemsize: int, limit: int) -> list[list]:
    """Tensors packed in order into shards of at most ``limit`` bytes (a bigger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, n))
        size += n
    return shards


def build_synthetic_llama(out: Path, *, hidden: int, layers: int, intermediate: int | None = None,
                          heads: int | None = None, kv_heads: int | None = None, dtype: str = "float16",
                          shard_mib: int = 1024, tokenizer_dir: Path | None = None, seed: int = 0,
                          vocab: int | None = None) -> Path:
    """Write a random untied LlamaForCausalLM checkpoint to ``out`` and return ``out``.

    heads defaults to hidden // 64, kv_heads to heads (fewer gives GQA), intermediate to
    default_intermediate(hidden); the tokenizer is copied from ``tokenizer_dir`` (default:
    llmquant's default model) and vocab_size follows it, or is ``vocab`` (at least the tokenizer's
    count: the rows past it are padding ids, as real checkpoints round vocab_size up, and
    the GGUF lists them as unused [PAD] tokens). Peak memory is ~CHUNK_BYTES.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
    heads = heads or max(1, hidden // 64)
    kv_heads = kv_heads or heads
    intermediate = intermediate or default_intermediate(hidden)
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    if tokenizer_dir is None:
        from llmquant.loading.default_model import default_model_dir

        tokenizer_dir = default_model_dir()
    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    n_tokens = tokenizer_vocab(tokenizer_dir)
    if vocab is not None and vocab < n_tokens:
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {n_tokens} tokens")
    vocab = vocab or n_tokens
    src_cfg = tokenizer_dir / "config.json"
    ids = json.loads(src_cfg.read_text()) if src_cfg.is_file() else {}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "dtype": dtype, "use_cache": True,
        **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id") if k in ids},
    }
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    st_dtype, itemsize = DTYPES[dtype]
    shards = _shards(llama_shapes(hidden, layers, intermediate, heads, kv_heads, vocab), itemsize,
                     shard_mib * 2**20)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, n in shard:
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes
        with open(tmp / fname, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for _, shape, _ in shard:
                _write_tensor(fh, shape, dtype, rng, norm=len(shape) == 1)
        total += offset
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, tmp / name)
    info = {"hidden": hidden, "layers": layers, "intermediate": intermediate, "heads": heads,
            "kv_heads": kv_heads, "dtype": dtype, "seed": seed, "vocab": vocab, "weight_bytes": total,
            "params": total // itemsize}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def weight_bytes(model_dir: Path) -> int:
    """Bytes of tensor data in a folder this module wrote (headers excluded)."""
    return json.loads((Path(model_dir) / INFO_FILE).read_text())["weight_bytes"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write a random LlamaForCausalLM checkpoint, streaming")
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--intermediate", type=int, default=None, help="default: 8/3 hidden rounded up to 256")
    p.add_argument("--heads", type=int, default=None, help="default: hidden // 64")
    p.add_argument("--kv-heads", type=int, default=None, help="default: heads (fewer for GQA)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    p.add_argument("--shard-mib", type=int, default=1024)
    p.add_argument("--tokenizer-dir", type=Path, default=None, help="default: llmquant's default model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=None, help="embedding rows (default: the tokenizer's count)")
    a = p.parse_args(argv)
    try:
        out = build_synthetic_llama(a.out, hidden=a.hidden, layers=a.layers, intermediate=a.intermediate,
                                    heads=a.heads, kv_heads=a.kv_heads, dtype=a.dtype, shard_mib=a.shard_mib,
                                    tokenizer_dir=a.tokenizer_dir, seed=a.seed, vocab=a.vocab)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = weight_bytes(out)
    print(f"wrote {out}: {n} bytes of weights ({n / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
