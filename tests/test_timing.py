"""Where a run's time goes (``--report``): the stage clock's accounting, and the stages of real runs."""

from __future__ import annotations

import json

import pytest
from tiny import build_tiny_model

import llmquant
from llmquant.timing import STAGES, StageClock


def test_nested_stages_count_their_time_once():
    ticks = iter([0.0, 1.0, 3.0, 3.5, 6.0, 10.0, 10.0, 12.0])
    clock = StageClock(timer=lambda: next(ticks))
    with clock("method"):  # 0 .. 10, of which 1 .. 6 in forward (with 3 .. 3.5 in statistics)
        with clock("forward"):
            with clock("statistics"):
                pass
        # back in method at 6
    with clock("write"):  # 10 .. 12
        pass
    assert clock.totals == {"read": 0.0, "forward": 4.5, "statistics": 0.5, "method": 5.0, "write": 2.0}
    with pytest.raises(ValueError, match="unknown stage"):
        with clock("sleep"):
            pass


@pytest.fixture(scope="module")
def tiny(smollm2_dir, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("timing") / "tiny", "llama", smollm2_dir, layers=3)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_report_has_every_stage_per_layer(tiny, tmp_path, method):
    calib = llmquant.CalibrationConfig(samples=4, seqlen=32) if method != "rtn" else None
    rep = llmquant.quantize(tiny, tmp_path / "m.gguf", type="q4_0", method=method, calibration=calib,
                            report=tmp_path / "r.json", progress=False)
    data = json.loads((tmp_path / "r.json").read_text())
    assert list(data["stages"]) == list(STAGES) and data["stages"] == rep.stages
    assert [s["layer"] for s in data["layer_stages"]] == [0, 1, 2]
    total = sum(rep.stages.values())
    assert 0 < total <= rep.seconds
    for stage in STAGES:  # the layers' parts are within the run's totals (embedding and head are outside)
        assert 0 <= sum(s[stage] for s in rep.layer_stages) <= rep.stages[stage] + 1e-9
    for s in rep.layer_stages:
        assert s["method"] > 0 and s["write"] > 0 and s["read"] > 0
        calibrated = method != "rtn"
        assert (s["forward"] > 0) == calibrated and (s["statistics"] > 0) == calibrated
    line = next(line for line in rep.summary().splitlines() if line.startswith("  stages  "))
    assert ("x the forward passes" in line) == (method != "rtn")
