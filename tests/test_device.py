"""``--device``: every calibrated method computes on the device of its tensors, one layer at a time.

These run on the CPU (the GPU path is the same code, so the CPU tests hold it
too). Three kinds of check stand in for a GPU: the device choice and its
refusals; byte identity of ``--device cpu``/``auto`` with the default; and
runs that catch a tensor made on the CPU whatever the inputs' device (the
layer math on ``meta`` tensors, and a whole run with every torch factory call
from the methods recorded).
"""

from __future__ import annotations

import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from same_file import assert_same_file
from tiny import build_tiny_model
from torch.overrides import TorchFunctionMode

from llmquant import CalibrationConfig, LlmquantError, quantize
from llmquant.export.gguf_file import ResumableError
from llmquant.formats import get_format
from llmquant.loading.layers import LayerRunner, _to_device
from llmquant.methods import edge
from llmquant.methods.awq import channel_map, fold_scales, rtn_error, scales_for
from llmquant.methods.gptq import HessianAccumulator, _walk, gptq_quantize
from llmquant.methods.tune import _start_state
from llmquant.options import resolve_device

CALIB = CalibrationConfig(samples=4, seqlen=64)
METHODS_DIR = str(Path(edge.__file__).parent)
FORMATS_DIR = str(Path(get_format.__code__.co_filename).parent)


@pytest.fixture(scope="module")
def tiny(smollm2_dir, tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("device") / "llama", "llama", smollm2_dir, hidden=128)


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --------------------------------------------------------------------------- choosing the device


def test_auto_takes_the_gpu_where_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("CPU") == "cpu"  # forced, even with a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"


def test_unknown_device_is_refused():
    with pytest.raises(LlmquantError, match=r"^--device must be one of auto, cpu, cuda, got 'tpu'$"):
        resolve_device("tpu")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_cuda_without_a_gpu_is_refused_before_any_output(method, tiny, tmp_path, no_gpu, capsys):
    """One line, exit 2, and nothing written: not the output, not its work folder."""
    from llmquant.cli import main

    out = tmp_path / "m.gguf"
    rc = main(["quantize", str(tiny), "--out", str(out), "--method", method, "--device", "cuda", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("error: --device cuda: torch sees no CUDA GPU"), err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(LlmquantError, match="^--device cuda: torch sees no CUDA GPU"):
        quantize(tiny, out, method=method, device="cuda", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_cpu_and_auto_write_the_bytes_of_no_flag(method, tiny, tmp_path, no_gpu):
    files = {}
    for device in (None, "cpu", "auto"):
        out = tmp_path / f"{device}.gguf"
        kw = {} if device is None else {"device": device}
        report = quantize(tiny, out, type="q4_0", method=method, calibration=CALIB, progress=False, **kw)
        assert report.device == "cpu"
        assert "device cpu" in report.summary()
        files[device] = out
    assert_same_file(files["cpu"], files[None])
    assert_same_file(files["auto"], files[None])


# --------------------------------------------------------------------------- running out of GPU memory


def test_out_of_gpu_memory_is_resumable_and_continues_on_the_cpu(tiny, tmp_path, monkeypatch, capsys):
    """A GPU out-of-memory in layer 1 stops like host memory does (one line, the first layer kept);
    the run then continues with --device cpu (the device is not fingerprinted)."""
    from llmquant.cli import main

    args = ["quantize", str(tiny), "--type", "q4_0", "--method", "gptq", "--calib-samples", "4",
            "--calib-seqlen", "64", "--quiet"]
    whole = tmp_path / "whole.gguf"
    assert main([*args, "--out", str(whole)]) == 0
    build = LayerRunner.build

    def build_oom(self, i, weights):
        if i == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return build(self, i, weights)

    monkeypatch.setattr(LayerRunner, "build", build_oom)
    out = tmp_path / "m.gguf"
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: out of GPU memory while quantizing into {out}; "), err
    assert "run again with --resume to continue" in err, err
    assert not out.exists()
    monkeypatch.setattr(LayerRunner, "build", build)
    assert main([*args, "--out", str(out), "--resume", "--device", "cpu"]) == 0
    assert_same_file(out, whole)


def test_out_of_gpu_memory_through_the_api(tiny, tmp_path, monkeypatch):
    def build_oom(self, i, weights):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(LayerRunner, "build", build_oom)
    with pytest.raises(ResumableError, match="^out of GPU memory while quantizing into"):
        quantize(tiny, tmp_path / "m.gguf", method="gptq", calibration=CALIB, progress=False)
    assert list(tmp_path.iterdir()) == []  # died in layer 0: nothing to keep


# --------------------------------------------------------------------------- no tensor left on the CPU


def test_captured_arguments_move_and_stay_shared():
    """What the model passes its layers (cos/sin in a tuple, masks, flags) all goes to the device;
    a tensor shared by layers of one kind is moved once and stays shared."""
    Pair = namedtuple("Pair", "cos sin")
    cos, sin, mask = torch.ones(1, 4, 8), torch.zeros(1, 4, 8), torch.ones(1, 1, 4, 4)
    layers = [{"position_embeddings": (cos, sin), "mask": mask, "pair": Pair(cos, sin), "flag": False,
               "ids": [torch.arange(4)], "none": None} for _ in range(2)]
    moved: dict = {}
    out = [_to_device(kw, torch.device("meta"), moved) for kw in layers]
    for kw in out:
        assert all(t.device.type == "meta" for t in (*kw["position_embeddings"], kw["mask"], *kw["ids"]))
        assert isinstance(kw["pair"], Pair) and kw["pair"].cos.device.type == "meta"
        assert kw["flag"] is False and kw["none"] is None
    assert out[0]["mask"] is out[1]["mask"] and out[0]["pair"].sin is out[0]["position_embeddings"][1]


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1"])
def test_gptq_walk_and_hessian_stay_on_the_inputs_device(qtype):
    """On ``meta`` (no data, every device check intact): a CPU tensor mixed in would raise."""
    fmt = get_format(qtype)
    co, ci = 8, 64
    acc = HessianAccumulator(ci, device="meta")
    acc.add(torch.empty(2, 5, ci, device="meta"))
    H = acc.hessian()
    assert H.device.type == "meta"
    W = torch.empty(co, ci, device="meta")
    S = torch.empty(co, ci // 32, device="meta")
    M = torch.empty(co, ci // 32, device="meta") if fmt.has_min else None
    Q = _walk(W, H, fmt, S, M, 64, col_block=[j // 32 for j in range(ci)])
    assert Q.device.type == "meta" and W.device.type == "meta"


def test_awq_fold_stays_on_the_layers_device():
    layer = torch.nn.Module()
    layer.norm = torch.nn.RMSNorm(64, device="meta")
    layer.q = torch.nn.Linear(64, 32, bias=False, device="meta")
    index = channel_map(layer, ["q"], "norm")
    assert index.device.type == "meta"
    s = scales_for(torch.empty(64, device="meta"), 0.5)
    fold_scales(layer, ["q"], "norm", s, index)
    assert layer.q.weight.device.type == "meta" and layer.norm.weight.device.type == "meta"


class FactoryRecorder(TorchFunctionMode):
    """Records torch calls that make a tensor on the default device (no ``device=``) from code in
    ``scope``, and ``torch.from_numpy`` there outside ``methods/edge.py``: on a GPU, each is a CPU tensor
    the method meant to have beside its inputs."""

    FACTORIES = frozenset({"zeros", "ones", "empty", "full", "eye", "arange", "linspace", "logspace", "tensor",
                           "rand", "randn", "randint", "randperm", "as_tensor"})

    def __init__(self, scope: str) -> None:
        super().__init__()
        self.scope = scope
        self.found: list[str] = []

    def _caller(self) -> str | None:
        frame = sys._getframe(2)
        name = frame.f_code.co_filename
        return f"{Path(name).name}:{frame.f_lineno}" if name.startswith(self.scope) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.FACTORIES and "device" not in kwargs:
            where = self._caller()
            if where is not None:
                self.found.append(f"torch.{func.__name__} at {where}")
        return func(*args, **kwargs)

    def watch_from_numpy(self, monkeypatch) -> None:
        real = torch.from_numpy

        def from_numpy(a):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(self.scope) and frame.f_code.co_filename != edge.__file__:
                self.found.append(f"torch.from_numpy at {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
            return real(a)

        monkeypatch.setattr(torch, "from_numpy", from_numpy)


def test_the_recorder_sees_a_tensor_made_without_a_device(monkeypatch):
    """The check below can fail: a factory call or from_numpy in its scope is reported."""
    import numpy as np

    rec = FactoryRecorder(scope=__file__)
    rec.watch_from_numpy(monkeypatch)
    with rec:
        torch.zeros(2, device="cpu")
        torch.zeros(2)
        torch.from_numpy(np.ones(2))
    assert [f.split(" at ")[0] for f in rec.found] == ["torch.zeros", "torch.from_numpy"], rec.found


@pytest.mark.parametrize(("method", "qtype", "options"), [
    ("gptq", "q4_1", {"act_order": True}),
    ("gptq", "q4_K", {}),
    ("awq+gptq", "q4_0", {}),
    ("awq", "q5_1", {}),
    ("awq", "q4_K", {}),
    ("tune", "q4_0", {"steps": 2}),
])
def test_methods_make_every_tensor_on_their_inputs_device(method, qtype, options, tiny, tmp_path, monkeypatch):
    """A whole run: no method creates a tensor on the default device (on a GPU: the CPU) by itself."""
    rec = FactoryRecorder(scope=METHODS_DIR)
    rec.watch_from_numpy(monkeypatch)
    with rec:
        quantize(tiny, tmp_path / "m.gguf", type=qtype, pure=True, method=method, method_options=options,
                 calibration=CalibrationConfig(samples=2, seqlen=32), progress=False)
    assert rec.found == [], sorted(set(rec.found))


def test_tune_state_is_on_the_weights_device():
    """The trainable state of a linear starts beside its weights (codes from numpy come along)."""
    fmt = get_format("q4_0")
    W = torch.randn(4, 64)
    q = fmt.rtn(W.reshape(-1, 32).numpy())
    st = _start_state(fmt, q, W.to("meta"))
    assert {t.device.type for t in (st.base, st.s0, st.V, st.alpha)} == {"meta"}


class NumpyCrossings:
    """Counts tensors leaving torch for numpy (``Tensor.numpy``) and arrays entering it (``torch.from_numpy``)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        real_numpy, real_from = torch.Tensor.numpy, torch.from_numpy

        def numpy(t, *a, **k):
            self.count += 1
            return real_numpy(t, *a, **k)

        def from_numpy(a):
            self.count += 1
            return real_from(a)

        monkeypatch.setattr(torch.Tensor, "numpy", numpy)
        monkeypatch.setattr(torch, "from_numpy", from_numpy)


@pytest.mark.parametrize("qtype", ["q4_K", "q6_K", "q3_K", "q5_0", "q4_1"])
def test_gptq_crosses_to_numpy_per_tensor_not_per_block(qtype, monkeypatch):
    """llama.cpp's rules run in torch inside the walk (on a GPU: on the GPU): the numpy crossings of a
    whole GPTQ call are the same few for 2 and for 6 block column ranges (the QuantBlocks it returns)."""
    crossings = NumpyCrossings(monkeypatch)
    counts = []
    for ci in (512, 1536):
        g = torch.Generator().manual_seed(ci)
        W, X = torch.randn(8, ci, generator=g), torch.randn(64, ci, generator=g)
        before = crossings.count
        gptq_quantize(W, 2 * X.T @ X / 64, get_format(qtype), block_cols=256)
        counts.append(crossings.count - before)
    assert counts[0] == counts[1] <= 16, counts  # the QuantBlocks (k-quants: its SuperGrid) at the end


@pytest.mark.parametrize("qtype", ["q4_K", "q5_1"])
def test_awq_error_of_llama_cpps_rule_stays_in_torch(qtype, monkeypatch):
    """AWQ's α grid scores llama.cpp's rule on every candidate scaling: no numpy at all."""
    W = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    crossings = NumpyCrossings(monkeypatch)
    err = rtn_error(W, torch.rand(256) + 0.5, get_format(qtype), torch.eye(256))
    assert crossings.count == 0 and err > 0


@pytest.mark.parametrize(("qtype", "weighted"), [(t, w) for t in ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q4_0",
                                                                  "q4_1", "q5_0", "q5_1", "q8_0") for w in (False, True)])
def test_llama_cpps_rules_make_every_tensor_on_the_inputs_device(qtype, weighted, monkeypatch):
    """The formats' searches (``rtn_rows_torch``, imatrix path included) create no tensor on the default
    device and cross no numpy: on a GPU they stay on it."""
    fmt = get_format(qtype)
    rows = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    importance = torch.rand(512) + 0.1 if weighted else None
    rec = FactoryRecorder(scope=FORMATS_DIR)
    crossings = NumpyCrossings(monkeypatch)
    with rec:
        codes, grid = fmt.rtn_rows_torch(rows, importance)
    assert rec.found == [] and crossings.count == 0, sorted(set(rec.found))
    assert codes.shape == (512 * 4 // fmt.sub_size, fmt.sub_size) and grid.scales.shape == (codes.shape[0],)
