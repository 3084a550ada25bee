"""--calib-source: sampled calibration (generated, chat), its cache, and weighted mixes of sources."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import build_tiny_model

import llmquant.calibration_generate as gen
from llmquant import quantize
from llmquant.calibration import CalibrationConfig, calibration_tokens, parse_sources, split_counts
from llmquant.errors import LlmquantError

SEQLEN = 112  # past the chat template's system prompt and user turn


@pytest.fixture(scope="module")
def tiny(smollm2_dir, tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("calib-src") / "llama", "llama", smollm2_dir, hidden=64)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _generated(tiny: Path, n: int = 5, seed: int = 0, kind: str = "generated") -> torch.Tensor:
    return gen.generated_windows(tiny, n, SEQLEN, seed, kind=kind, batch=4)


def test_generated_is_cached_and_reused(tiny, cache, monkeypatch):
    import llmquant.llamacpp_sampler as sampler

    first = _generated(tiny)
    assert first.shape == (5, SEQLEN) and first.dtype == torch.long
    files = sorted((cache / "calibration").iterdir())
    assert [f.name.rsplit("-", 1)[1] for f in files] == ["batch0.safetensors", "batch1.safetensors"]  # 5 rows of 4
    monkeypatch.setattr(sampler, "sample_sequences", lambda *a, **k: pytest.fail("sampled again from the cache"))
    assert torch.equal(_generated(tiny), first)


def test_fewer_windows_are_the_first_of_more_and_share_their_batches(tiny, cache, monkeypatch):
    import llmquant.llamacpp_sampler as sampler

    three = _generated(tiny, n=3)
    real, calls = sampler.sample_sequences, []
    monkeypatch.setattr(sampler, "sample_sequences", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    six = _generated(tiny, n=6)
    assert torch.equal(six[:3], three)
    assert calls == [0 * 1_000_003 + 1]  # seed 0: batch 0 came from the cache, only batch 1 (seeded 1) was sampled


def test_generated_sequences_start_at_bos_are_distinct_and_seeded(tiny, cache):
    ids = _generated(tiny)
    assert (ids[:, 0] == 1).all()  # the tiny config's bos_token_id
    assert len({tuple(r.tolist()) for r in ids}) == len(ids)
    assert (ids[:, 1:] != 2).all()  # end-of-sequence may not cut a sequence short
    assert not torch.equal(_generated(tiny, seed=1), ids)
    for f in (cache / "calibration").iterdir():
        f.unlink()
    assert torch.equal(_generated(tiny), ids)  # sampled afresh: the same tokens


def test_generated_is_the_same_in_a_fresh_process(tiny, cache):
    ids = _generated(tiny)
    code = (f"import sys, json, torch; torch.set_num_threads({torch.get_num_threads()}); "
            "import llmquant.calibration_generate as g; "
            f"print(json.dumps(g.generated_windows(sys.argv[1], 5, {SEQLEN}, 0, batch=4).tolist()))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny)], capture_output=True, text=True, check=True,
                         env={"LLMQUANT_CACHE": str(cache.parent / "other-cache"), "HF_HUB_OFFLINE": "1",
                              "PATH": "/usr/bin:/bin"})
    assert torch.equal(torch.tensor(json.loads(out.stdout)), ids)


def test_chat_samples_are_the_assistants_reply_under_the_models_template(tiny, cache):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    ids = _generated(tiny, n=3, kind="chat")
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row in ids.tolist():
        text = tok.decode(row)
        assert text.startswith("<|im_start|>system\n"), text[:80]
        user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
        assert row[:len(prompt)] == prompt and prompt[-len(header):] == header
        assert len(row) - len(prompt) > 0  # the reply itself is sampled


def test_chat_without_a_template_and_generated_without_bos_are_refused(tiny, tmp_path, cache):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny.iterdir():
        if f.name != "chat_template.jinja":
            (bare / f.name).symlink_to(f)
    with pytest.raises(LlmquantError, match="has no chat template, which --calib-source chat needs"):
        _generated(bare, kind="chat")
    nobos = tmp_path / "nobos"
    nobos.mkdir()
    for f in tiny.iterdir():
        if f.name != "tokenizer_config.json":
            (nobos / f.name).symlink_to(f)
    cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    cfg["bos_token"] = None
    (nobos / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LlmquantError, match="has no BOS token to start generated calibration from"):
        _generated(nobos)


def test_a_mix_sums_to_the_requested_windows_in_its_parts_order(tiny, cache):
    cfg = CalibrationConfig(samples=7, seqlen=SEQLEN, source="generated:0.5,builtin:0.5")
    ids = calibration_tokens(tiny, cfg)
    assert ids.shape == (7, SEQLEN)
    assert split_counts(7, [0.5, 0.5]) == [4, 3]
    assert torch.equal(ids[:4], gen.generated_windows(tiny, 4, SEQLEN, 0))
    builtin = calibration_tokens(tiny, CalibrationConfig(samples=3, seqlen=SEQLEN, source="builtin"))
    assert torch.equal(ids[4:], builtin)


def test_the_default_source_is_generated_and_spelled_the_same_however_given(tiny, cache):
    from llmquant.calibration import source_spec

    default = CalibrationConfig(samples=3, seqlen=SEQLEN)
    assert torch.equal(calibration_tokens(tiny, default), gen.generated_windows(tiny, 3, SEQLEN, 0))
    assert source_spec(default) == source_spec(CalibrationConfig(source="generated")) == "generated:1"
    assert source_spec(CalibrationConfig(text_file=Path("a.txt"))) == "file:a.txt:1"
    with pytest.raises(LlmquantError, match="pass either --calib-text or --calib-source, not both"):
        source_spec(CalibrationConfig(text_file=Path("a.txt"), source="generated"))


def test_split_counts_follow_the_weights():
    assert split_counts(10, [3, 1]) == [8, 2]  # 7.5 / 2.5: the tie goes to the earlier part
    assert split_counts(128, [1, 1, 2]) == [32, 32, 64]
    assert split_counts(5, [1, 1, 1]) == [2, 2, 1]
    assert sum(split_counts(1000, [0.3, 0.01, 2.5])) == 1000


def test_source_specs_parse_with_paths_and_weights():
    s = parse_sources("file:/data/a:b.txt:0.25,dataset:wikitext,generated:2")
    assert [(x.kind, x.arg, x.weight) for x in s] == [("file", "/data/a:b.txt", 0.25), ("dataset", "wikitext", 1.0),
                                                      ("generated", None, 2.0)]
    assert [(x.kind, x.arg) for x in parse_sources("file:notes.txt")] == [("file", "notes.txt")]
    with pytest.raises(LlmquantError, match="builtin takes only a weight"):
        parse_sources("builtin:abc")


def test_a_run_on_a_mix_calibrates_on_all_its_tokens_and_its_source_decides_the_bytes(tiny, tmp_path, cache):
    cfg = CalibrationConfig(samples=4, seqlen=SEQLEN, source="generated:0.5,builtin:0.5")
    a = quantize(tiny, tmp_path / "mix.gguf", type="q4_0", method="gptq", calibration=cfg, progress=False)
    assert a.calibration_tokens == 4 * SEQLEN
    b = quantize(tiny, tmp_path / "builtin.gguf", type="q4_0", method="gptq",
                 calibration=CalibrationConfig(samples=4, seqlen=SEQLEN, source="builtin"), progress=False)
    assert a.checksum != b.checksum


def test_gumbel_draw_follows_the_tempered_softmax():
    from llmquant.llamacpp_sampler import gumbel_draw

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0])
    for temperature in (1.0, 0.5, 2.0):
        gen = torch.Generator().manual_seed(0)
        drawn = gumbel_draw(logits.expand(200_000, -1), temperature, gen)
        freq = torch.bincount(drawn, minlength=5).double() / drawn.numel()
        want = torch.softmax(logits.double() / temperature, 0)
        assert (freq - want).abs().max() < 0.004, (temperature, freq, want)


def test_llamacpp_samples_are_draws_from_the_hf_models_own_distribution(smollm2_dir, tmp_path):
    """Teacher-forced through the HF model, sampled tokens cost on average what the model's entropy says.

    For exact draws from p, E[-log p(x)] = H(p) at every step. A sampler that
    mixed up sequences or positions, read the wrong logits row, or applied the
    temperature the wrong way would sample tokens far less (or far more) likely
    than that under the checkpoint's own distribution.
    """
    from transformers import AutoModelForCausalLM

    from llmquant.llamacpp_sampler import sample_sequences

    gguf = tmp_path / "q8_0.gguf"
    quantize(smollm2_dir, gguf, type="q8_0", pure=True, progress=False)
    temperature, seqlen = 0.7, 96
    prompts = [[1], [1, 504, 3458], [1], [1, 30, 2412, 314, 253]]
    ids = sample_sequences(gguf, prompts, seqlen, 3, temperature=temperature, threads=2)
    assert ids.shape == (4, seqlen)
    for row, p in zip(ids.tolist(), prompts, strict=True):
        assert row[:len(p)] == p
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[:, :-1].double() / temperature, -1)
    nll, entropy = [], []
    for i, p in enumerate(prompts):
        steps = slice(len(p) - 1, seqlen - 1)
        nll.append(-logp[i, steps].gather(-1, ids[i, 1:][steps, None])[:, 0])
        entropy.append(-(logp[i, steps].exp() * logp[i, steps]).sum(-1))
    nll, entropy = torch.cat(nll), torch.cat(entropy)
    stderr = (nll - entropy).std() / len(nll) ** 0.5
    assert abs(float((nll - entropy).mean())) < 4 * float(stderr), (nll.mean(), entropy.mean(), stderr)


def test_the_sampler_refuses_a_file_llamacpp_cannot_load_and_tokens_outside_its_vocabulary(tiny, tmp_path):
    from llmquant.llamacpp_sampler import sample_sequences

    gguf = tmp_path / "tiny-q8_0.gguf"
    quantize(tiny, gguf, type="q8_0", pure=True, progress=False)
    with pytest.raises(LlmquantError, match="outside the .*-token vocabulary"):
        sample_sequences(gguf, [[1, 10**6]], 8, 0, temperature=1.0, threads=1)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    with pytest.raises(LlmquantError, match="llama.cpp cannot load .*cut.gguf to sample calibration from"):
        sample_sequences(cut, [[1]], 8, 0, temperature=1.0, threads=1)
