"""``cpu-only``: transformers' Mixtral on the CPU in the run's dtype with all cores, what a
user without a GPU runs (``model.generate``). Its weights come from the same source as every
other system's (seeded random weights are drawn on the run's generator device and copied to
ordinary host memory)."""

from __future__ import annotations

import torch

from baselines.base import SystemOptions, device_peak_memory, register, require_greedy
from baselines.hf_generate import timed_generate
from fiddler.cpu_experts import set_cpu_threads
from fiddler.generate import GenerationResult, GenerationSettings
from fiddler.hf_reference import build_transformers_model
from fiddler.weights import open_weights


@register("cpu-only")
class CpuOnly:
    name = "cpu-only"

    def __init__(self, options: SystemOptions):
        self.options = options
        self.threads = set_cpu_threads(options.cpu_threads)
        source = open_weights(options.config, options.checkpoint, options.seed, torch.device(options.device).type)
        self.model = build_transformers_model(source, "cpu", options.dtype)

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> GenerationResult:
        require_greedy(self.name, settings)
        result = timed_generate(self.model, prompt_ids, settings, "cpu")
        result.stats.update(executor="transformers", device="cpu", cpu_threads=self.threads)
        return result

    def peak_gpu_memory(self) -> dict[str, float | None]:
        return device_peak_memory("cpu")  # nothing on the GPU

    def close(self) -> None:
        del self.model
