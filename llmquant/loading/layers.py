"""Run one real decoder layer of a Hugging Face model at a time.

The model's module tree is built on the meta device (no memory), then one
layer at a time is materialized on the CPU with its weights from the
checkpoint. The keyword arguments the model passes to its layers (rotary
position embeddings, masks, cache switches) are captured once by running the
model's own forward until layer 0, so the replay matches the model exactly
for every architecture transformers implements.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LlmquantError
from .weights import WeightStore


class _StopForward(Exception):
    """Raised by the capture hook to end the forward pass at layer 0."""


class _Capture(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kwargs: dict = {}

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise LlmquantError("decoder layer called with positional arguments; unsupported model code")
        self.kwargs = kwargs
        raise _StopForward


class LayerRunner:
    """Materializes decoder layers one by one and replays them on hidden states."""

    def __init__(self, model_dir, store: WeightStore, layer_prefix: str):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.store = store
        self.layer_prefix = layer_prefix
        config = AutoConfig.from_pretrained(model_dir)
        config.use_cache = False
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        self.model.eval()
        self.decoder = self.model.model
        rotary = getattr(self.decoder, "rotary_emb", None)
        if rotary is not None:  # buffers computed at init; rebuild them for real
            self.decoder.rotary_emb = type(rotary)(config=config)
        self.layer_kwargs: dict = {}

    @torch.no_grad()
    def capture_kwargs(self, hidden: torch.Tensor) -> None:
        """Record what the model passes to its layers for batches shaped like ``hidden``."""
        layers = self.decoder.layers
        original, capture = layers[0], _Capture()
        layers[0] = capture
        try:
            self.decoder(inputs_embeds=hidden, use_cache=False)
        except _StopForward:
            pass
        finally:
            layers[0] = original
        self.layer_kwargs = capture.kwargs

    def build(self, i: int, weights: dict[str, torch.Tensor]) -> nn.Module:
        """Layer i on the CPU holding ``weights`` (full HF names -> tensors)."""
        layer = self.decoder.layers[i]
        layer.to_empty(device="cpu")
        prefix = self.layer_prefix.format(i=i)
        state = {name[len(prefix):]: t for name, t in weights.items()}
        missing, unexpected = layer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LlmquantError(f"layer {i}: weights do not match the model code (missing {missing[:2]}, unexpected {unexpected[:2]})")
        return layer

    def free(self, i: int) -> None:
        self.decoder.layers[i].to("meta")

    @torch.no_grad()
    def feed(self, layer: nn.Module, hidden: torch.Tensor, module: nn.Module, observe, batch_size: int) -> None:
        """Pass each batch of ``hidden`` through ``layer`` only as far as ``module``'s input.

        observe(x) gets that input (x [batch, seq, ci]); the rest of the layer is
        skipped, which makes the true-sequential passes about half as costly.
        """

        def stop(_module, args):
            observe(args[0])
            raise _StopForward

        hook = module.register_forward_pre_hook(stop)
        try:
            for batch in hidden.split(batch_size):
                try:
                    layer(batch, **self.layer_kwargs)
                except _StopForward:
                    pass
        finally:
            hook.remove()

    @torch.no_grad()
    def forward(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, **self.layer_kwargs)
        return out[0] if isinstance(out, tuple) else out
