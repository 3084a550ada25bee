"""Run a GGUF file in llama.cpp (through llama-cpp-python): the proof a file works."""

from __future__ import annotations

from pathlib import Path

from .errors import LlmquantError
from .inspect_gguf import open_gguf
from .quiet import quiet_fd2


def load_llama(path: str | Path, *, n_ctx: int = 512, threads: int = 2, **kwargs):
    """A llama_cpp.Llama for a GGUF file, with a one-line error if llama.cpp refuses it."""
    open_gguf(path)
    try:
        from llama_cpp import Llama
    except ImportError:
        raise LlmquantError("llama-cpp-python is not installed: pip install 'llmquant[llama]'") from None
    try:
        with quiet_fd2():
            return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, verbose=False, **kwargs)
    except (ValueError, RuntimeError) as exc:
        raise LlmquantError(f"llama.cpp cannot load {path}: {exc}") from None


def generate(path: str | Path, prompt: str, *, max_tokens: int = 64, chat: bool = False, threads: int = 2,
             ctx: int = 512) -> str:
    """Greedy completion of ``prompt`` (or a chat reply with the file's template) in a context of ``ctx`` tokens."""
    from .options import check_value

    for name, value in (("max_tokens", max_tokens), ("threads", threads), ("ctx", ctx)):
        check_value(name, value)
    if not prompt.strip():
        raise LlmquantError("the prompt is empty; give the text to complete (or, with --chat, the message)")
    llm = load_llama(path, n_ctx=ctx, threads=threads)
    n = len(llm.tokenize(prompt.encode("utf-8"), add_bos=True))
    if n >= ctx:  # llama-cpp-python would fail deep inside its eval
        raise LlmquantError(f"the prompt ({n} tokens) does not fit the context of {ctx} tokens; give a larger --ctx")
    try:
        with quiet_fd2():
            if chat:
                out = llm.create_chat_completion(
                    messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0
                )
                return out["choices"][0]["message"]["content"]
            out = llm(prompt, max_tokens=max_tokens, temperature=0.0)
    except ValueError as exc:  # llama-cpp-python's way of saying the tokens (chat template included) overflow
        raise LlmquantError(f"llama.cpp cannot run the prompt ({n} tokens{' before the chat template' if chat else ''}) "
                            f"in a context of {ctx} tokens: {exc}; give a larger --ctx") from None
    return prompt + out["choices"][0]["text"]
