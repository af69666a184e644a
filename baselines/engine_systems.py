"""Systems that are this project's own engine: Fiddler's policies and the whole model resident.

Contract: ``fiddler-paper``, ``fiddler-hybrid`` and the ablations ``fiddler-cpu-experts`` /
``fiddler-copy-experts`` run ``fiddler.build.build_engine`` with that policy under the
system's GPU budget; ``fiddler-hybrid-stream`` is ``hybrid`` with the executor's stream CPU mode
(``fiddler.orchestrator``: the GPU's stream waits for the CPU worker's rows instead of the main
thread; a name of its own, so that a sweep's ``fiddler-hybrid`` rows stay one engine's);
``gpu-resident`` puts the whole model on the device (decode captured as a
CUDA graph) and refuses when the model, its KV cache and workspace exceed the budget.
"""

from __future__ import annotations

from baselines.base import EngineBacked, SystemOptions, SystemRefused, register, require_whole_model_fits
from fiddler.build import RESIDENT, EngineOptions, build_engine
from fiddler.generate import GenerationResult, GenerationSettings, generate
from fiddler.orchestrator import STREAM, THREAD
from fiddler.planner import HYBRID, POLICIES


class EngineSystem(EngineBacked):
    name = "engine"

    def __init__(self, options: SystemOptions, policy: str, cpu_mode: str = THREAD):
        self.options = options
        engine_options = EngineOptions(
            config=options.config,
            max_seq_len=options.max_seq_len,
            checkpoint=options.checkpoint,
            seed=options.seed,
            device=options.device,
            dtype=options.dtype,
            beam_width=options.beam_width,
            gpu_memory_gb=options.gpu_memory_gb,
            policy=policy,
            calibration=options.calibration,
            popularity=options.popularity,
            cpu_threads=options.cpu_threads,
            cpu_mode=cpu_mode,
        )
        try:
            self.engine, self.record = build_engine(engine_options)
        except ValueError as err:
            if "cannot hold" in str(err):
                raise SystemRefused(str(err)) from None
            raise

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> GenerationResult:
        result = generate(self.engine, prompt_ids, settings)
        result.stats["engine"] = self.record
        return result


def _fiddler(policy: str, cpu_mode: str = THREAD):
    def factory(options: SystemOptions) -> EngineSystem:
        return EngineSystem(options, policy, cpu_mode)

    return factory


for _policy in POLICIES:
    register(f"fiddler-{_policy}")(_fiddler(_policy))
register(f"fiddler-{HYBRID}-{STREAM}")(_fiddler(HYBRID, STREAM))


@register("gpu-resident")
def gpu_resident(options: SystemOptions) -> EngineSystem:
    require_whole_model_fits("gpu-resident", options)
    return EngineSystem(options, RESIDENT)
