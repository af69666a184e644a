"""Expert popularity: how often the router picks each (layer, expert) over a prompt set.

Contract: ``RoutingCounter`` wraps any expert executor and counts router selections on the
device (no host synchronisation, so it works inside CUDA graphs). ``profile_popularity``
runs prompts through an engine and returns the counts; ``save_popularity`` writes the JSON
that placement reads (schema ``fiddler-popularity`` version 1: ``model``, ``num_layers``,
``num_experts``, ``prompts``, ``routed_tokens``, ``counts`` [layer][expert]).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fiddler.engine import Engine
from fiddler.files import write_json_atomic
from fiddler.generate import GenerationSettings, generate
from fiddler.moe import ExpertExecutor, Routing

SCHEMA = "fiddler-popularity"
VERSION = 1


class RoutingCounter:
    def __init__(self, inner: ExpertExecutor, num_layers: int, num_experts: int, device: torch.device):
        self.inner = inner
        self.capturable = inner.capturable
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.long, device=device)
        self._expert_ids = torch.arange(num_experts, device=device)

    def __call__(self, layer: int, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        self.counts[layer] += (routing.experts.reshape(-1, 1) == self._expert_ids).sum(dim=0)
        return self.inner(layer, hidden, routing)

    def stats(self) -> dict[str, object]:
        return self.inner.stats()

    def reset_stats(self) -> None:
        self.inner.reset_stats()

    def close(self) -> None:
        self.inner.close()


def profile_popularity(engine: Engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Counts over every prompt's prefill and ``max_new_tokens`` greedy steps."""
    if not prompts:
        raise ValueError("no prompts to profile with")
    cfg = engine.config
    counter = RoutingCounter(engine.model.experts, cfg.num_layers, cfg.num_experts, engine.device)
    engine.set_executor(counter)
    try:
        for prompt in prompts:
            generate(engine, prompt, GenerationSettings(max_new_tokens=max(max_new_tokens, 1)))
    finally:
        engine.set_executor(counter.inner)
    return counter.counts.cpu().tolist()


def save_popularity(counts: list[list[int]], model_name: str, prompts: int, path: str | Path) -> None:
    top_k_total = sum(counts[0]) if counts else 0
    payload = {
        "schema": SCHEMA,
        "version": VERSION,
        "model": model_name,
        "num_layers": len(counts),
        "num_experts": len(counts[0]) if counts else 0,
        "prompts": prompts,
        "routed_tokens": top_k_total,
        "counts": counts,
    }
    write_json_atomic(path, payload)
