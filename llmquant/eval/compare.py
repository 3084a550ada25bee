"""``llmquant compare FILE``: a quantized file beside llama.cpp's own quantizer of the same type and size.

What a user wants to see after quantizing: did the method beat what
``llama-quantize`` would have written? Both files are measured against the
model's f32 GGUF on the same held-out windows (KL-divergence, perplexity,
top-1 agreement) with the evaluation ``llmquant perplexity`` runs, and both
complete the same prompt. llama.cpp's file is made from that f32 GGUF with the
file type FILE records (``general.file_type``) and the same plan: ``--pure``
when FILE is pure, and, for ``llama.cpp+imatrix``, ``llama-quantize --imatrix``
with an importance matrix computed by ``llmquant imatrix`` on the calibration
windows (llama-imatrix's statistics, streamed). The f32 reference and
llama.cpp's files are kept in a work folder and reused.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LlmquantError

AGAINST = ("llama.cpp", "llama.cpp+imatrix")
DEFAULT_PROMPT = "The capital of France is"


@dataclass
class CompareRow:
    name: str  # "FILE" or one of AGAINST
    file: Path
    size: int
    bits_per_weight: float
    ppl: float
    kld: float
    kld_p99: float
    top1: float
    quantize_seconds: float | None  # llama.cpp's time to write its file (None for FILE: not known here)
    completion: str = ""


@dataclass
class CompareResult:
    file: Path
    model: str
    type: str  # the recipe (llama.cpp file type) FILE was written as
    pure: bool
    ref: Path
    ref_ppl: float
    tokens: int
    ctx: int
    prompt: str
    rows: list[CompareRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()} | {
            "rows": [{k: str(v) if isinstance(v, Path) else v for k, v in r.items()} for r in d["rows"]]}

    def table(self) -> str:
        """One screen: a markdown table (ratios against the first llama.cpp row), then the completions."""
        base = next((r for r in self.rows if r.name == "llama.cpp"), self.rows[-1])
        head = ["file", "size MiB", "bpw", "ppl", "KLD", "KLD p99", "top-1", "KLD ratio", "size ratio", "quantize s"]
        lines = [f"{self.file}  ({self.type}{', pure' if self.pure else ''}) vs llama.cpp's quantizer; "
                 f"reference f32 ppl {self.ref_ppl:.4f} on {self.tokens} held-out tokens (ctx {self.ctx})",
                 "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            secs = "-" if r.quantize_seconds is None else f"{r.quantize_seconds:.1f}"
            ratio = r.kld / base.kld if base.kld > 0 else float("nan")
            lines.append(f"| {r.name} | {r.size / 2**20:.1f} | {r.bits_per_weight:.3f} | {r.ppl:.4f} | {r.kld:.6f} | "
                         f"{r.kld_p99:.5f} | {100 * r.top1:.2f}% | {ratio:.3f} | {r.size / base.size:.4f} | {secs} |")
        lines += ["", f"prompt: {self.prompt!r}"]
        lines += [f"  {r.name}: {r.completion[len(self.prompt):].strip()!r}" for r in self.rows]
        return "\n".join(lines)


def file_recipe(path: Path):
    """FILE's recipe, from the llama.cpp file type it records (``general.file_type``).

    Returns (recipe, whether FILE records an imatrix, its tensors' shapes (rows last) and types by name).
    """
    from ..inspect_gguf import open_gguf
    from ..policy import RECIPES

    reader = open_gguf(path)
    ft = reader.get_field("general.file_type")
    if ft is None:
        raise LlmquantError(f"{path} has no general.file_type; it was not written by llmquant or llama.cpp")
    ftype = int(ft.contents())
    recipe = next((r for r in RECIPES.values() if int(r.file_type) == ftype), None)
    if recipe is None:
        raise LlmquantError(f"{path} has llama.cpp file type {ftype}, which llmquant does not write")
    if recipe.base in ("f32", "f16", "bf16"):
        raise LlmquantError(f"{path} is {recipe.name}: there is no quantizer to compare against")
    has_imatrix = reader.get_field("quantize.imatrix.entries_count") is not None
    tensors = {t.name: (tuple(int(n) for n in reversed(t.shape)), t.tensor_type.name.lower()) for t in reader.tensors}
    return recipe, has_imatrix, tensors


def _plan_types(model_dir: Path, recipe, has_imatrix: bool) -> dict[bool, dict[str, tuple[tuple[int, ...], str]]]:
    """The model's plan for ``recipe``, pure and not: {pure: {name: (shape, type)}}."""
    from ..export.arch import get_arch
    from ..loading.source import read_config
    from ..loading.weights import WeightStore
    from ..plan import plan_tensors

    config = read_config(model_dir)
    spec = get_arch(config)
    store = WeightStore(model_dir, spec.checkpoint_renames)
    return {pure: {t.name: (tuple(t.shape), t.type)
                   for t in plan_tensors(spec, config, store, recipe, pure, has_imatrix=has_imatrix).tensors}
            for pure in (False, True)}


def compare(file: str | Path, *, model: str | Path | None = None, against: tuple[str, ...] = ("llama.cpp",),
            ctx: int = 512, windows: int | None = 8, threads: int = 2, prompt: str = DEFAULT_PROMPT,
            max_tokens: int = 24, text: str | None = None, work: str | Path | None = None,
            calib_samples: int = 32, card: bool = False, progress: bool = True) -> CompareResult:
    """Measure ``file`` and llama.cpp's quantization of ``model`` to the same type side by side.

    model: the HF model ``file`` was quantized from (default: the built-in model); its
    f32 GGUF is the reference. work: where the reference and llama.cpp's files are
    kept (default: ``FILE.compare`` beside it). text: the held-out text (default: the
    built-in evaluation part). calib_samples: windows of 512 tokens for the imatrix of
    ``llama.cpp+imatrix``. card: add the table and a KLD-vs-size plot (``FILE.kld.png``)
    to FILE's model card (``FILE.md``, see ``llmquant.card``).
    """
    import llmquant

    from ..calibration import CalibrationConfig
    from ..generate import generate
    from ..imatrix import compute_imatrix
    from ..loading.source import resolve_model
    from ..options import check_value
    from ..text import default_text
    from .perplexity import evaluate_many

    file = Path(file)
    bad = [a for a in against if a not in AGAINST]
    if bad or not against:
        raise LlmquantError(f"--against {','.join(bad) or '(nothing)'}: choose from {', '.join(AGAINST)}")
    for name, value in (("threads", threads), ("max_tokens", max_tokens), ("ctx", ctx)):
        check_value(name, value)
    if windows is not None and windows < 1:
        raise LlmquantError(f"--windows must be at least 1, got {windows}")
    recipe, has_imatrix, types = file_recipe(file)
    model_dir = resolve_model(model)
    if card:
        from ..card import card_path
        from ..paths import check_writable

        for path, what in ((card_path(file), "model card (--card)"), (file.with_suffix(".kld.png"), "plot")):
            check_writable(path, what, model_dir=model_dir, inputs={file: "FILE"}, hint="")
    plans = _plan_types(model_dir, recipe, has_imatrix)
    matching = [pure for pure, plan in plans.items() if plan == types]
    if not matching:
        if {n: shape for n, (shape, _) in plans[False].items()} != {n: shape for n, (shape, _) in types.items()}:
            raise LlmquantError(f"{file} does not hold the tensors of {model or 'the default model'}: "
                                "give the model it was quantized from (--model)")
        raise LlmquantError(f"{file}'s tensor types are neither llama.cpp's {recipe.name.upper()} plan nor the "
                            "pure one for this model: no llama.cpp file of the same recipe to compare with")
    pure = matching[0]
    work = Path(work) if work is not None else file.with_name(file.name + ".compare")
    work.mkdir(parents=True, exist_ok=True)
    def say(msg: str) -> None:
        if progress:
            print(f"[compare] {msg}", flush=True, file=sys.stderr)

    ref = work / "reference-f32.gguf"
    if not ref.is_file():
        say(f"writing the f32 reference {ref}")
        llmquant.quantize(model, ref, type="f32", progress=progress)
    theirs: list[tuple[str, Path, float]] = []
    for name in against:
        out = work / f"{name}-{recipe.name}{'-pure' if pure else ''}.gguf"
        imatrix = None
        if name == "llama.cpp+imatrix":
            imatrix = work / f"imatrix-c{calib_samples}x512.gguf"
            if not imatrix.is_file():
                say(f"llmquant imatrix on {calib_samples} x 512 calibration tokens -> {imatrix}")
                compute_imatrix(model, imatrix, calibration=CalibrationConfig(samples=calib_samples, seqlen=512),
                                progress=progress)
        say(f"llama.cpp quantizes {ref.name} to {recipe.name.upper()} -> {out}")
        t0 = time.perf_counter()
        _llama_quantize(ref, out, recipe, pure, imatrix, threads)
        theirs.append((name, out, time.perf_counter() - t0))
    text = default_text("eval") if text is None else text
    result = None
    files = [("FILE", file, None), *theirs]
    say(f"evaluating {', '.join(path.name for _, path, _ in files)} against the f32 reference, one pass")
    scores = evaluate_many([path for _, path, _ in files], text=text, ctx=ctx, windows=windows, ref=ref,
                           threads=threads, progress=progress)
    for (name, path, secs), r in zip(files, scores, strict=True):
        if result is None:
            result = CompareResult(file=file, model=str(model or "SmolLM2-135M-Instruct (default)"),
                                   type=recipe.name, pure=pure, ref=ref, ref_ppl=r.ref_ppl, tokens=r.tokens, ctx=ctx,
                                   prompt=prompt)
        completion = generate(path, prompt, max_tokens=max_tokens, threads=threads)
        result.rows.append(CompareRow(name=file.name if name == "FILE" else name, file=path, size=r.file_size,
                                      bits_per_weight=r.bits_per_weight, ppl=r.ppl, kld=r.kld, kld_p99=r.kld_p99,
                                      top1=r.top1, quantize_seconds=secs, completion=completion))
    if card:
        from ..card import card_path, compare_section, plot_compare, update_card

        plot = plot_compare(result, file.with_suffix(".kld.png"))
        update_card(card_path(file), "compare", compare_section(result, plot), f"{file.stem}")
    return result


def _llama_quantize(src: Path, dst: Path, recipe, pure: bool, imatrix: Path | None, threads: int) -> None:
    """llama.cpp's quantizer: the library call without an imatrix, llama-quantize with one."""
    import os

    if imatrix is not None:
        from .llamacpp_tools import quantize_with_imatrix

        if pure:
            raise LlmquantError("--against llama.cpp+imatrix compares llama.cpp's recipes; FILE is --pure")
        quantize_with_imatrix(src, dst, recipe.name.upper() if "_k" in recipe.name else recipe.name, imatrix, threads)
        return
    import llama_cpp

    from ..quiet import quiet_fd2

    partial = dst.with_name(dst.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = int(recipe.file_type), threads, pure
    with quiet_fd2():  # llama.cpp logs every tensor on stderr
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), params)
    if rc != 0:
        partial.unlink(missing_ok=True)
        raise LlmquantError(f"llama.cpp's quantizer failed on {src}")
    os.replace(partial, dst)
