"""``accelerate-offload``: transformers' Mixtral dispatched by accelerate with ``max_memory`` =
{GPU: budget, CPU: the rest}, the standard ``device_map`` offload, generating with
transformers' ``generate``.

Contract: as a capable user would run it. The GPU's ``max_memory`` is the budget less the KV
cache and activation workspace the run needs and less the expert copies ``generate`` makes at
each decode step (``baselines.hf_generate.decode_expert_copies_bytes``): accelerate counts
weights only, and itself keeps room for the largest offloaded layer (``weights_allowance``,
``plan_device_map``); ``infer_auto_device_map`` never splits a decoder layer. Offloaded
weights are held the way ``from_pretrained`` holds them, in ordinary (pageable) host memory,
and accelerate's hooks copy them to the GPU at every forward. The model is built on the meta
device and filled from the run's weight source under transformers' in-memory names
(``fiddler.hf_reference``). With ``cpu`` standing in for the GPU everything lives on the CPU
and no hook is installed.
"""

from __future__ import annotations

import psutil
import torch

from baselines.base import SystemOptions, SystemRefused, device_peak_memory, register, require_greedy
from baselines.hf_generate import decode_expert_copies_bytes, timed_generate
from fiddler.cpu_experts import set_cpu_threads
from fiddler.generate import GenerationResult, GenerationSettings
from fiddler.hf_reference import build_transformers_model, empty_transformers_model
from fiddler.placement import GB, budget_breakdown
from fiddler.weights import open_weights


def module_device(device_map: dict[str, object], parameter: str) -> str:
    """The device accelerate assigned to the module holding ``parameter`` (longest prefix)."""
    best, where = -1, None
    for module, device in device_map.items():
        if (module == "" or parameter == module or parameter.startswith(module + ".")) and len(module) > best:
            best, where = len(module), device
    if where is None:
        raise KeyError(f"accelerate's device map does not place {parameter}")
    return f"cuda:{where}" if isinstance(where, int) else str(where)


def weights_allowance(options: SystemOptions, budget: int) -> int:
    """Bytes of the GPU budget accelerate may fill with weights: the budget less the KV cache and
    activation workspace of the run's longest sequence and less the decode step's expert copies
    (accelerate counts weights only). Refuses a budget that leaves nothing."""
    b = budget_breakdown(options.config, budget, options.dtype, options.max_seq_len, options.beam_width, 0)
    copies = decode_expert_copies_bytes(options.config, options.dtype, options.beam_width)
    allowance = b.budget - b.kv_cache - b.workspace - copies
    if allowance <= 0:
        raise SystemRefused(
            f"accelerate-offload: a {budget / GB:.3g} GB budget leaves no room for weights (the KV cache, "
            f"workspace and decode copies take {(budget - allowance) / GB:.3g} GB); raise --gpu-memory-gb"
        )
    return allowance


def plan_device_map(model: torch.nn.Module, options: SystemOptions, budget: int, index: int) -> dict[str, object]:
    """accelerate's device map for ``model`` (on the meta device) with GPU ``index`` given
    ``weights_allowance`` and the host the memory it has free."""
    from accelerate import infer_auto_device_map

    max_memory = {index: weights_allowance(options, budget), "cpu": psutil.virtual_memory().available}
    return infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=model._no_split_modules, dtype=options.dtype
    )


@register("accelerate-offload")
class AccelerateOffload:
    name = "accelerate-offload"

    def __init__(self, options: SystemOptions):
        from accelerate import dispatch_model

        self.options = options
        self.threads = set_cpu_threads(options.cpu_threads)
        device = torch.device(options.device)
        source = open_weights(options.config, options.checkpoint, options.seed, device.type)
        model = empty_transformers_model(options.config)
        if device.type != "cuda":
            self.device_map: dict[str, object] = {"": "cpu"}
            self.model = build_transformers_model(source, "cpu", options.dtype, model=model)
            return
        budget = options.budget_bytes or torch.cuda.mem_get_info(device)[0]
        self.device_map = plan_device_map(model, options, budget, device.index or 0)
        self.model = build_transformers_model(
            source,
            lambda name: module_device(self.device_map, name),
            options.dtype,
            model=model,
            rotary_device=device,
        )
        self.model = dispatch_model(self.model, device_map=self.device_map, main_device=device)

    @property
    def modules_on_gpu(self) -> int:
        return sum(1 for d in self.device_map.values() if not isinstance(d, str) or d.startswith("cuda"))

    def generate(self, prompt_ids: list[int], settings: GenerationSettings) -> GenerationResult:
        require_greedy(self.name, settings)
        result = timed_generate(self.model, prompt_ids, settings, self.options.device)
        result.stats.update(
            executor="transformers+accelerate",
            modules_on_gpu=self.modules_on_gpu,
            modules=len(self.device_map),
            cpu_threads=self.threads,
        )
        return result

    def peak_gpu_memory(self) -> dict[str, float | None]:
        return device_peak_memory(self.options.device)

    def close(self) -> None:
        del self.model
