"""Quantization-aware training the textbook way, on a tiny Llama trained from scratch.

    python scripts/qat_demo.py [--vocab V] [--steps N] [--qat-steps N] [--hidden H] [--layers L] [--seqlen T]
                               [--batch B] [--lr X] [--qat-lr X] [--eval-windows N] [--threads N]
                               [--seed S] [--out-dir bench-out/qat] [--small]

One run, four models of the same ``LlamaForCausalLM`` (SmolLM2's tokenizer cut
to its first ``--vocab`` tokens, tied embeddings), trained on the calibration part of the built-in text and
measured on the held-out part:

1. **FP**: full-precision training with AdamW (warm-up, cosine decay);
2. **PTQ**: the FP weights rounded to q4_0 after training (llama.cpp's RTN);
3. **QAT**: training continued from FP at a lower learning rate with every
   2-D weight fake-quantized to q4_0 in the forward pass and the
   straight-through estimator in the backward pass,
   ``w_q = w + (dequant(rtn(w)) - w).detach()``;
4. **control**: training continued from FP for the same steps on the same
   batches without fake quantization, then RTN q4_0, so that QAT's gain is
   not mistaken for the gain of training longer.

The fake quantizer is ``llmquant.formats``' own q4_0 ``rtn`` and ``dequantize``,
the rule llmquant writes files with, applied to exactly the tensors that
``llmquant.quantize(type="q4_0", pure=True)`` stores in q4_0 (every 2-D weight,
the embedding included). So writing the *latent* QAT weights with RTN gives a
file whose tensors dequantize to the weights the QAT forward pass used; the
script checks this bit for bit and checks that llama.cpp's perplexity of each
file matches the torch figure on the same tokens. It prints a table and
writes results.json and qat_demo.png (training curves, weight histograms on
the q4_0 grid) into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmquant.errors import LlmquantError

# Relative gap allowed between llama.cpp's and torch's perplexity of one model on the same
# tokens: llama.cpp multiplies q4_0 weights with activations rounded to q8_0, torch in float32.
PPL_TOLERANCE = 0.005
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
HIST_TENSOR = "model.layers.0.mlp.down_proj.weight"  # the linear the histograms show
SIZES = {  # option -> (full size, --small)
    "steps": (600, 120), "qat_steps": (200, 80), "hidden": (64, 64), "layers": (4, 2),
    "seqlen": (128, 64), "batch": (8, 8), "eval_windows": (None, 24), "eval_every": (50, 20),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FP vs post-training RTN q4_0 vs QAT q4_0 on a tiny Llama")
    for name, (full, small) in SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"(default {full}; --small: {small})")
    p.add_argument("--vocab", type=int, default=4096, help="SmolLM2's tokenizer cut to its first V tokens (4096)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of FP training (3e-3)")
    p.add_argument("--qat-lr", type=float, default=None,
                   help="peak learning rate of QAT and control (lr / 30: below where FP's schedule ended, "
                        "since more epochs over the small text overfit)")
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (2)")
    p.add_argument("--seed", type=int, default=0, help="model init and batch order (0)")
    p.add_argument("--out-dir", type=Path, default=Path("bench-out/qat"), help="files, results.json, plot")
    p.add_argument("--small", action="store_true", help="the CI size: a minute or so on 2 cores")
    args = p.parse_args(argv)
    for name, (full, small) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.small else full)
    args.qat_lr = args.lr / 30 if args.qat_lr is None else args.qat_lr
    if args.vocab < 512:
        raise LlmquantError(f"--vocab {args.vocab}: keep at least 512 tokens")
    if args.hidden % 32 or args.hidden < 32:
        raise LlmquantError(f"--hidden {args.hidden}: q4_0 needs rows that are a multiple of 32")
    if min(args.steps, args.qat_steps, args.layers, args.batch, args.threads, args.eval_every) < 1 \
            or args.seqlen < 8 or (args.eval_windows is not None and args.eval_windows < 1):
        raise LlmquantError("need --steps, --qat-steps, --layers, --batch, --threads >= 1 and --seqlen >= 8")
    return args


def small_tokenizer(src: Path, dst: Path, vocab: int) -> Path:
    """SmolLM2's byte-level BPE cut to its first ``vocab`` ids, into dst (tokenizer files only).

    BPE adds one token per merge, in merge order (SmolLM2's merge i makes id 252 + i), so
    keeping the ids below ``vocab`` and the merges that make them is the tokenizer BPE
    training stops at with that target size. The output head's cost grows with the
    vocabulary: a cut makes training from scratch a matter of minutes on two cores.
    """
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    if vocab > len(model["vocab"]):
        raise LlmquantError(f"--vocab {vocab}: SmolLM2's tokenizer has {len(model['vocab'])} tokens")
    ids = model["vocab"]
    model["merges"] = [m for m in model["merges"]
                       if ids["".join(m.split(" ") if isinstance(m, str) else m)] < vocab]
    model["vocab"] = {t: i for t, i in ids.items() if i < vocab}
    if len(model["vocab"]) != vocab or any(t["id"] >= vocab for t in tj["added_tokens"]):
        raise LlmquantError(f"--vocab {vocab}: ids below it are not a prefix of the tokenizer")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    for name in TOKENIZER_FILES[1:]:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst


def build_model(args: argparse.Namespace):
    """A tiny LlamaForCausalLM on the cut SmolLM2 vocabulary, tied embeddings.

    Every in-feature count (hidden, 2·hidden heads, 4·hidden MLP) is a multiple
    of 32, so every 2-D weight fits q4_0 and none falls back to f16.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(2, args.hidden // 16)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=max(256, args.seqlen), rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).float()


def tokens(tok_dir: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The built-in text's calibration part (training) and held-out part, as token ids [n]."""
    from transformers import AutoTokenizer

    from llmquant.text import default_text

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.model_max_length = sys.maxsize
    ids = {p: torch.tensor(tok(default_text(p), add_special_tokens=False).input_ids) for p in ("calib", "eval")}
    return ids["calib"], ids["eval"], default_text("eval")


def quantized_names(model) -> list[str]:
    """The tensors ``quantize(type="q4_0", pure=True)`` stores in q4_0: every 2-D weight
    (named_parameters lists the tied embedding once, as model.embed_tokens.weight)."""
    return [n for n, p in model.named_parameters() if p.dim() == 2]


def _rtn_q4_0(w: torch.Tensor):
    """llmquant's q4_0 rtn of w [co, ci] (ci a multiple of 32): QuantBlocks of co·ci/32 blocks."""
    from llmquant.formats import get_format

    fmt = get_format("q4_0")
    return fmt, fmt.rtn(w.detach().reshape(-1, fmt.block_size).numpy())


def fake_q4_0(w: torch.Tensor) -> torch.Tensor:
    """dequantize(rtn(w)) with llmquant's q4_0 format: the values llama.cpp reads back from the file.

    w: float32 [co, ci] -> float32 [co, ci]; no gradient flows through it.
    """
    fmt, q = _rtn_q4_0(w)
    return torch.from_numpy(fmt.dequantize(q)).reshape(w.shape)


def grid_units(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """w [co, ci] / its q4_0 block's fp16 scale d, so that the codes sit on the integers -8..7,
    and the codes RTN gives w (both flat [co·ci])."""
    fmt, q = _rtn_q4_0(w)
    x = w.detach().reshape(-1, fmt.block_size).numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        units = np.where(q.scales[:, None] == 0, 0, x / q.scales[:, None])
    return units.ravel(), q.codes.ravel()


def forward_logits(model, x: torch.Tensor, names: list[str] | None, ste: bool) -> torch.Tensor:
    """Logits [b, t, vocab] of x [b, t]; with names, those weights fake-quantized to q4_0.

    ste: the straight-through estimator w + (q(w) - w).detach() (forward: q(w); backward: identity),
    else q(w) itself. functional_call ties the head to the replaced embedding.
    """
    if not names:
        return model(input_ids=x).logits
    params = dict(model.named_parameters())
    swap = {}
    for n in names:
        w = params[n]
        q = fake_q4_0(w)
        swap[n] = w + (q - w).detach() if ste else q
    return torch.func.functional_call(model, swap, args=(), kwargs={"input_ids": x}, tie_weights=True).logits


def next_token_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean NLL of tokens 1..t-1 of x [b, t] from logits [b, t, vocab]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def train(model, ids: torch.Tensor, steps: int, lr: float, args: argparse.Namespace, *, seed: int,
          names: list[str] | None, eval_names: list[str] | None, curve_windows: torch.Tensor, desc: str,
          warmup: int = 1, offset: int = 0, opt_state: dict | None = None) -> tuple[dict, dict]:
    """AdamW on random windows of ids (the same windows for the same seed); with names, the
    forward fake-quantizes those weights to q4_0 and the backward passes straight through.

    opt_state: AdamW's moments to continue from (a fresh AdamW's first steps have the full
    size lr·sign(g) and would knock a trained model off its minimum).
    Returns the curve (per step the training loss; every eval_every steps the held-out
    loss of the model as it will be stored, eval_names fake-quantized: its q4_0 file)
    and the optimizer's state.
    """
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    if opt_state is not None:
        opt.load_state_dict(copy.deepcopy(opt_state))
    span = torch.arange(args.seqlen)
    curve = {"step": [], "loss": [], "eval_step": [], "eval_loss": []}
    model.train()
    bar = tqdm(range(steps), desc=desc, unit="step", file=sys.stderr, disable=None)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x = ids[torch.randint(0, len(ids) - args.seqlen, (args.batch,), generator=gen)[:, None] + span]
        loss = next_token_loss(forward_logits(model, x, names, ste=True), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve["step"].append(offset + step + 1)
        curve["loss"].append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            curve["eval_step"].append(offset + step + 1)
            curve["eval_loss"].append(measure(model, curve_windows, eval_names)["loss"])
            bar.set_postfix(loss=f"{loss.item():.3f}", heldout=f"{curve['eval_loss'][-1]:.3f}")
    model.eval()
    return curve, opt.state_dict()


@torch.no_grad()
def measure(model, windows: torch.Tensor, names: list[str] | None, batch: int = 8) -> dict:
    """Loss over every position of windows [n, t] and llama-perplexity's figure on the same logits.

    ppl scores only the second half of each window (llmquant.eval.perplexity.window_stats),
    as llama.cpp's perplexity does; with names the q4_0 fake-quantized model is measured.
    """
    from llmquant.eval.perplexity import ppl_and_stderr, window_stats

    was_training = model.training
    model.eval()
    losses, nll = [], []
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        logits = forward_logits(model, x, names, ste=False)
        losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                      reduction="none"))
        nll += [window_stats(lg.numpy(), w.numpy())["nll"] for lg, w in zip(logits, x, strict=True)]
    model.train(was_training)
    ppl, stderr = ppl_and_stderr(np.concatenate(nll))
    return {"loss": float(torch.cat(losses).double().mean()), "ppl": ppl, "ppl_stderr": stderr}


def windows_of(ids: torch.Tensor, seqlen: int, n: int | None, rng: np.random.Generator | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen]: the first n (llama.cpp's order), or n drawn by rng."""
    from llmquant.eval.perplexity import make_windows

    if rng is None:
        return torch.from_numpy(make_windows(ids.tolist(), seqlen, n, add_bos=False, bos=None))
    all_windows = windows_of(ids, seqlen, None)
    return all_windows[np.sort(rng.choice(len(all_windows), size=n, replace=False))]


def save_checkpoint(model, folder: Path, tok_dir: Path) -> Path:
    """An HF checkpoint of the model's (latent) float32 weights with SmolLM2's tokenizer files."""
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, folder / name)
    return folder


def write_gguf(folder: Path, out: Path, type_: str, threads: int) -> Path:
    """llmquant's own HF -> GGUF path: RTN, every 2-D weight in type_ (pure)."""
    import llmquant

    out.unlink(missing_ok=True)
    llmquant.quantize(folder, out, type=type_, method="rtn", pure=True, threads=threads, progress=False)
    return out


def check_file(path: Path, folder: Path, expected: dict[str, torch.Tensor]) -> int:
    """Raise unless the q4_0 tensors of the GGUF are exactly ``expected`` (HF name -> float32 [co, ci]).

    The file holds rows in llama.cpp's order (q/k permuted), so expected rows are permuted with the
    architecture's own rule; the comparison is on the float32 bit patterns. Returns the tensor count.
    """
    import gguf

    from llmquant.export.arch import get_arch

    config = json.loads((folder / "config.json").read_text())
    spec = get_arch(config)
    n_layers = config["num_hidden_layers"]
    want = {spec.gguf_tensor_name(n, n_layers): (n, w) for n, w in expected.items()}
    got = {t.name: t for t in gguf.GGUFReader(path).tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_0}
    if set(got) != set(want):
        raise LlmquantError(f"{path}: q4_0 tensors {sorted(got)} are not the fake-quantized {sorted(want)}")
    for name, t in got.items():
        hf_name, w = want[name]
        rows = spec.to_gguf_rows(hf_name, w.numpy(), config)
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(rows.shape)
        if not np.array_equal(values.view(np.uint32), np.ascontiguousarray(rows).view(np.uint32)):
            raise LlmquantError(f"{path}: {name} does not dequantize to the QAT forward's weights")
    return len(got)


def llama_tokens_match(path: Path, text: str, ids: torch.Tensor) -> bool:
    """Whether llama.cpp tokenizes the held-out text to the ids torch was measured on."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == ids.tolist()
    finally:
        llm.close()


def evaluate_file(path: Path, text: str, args: argparse.Namespace) -> dict:
    """llama.cpp's perplexity of a GGUF on the held-out text: same windows, same scored tokens."""
    from llmquant.eval.perplexity import evaluate

    r = evaluate(path, text=text, ctx=args.seqlen, windows=args.eval_windows, threads=args.threads, progress=False)
    return {"llamacpp_ppl": r.ppl, "llamacpp_tokens": r.tokens, "file": str(path), "file_mib": r.file_size / 2**20}


def phase_row(phase: str, steps: str, model, names: list[str] | None, data: dict, path: Path,
              args: argparse.Namespace) -> dict:
    """One table row: torch's losses and perplexity of the stored model, then llama.cpp's of its file."""
    train_m, eval_m = measure(model, data["train"], names), measure(model, data["eval"], names)
    row = {"phase": phase, "steps": steps, "type": "q4_0" if names else "f32", "train_loss": train_m["loss"],
           "heldout_loss": eval_m["loss"], "torch_ppl": eval_m["ppl"], "torch_ppl_stderr": eval_m["ppl_stderr"],
           **evaluate_file(path, data["text"], args)}
    row["ppl_rel_diff"] = row["llamacpp_ppl"] / row["torch_ppl"] - 1
    row["ppl_matches"] = bool(abs(row["ppl_rel_diff"]) <= PPL_TOLERANCE)
    return row


def continue_training(model, fp_state: tuple[dict, dict], names: list[str] | None, qnames: list[str], data: dict,
                      args: argparse.Namespace, desc: str) -> dict:
    """From the FP weights and AdamW state: qat_steps more steps at qat_lr on the same batches (seed + 2)."""
    model.load_state_dict(fp_state[0])
    return train(model, data["train_ids"], args.qat_steps, args.qat_lr, args, seed=args.seed + 2, names=names,
                 eval_names=qnames, curve_windows=data["curve"], desc=desc, offset=args.steps,
                 opt_state=fp_state[1])[0]


def run(args: argparse.Namespace) -> dict:
    """All four phases; returns the results (rows, curves, checks) that main writes."""
    from llmquant.loading.default_model import default_model_dir

    torch.set_num_threads(args.threads)
    out, t0 = args.out_dir, time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = small_tokenizer(default_model_dir(), out / "tokenizer", args.vocab)
    train_ids, eval_ids, text = tokens(tok_dir)
    data = {"train_ids": train_ids, "text": text, "eval": windows_of(eval_ids, args.seqlen, args.eval_windows),
            "train": windows_of(train_ids, args.seqlen, 16, np.random.default_rng(args.seed))}
    data["curve"] = data["eval"][:16]
    model = build_model(args)
    qnames = quantized_names(model)
    fp_curve, opt_state = train(model, train_ids, args.steps, args.lr, args, seed=args.seed + 1, names=None,
                                eval_names=None, curve_windows=data["curve"], desc="FP", warmup=max(1, args.steps // 20))
    fp_state = ({k: v.detach().clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt_state))
    levels = {"fp": measure(model, data["curve"], None)["loss"], "ptq": measure(model, data["curve"], qnames)["loss"]}
    before = model.get_parameter(HIST_TENSOR).detach().clone()
    folder = save_checkpoint(model, out / "fp-hf", tok_dir)
    files = {"fp": write_gguf(folder, out / "fp-f32.gguf", "f32", args.threads),
             "ptq": write_gguf(folder, out / "ptq-rtn-q4_0.gguf", "q4_0", args.threads)}
    checked = check_file(files["ptq"], folder, {n: fake_q4_0(model.get_parameter(n)) for n in qnames})
    rows = [phase_row("FP (f32)", f"{args.steps}", model, None, data, files["fp"], args),
            phase_row("PTQ: RTN q4_0", f"{args.steps}", model, qnames, data, files["ptq"], args)]
    steps = f"{args.steps}+{args.qat_steps}"
    curves = {"fp": fp_curve}
    for key, phase, names in (("control", "control: FP +steps, RTN q4_0", None), ("qat", "QAT q4_0 (STE)", qnames)):
        curves[key] = continue_training(model, fp_state, names, qnames, data, args, key)
        folder = save_checkpoint(model, out / f"{key}-hf", tok_dir)
        files[key] = write_gguf(folder, out / f"{key}-q4_0.gguf", "q4_0", args.threads)
        checked += check_file(files[key], folder, {n: fake_q4_0(model.get_parameter(n)) for n in qnames})
        rows.append(phase_row(phase, steps, model, qnames, data, files[key], args))
    after = model.get_parameter(HIST_TENSOR).detach().clone()
    return {"rows": rows, "curves": curves, "file_matches_fake_quant": True, "tensors_checked": checked,
            "quantized_tensors": qnames, "curve_levels": levels, "ppl_tolerance": PPL_TOLERANCE,
            "tokens_match_llamacpp": llama_tokens_match(files["fp"], text, eval_ids),
            "params": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - t0,
            "histogram": {"tensor": HIST_TENSOR, "before": before, "after": after}}


def table(rows: list[dict]) -> str:
    head = ["phase", "steps", "train loss", "held-out loss", "torch ppl", "llama.cpp ppl", "llama.cpp/torch",
            "file MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["phase"], r["steps"], f"{r['train_loss']:.4f}", f"{r['heldout_loss']:.4f}", f"{r['torch_ppl']:.3f}",
                 f"{r['llamacpp_ppl']:.3f}", f"{100 * r['ppl_rel_diff']:+.3f}%", f"{r['file_mib']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _smooth(values: list[float], n: int = 20) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    n = max(1, min(n, len(v)))
    return np.convolve(v, np.ones(n) / n, mode="valid")


def plot(result: dict, path: Path, args: argparse.Namespace) -> None:
    """Training curves (whole run; the continued phase zoomed) and the histograms of one linear
    in units of its blocks' q4_0 scale d, where the 16 codes sit on the integers -8..7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = result["curves"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.2))
    ax = axes[0, 0]
    for key, label in (("fp", "FP"), ("control", "control (no fake quant)"), ("qat", "QAT (fake q4_0)")):
        s = _smooth(c[key]["loss"])
        ax.plot(c[key]["step"][len(c[key]["step"]) - len(s):], s, lw=1, label=f"{label}: train (mean of 20)")
    ax.plot(c["fp"]["eval_step"], c["fp"]["eval_loss"], "k.", ms=4, label="FP: held-out")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="training from scratch")
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for key, label, style in (("control", "control, RTN q4_0", "s-"), ("qat", "QAT, q4_0", "o-")):
        ax.plot(c[key]["eval_step"], c[key]["eval_loss"], style, ms=3, label=f"{label}: held-out")
    for key, label, ls in (("fp", "FP, f32", ":"), ("ptq", "PTQ: FP, RTN q4_0", "--")):
        ax.axhline(result["curve_levels"][key], ls=ls, c="gray", lw=1)
        ax.text(0.01, result["curve_levels"][key], label, transform=ax.get_yaxis_transform(), fontsize=7,
                va="bottom" if key == "fp" else "top")
    ax.set(xlabel="step", ylabel="held-out loss (first 16 windows)", title="continued: QAT vs the same steps without")
    ax.legend(fontsize=7)
    hist = result["histogram"]
    (before, codes0), (after, codes1) = grid_units(hist["before"]), grid_units(hist["after"])
    changed = float(np.mean(codes0 != codes1))
    bins = np.linspace(-8.5, 7.5, 161)
    for ax, units, title in ((axes[1, 0], before, "before QAT (FP weights)"),
                             (axes[1, 1], after, f"after QAT (latent; {100 * changed:.0f}% of codes moved)")):
        ax.hist(units, bins=bins, color="tab:blue")
        for g in range(-8, 8):
            ax.axvline(g, c="tab:red", lw=0.5, alpha=0.6)
        ax.set(xlabel="w / d (d: its block's fp16 q4_0 scale; red: the 16 codes)", ylabel="weights",
               title=f"{hist['tensor'].removeprefix('model.')}: {title}")
        ax.title.set_fontsize(9)
    fig.suptitle(f"tiny Llama, {result['params'] / 1e6:.2f}M params, {args.layers} layers, hidden {args.hidden}: "
                 "FP vs post-training RTN vs QAT, q4_0", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_info(args: argparse.Namespace, argv: list[str]) -> dict:
    return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
            "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "scripts/qat_demo.py", *argv])}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
        for mod in ("llama_cpp", "matplotlib", "tqdm"):
            try:
                __import__(mod)
            except ImportError as exc:
                raise LlmquantError(f"{mod} is not installed ({exc}); install llmquant[llama,bench]") from exc
        result = run(args)
    except LlmquantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    png, results = args.out_dir / "qat_demo.png", args.out_dir / "results.json"
    plot(result, png, args)
    (before, codes0), (after, codes1) = (grid_units(result["histogram"][k]) for k in ("before", "after"))
    result["histogram"] = {"tensor": HIST_TENSOR, "codes_moved": float(np.mean(codes0 != codes1))}
    results.write_text(json.dumps({"run": run_info(args, argv), **result}, indent=1))
    print(table(result["rows"]))
    bad = [r["phase"] for r in result["rows"] if not r["ppl_matches"]]
    print(f"\n{result['params'] / 1e6:.2f}M parameters, {result['seconds']:.0f} s; every q4_0 file dequantizes bit for "
          f"bit to the weights its torch row used ({result['tensors_checked']} tensors); llama.cpp's perplexity "
          f"within {100 * PPL_TOLERANCE:g}% of torch's: {'yes' if not bad else 'NO for ' + ', '.join(bad)}; "
          f"wrote {results} and {png}", file=sys.stderr)
    return 0 if not bad and result["tokens_match_llamacpp"] else 1


if __name__ == "__main__":
    sys.exit(main())
