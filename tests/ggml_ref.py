"""llama.cpp's own quantizer, called directly: the byte oracle for the k-quants.

``ggml_quantize_chunk`` in the ggml library that llama-cpp-python built is the
function ``llama-quantize`` calls for every tensor (with ``imatrix=NULL`` when
no importance matrix is given), so its bytes are llama.cpp's bytes. gguf-py
cannot quantize k-quants, hence this ctypes bridge (tests only).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(libdir.glob("libggml-base.*")) or sorted(libdir.glob("libggml.*"))
    if not found:
        raise FileNotFoundError(f"no libggml-base in {libdir}: is llama-cpp-python installed?")
    lib = ctypes.CDLL(str(found[0]))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """x: float32 [rows, n_per_row] -> uint8 [rows · n_per_row / block, type_size], llama.cpp's bytes.

    imatrix: float32 [n_per_row] importance per column, or None (what
    ``llama-quantize`` passes without ``--imatrix``).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows * n // block, size), dtype=np.uint8)
    w = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    got = _lib().ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
                                     None if w is None else w.ctypes.data)
    assert got == out.nbytes, (got, out.nbytes)
    return out
