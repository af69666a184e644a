"""Single-device Mixtral layers: embedding, RMSNorm, RoPE, grouped-query attention over a
preallocated KV cache, router, final norm and LM head. No placement logic lives here.

Contract:
- ``MixtralModel.forward(tokens, positions)`` runs a chunk of ``T`` new tokens for ``B``
  sequences that share positions (a prefill or one decode step; beams are batch rows) and
  returns logits. Dense weights live on one device; the MoE part of every layer calls
  ``experts(layer, hidden, routing)``, an executor (``fiddler.moe``) that decides where each
  expert runs, so orchestration strategies plug in without forking the model.
- Positions are a device tensor. Without ``kv_len`` attention covers the whole preallocated
  cache with a mask, so a decode step has static shapes and no host synchronisation: it can
  be captured as a CUDA graph when the executor allows it. With ``kv_len`` (eager calls) it
  reads only the filled prefix, and a prefill from position 0 uses the causal kernel.
- Numerics follow transformers' Mixtral (RMSNorm in float32 then cast back; router softmax in
  float32, top-k renormalised; rotary tables cast to the activation dtype).

Shape legend: B sequences, T new tokens, S cache length, D hidden, H query heads,
G key/value heads, E head dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from fiddler.config import ModelConfig
from fiddler.moe import ExpertExecutor, Routing


@dataclasses.dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [D]
    wqkv: torch.Tensor  # [(H + 2G) * E, D]: q, k, v projections fused into one matmul
    wo: torch.Tensor  # [D, H * E]
    moe_norm: torch.Tensor  # [D]
    router: torch.Tensor  # [num_experts, D]


@dataclasses.dataclass
class DenseWeights:
    embed: torch.Tensor  # [V, D]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [D]
    lm_head: torch.Tensor  # [V, D]

    def nbytes(self) -> int:
        tensors = [self.embed, self.norm, self.lm_head]
        for layer in self.layers:
            tensors += [layer.attn_norm, layer.wqkv, layer.wo, layer.moe_norm, layer.router]
        unique = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
        return sum(unique.values())


class KVCache:
    """Preallocated keys and values for every layer: [layers, B, G, S, E] each, zero-filled
    (masked slots are multiplied by zero attention weights, so they must not hold NaN)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    @classmethod
    def allocate(
        cls, config: ModelConfig, batch: int, seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (config.num_layers, batch, config.num_key_value_heads, seq_len, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def rows(self, count: int) -> KVCache:
        """A view of the first ``count`` sequences (shares storage)."""
        return KVCache(self.k[:, :count], self.v[:, :count])

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def seq_len(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_rows_(self, source_rows: torch.Tensor) -> None:
        """Row b takes the contents of row ``source_rows[b]`` (beam reorder / expansion), in place."""
        self.k.copy_(self.k.index_select(1, source_rows))
        self.v.copy_(self.v.index_select(1, source_rows))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotary_tables(config: ModelConfig, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [S, E] in float32, as transformers' default RoPE computes them."""
    exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64, device=device).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    angles = torch.arange(seq_len, device=device).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, T, E]; cos, sin: [T, E] in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class MixtralModel:
    """Mixtral forward over dense weights on one device and an expert executor."""

    static_weights = True  # layer_weights() returns the same tensors every call (graphs may record them)

    def __init__(self, config: ModelConfig, dense: DenseWeights, experts: ExpertExecutor, max_seq_len: int):
        self.config = config
        self.dense = dense
        self.experts = experts
        self.device = dense.embed.device
        self.dtype = dense.embed.dtype
        cos, sin = rotary_tables(config, max_seq_len, self.device)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        self.key_positions = torch.arange(max_seq_len, device=self.device)

    @property
    def max_seq_len(self) -> int:
        return self.cos.shape[0]

    def attention_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[T, S] boolean: query at position p sees keys at positions <= p (within the window)."""
        keys = self.key_positions[:kv_len][None, :]
        queries = positions[:, None]
        mask = keys <= queries
        if self.config.sliding_window is not None:
            mask &= keys > queries - self.config.sliding_window
        return mask

    def attention_span(
        self, positions: torch.Tensor, cache: KVCache, kv_len: int | None
    ) -> tuple[int, torch.Tensor | None, bool]:
        """(keys to read, mask or None, causal flag): the cheapest exact form for this call."""
        if kv_len is None:
            return cache.seq_len, self.attention_mask(positions, cache.seq_len), False
        window = self.config.sliding_window
        num_tokens = positions.shape[0]
        if window is None or kv_len <= window:
            if num_tokens == 1:
                return kv_len, None, False  # one query at the last position sees every key
            if num_tokens == kv_len:
                return kv_len, None, True  # a prefill from position 0
        return kv_len, self.attention_mask(positions, kv_len), False

    def layer_weights(self, layer: int) -> LayerWeights:
        """The dense weights of ``layer``, ready on the device (a streaming subclass fetches them)."""
        return self.dense.layers[layer]

    def attention(
        self,
        layer: int,
        w: LayerWeights,
        x: torch.Tensor,
        positions: torch.Tensor,
        span: tuple[int, torch.Tensor | None, bool],
        cache: KVCache,
    ) -> torch.Tensor:
        cfg = self.config
        kv_len, mask, causal = span
        batch, num_tokens, _ = x.shape
        qkv = F.linear(x, w.wqkv)
        q, k, v = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
        q = q.view(batch, num_tokens, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(batch, num_tokens, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(batch, num_tokens, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        cache.k[layer].index_copy_(2, positions, k)
        cache.v[layer].index_copy_(2, positions, v)
        out = F.scaled_dot_product_attention(
            q,
            cache.k[layer, :, :, :kv_len],
            cache.v[layer, :, :, :kv_len],
            attn_mask=mask,
            is_causal=causal,
            scale=cfg.head_dim**-0.5,
            enable_gqa=cfg.num_attention_heads != cfg.num_key_value_heads,
        )
        out = out.transpose(1, 2).reshape(batch, num_tokens, cfg.q_size)
        return F.linear(out, w.wo)

    def route(self, w: LayerWeights, hidden: torch.Tensor) -> Routing:
        """hidden: [N, D] -> top-k experts and their renormalised float32 weights."""
        logits = F.linear(hidden, w.router)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.config.num_experts_per_token, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(experts=experts, weights=weights)

    def before_experts(
        self, layer: int, x: torch.Tensor, positions: torch.Tensor, span, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """Attention with its residual, then the MoE norm and routing: (x, hidden [N, D], routing)."""
        cfg, w = self.config, self.layer_weights(layer)
        x = x + self.attention(layer, w, rms_norm(x, w.attn_norm, cfg.rms_norm_eps), positions, span, cache)
        hidden = rms_norm(x, w.moe_norm, cfg.rms_norm_eps).reshape(-1, x.shape[-1])
        return x, hidden, self.route(w, hidden)

    def head(self, x: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        if last_only:
            x = x[:, -1]
        return F.linear(rms_norm(x, self.dense.norm, self.config.rms_norm_eps), self.dense.lm_head).float()

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        kv_len: int | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """tokens: [B, T] int64, positions: [T] int64 on the model's device; ``kv_len``, when
        known on the host, is the number of filled cache positions after this call.
        Returns float32 logits [B, V] for the last position (or [B, T, V])."""
        x = F.embedding(tokens, self.dense.embed)
        span = self.attention_span(positions, cache, kv_len)
        for layer in range(self.config.num_layers):
            x, hidden, routing = self.before_experts(layer, x, positions, span, cache)
            x = x + self.experts(layer, hidden, routing).view_as(x)
        return self.head(x, last_only)
