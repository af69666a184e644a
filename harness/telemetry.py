"""What the machine did during a run, and what the machine is.

Contract: ``NvmlSampler`` samples the GPU on a background thread while a generation runs (memory
used, utilisation, PCIe receive/transmit throughput) and summarises the samples; without NVML
or a GPU it records nothing. ``process_rss_gb`` is this process's resident memory.
``environment(...)`` describes the run's machine and software (GPU, driver, PCIe link, CPU
model, cores, ISA flags, RAM, library versions, git commit) beside the run's settings.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import threading
from pathlib import Path

import psutil

from fiddler.machine import machine_identity
from fiddler.timing import Clock

SAMPLE_INTERVAL_S = 0.05
REPO = Path(__file__).resolve().parent.parent


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no GPU: telemetry is simply absent
        return None


class NvmlSampler:
    def __init__(self, device_index: int = 0, interval_s: float = SAMPLE_INTERVAL_S):
        self.nvml = _nvml()
        self.interval_s = interval_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.handle = self.nvml.nvmlDeviceGetHandleByIndex(device_index) if self.nvml else None

    def _sample(self) -> None:
        nvml, handle, clock = self.nvml, self.handle, Clock("cpu")
        while not self._stop.wait(self.interval_s):
            self.samples.append(
                {
                    "t": clock.now(),
                    "memory_used_gb": nvml.nvmlDeviceGetMemoryInfo(handle).used / 1e9,
                    "gpu_util": nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                    "pcie_rx_gb_per_s": nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_RX_BYTES) / 1e6,
                    "pcie_tx_gb_per_s": nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES) / 1e6,
                }
            )

    def __enter__(self) -> NvmlSampler:
        if self.handle is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {}
        pick = lambda key: [s[key] for s in self.samples]  # noqa: E731
        return {
            "nvml_samples": len(self.samples),
            "nvml_memory_used_max_gb": max(pick("memory_used_gb")),
            "gpu_util_mean": statistics.mean(pick("gpu_util")),
            "pcie_rx_gb_per_s_mean": statistics.mean(pick("pcie_rx_gb_per_s")),
            "pcie_rx_gb_per_s_max": max(pick("pcie_rx_gb_per_s")),
            "pcie_tx_gb_per_s_mean": statistics.mean(pick("pcie_tx_gb_per_s")),
        }


def process_rss_gb() -> float:
    return psutil.Process().memory_info().rss / 1e9


def git_commit() -> dict[str, object]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    # the launcher's word first: the GPU host's copy of the tree may carry a .git from an older
    # snapshot than the files beside it (it labelled rows of 61c16b3 as ae5dc7f-dirty)
    stated = os.environ.get("FIDDLER_GIT_COMMIT")
    if stated:
        return {"git_commit": stated, "git_dirty": None}
    try:
        return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "git_dirty": None}


DIRTY = "-dirty"  # a commit label's suffix when the tree held uncommitted changes


def measuring_commit() -> str:
    """The commit of the code running, marked ``-dirty`` when the tree has uncommitted changes
    (the launcher on a host without .git states it in FIDDLER_GIT_COMMIT, suffix included)."""
    info = git_commit()
    commit = info["git_commit"] or ""
    return commit + DIRTY if commit and info["git_dirty"] and not commit.endswith(DIRTY) else commit


def _gpu_details() -> dict[str, object]:
    nvml = _nvml()
    if nvml is None:
        return {}
    details: dict[str, object] = {}
    with contextlib.suppress(Exception):
        handle = nvml.nvmlDeviceGetHandleByIndex(0)
        details["driver"] = nvml.nvmlSystemGetDriverVersion()
        details["pcie_link_gen"] = nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)
        details["pcie_link_width"] = nvml.nvmlDeviceGetCurrPcieLinkWidth(handle)
        details["pcie_link_gen_max"] = nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)
    return details


def environment(device: str, settings: dict[str, object]) -> dict[str, object]:
    versions = {}
    for name in ("transformers", "accelerate", "datasets", "pandas", "safetensors"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    return {
        "machine": machine_identity(device) | _gpu_details(),
        "libraries": versions,
        **git_commit(),
        "settings": settings,
    }
