"""What machine this is: recorded with every calibration and every run.

Contract: ``machine_identity(device)`` returns a JSON-serialisable dictionary (CPU model,
cores, ISA flags relevant to expert kernels, RAM, GPU name and memory, library versions,
hostname). Missing information is left out, never guessed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
from pathlib import Path

import torch

ISA_PREFIXES = ("avx512", "amx", "avx2", "fma")


def _cpuinfo() -> dict[str, object]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    info: dict[str, object] = {}
    for line in lines:
        if line.startswith("model name") and "cpu_model" not in info:
            info["cpu_model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags") and "isa" not in info:
            flags = line.split(":", 1)[1].split()
            info["isa"] = sorted(f for f in flags if f.startswith(ISA_PREFIXES))
    return info


def machine_identity(device: torch.device | str = "cpu") -> dict[str, object]:
    device = torch.device(device)
    identity: dict[str, object] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        **_cpuinfo(),
    }
    with contextlib.suppress(OSError):
        identity["transparent_hugepages"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    with contextlib.suppress(OSError, ValueError, IndexError):
        identity["ram_gb"] = int(Path("/proc/meminfo").read_text().split()[1]) * 1024 / 1e9
    try:
        import transformers

        identity["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        identity.update(gpu=props.name, gpu_memory_gb=props.total_memory / 1e9, cuda=torch.version.cuda)
    return identity
