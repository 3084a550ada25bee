"""Run one real decoder layer of a Hugging Face model at a time.

The model's module tree is built on the meta device (no memory), then one
layer at a time is materialized on the compute device (the CPU or a GPU) with
its weights from the checkpoint, and sent back to meta when done, so the
device holds one layer (and the activations) whatever the depth. The keyword arguments the model passes to each of its layers
(rotary position embeddings, masks, cache switches) are captured once by
running the model's own forward with every layer replaced by a recorder, so
the replay matches the model exactly for every architecture transformers
implements, including those whose layers differ in kind (Gemma 3: sliding
layers get the local RoPE base and a sliding-window mask, global layers the
global base and the full causal mask).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LlmquantError
from ..threads import one_thread
from .weights import WeightStore


class _StopForward(Exception):
    """Raised to end a forward pass early (after the last layer's recorder, or at a module's input)."""


class _Recorder(nn.Module):
    """Stands in for one decoder layer: keeps what the model passes it, hands the input on unchanged."""

    def __init__(self, last: bool) -> None:
        super().__init__()
        self.last = last
        self.kwargs: dict = {}

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise LlmquantError("decoder layer called with positional arguments; unsupported model code")
        self.kwargs = kwargs
        if self.last:  # the final norm and head are on the meta device: stop before them
            raise _StopForward
        return hidden_states


def _to_device(value, device: torch.device, moved: dict[int, object]):
    """``value`` with every tensor inside it (dicts, tuples, lists) on ``device``; other objects as they are.

    moved: id of a tensor already moved -> its copy, so tensors the model shares
    between layers stay shared on the device.
    """
    if isinstance(value, torch.Tensor):
        if id(value) not in moved:
            moved[id(value)] = value.to(device)
        return moved[id(value)]
    if isinstance(value, dict):
        return {k: _to_device(v, device, moved) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        items = [_to_device(v, device, moved) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a namedtuple
    return value


class LayerRunner:
    """Materializes decoder layers one by one and replays them on hidden states."""

    def __init__(self, model_dir, store: WeightStore, layer_prefix: str, device: str | torch.device = "cpu"):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.store = store
        self.device = torch.device(device)
        self.layer_prefix = layer_prefix
        # the language model's own config: itself for a causal LM, text_config for a multimodal wrapper
        # (Gemma3ForConditionalGeneration), whose decoder layers are those of its text model
        config = AutoConfig.from_pretrained(model_dir).get_text_config()
        config.use_cache = False
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        self.model.eval()
        self.decoder = self.model.model
        rotary = getattr(self.decoder, "rotary_emb", None)
        if rotary is not None:  # buffers computed at init; rebuild them for real
            self.decoder.rotary_emb = type(rotary)(config=config)
        self.layer_kwargs: list[dict] = []  # per layer, what the model passes it besides the hidden states
        self._index: dict[int, int] = {}  # id of a decoder layer module -> its index

    @torch.no_grad()
    def capture_kwargs(self, hidden: torch.Tensor) -> None:
        """Record what the model passes to each layer for sequences as long as ``hidden``'s.

        hidden: [batch, seq, hidden_size]; only its first row runs, so every recorded
        tensor (masks [1, 1, seq, seq], rotary cos/sin [1, seq, head_dim]) has batch 1
        and broadcasts over batches of any size. Layers of one kind share the same
        tensors (the model computes each once), so this costs one set per kind.
        The model's own code (rotary buffers) lives on the CPU: the capture runs
        there and the recorded tensors then move to the compute device.
        """
        layers = self.decoder.layers
        originals = list(layers)
        recorders = [_Recorder(last=i == len(originals) - 1) for i in range(len(originals))]
        for i, rec in enumerate(recorders):
            layers[i] = rec
        try:
            with one_thread():  # the run's first cos/sin, on this thread alone (see one_thread)
                self.decoder(inputs_embeds=hidden[:1].cpu(), use_cache=False)
        except _StopForward:
            pass
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
        moved: dict[int, object] = {}  # a tensor shared by layers of one kind moves once
        self.layer_kwargs = [_to_device(rec.kwargs, self.device, moved) for rec in recorders]
        self._index = {id(layer): i for i, layer in enumerate(originals)}

    def kwargs_for(self, layer: nn.Module) -> dict:
        """The keyword arguments captured for this decoder layer (one of ``self.decoder.layers``)."""
        i = self._index.get(id(layer))
        if i is None:
            raise LlmquantError("no captured arguments for this layer: call capture_kwargs first")
        return self.layer_kwargs[i]

    def build(self, i: int, weights: dict[str, torch.Tensor]) -> nn.Module:
        """Layer i on the compute device holding ``weights`` (full HF names -> tensors, any device).

        The layer's parameters are the weights' tensors themselves where they already
        lie on the device (``assign``): a second copy of a Llama-70B layer is 3.4 GB
        of float32. The caller reads the layer's state back after the method anyway.
        """
        layer = self.decoder.layers[i]
        layer.to_empty(device=self.device)  # buffers, and any parameter the weights lack, get storage
        prefix = self.layer_prefix.format(i=i)
        state = {name[len(prefix):]: t.to(self.device) for name, t in weights.items()}
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise LlmquantError(f"layer {i}: weights do not match the model code (missing {missing[:2]}, unexpected {unexpected[:2]})")
        return layer

    def free(self, i: int) -> None:
        """Send layer i back to meta: its device memory returns to torch's allocator for the next layer."""
        self.decoder.layers[i].to("meta")

    @torch.no_grad()
    def feed(self, layer: nn.Module, hidden: torch.Tensor, module: nn.Module, observe, batch_size: int,
             kwargs: dict | None = None) -> None:
        """Pass each batch of ``hidden`` through ``layer`` only as far as ``module``'s input.

        observe(x) gets that input (x [batch, seq, ci]); the rest of the layer is
        skipped, which makes the true-sequential passes about half as costly.
        kwargs: the layer's captured arguments, given where ``layer`` is a copy of one
        of the decoder's layers (default: ``kwargs_for(layer)``).
        """

        def stop(_module, args):
            observe(args[0])
            raise _StopForward

        kwargs = self.kwargs_for(layer) if kwargs is None else kwargs
        hook = module.register_forward_pre_hook(stop)
        try:
            for batch in hidden.split(batch_size):
                try:
                    layer(batch, **kwargs)
                except _StopForward:
                    pass
        finally:
            hook.remove()

    @torch.no_grad()
    def forward(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer(hidden, **self.kwargs_for(layer))
        return out[0] if isinstance(out, tuple) else out
