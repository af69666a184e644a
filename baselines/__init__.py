"""The systems Fiddler is compared with, behind one interface and one GPU memory budget.

Importing the package registers every system (``baselines.base.SYSTEMS``): the engine's own
(``fiddler-*``, ``gpu-resident``), transformers' (``cpu-only``, ``transformers-resident``),
``accelerate-offload``, ``expert-lru``, ``llama-cpp``, ``llama-cpp-cpu-moe``,
``expert-lru-prefetch`` and ``layer-streaming``. Contract to keep: ``baselines`` may import
``fiddler`` but never ``harness``.
"""

from baselines import accelerate_offload, engine_systems, expert_lru, layer_streaming, llama_cpp, transformers_systems
from baselines.base import SYSTEMS, System, SystemOptions, SystemRefused, Unsupported, load_system

__all__ = [
    "SYSTEMS",
    "System",
    "SystemOptions",
    "SystemRefused",
    "Unsupported",
    "accelerate_offload",
    "engine_systems",
    "expert_lru",
    "layer_streaming",
    "llama_cpp",
    "load_system",
    "transformers_systems",
]
