"""Where in a generation does a system's GPU allocation peak? (issue 8)

`accelerate-offload` peaked at 24.14-24.17 GB of a 24 GB budget on the GPU host, after loading
had peaked at 20.93 (results/h200-accelerate-memory-24gb/): the excess comes during generation,
and accelerate's device map (weights only, room kept for the largest offloaded layer) does not
say where. This loads one system whose ``model`` is a torch module (the transformers-based
baselines), puts a forward pre-hook and a forward hook on each unit of its device map (for
accelerate: embeddings, each decoder layer, the final norm, the LM head; a hook on a unit runs
outside accelerate's own, so a unit's "enter" is before its offloaded weights arrive and its
"exit" after they are gone) and on the modules two levels inside each (weights present), and
generates. At every hook it records the allocation then and the peak since the hook before,
and resets the peak: each interval's peak belongs to the code between two hooks, so the
generation's peak has a place (e.g. "from layer 31's experts entering to their exit").

Writes ``<out>/module_memory.json`` (atomically): the budget and its breakdown, the device
map with each unit's size (accelerate's ``compute_module_sizes``), loading's peak, every event,
and the ``TOP_INTERVALS`` intervals with the highest peaks; prints them as a table.
Usage (GPU host): ``python experiments/module_memory.py --out DIR --system accelerate-offload
--gpu-memory-gb 24 --input-tokens 256 --new-tokens 4 [--model mixtral-8x7b]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from baselines import load_system
from baselines.base import SystemOptions
from fiddler.config import resolve_model
from fiddler.files import write_json_atomic
from fiddler.generate import GenerationSettings
from fiddler.placement import GB, budget_breakdown

TOP_INTERVALS = 10
WHOLE_MODEL = "(model)"  # how the unit "" is named in the intervals


@dataclass(frozen=True)
class MemoryReader:
    """The allocator's counters for one device: bytes allocated now, the peak since the last
    reset, and the reset (``cuda`` reads torch's CUDA allocator; tests pass their own)."""

    allocated: Callable[[], int]
    peak: Callable[[], int]
    reset_peak: Callable[[], None]

    @classmethod
    def cuda(cls, device: torch.device) -> MemoryReader:
        return cls(
            allocated=lambda: torch.cuda.memory_allocated(device),
            peak=lambda: torch.cuda.max_memory_allocated(device),
            reset_peak=lambda: torch.cuda.reset_peak_memory_stats(device),
        )


@dataclass(frozen=True)
class Event:
    module: str
    kind: str  # "enter" (before the module's forward) or "exit" (after it)
    allocated: int  # bytes allocated at the hook
    peak_since_last: int  # the peak between the hook before and this one


class MemoryTrace:
    """Hooks on named modules that record ``Event``s; ``close`` removes them."""

    def __init__(self, model: torch.nn.Module, names: list[str], reader: MemoryReader):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"the model has no module named {', '.join(missing)}")
        self.reader = reader
        self.events: list[Event] = []
        self._handles = []
        for name in names:
            module = modules[name]
            self._handles.append(module.register_forward_pre_hook(self._hook(name, "enter")))
            self._handles.append(module.register_forward_hook(self._hook(name, "exit")))
        reader.reset_peak()

    def _hook(self, name: str, kind: str) -> Callable:
        def record(*_: object) -> None:
            self.events.append(Event(name, kind, self.reader.allocated(), self.reader.peak()))
            self.reader.reset_peak()

        return record

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def traced_names(model: torch.nn.Module, units: list[str], depth: int = 2) -> list[str]:
    """``units`` (a device map's keys; "" is the whole model) and the modules inside each one
    down to ``depth`` levels (2: a decoder layer's attention and MoE block, and the MoE
    block's router and experts)."""
    modules = dict(model.named_modules())
    names = []
    for unit in units:
        if unit not in modules:
            raise ValueError(f"the device map names {unit!r}, which the model does not have")
        for inner, _ in modules[unit].named_modules():
            if not inner or inner.count(".") < depth:
                names.append(f"{unit}.{inner}" if unit and inner else unit or inner)
    return names


def top_intervals(events: list[Event], count: int = TOP_INTERVALS) -> list[dict[str, object]]:
    """The ``count`` intervals between consecutive hooks with the highest peaks: where each
    began and ended, the allocation at its start, its peak and the growth within it (GB)."""
    intervals = [
        {
            "from": f"{before.module or WHOLE_MODEL} {before.kind}",
            "to": f"{after.module or WHOLE_MODEL} {after.kind}",
            "index": index,
            "allocated_at_start_gb": before.allocated / GB,
            "peak_gb": after.peak_since_last / GB,
            "growth_gb": (after.peak_since_last - before.allocated) / GB,
        }
        for index, (before, after) in enumerate(itertools.pairwise(events), start=1)
    ]
    return sorted(intervals, key=lambda i: -i["peak_gb"])[:count]


def table(intervals: list[dict[str, object]]) -> str:
    lines = ["| from | to | event | allocated at start GB | peak GB | growth GB |", "|---|---|---|---|---|---|"]
    for i in intervals:
        lines.append(
            f"| {i['from']} | {i['to']} | {i['index']} | {i['allocated_at_start_gb']:.3f} | {i['peak_gb']:.3f} "
            f"| {i['growth_gb']:.3f} |"
        )
    return "\n".join(lines)


def unit_sizes(model: torch.nn.Module, units: list[str], dtype: torch.dtype) -> dict[str, float]:
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=dtype)
    return {unit: sizes.get(unit, 0) / GB for unit in units}


def trace_generation(
    system: object, options: SystemOptions, input_tokens: int, new_tokens: int, reader: MemoryReader
) -> dict:
    """Trace one greedy generation of ``new_tokens`` after a seeded random prompt of
    ``input_tokens`` on a loaded ``system`` (its peak not reset since loading); the record of
    the module docstring, without the command line."""
    model = getattr(system, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{type(system).__name__} has no torch model to hook; use a transformers-based system")
    load_peak, after_load = reader.peak(), reader.allocated()
    device_map = getattr(system, "device_map", {"": options.device})
    units = list(device_map)
    trace = MemoryTrace(model, traced_names(model, units), reader)
    seeded = torch.Generator().manual_seed(options.seed)
    prompt = torch.randint(options.config.vocab_size, (input_tokens,), generator=seeded)
    try:
        system.generate(prompt.tolist(), GenerationSettings(max_new_tokens=new_tokens))
    finally:
        trace.close()
    breakdown = budget_breakdown(
        options.config, options.budget_bytes or 0, options.dtype, options.max_seq_len, 1, staging_experts=0
    )
    return {
        "budget_gb": options.gpu_memory_gb,
        "breakdown": breakdown.to_json(),
        "device_map": {k: str(v) for k, v in device_map.items()},
        "unit_sizes_gb": unit_sizes(model, units, options.dtype),
        "load_peak_allocated_gb": load_peak / GB,
        "allocated_after_load_gb": after_load / GB,
        "generation_peak_allocated_gb": max(e.peak_since_last for e in trace.events) / GB,
        "top_intervals": top_intervals(trace.events),
        "events": [asdict(e) for e in trace.events],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--system", default="accelerate-offload")
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--gpu-memory-gb", type=float, default=24.0)
    parser.add_argument("--input-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        parser.error("--device must be a CUDA device: the trace reads torch's CUDA allocator")
    config, checkpoint = resolve_model(args.model)
    options = SystemOptions(
        config=config,
        max_seq_len=args.input_tokens + args.new_tokens,
        checkpoint=checkpoint,
        seed=args.seed,
        device=args.device,
        dtype=torch.bfloat16,
        gpu_memory_gb=args.gpu_memory_gb,
    )
    system = load_system(args.system, options)  # resets the peak first
    try:
        record = trace_generation(system, options, args.input_tokens, args.new_tokens, MemoryReader.cuda(device))
    except ValueError as err:
        parser.error(f"--system {args.system}: {err}")
    record = {"args": {k: str(v) for k, v in vars(args).items()}} | record
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "module_memory.json", record)
    print(
        f"{args.system} at {args.gpu_memory_gb:g} GB: loading peaked at {record['load_peak_allocated_gb']:.3f} GB "
        f"({record['allocated_after_load_gb']:.3f} allocated after it), "
        f"generation at {record['generation_peak_allocated_gb']:.3f}"
    )
    print(table(record["top_intervals"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
