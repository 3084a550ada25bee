"""Perplexity and KL-divergence with the protocol of llama.cpp's ``llama-perplexity``.

Numbers are only comparable when the protocol is identical, so this follows
tools/perplexity/perplexity.cpp: tokenize the whole text once (with BOS if the
vocab adds one), cut it into non-overlapping windows of ``ctx`` tokens, put BOS
on the first position of every window if the vocab adds BOS, and score only the
second half of each window (logits at ``first..ctx-2``, ``first = ctx//2``,
predict tokens ``first+1..ctx-1``), so every scored token has at least ctx/2
tokens of context. KL-divergence against a reference model uses the very same
windows and scored positions. See docs/perplexity.md.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import LlmquantError

GGUF_MAGIC = b"GGUF"
_ROW_CHUNK = 64  # rows per log-softmax block: bounds float64 memory for big vocabularies


@dataclass
class PerplexityResult:
    """One evaluation; kld/kld_p99/top1/ref_ppl are None without a reference."""

    ppl: float
    ppl_stderr: float
    kld: float | None
    kld_p99: float | None
    top1: float | None
    ref_ppl: float | None
    tokens: int
    ctx: int
    windows: int
    file_size: int
    bits_per_weight: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Runner(Protocol):
    n_vocab: int
    add_bos: bool
    bos: int | None

    def tokenize(self, text: str) -> list[int]: ...
    def logits(self, window: np.ndarray) -> np.ndarray: ...
    def close(self) -> None: ...


def gguf_logits(llm: Any, window: np.ndarray) -> np.ndarray:
    """Logits (n, vocab) of a llama_cpp.Llama for one window, from an empty KV cache.

    ``llm.scores`` is a buffer reused by the next eval, so this returns a copy.
    """
    llm.reset()
    llm.eval([int(t) for t in window])
    return np.array(llm.scores[: len(window)], dtype=np.float32)


def hf_logits(model: Any, window: np.ndarray) -> np.ndarray:
    """Logits (n, vocab) of a transformers causal LM for one window, in float32."""
    import torch

    with torch.inference_mode():
        ids = torch.as_tensor(np.asarray(window, dtype=np.int64))[None]
        return model(input_ids=ids).logits[0].float().numpy()


class _GgufRunner:
    """A GGUF file in llama.cpp; tokenizes like llama-perplexity (BOS iff the vocab adds it)."""

    def __init__(self, path: Path, ctx: int, threads: int) -> None:
        import llama_cpp

        try:
            self.llm = llama_cpp.Llama(
                str(path), n_ctx=ctx, n_batch=ctx, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False,
            )
        except Exception as exc:  # llama_cpp raises ValueError with little detail
            raise LlmquantError(f"llama.cpp cannot load {path}: {exc}") from exc
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos = int(self.llm.token_bos())
        self.n_vocab = int(self.llm.n_vocab())

    def tokenize(self, text: str) -> list[int]:
        # add_bos=True means llama_tokenize(add_special=True): BOS only if the vocab says so.
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def logits(self, window: np.ndarray) -> np.ndarray:
        return gguf_logits(self.llm, window)

    def close(self) -> None:
        self.llm.close()


class _HfRunner:
    """An HF checkpoint folder in torch float32; BOS iff its tokenizer adds one by default."""

    def __init__(self, path: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..quiet import quiet_transformers

        try:
            with quiet_transformers():
                self.tok = AutoTokenizer.from_pretrained(path)
                self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        except Exception as exc:
            raise LlmquantError(f"transformers cannot load {path}: {exc}") from exc
        self._threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        self.tok.model_max_length = sys.maxsize  # whole-text tokenization is intended
        self.bos = self.tok.bos_token_id
        with_special = self.tok("a").input_ids[:1]
        plain = self.tok("a", add_special_tokens=False).input_ids[:1]
        self.add_bos = self.bos is not None and with_special == [self.bos] and plain != [self.bos]
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])

    def tokenize(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False).input_ids
        return [self.bos, *ids] if self.add_bos else list(ids)

    def logits(self, window: np.ndarray) -> np.ndarray:
        return hf_logits(self.model, window)

    def close(self) -> None:
        import torch

        torch.set_num_threads(self._threads)


def check_model_path(path: Path, hf: bool) -> None:
    """Fail early, with one line, on a missing file or a file that is not GGUF."""
    if not path.exists():
        raise LlmquantError(f"model {path} does not exist")
    if hf:
        if not (path / "config.json").is_file():
            raise LlmquantError(f"{path} is not a Hugging Face model folder (no config.json)")
        return
    if not path.is_file():
        raise LlmquantError(f"model {path} is not a file (a GGUF file is expected; use --hf for a folder)")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise LlmquantError(f"{path} is not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")


def make_windows(tokens: list[int], ctx: int, windows: int | None, add_bos: bool, bos: int | None) -> np.ndarray:
    """Non-overlapping windows (n, ctx) of the token stream; BOS first in each if the vocab adds it."""
    available = len(tokens) // ctx
    if available == 0:
        raise LlmquantError(f"text has {len(tokens)} tokens, fewer than one window of {ctx}; pass a longer --text or a smaller --ctx")
    n = available if windows is None else min(windows, available)
    if windows is not None and windows > available:
        warnings.warn(f"the text has only {available} windows of {ctx} tokens; using {available}, not {windows}", stacklevel=2)
    out = np.asarray(tokens[: n * ctx], dtype=np.int64).reshape(n, ctx).copy()
    if add_bos and bos is not None:
        out[:, 0] = bos
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (float32 sums over 50K+ entries lose digits)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def window_stats(logits: np.ndarray, window: np.ndarray, ref_logits: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per scored token of one window: nll, and with a reference kld, top1 and ref_nll.

    Rows ``first..ctx-2`` predict tokens ``first+1..ctx-1`` (first = ctx//2).
    KL is KL(P_ref || P_test) = sum_v p_ref (log p_ref - log p_test).
    """
    n = len(window)
    parts: dict[str, list[np.ndarray]] = {"nll": [], "kld": [], "top1": [], "ref_nll": []}
    for s in range(n // 2, n - 1, _ROW_CHUNK):
        e = min(s + _ROW_CHUNK, n - 1)
        rows, targets = np.arange(e - s), window[s + 1 : e + 1]
        lp = log_softmax(logits[s:e])
        parts["nll"].append(-lp[rows, targets])
        if ref_logits is not None:
            lr = log_softmax(ref_logits[s:e])
            parts["kld"].append(np.sum(np.exp(lr) * (lr - lp), axis=-1))
            parts["top1"].append(np.argmax(logits[s:e], axis=-1) == np.argmax(ref_logits[s:e], axis=-1))
            parts["ref_nll"].append(-lr[rows, targets])
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def ppl_and_stderr(nll: np.ndarray) -> tuple[float, float]:
    """exp(mean nll) and its error as llama-perplexity prints it: ppl*sqrt((<x^2>-<x>^2)/(N-1))."""
    mean = float(np.mean(nll))
    var = float(np.mean(np.square(nll))) - mean * mean
    ppl = float(np.exp(mean))
    return ppl, (ppl * float(np.sqrt(var / (len(nll) - 1))) if var > 0 and len(nll) > 1 else 0.0)


def bits_per_weight(path: Path, hf: bool) -> float:
    """Storage cost per weight, so files of different formats compare on one axis.

    GGUF: 8 * (data bytes of the tensors with 2+ dims) / (their element count):
    the matrices that quantization touches; norms and biases (1-D, kept F32)
    and metadata are excluded. HF folder: 8 * (bytes of the *.safetensors
    files) / (all parameters in their headers), i.e. ~32 for float32.
    """
    if hf:
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        n = 0
        for f in files:
            with safe_open(str(f), "np") as st:
                n += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())
        return 8 * sum(f.stat().st_size for f in files) / n if n else float("nan")
    import gguf

    mats = [t for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) >= 2]
    return 8 * sum(int(t.n_bytes) for t in mats) / max(1, sum(int(t.n_elements) for t in mats))


def _file_size(path: Path) -> int:
    """Bytes on disk: the GGUF file, or an HF folder's *.safetensors weight files."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


def _open(path: Path, hf: bool, ctx: int, threads: int) -> _Runner:
    return _HfRunner(path, threads) if hf else _GgufRunner(path, ctx, threads)


def evaluate(model: str | Path, *, text: str, ctx: int = 512, windows: int | None = None, ref: str | Path | None = None,
             threads: int = 2, hf: bool = False, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``text``, plus KLD/top-1 against ``ref`` (GGUF file or HF folder).

    Both models run window by window in one pass, so no logits are stored:
    memory is one window of logits per model. Tokens come from the model under
    test (llama.cpp tokenizer for GGUF, the HF tokenizer with ``hf=True``).
    """
    return evaluate_many([model], text=text, ctx=ctx, windows=windows, ref=ref, threads=threads, hf=hf,
                         progress=progress)[0]


def evaluate_many(models: list[str | Path], *, text: str, ctx: int = 512, windows: int | None = None,
                  ref: str | Path | None = None, threads: int = 2, hf: bool = False,
                  progress: bool = True) -> list[PerplexityResult]:
    """``evaluate`` of several files of one model on the same windows, the reference run once per window.

    The reference is the costly part (an f32 file is several times a quantized one's work), so
    comparing k files this way costs k + 1 forward passes per window instead of 2k. Every file is
    open at once: memory is the sum of the files. They must tokenize ``text`` alike (the windows
    are the first file's), as files of one model do.
    """
    from tqdm import tqdm

    if ctx < 4 or (windows is not None and windows < 1) or threads < 1:
        raise LlmquantError(f"need ctx >= 4, windows >= 1, threads >= 1 (got ctx={ctx}, windows={windows}, threads={threads})")
    if not models:
        raise LlmquantError("no model to evaluate")
    paths, ref_path = [Path(m) for m in models], (Path(ref) if ref is not None else None)
    for path in paths:
        check_model_path(path, hf)
    if ref_path is not None:
        check_model_path(ref_path, ref_path.is_dir())
    acc: list[dict[str, list[np.ndarray]]] = [{} for _ in paths]
    with ExitStack() as stack:
        tests = []
        for path in paths:
            tests.append(_open(path, hf, ctx, threads))
            stack.callback(tests[-1].close)
        tokens = tests[0].tokenize(text)
        for path, test in zip(paths[1:], tests[1:], strict=True):
            if test.tokenize(text) != tokens:
                raise LlmquantError(f"{path} tokenizes the text differently from {paths[0]}; evaluate them apart")
        wins = make_windows(tokens, ctx, windows, tests[0].add_bos, tests[0].bos)
        base = None
        if ref_path is not None:
            base = _open(ref_path, ref_path.is_dir(), ctx, threads)
            stack.callback(base.close)
            for path, test in zip(paths, tests, strict=True):
                if base.n_vocab != test.n_vocab:
                    raise LlmquantError(f"vocabularies differ: {path} has {test.n_vocab} tokens, "
                                        f"{ref_path} has {base.n_vocab}")
        for i, w in enumerate(tqdm(wins, desc="perplexity", unit="window", disable=not progress, file=sys.stderr)):
            ref_logits = base.logits(w) if base is not None else None
            if ref_logits is not None and not np.isfinite(ref_logits).all():
                raise LlmquantError(f"{ref_path} gives logits that are not finite (NaN or Inf) in window {i + 1}; "
                                    "the model or file is broken")
            for path, test, stats in zip(paths, tests, acc, strict=True):
                logits = test.logits(w)
                if not np.isfinite(logits).all():
                    raise LlmquantError(f"{path} gives logits that are not finite (NaN or Inf) in window {i + 1}; "
                                        "the model or file is broken")
                for k, v in window_stats(logits, w, ref_logits).items():
                    stats.setdefault(k, []).append(v)
    return [_result({k: np.concatenate(v) for k, v in stats.items()}, path, hf, ctx, len(wins))
            for path, stats in zip(paths, acc, strict=True)]


def _result(stats: dict[str, np.ndarray], model: Path, hf: bool, ctx: int, n_windows: int) -> PerplexityResult:
    ppl, stderr = ppl_and_stderr(stats["nll"])
    has_ref = "kld" in stats
    return PerplexityResult(
        ppl=ppl, ppl_stderr=stderr,
        kld=float(np.mean(stats["kld"])) if has_ref else None,
        kld_p99=float(np.percentile(stats["kld"], 99)) if has_ref else None,
        top1=float(np.mean(stats["top1"])) if has_ref else None,
        ref_ppl=ppl_and_stderr(stats["ref_nll"])[0] if has_ref else None,
        tokens=int(stats["nll"].size), ctx=ctx, windows=n_windows,
        file_size=_file_size(model), bits_per_weight=bits_per_weight(model, hf),
    )
