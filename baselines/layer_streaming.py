"""``layer-streaming``: ZeRO-Inference style, like the paper's "DeepSpeed-MII" configuration.

Contract: every decoder layer's weights (attention and the whole MoE block, all experts) live
in page-locked host memory and are streamed to the GPU for every forward pass, double
buffered: while layer l computes from one buffer, layer l+1 is copied into the other on a
side stream (a buffer is refilled only after the GPU has finished with it). The embedding,
final norm and LM head stay on the GPU (0.5 GB for Mixtral; ZeRO-Inference offloads them too,
which would only add copies). Experts of the streamed layer run with the resident grouped
path. Refuses when two layer buffers, the resident parts, KV cache and workspace exceed the
budget. Counters: layers streamed, bytes copied.
"""

from __future__ import annotations

import dataclasses

import torch

from baselines.base import EngineBacked, SystemOptions, SystemRefused, register
from fiddler.config import ModelConfig
from fiddler.engine import Engine
from fiddler.host_memory import HostArena, nbytes_of
from fiddler.loading import expert_shapes, load_expert_into
from fiddler.model import DenseWeights, LayerWeights, MixtralModel
from fiddler.moe import ResidentExperts, grouped_mm_supported
from fiddler.placement import budget_breakdown
from fiddler.streams import new_stream, on_stream, record, wait
from fiddler.weights import EMBED, FINAL_NORM, LM_HEAD, dense_layer_names, load, open_weights

LAYER_PARTS = ("wqkv", "wo", "attn_norm", "moe_norm", "router", "w13", "w2")


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """One decoder layer as streamed: dense tensors (q/k/v fused) and stacked experts."""
    d, x = config.hidden_size, config.num_experts
    (w13, w2) = expert_shapes(config)
    return {
        "wqkv": (config.q_size + 2 * config.kv_size, d),
        "wo": (d, config.q_size),
        "attn_norm": (d,),
        "moe_norm": (d,),
        "router": (x, d),
        "w13": (x, *w13),
        "w2": (x, *w2),
    }


def _fill_layer(source, layer: int, parts: dict[str, torch.Tensor]) -> None:
    cfg = source.config
    names = dense_layer_names(layer)
    q, k, v = parts["wqkv"].split((cfg.q_size, cfg.kv_size, cfg.kv_size))
    for tensor, role in (
        (q, "wq"),
        (k, "wk"),
        (v, "wv"),
        (parts["wo"], "wo"),
        (parts["router"], "router"),
        (parts["attn_norm"], "attn_norm"),
        (parts["moe_norm"], "moe_norm"),
    ):
        source.load_into(names[role], tensor)
    for expert in range(cfg.num_experts):
        load_expert_into(source, layer, expert, parts["w13"][expert], parts["w2"][expert])


@dataclasses.dataclass
class _Buffer:
    parts: dict[str, torch.Tensor]
    layer: int = -1
    ready: torch.cuda.Event | None = None
    free: torch.cuda.Event | None = None


class LayerStreamer:
    """Host copies of every layer and two device buffers that take turns."""

    def __init__(self, source, device: torch.device, dtype: torch.dtype):
        cfg = source.config
        self.device = device
        shapes = layer_shapes(cfg)
        sizes = [nbytes_of(shapes[p], dtype) for _ in range(cfg.num_layers) for p in LAYER_PARTS]
        self.arena = HostArena(sizes, pin=device.type == "cuda")
        self.host_layers = []
        for layer in range(cfg.num_layers):
            parts = {p: self.arena.take(shapes[p], dtype) for p in LAYER_PARTS}
            _fill_layer(source, layer, parts)
            self.host_layers.append(parts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.buffers = [
            _Buffer({p: torch.empty(shapes[p], device=device, dtype=dtype) for p in LAYER_PARTS}) for _ in range(2)
        ]
        self.in_use: _Buffer | None = None
        self.layer_bytes = sum(sizes[: len(LAYER_PARTS)])
        self.stream = new_stream(device)
        self.layers_streamed = 0

    def _fill(self, buffer: _Buffer, layer: int) -> None:
        with on_stream(self.stream):
            wait(buffer.free, self.stream)  # the GPU is done with the layer it held
            for part in LAYER_PARTS:
                buffer.parts[part].copy_(self.host_layers[layer][part], non_blocking=True)
            buffer.ready = record(self.device, self.stream)
        buffer.layer = layer
        self.layers_streamed += 1

    def _holding(self, layer: int) -> _Buffer | None:
        return next((b for b in self.buffers if b.layer == layer), None)

    def acquire(self, layer: int) -> _Buffer:
        """The buffer holding ``layer``, ready for use on the current stream; then the other
        buffer, once everything queued so far is done with it, starts receiving the next
        layer (the first layer again after the last: the next forward pass's)."""
        buffer = self._holding(layer)
        if buffer is None:
            buffer = self.buffers[0] if self.buffers[1] is self.in_use else self.buffers[1]
            buffer.free = record(self.device)
            self._fill(buffer, layer)
        wait(buffer.ready)
        self.in_use = buffer
        other = self.buffers[1] if buffer is self.buffers[0] else self.buffers[0]
        following = (layer + 1) % len(self.host_layers)
        if following != layer and other.layer != following:
            other.free = record(self.device)
            self._fill(other, following)
        return buffer

    def current(self, layer: int) -> _Buffer:
        buffer = self._holding(layer)
        assert buffer is not None and buffer is self.in_use, "the layer's weights were not acquired"
        return buffer


class _StreamedStack:
    """``stack[layer]`` is the streamed layer's stacked experts (for ResidentExperts)."""

    def __init__(self, streamer: LayerStreamer, part: str):
        self.streamer, self.part = streamer, part

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.streamer.current(layer).parts[self.part]


class StreamingModel(MixtralModel):
    static_weights = False  # every layer's weights arrive in one of two buffers, by host logic

    def __init__(self, config, dense: DenseWeights, streamer: LayerStreamer, max_seq_len: int, strategy: str):
        experts = _StreamingExperts(streamer, strategy)
        super().__init__(config, dense, experts, max_seq_len)
        self.streamer = streamer

    def layer_weights(self, layer: int) -> LayerWeights:
        p = self.streamer.acquire(layer).parts
        return LayerWeights(p["attn_norm"], p["wqkv"], p["wo"], p["moe_norm"], p["router"])


class _StreamingExperts(ResidentExperts):
    def __init__(self, streamer: LayerStreamer, strategy: str):
        super().__init__(_StreamedStack(streamer, "w13"), _StreamedStack(streamer, "w2"), strategy=strategy)
        self.capturable = False
        self.streamer = streamer
        self._streamed_at_reset = 0

    def stats(self) -> dict[str, object]:
        layers = self.streamer.layers_streamed - self._streamed_at_reset
        return {
            "executor": "layer-streaming",
            "strategy": self.strategy,
            "layers_streamed": layers,
            "h2d_bytes": layers * self.streamer.layer_bytes,
        }

    def reset_stats(self) -> None:
        self._streamed_at_reset = self.streamer.layers_streamed

    def close(self) -> None:
        self.streamer.host_layers = []  # drop the views first, so the mapping can go at once
        self.streamer.arena.close()


@register("layer-streaming")
class LayerStreaming(EngineBacked):
    name = "layer-streaming"

    def __init__(self, options: SystemOptions):
        self.options = options
        cfg, device = options.config, torch.device(options.device)
        layer_bytes = sum(nbytes_of(s, options.dtype) for s in layer_shapes(cfg).values())
        if options.budget_bytes is not None:
            b = budget_breakdown(cfg, options.budget_bytes, options.dtype, options.max_seq_len, options.beam_width, 0)
            resident = sum(nbytes_of(s, options.dtype) for s in ((cfg.vocab_size, cfg.hidden_size),) * 2)
            needed = 2 * layer_bytes + resident + b.kv_cache + b.workspace
            if needed > b.budget:
                raise SystemRefused(
                    f"layer-streaming needs {needed / 1e9:.3g} GB (two layer buffers, embeddings, KV cache); "
                    f"the budget is {options.gpu_memory_gb:g} GB"
                )
        source = open_weights(cfg, options.checkpoint, options.seed, device.type)
        streamer = LayerStreamer(source, device, options.dtype)
        embed = load(source, EMBED, device, options.dtype)
        dense = DenseWeights(
            embed=embed,
            layers=[],
            norm=load(source, FINAL_NORM, device, options.dtype),
            lm_head=embed if cfg.tie_word_embeddings else load(source, LM_HEAD, device, options.dtype),
        )
        strategy = "grouped" if grouped_mm_supported(device, options.dtype) else "loop"
        model = StreamingModel(cfg, dense, streamer, options.max_seq_len, strategy)
        self.engine = Engine(model, cuda_graphs=False)
