"""The native CPU expert kernels (fiddler/csrc/expert_bf16.cpp), built on first use.

Contract: ``native_expert_module()`` returns the compiled extension (``expert``: AVX512-BF16
dot products, up to ``max_tokens`` tokens; ``expert_amx``: AMX tiles, any count, usable where
``amx_unavailable_reason()`` is None; ``read_all``: one read of a buffer, for bandwidth), or
``None`` with the reason in ``native_unavailable_reason()`` when this CPU lacks AVX512-BF16,
there is no compiler, or the build fails; callers then use the pure-torch path. A compiler
without AMX support builds the module without ``expert_amx`` (``has_amx`` false). The build
goes through torch's extension loader (ninja, the host compiler, OpenMP so it uses torch's
intra-op threads) into torch's extension cache, so later processes load it without compiling.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "expert_bf16.cpp"
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
# AMX flags let the compiler accept the tile intrinsics; it emits them only where they are written,
# and expert_amx is called only where the CPU has AMX (amx_unavailable_reason() is None).
NO_AMX_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
COMPILE_FLAGS = [*NO_AMX_FLAGS, "-mamx-tile", "-mamx-bf16"]
AMX_FLAGS = ("amx_tile", "amx_bf16")
_reason: list[str] = []


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build(name: str, flags: list[str]):
    from torch.utils.cpp_extension import load

    return load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)


@functools.cache
def native_expert_module():
    missing = [flag for flag in REQUIRED_FLAGS if flag not in cpu_flags()]
    if missing:
        _reason.append(f"this CPU lacks {', '.join(missing)}")
        return None
    try:
        return _build("fiddler_expert_bf16", COMPILE_FLAGS)
    except Exception as err:  # no compiler, no ninja, a failed build: try without AMX, then torch
        first = str(err).splitlines()[0][:200]
    try:
        # a compiler that does not know AMX still builds the AVX512 kernel
        module = _build("fiddler_expert_bf16_no_amx", [*NO_AMX_FLAGS, "-DFIDDLER_NO_AMX"])
        log.warning("native CPU kernel built without its AMX path: %s", first)
        return module
    except Exception as err:
        _reason.append(f"the native kernel did not build: {str(err).splitlines()[0][:200]}")
        log.warning("native CPU expert kernel unavailable: %s", _reason[-1])
        return None


def native_unavailable_reason() -> str | None:
    native_expert_module()
    return _reason[-1] if _reason else None


def amx_unavailable_reason() -> str | None:
    """None when the AMX path of the native module can run here, else why not."""
    module = native_expert_module()
    if module is None:
        return native_unavailable_reason()
    missing = [flag for flag in AMX_FLAGS if flag not in cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if not module.has_amx:
        return "the native module was built without its AMX path (the compiler lacks AMX support)"
    if not module.amx_permitted():
        return "the operating system refused this process the AMX tile state (arch_prctl)"
    return None
