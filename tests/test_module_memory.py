"""The module-memory trace: hooks fire in forward order around each unit and its children, each
interval's peak is attributed to the code between two hooks, and bad module names are refused."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
from module_memory import MemoryReader, MemoryTrace, top_intervals, traced_names


class FakeAllocator:
    """Counters a module moves by hand: ``hold`` allocates, ``spike`` allocates and frees."""

    def __init__(self) -> None:
        self.now = 0
        self.high = 0

    def hold(self, nbytes: int) -> None:
        self.now += nbytes
        self.high = max(self.high, self.now)

    def spike(self, nbytes: int) -> None:
        self.hold(nbytes)
        self.now -= nbytes

    def reset(self) -> None:
        self.high = self.now

    def reader(self) -> MemoryReader:
        return MemoryReader(allocated=lambda: self.now, peak=lambda: self.high, reset_peak=self.reset)


class Block(torch.nn.Module):
    def __init__(self, allocator: FakeAllocator, spike: int):
        super().__init__()
        self.inner = torch.nn.Identity()
        self.allocator, self.spike_bytes = allocator, spike

    def forward(self, x):
        x = self.inner(x)
        self.allocator.spike(self.spike_bytes)  # after the child: between its exit and ours
        return x


class Model(torch.nn.Module):
    def __init__(self, allocator: FakeAllocator):
        super().__init__()
        self.first = Block(allocator, 10)
        self.second = Block(allocator, 1000)

    def forward(self, x):
        return self.second(self.first(x))


def test_the_peak_is_placed_between_the_hooks_around_it():
    allocator = FakeAllocator()
    allocator.hold(5)
    model = Model(allocator)
    names = traced_names(model, ["first", "second"])
    assert names == ["first", "first.inner", "second", "second.inner"]
    trace = MemoryTrace(model, names, allocator.reader())
    model(torch.zeros(1))
    trace.close()
    assert [(e.module, e.kind) for e in trace.events] == [
        ("first", "enter"),
        ("first.inner", "enter"),
        ("first.inner", "exit"),
        ("first", "exit"),
        ("second", "enter"),
        ("second.inner", "enter"),
        ("second.inner", "exit"),
        ("second", "exit"),
    ]
    top = top_intervals(trace.events, count=2)
    assert (top[0]["from"], top[0]["to"]) == ("second.inner exit", "second exit")
    assert top[0]["peak_gb"] * 1e9 == pytest.approx(1005) and top[0]["growth_gb"] * 1e9 == pytest.approx(1000)
    assert (top[1]["from"], top[1]["to"]) == ("first.inner exit", "first exit")
    model(torch.zeros(1))  # closed: no more events
    assert len(trace.events) == 8


def test_the_whole_model_as_one_unit_and_unknown_names():
    model = Model(FakeAllocator())
    assert traced_names(model, [""]) == ["", "first", "first.inner", "second", "second.inner"]
    assert traced_names(model, [""], depth=1) == ["", "first", "second"]
    with pytest.raises(ValueError, match="does not have"):
        traced_names(model, ["third"])
    with pytest.raises(ValueError, match="no module named third"):
        MemoryTrace(model, ["third"], FakeAllocator().reader())


def test_a_cpu_device_is_refused_before_loading(capsys):
    import module_memory

    with pytest.raises(SystemExit):
        module_memory.main(["--out", "unused", "--device", "cpu"])
    assert "CUDA" in capsys.readouterr().err


def test_a_whole_generation_is_traced(tmp_path):
    """accelerate-offload with ``cpu`` standing in for the GPU (one unit: the whole model), on
    a tiny Mixtral: every forward of the prompt and each new token is seen, and the record
    names the units and their sizes."""
    from module_memory import trace_generation

    from baselines import load_system
    from baselines.base import SystemOptions
    from fiddler.config import resolve_model

    config, _ = resolve_model("mixtral-tiny")
    options = SystemOptions(config=config, max_seq_len=12, device="cpu", dtype=torch.float32, gpu_memory_gb=1.0)
    system = load_system("accelerate-offload", options)
    allocator = FakeAllocator()
    record = trace_generation(system, options, input_tokens=8, new_tokens=3, reader=allocator.reader())
    assert record["device_map"] == {"": "cpu"}
    assert record["unit_sizes_gb"][""] > 0
    entered = [e for e in record["events"] if e["module"] == "" and e["kind"] == "enter"]
    assert len(entered) == 3  # the prompt's forward and two decode steps
    assert len(record["top_intervals"]) > 0


def test_a_system_without_a_torch_model_is_refused():
    from module_memory import trace_generation

    class NoModel:
        pass

    with pytest.raises(ValueError, match="no torch model"):
        trace_generation(NoModel(), None, 1, 1, FakeAllocator().reader())
