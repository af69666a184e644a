"""Systems that are transformers' own ``generate`` on the whole model in one place.

- ``cpu-only``: transformers' Mixtral on the CPU in the run's dtype with all cores, what a
  user without a GPU runs.
- ``transformers-resident``: transformers' Mixtral entirely on the accelerator (the reference
  of a sweep where the model fits); refuses when it does not fit the budget (its weights,
  cache, workspace and the expert copies of a decode step, ``decode_expert_copies_bytes``).

Weights come from the same source as every other system's (seeded random weights are drawn on
the run's generator device, then placed), so every system of a run computes the same model.
"""

from __future__ import annotations

import torch

from baselines.base import SystemOptions, device_peak_memory, register, require_greedy, require_whole_model_fits
from baselines.hf_generate import decode_expert_copies_bytes, timed_generate
from fiddler.cpu_experts import set_cpu_threads
from fiddler.generate import GenerationResult, GenerationSettings
from fiddler.hf_reference import build_transformers_model
from fiddler.weights import open_weights


class TransformersSystem:
    name = "transformers"

    def __init__(self, options: SystemOptions, device: str):
        self.options, self.device = options, device
        self.threads = set_cpu_threads(options.cpu_threads)
        source = open_weights(options.config, options.checkpoint, options.seed, torch.device(options.device).type)
        self.model = build_transformers_model(source, device, options.dtype)

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> GenerationResult:
        require_greedy(self.name, settings)
        result = timed_generate(self.model, prompt_ids, settings, self.device)
        result.stats.update(executor="transformers", device=self.device, cpu_threads=self.threads)
        return result

    def peak_gpu_memory(self) -> dict[str, float | None]:
        return device_peak_memory(self.device)

    def close(self) -> None:
        del self.model


@register("cpu-only")
def cpu_only(options: SystemOptions) -> TransformersSystem:
    return TransformersSystem(options, "cpu")


@register("transformers-resident")
def transformers_resident(options: SystemOptions) -> TransformersSystem:
    copies = decode_expert_copies_bytes(options.config, options.dtype, options.beam_width)
    require_whole_model_fits("transformers-resident", options, extra=copies)
    return TransformersSystem(options, options.device)
