"""Sampling token sequences from a GGUF file in llama.cpp, many sequences per decode step.

Generated calibration needs a full forward pass per token, so the model cannot
stream layer by layer the way quantization does. llama.cpp memory-maps the
file and keeps only the KV cache and one step's activations beside it, so a
q8_0 file (about a quarter of the float32 checkpoint a torch ``generate``
would load) is what sampling holds. Sequences run side by side in one batch
(one KV sequence each), which turns each step's matrix-vector products into
matrix products.

The draw itself is ours, not llama.cpp's sampler chain: Gumbel-max over the
logits llama.cpp returns, with a seeded torch generator, so the tokens depend
only on the file, the prompts, the seed and the thread count (which sets how
llama.cpp splits its sums). End-of-generation tokens are masked out: every
sequence runs to its full length.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .errors import LlmquantError
from .quiet import quiet_fd2


def gumbel_draw(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab], distributed as softmax(logits / temperature).

    Gumbel-max: argmax(l / T + G) with G = -log(-log(U)) is an exact draw from the
    softmax, and unlike ``multinomial`` needs no normalization over the vocabulary.
    Float64 noise: float32's uniform stops at 2**-24, which cuts the Gumbel tail.
    """
    u = torch.rand(logits.shape, generator=gen, dtype=torch.float64).clamp_(min=1e-300)
    return (logits.double() / temperature - torch.log(-torch.log(u))).argmax(-1)


@contextmanager
def _silent() -> Iterator[None]:
    """No llama.cpp log lines: they reach fd 2 directly or through llama-cpp-python's logger (sys.stderr)."""
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with quiet_fd2():
            yield
    finally:
        log.setLevel(level)


@contextmanager
def _llama(path: Path, n_seq: int, seqlen: int, n_batch: int, threads: int):
    """A llama.cpp model and a context with one KV sequence of ``seqlen`` cells per sampled sequence."""
    try:
        import llama_cpp as lc
    except ImportError:
        raise LlmquantError("generated calibration samples with llama.cpp: pip install 'llmquant[llama]'") from None
    with _silent():
        lc.llama_backend_init()
        model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
        if not model:
            raise LlmquantError(f"llama.cpp cannot load {path} to sample calibration from; "
                                "use --calib-source builtin or file:PATH")
        params = lc.llama_context_default_params()
        params.n_ctx = n_seq * seqlen
        params.n_seq_max = n_seq
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = threads
        ctx = lc.llama_init_from_model(model, params)
    if not ctx:
        lc.llama_model_free(model)
        raise LlmquantError(f"llama.cpp cannot make a context of {n_seq} x {seqlen} tokens for {path} (out of "
                            "memory?); use a smaller --calib-seqlen or --calib-source builtin")
    batch = lc.llama_batch_init(n_batch, 0, 1)
    try:
        yield lc, model, ctx, batch
    finally:
        with _silent():
            lc.llama_batch_free(batch)
            lc.llama_free(ctx)
            lc.llama_model_free(model)


def sample_sequences(path: str | Path, prompts: list[list[int]], seqlen: int, seed: int, *, temperature: float,
                     threads: int, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Each prompt (token ids) continued by sampling to exactly ``seqlen`` tokens: [len(prompts), seqlen].

    All prompts decode in one batch, then every step decodes one token of every
    sequence still short of ``seqlen``. ``on_step(k)`` reports the k tokens each step sampled.
    """
    n = len(prompts)
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0 or longest >= seqlen:
        raise LlmquantError(f"prompts must hold 1 to {seqlen - 1} tokens to be continued to {seqlen}, "
                            f"got {min(len(p) for p in prompts)} to {longest}")
    n_batch = max(n, sum(len(p) for p in prompts))
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, seqlen, dtype=torch.long)
    length = torch.tensor([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        out[i, :len(p)] = torch.tensor(p)
    with _llama(Path(path), n, seqlen, n_batch, threads) as (lc, model, ctx, batch):
        vocab = lc.llama_model_get_vocab(model)
        n_vocab = lc.llama_vocab_n_tokens(vocab)
        if int(out.max()) >= n_vocab:
            raise LlmquantError(f"a prompt token id ({int(out.max())}) is outside the {n_vocab}-token vocabulary "
                                f"of {path}")
        eog = torch.tensor([bool(lc.llama_vocab_is_eog(vocab, t)) for t in range(n_vocab)])
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        # first step: every prompt whole, logits only at each prompt's last token
        entries = [(i, pos, int(tok), pos == len(p) - 1) for i, p in enumerate(prompts) for pos, tok in enumerate(p)]
        active = list(range(n))
        while active:
            _fill(batch, entries)
            if lc.llama_decode(ctx, batch) != 0:
                raise LlmquantError(f"llama.cpp failed to decode while sampling calibration from {path}")
            rows = [k for k, e in enumerate(entries) if e[3]]
            logits = torch.stack([_logits(lc, ctx, k, n_vocab) for k in rows])
            logits[:, eog] = -float("inf")
            drawn = gumbel_draw(logits, temperature, gen)
            for seq, tok in zip(active, drawn.tolist(), strict=True):
                out[seq, length[seq]] = tok
                length[seq] += 1
            if on_step is not None:
                on_step(len(active))
            active = [s for s in active if length[s] < seqlen]
            entries = [(s, int(length[s]) - 1, int(out[s, length[s] - 1]), True) for s in active]
    return out


def _fill(batch, entries: list[tuple[int, int, int, bool]]) -> None:
    """Write (sequence, position, token, wants logits) entries into a llama_batch."""
    batch.n_tokens = len(entries)
    for k, (seq, pos, tok, want) in enumerate(entries):
        batch.token[k] = tok
        batch.pos[k] = pos
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = seq
        batch.logits[k] = want


def _logits(lc, ctx, k: int, n_vocab: int) -> torch.Tensor:
    ptr = lc.llama_get_logits_ith(ctx, k)
    return torch.from_numpy(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                  shape=(n_vocab,)).copy())
