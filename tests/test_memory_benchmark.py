"""scripts/memory_benchmark.py on a real model's shapes (--preset), reduced to a tiny one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# A GQA model whose vocabulary is padded past the tokenizer's 49152 tokens, as Llama 3's presets are.
TINY = {"hidden": 128, "intermediate": 384, "heads": 4, "kv_heads": 2, "vocab": 49408, "dtype": "bfloat16"}


def script(name: str):
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2_dir):
    mb = script("memory_benchmark")
    mb.PRESETS["tiny"] = TINY
    work = tmp_path_factory.mktemp("memory")
    assert mb.main(["--preset", "tiny", "--methods", "rtn,gptq,gptq@gptq_target=layer", "--calib-samples", "2", "--calib-seqlen", "32",
                    "--work-dir", str(work)]) == 0
    return mb, work, json.loads((work / "memory.json").read_text())


def test_preset_replaces_the_sweeps_and_keeps_its_shapes(run):
    _, work, result = run
    rows = result["rows"]
    assert [(r["method"], r["sweeps"]) for r in rows] == [("rtn", ["preset"]), ("gptq", ["preset"]),
                                                          ("gptq@gptq_target=layer", ["preset"])]
    config = json.loads((work / "models" / "tiny-l2-bfloat16" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_key_value_heads"],
            config["vocab_size"], config["dtype"], config["num_hidden_layers"]) == (128, 384, 2, 49408, "bfloat16", 2)
    for r in rows:
        assert r["peak_mib"] > result["baseline"]["peak_mib"] and r["vocab"] == 49408
    assert (work / "memory.png").stat().st_size > 10_000


def test_the_peak_is_accounted_from_the_shapes(run):
    mb, _, result = run
    rtn, gptq, plain = result["rows"]
    assert rtn["holds_mib"] is None  # no calibration: nothing but the tensor being packed
    h, i, mib = 128, 384, 2**-20
    layer = (2 * h * h + 2 * 64 * h + 3 * h * i + 2 * h) * 4 * mib  # float32, kv width 2 heads of 32
    want = {"layer_weights": layer, "hidden_states": 2 * 2 * 32 * h * 4 * mib, "hessian": i * i * 4 * mib,
            "gptq_factor": 2 * i * i * 8 * mib, "mlp_batch": 3 * 2 * 32 * i * 4 * mib}
    assert plain["holds_mib"] == pytest.approx({**want, "total": sum(want.values())})
    # fitted to the model (the default): the full-precision stream's inputs and outputs beside the quantized ones
    want["hidden_states"] *= 2
    assert gptq["holds_mib"] == pytest.approx({**want, "total": sum(want.values())})
    table = mb.holds_table(result["rows"])
    assert table.count("\n") == 3 and "| tiny-l2-bfloat16 | gptq |" in table


def test_unknown_preset_and_short_vocab_are_refused(tmp_path, smollm2_dir):
    mb = script("memory_benchmark")
    with pytest.raises(SystemExit) as exc:
        mb.parse_args(["--preset", "llama-9-1t"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="smaller than the tokenizer's 49152"):
        script("synthetic_model").build_synthetic_llama(tmp_path / "m", hidden=64, layers=1, vocab=1000,
                                                        tokenizer_dir=smollm2_dir)
