"""``expert-lru`` and ``expert-lru-prefetch``: the Mixtral-offloading approach (Eliseev & Mazur)
over this project's model.

Contract: non-expert weights live on the GPU; each layer has an LRU cache of expert slots on
the GPU. The slots are what the budget holds after the non-expert weights, KV cache and
workspace, spread over the layers as evenly as they go (counts differ by at most one, the
first layers taking the extra): Mixtral-offloading's code keeps one count for every layer,
which at 24 GB for Mixtral-8x7B would leave 24 experts' worth of the budget (8.4 GB) unused,
and a baseline should use the budget it is given. At least one slot per layer, else the
system refuses.
Every expert also lives in page-locked host memory. A routed expert that is cached runs from
its slot (a hit, and it becomes the most recently used); a missing one is copied on a side
stream into the least recently used slot of its layer (a miss), at most as many copies ahead
of the GPU using them as the layer has slots, and then runs there. ``expert-lru-prefetch`` adds their speculative
prefetch: the next layer's router is applied to this layer's MoE input and the experts it
picks start copying into the next layer's cache while this layer computes; a prefetched
expert is an ordinary cache entry, so outputs never change. Counters: hits, misses,
prefetches and the ones that were used, bytes copied.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.nn.functional as F

from baselines.base import EngineBacked, SystemOptions, SystemRefused, register
from fiddler.engine import Engine
from fiddler.expert_layout import split_ffn
from fiddler.loading import HostWeights, load_dense, load_host_weights
from fiddler.model import MixtralModel
from fiddler.moe import Routing, combine
from fiddler.placement import budget_breakdown
from fiddler.streams import new_stream, on_stream, record, wait
from fiddler.weights import open_weights


@dataclasses.dataclass
class _Slot:
    w13b: torch.Tensor
    w2b: torch.Tensor
    expert: int = -1
    free: torch.cuda.Event | None = None  # the GPU's last use of the slot
    landed: torch.cuda.Event | None = None  # the copy that filled it
    prefetched: bool = False


@dataclasses.dataclass
class LruCounters:
    hits: int = 0  # expert calls served from the cache
    misses: int = 0
    hit_rows: int = 0  # routed (token, expert) pairs, as Fiddler's hit rate counts them
    miss_rows: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0

    def to_json(self) -> dict[str, object]:
        rows = self.hit_rows + self.miss_rows
        return dataclasses.asdict(self) | {"gpu_hit_rate": self.hit_rows / rows if rows else None}


class LruExperts:
    """An ``ExpertExecutor`` with a per-layer LRU cache of expert slots on the device."""

    capturable = False

    def __init__(
        self,
        host: HostWeights,
        device: torch.device,
        slots_per_layer: int | list[int],
        routers: list[torch.Tensor] | None = None,
        top_k: int = 2,
    ):
        self.host, self.device = host, device
        dtype = host.experts[0][0][0].dtype
        w13_shape, w2_shape = host.experts[0][0][0].shape, host.experts[0][0][1].shape
        if isinstance(slots_per_layer, int):
            slots_per_layer = [slots_per_layer] * len(host.experts)
        self.caches: list[collections.OrderedDict[int, _Slot]] = []
        self.free_slots: list[list[_Slot]] = []
        for count in slots_per_layer:
            slots = [
                _Slot(
                    torch.empty(w13_shape, device=device, dtype=dtype),
                    torch.empty(w2_shape, device=device, dtype=dtype),
                )
                for _ in range(count)
            ]
            self.free_slots.append(slots)
            self.caches.append(collections.OrderedDict())
        self.slots_per_layer = list(slots_per_layer)
        self.expert_bytes = sum(t.numel() * t.element_size() for t in host.experts[0][0])
        self.routers = routers  # set: speculative prefetch of the next layer
        self.top_k = top_k
        self.copy_stream = new_stream(device)
        self.counters = LruCounters()

    # ---- cache bookkeeping -------------------------------------------------------------

    def _victim(self, layer: int, keep: set[int]) -> _Slot:
        """An empty slot, else the least recently used one whose expert is not in ``keep``."""
        if self.free_slots[layer]:
            return self.free_slots[layer].pop()
        for expert, slot in self.caches[layer].items():  # oldest first
            if expert not in keep:
                del self.caches[layer][expert]
                return slot
        raise RuntimeError("every slot holds an expert this layer still needs")

    def _load(self, layer: int, expert: int, keep: set[int], prefetch: bool = False) -> _Slot:
        slot = self._victim(layer, keep)
        w13b, w2b = self.host.experts[layer][expert]
        with on_stream(self.copy_stream):
            wait(slot.free, self.copy_stream)  # the GPU is done with what the slot held
            slot.w13b.copy_(w13b, non_blocking=True)
            slot.w2b.copy_(w2b, non_blocking=True)
            slot.landed = record(self.device, self.copy_stream)
        slot.expert, slot.prefetched = expert, prefetch
        self.caches[layer][expert] = slot
        self.counters.h2d_bytes += self.expert_bytes
        return slot

    def cached(self, layer: int) -> list[int]:
        """Experts cached for ``layer``, least recently used first."""
        return list(self.caches[layer])

    # ---- the executor interface --------------------------------------------------------

    def __call__(self, layer: int, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        num_tokens, top_k = routing.experts.shape
        flat = routing.experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        read = flat
        prefetching = self.routers is not None and layer + 1 < len(self.routers)
        if prefetching:  # guess the next layer's experts now, so one read-back brings both
            guessed = torch.topk(F.linear(hidden, self.routers[layer + 1]).float(), self.top_k, dim=-1).indices
            read = torch.cat((flat, guessed.reshape(-1)))
        host_ids = read.cpu()  # the one sync
        self.counters.d2h_bytes += read.numel() * read.element_size()
        counts = torch.bincount(host_ids[: flat.numel()], minlength=len(self.host.experts[layer])).tolist()
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        token_of_row = order // top_k
        needed = [e for e, c in enumerate(counts) if c]
        cache = self.caches[layer]
        hits = [e for e in needed if e in cache]
        misses = [e for e in needed if e not in cache]
        self.counters.hits += len(hits)
        self.counters.misses += len(misses)
        self.counters.hit_rows += sum(counts[e] for e in hits)
        self.counters.miss_rows += sum(counts[e] for e in misses)
        self.counters.prefetch_hits += sum(1 for e in hits if cache[e].prefetched)

        sorted_out = hidden.new_empty(flat.shape[0], hidden.shape[-1])
        for expert in hits:
            cache.move_to_end(expert)
            self._run(layer, cache[expert], hidden, token_of_row, sorted_out, offsets, expert)
        pending = list(misses)
        computed: set[int] = set(hits)
        in_flight: collections.deque = collections.deque()
        while pending or in_flight:
            while pending and len(in_flight) < self.slots_per_layer[layer]:
                expert = pending.pop(0)
                # keep every expert of this layer that is queued but not yet computed
                in_flight.append(self._load(layer, expert, keep={e for e in needed if e not in computed}))
            slot = in_flight.popleft()
            self._run(layer, slot, hidden, token_of_row, sorted_out, offsets, slot.expert)
            computed.add(slot.expert)
        if prefetching:  # queued after this layer's misses on the same copy stream
            self._prefetch(layer + 1, host_ids[flat.numel() :].tolist())
        outputs = torch.empty_like(sorted_out).index_copy_(0, order, sorted_out)
        return combine(outputs.view(num_tokens, top_k, -1), routing, hidden.dtype)

    def _run(self, layer, slot: _Slot, hidden, token_of_row, sorted_out, offsets, expert) -> None:
        wait(slot.landed)
        slot.prefetched = False
        rows = slice(offsets[expert], offsets[expert + 1])
        sorted_out[rows] = split_ffn(hidden.index_select(0, token_of_row[rows]), slot.w13b, slot.w2b)
        slot.free = record(self.device)

    def _prefetch(self, layer: int, guessed: list[int]) -> None:
        """Start copying the experts guessed for ``layer`` (its router applied to the previous
        layer's MoE input) into its cache."""
        cache = self.caches[layer]
        wanted = [e for e in dict.fromkeys(guessed) if e not in cache][: self.slots_per_layer[layer]]
        for expert in wanted:
            self._load(layer, expert, keep=set(wanted), prefetch=True)
            self.counters.prefetches += 1

    def stats(self) -> dict[str, object]:
        return {
            "executor": "expert-lru",
            "prefetch": self.routers is not None,
            "slots": sum(self.slots_per_layer),
            "slots_per_layer": f"{min(self.slots_per_layer)}-{max(self.slots_per_layer)}"
            if min(self.slots_per_layer) != max(self.slots_per_layer)
            else self.slots_per_layer[0],
            **self.counters.to_json(),
        }

    def reset_stats(self) -> None:
        self.counters = LruCounters()

    def close(self) -> None:
        self.host.close()


def lru_slots(options: SystemOptions) -> list[int]:
    """Expert slots of each layer: every slot the budget holds beside the non-expert weights,
    spread as evenly as they go (the first layers take one more), at most every expert."""
    cfg = options.config
    budget = options.budget_bytes
    if budget is None:
        return [cfg.num_experts] * cfg.num_layers
    b = budget_breakdown(cfg, budget, options.dtype, options.max_seq_len, options.beam_width, staging_experts=0)
    return spread_slots(b.for_experts // b.expert, cfg.num_layers, cfg.num_experts)


def spread_slots(total: int, layers: int, per_layer_max: int) -> list[int]:
    """``total`` slots over ``layers``, counts differing by at most one, capped at ``per_layer_max``."""
    total = max(0, min(total, layers * per_layer_max))
    base, extra = divmod(total, layers)
    return [base + (1 if layer < extra else 0) for layer in range(layers)]


class ExpertLru(EngineBacked):
    name = "expert-lru"

    def __init__(self, options: SystemOptions, prefetch: bool):
        self.options = options
        cfg, device = options.config, torch.device(options.device)
        slots = lru_slots(options)
        if min(slots) < 1:
            raise SystemRefused(
                f"expert-lru needs at least one expert slot per layer; {options.gpu_memory_gb:g} GB leaves none "
                f"for {cfg.name}"
            )
        source = open_weights(cfg, options.checkpoint, options.seed, device.type)
        dense = load_dense(source, device, options.dtype)
        host = load_host_weights(source, options.dtype, pin=device.type == "cuda")
        routers = [layer.router for layer in dense.layers] if prefetch else None
        self.executor = LruExperts(host, device, slots, routers, cfg.num_experts_per_token)
        for layer in range(cfg.num_layers):  # start warm, as their implementation does
            for expert in range(slots[layer]):
                self.executor._load(layer, expert, keep=set())
        self.executor.reset_stats()
        self.engine = Engine(MixtralModel(cfg, dense, self.executor, options.max_seq_len))  # piecewise graphs on CUDA


@register("expert-lru")
def expert_lru(options: SystemOptions) -> ExpertLru:
    return ExpertLru(options, prefetch=False)


@register("expert-lru-prefetch")
def expert_lru_prefetch(options: SystemOptions) -> ExpertLru:
    return ExpertLru(options, prefetch=True)
