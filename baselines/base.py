"""The ``System`` interface every compared system implements, and the registry of systems.

Contract: ``load_system(name, options)`` builds a system from ``SystemOptions`` (model, weights
seed, device, dtype, GPU budget, CPU threads, longest sequence and beam width it must serve).
A system turns prompt ids and ``fiddler.generate.GenerationSettings`` into the same
``GenerationResult`` the engine returns (new token ids, TTFT, per-step decode times, stats),
reports ``peak_gpu_memory()`` since it was loaded, and ``close()``s. A system that cannot run
within its budget raises ``SystemRefused`` with the reason when loading (the harness records
the cell as refused); one that cannot do something asked of it (beam search, sampling) raises
``Unsupported`` naming what. Systems register themselves with ``@register(name)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from fiddler.config import ModelConfig
from fiddler.engine import Engine
from fiddler.generate import GenerationResult, GenerationSettings, generate
from fiddler.placement import GB, budget_breakdown


class SystemRefused(RuntimeError):
    """The system cannot run this model within the given budget."""


class Unsupported(ValueError):
    """The system cannot do what the generation settings ask."""


@dataclasses.dataclass(frozen=True)
class SystemOptions:
    config: ModelConfig
    max_seq_len: int  # prompt + new tokens of the longest run
    checkpoint: Path | None = None
    seed: int = 0
    device: str = "cpu"  # the accelerator; "cpu" stands in for it in tests
    dtype: torch.dtype = torch.bfloat16
    gpu_memory_gb: float | None = None  # None: no limit beyond the device's memory
    cpu_threads: int | None = None
    beam_width: int = 1
    calibration: Path | None = None  # for Fiddler's systems
    popularity: Path | None = None

    @property
    def budget_bytes(self) -> int | None:
        return None if self.gpu_memory_gb is None else int(self.gpu_memory_gb * GB)


class System(Protocol):
    name: str

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> GenerationResult: ...

    def peak_gpu_memory(self) -> dict[str, float | None]: ...

    def close(self) -> None: ...


SYSTEMS: dict[str, Callable[[SystemOptions], System]] = {}


def register(name: str) -> Callable:
    def decorate(factory: Callable[[SystemOptions], System]) -> Callable[[SystemOptions], System]:
        if name in SYSTEMS:
            raise RuntimeError(f"system {name!r} registered twice")
        SYSTEMS[name] = factory
        return factory

    return decorate


def load_system(name: str, options: SystemOptions) -> System:
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(sorted(SYSTEMS))}")
    if torch.device(options.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(options.device)
    system = SYSTEMS[name](options)
    system.name = name
    return system


def device_peak_memory(device: str) -> dict[str, float | None]:
    """torch's peak allocation and the device's memory in use now (with the CUDA context), GB."""
    if torch.device(device).type != "cuda":
        return {"peak_allocated_gb": None, "device_used_gb": None}
    free, total = torch.cuda.mem_get_info(device)
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / GB, "device_used_gb": (total - free) / GB}


def require_greedy(name: str, settings: GenerationSettings, beams: bool = True) -> None:
    """Raise ``Unsupported`` for what a system built on another library cannot reproduce."""
    if not beams and settings.beam_width > 1:
        raise Unsupported(f"{name} does not support beam search")
    if settings.temperature > 0:
        raise Unsupported(f"{name} compares greedy decoding only; use temperature 0")


def require_whole_model_fits(name: str, options: SystemOptions, extra: int = 0) -> None:
    """Refuse unless the whole model, its KV cache, workspace and ``extra`` bytes (what the
    system allocates besides) fit the budget."""
    if options.budget_bytes is None:
        return
    b = budget_breakdown(
        options.config, options.budget_bytes, options.dtype, options.max_seq_len, options.beam_width, staging_experts=0
    )
    needed = b.dense + b.kv_cache + b.workspace + options.config.num_expert_slots * b.expert + extra
    if needed > b.budget:
        raise SystemRefused(
            f"{name} needs {needed / GB:.3g} GB for {options.config.name}; the budget is {options.gpu_memory_gb:g} GB"
        )


class EngineBacked:
    """A system that is this project's engine with some expert executor: subclasses build
    ``self.engine``; generation, memory records and closing are the engine's."""

    name = "engine"
    options: SystemOptions
    engine: Engine

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> GenerationResult:
        return generate(self.engine, prompt_ids, settings)

    def peak_gpu_memory(self) -> dict[str, float | None]:
        return device_peak_memory(self.options.device)

    def close(self) -> None:
        self.engine.close()
