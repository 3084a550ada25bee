"""The core check of the project, shared by the method tests: the file holds exactly the method's weights."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from llmquant.export.arch import get_arch
from llmquant.loading.source import read_config


def assert_file_holds(model: Path, out: Path, w_hat: dict[str, np.ndarray], qtype: str, n_layers: int = 2) -> None:
    """gguf-py's dequantization of every recorded tensor in ``out`` equals the weights the
    method handed to the pipeline (w_hat: HF name -> [co, ci]), bit for bit, in type ``qtype``."""
    config = read_config(model)
    spec = get_arch(config)
    by_name = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert len([n for n in w_hat if n.endswith(".weight")]) == 7 * n_layers
    for hf_name, w in w_hat.items():
        t = by_name[spec.gguf_tensor_name(hf_name, n_layers)]
        assert t.tensor_type.name.lower() == qtype, hf_name
        deq = gguf.quants.dequantize(t.data.view(np.uint8), t.tensor_type)
        assert np.array_equal(deq, spec.to_gguf_rows(hf_name, w, config)), hf_name
