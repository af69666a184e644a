"""CPU expert kernels: the native AVX512-BF16 and AMX kernels against a float64 reference on
random inputs (where this CPU can build and run them), the torch fallback, and calibration's
choice of a kernel per range of token counts."""

import itertools
import statistics
import threading
import time

import pytest
import torch

from fiddler.calibrate import choose_tiers, kernel_tiers
from fiddler.cpu_experts import TieredExpertKernel, make_kernel, tiered_kernel
from fiddler.expert_layout import split_ffn, to_split_layout
from fiddler.native import amx_unavailable_reason, native_expert_module, native_unavailable_reason

BF16_TOL = 0.01  # relative L2 error; bf16 operands with float32 accumulation land near 0.003


def random_expert(d: int, f: int, blocks: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(2 * f, d, generator=generator) * 0.02).bfloat16()
    w2 = (torch.randn(d, f, generator=generator) * 0.02).bfloat16()
    w13b, w2b = torch.empty_like(w13), torch.empty(blocks, d, f // blocks, dtype=torch.bfloat16)
    to_split_layout(w13, w2, blocks, w13b, w2b)
    return w13b, w2b


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return float((value.double() - truth).norm() / truth.norm())


def skip_unless_runs(kernel_name: str) -> None:
    reason = {"torch": None, "avx512-bf16": native_unavailable_reason, "amx-bf16": amx_unavailable_reason}[kernel_name]
    if reason is not None and reason() is not None:
        pytest.skip(f"{kernel_name} unavailable here: {reason()}")


@pytest.mark.parametrize("kernel_name", ["torch", "avx512-bf16", "amx-bf16"])
# shapes with tails: hidden and block widths that are not multiples of a tile (16 rows x 32), and
# an odd block width (AMX packs its tokens element by element then)
@pytest.mark.parametrize(
    ("d", "f", "blocks"), [(64, 128, 16), (512, 1792, 16), (96, 192, 12), (100, 200, 10), (98, 210, 6)]
)
def test_kernels_match_float64(kernel_name, d, f, blocks):
    skip_unless_runs(kernel_name)
    kernel = make_kernel(kernel_name)
    w13b, w2b = random_expert(d, f, blocks, seed=d + f)
    g = f // blocks
    # 20: beyond the AVX512 kernel (torch serves it); 33, 64, 70: two to five AMX token tiles,
    # 70 in two passes over the weights
    for tokens in (1, 2, 3, 7, 16, 20, 33, 64, 70):
        x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(tokens)).bfloat16()
        truth = split_ffn(x.double(), w13b.double(), w2b.double())
        assert relative_error(kernel(x, w13b, w2b), truth) < BF16_TOL, tokens
        for cut in (1, blocks // 2, blocks - 1):  # a run of blocks: one side of a divided expert
            part = kernel(x, w13b[: 2 * cut * g], w2b[:cut])
            assert (
                relative_error(part, split_ffn(x.double(), w13b[: 2 * cut * g].double(), w2b[:cut].double())) < BF16_TOL
            )


STALL_SHARE_OF_CALL = 0.1  # a gap in the main thread's loop longer than this share of a call is a stall
MAX_STALLED_FRACTION = 0.5  # of the measuring window


@pytest.mark.parametrize(("kernel_name", "tokens"), [("avx512-bf16", 16), ("amx-bf16", 64)])
def test_native_kernels_release_the_gil(kernel_name, tokens):
    """The engine's main thread issues GPU work while a worker thread computes CPU experts: a
    kernel holding the GIL would stall it for a whole expert (seen on the GPU host as copies 90x
    slower beside the CPU)."""
    skip_unless_runs(kernel_name)
    kernel = make_kernel(kernel_name)
    w13b, w2b = random_expert(2048, 8192, 16, seed=1)  # ~100 MB: one call takes tens of ms
    x = torch.randn(tokens, 2048).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel on one core, this thread's loop on the other
    try:
        calls = []
        for _ in range(3):
            start = time.perf_counter()
            kernel(x, w13b, w2b)
            calls.append(time.perf_counter() - start)
        stop = threading.Event()

        def compute() -> None:
            while not stop.is_set():
                kernel(x, w13b, w2b)

        worker = threading.Thread(target=compute)
        worker.start()
        ticks = [time.perf_counter()]
        while ticks[-1] - ticks[0] < 10 * max(calls):
            ticks.append(time.perf_counter())
        stop.set()
        worker.join()
    finally:
        torch.set_num_threads(threads)
    # Holding the GIL stalls this loop for every call, nearly the whole window (0.96 measured with
    # a GIL-holding C call); a kernel that releases it leaves only the scheduler's preemptions on
    # a busy 2-core machine (one 30 ms gap failed the longest-gap version of this check in CI).
    call = statistics.median(calls)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    stalled = sum(gap for gap in gaps if gap > STALL_SHARE_OF_CALL * call) / (ticks[-1] - ticks[0])
    assert stalled < MAX_STALLED_FRACTION, (stalled, max(gaps), calls)


def test_native_kernel_bound_and_bad_input():
    if native_expert_module() is None:
        pytest.skip(f"native kernel unavailable here: {native_unavailable_reason()}")
    kernel = make_kernel("avx512-bf16", max_tokens=2)
    assert kernel.max_tokens == 2
    w13b, w2b = random_expert(64, 128, 16, seed=0)
    with pytest.raises(RuntimeError, match="bf16"):
        native_expert_module().expert(torch.randn(1, 64), w13b, w2b)


def test_calibration_picks_the_fastest_kernel_per_range_of_token_counts():
    counts = (1, 2, 4, 8)
    curves = {"torch": [4, 3, 3, 3], "avx512-bf16": [2, 2.5, 3.5, None], "amx-bf16": [2.5, 2.4, 2, 2.9]}
    assert choose_tiers(curves, counts) == [[1, "avx512-bf16"], [None, "amx-bf16"]]
    assert choose_tiers({"torch": [1, 1, 1, 1], "avx512-bf16": [2, 2, 2, None]}, counts) == [[None, "torch"]]
    assert choose_tiers({"torch": [3, 3, 1, 1], "avx512-bf16": [2, 2, 2, None]}, counts) == [
        [2, "avx512-bf16"],
        [None, "torch"],
    ]
    # files from before the tiers: one kernel up to a count, torch beyond
    assert kernel_tiers({"cpu_kernel": "avx512-bf16", "cpu_kernel_max_tokens": 4}) == [
        [4, "avx512-bf16"],
        [None, "torch"],
    ]
    assert kernel_tiers({"cpu_kernel": "torch", "cpu_kernel_max_tokens": 0}) == [[None, "torch"]]


def test_tiered_kernel_dispatches_by_token_count():
    calls = []

    class Recording:
        def __init__(self, name):
            self.name = name

        def __call__(self, x, w13b, w2b):
            calls.append((self.name, x.shape[0]))
            return x

    kernel = TieredExpertKernel([(2, Recording("a")), (8, Recording("b")), (None, Recording("c"))])
    assert kernel.name == "a<=2+b<=8+c"
    for n in (1, 2, 3, 8, 9, 100):
        kernel(torch.zeros(n, 4), None, None)
    assert calls == [("a", 1), ("a", 2), ("b", 3), ("b", 8), ("c", 9), ("c", 100)]
    assert tiered_kernel([[None, "torch"]]).name == "torch"
    with pytest.raises(ValueError, match="any token count"):
        TieredExpertKernel([(2, Recording("a"))])


def test_a_compiler_without_amx_still_builds_the_avx512_kernel(monkeypatch):
    """The first build (with AMX flags) fails as on an old compiler: the module is rebuilt
    without its AMX path, the AVX512 kernel works, and the AMX kernel says why it cannot run."""
    from fiddler import native

    if native_unavailable_reason() is not None:
        pytest.skip(f"native kernel unavailable here: {native_unavailable_reason()}")
    real_build = native._build

    def old_compiler(name, flags):
        if "-mamx-tile" in flags:
            raise RuntimeError("c++: error: unrecognized command-line option '-mamx-tile'")
        return real_build(name, flags)

    monkeypatch.setattr(native, "_build", old_compiler)
    module = native.native_expert_module.__wrapped__()
    assert module is not None and not module.has_amx and not hasattr(module, "expert_amx")
    w13b, w2b = random_expert(64, 128, 16, seed=1)
    x = torch.randn(3, 64).bfloat16()
    truth = split_ffn(x.double(), w13b.double(), w2b.double())
    assert relative_error(module.expert(x, w13b, w2b), truth) < BF16_TOL
    monkeypatch.setattr(native, "native_expert_module", lambda: module)
    # on a CPU with AMX the build is the reason; elsewhere the CPU would be named first
    flags = native.cpu_flags() | set(native.AMX_FLAGS)
    monkeypatch.setattr(native, "cpu_flags", lambda: flags)
    assert "without its AMX path" in native.amx_unavailable_reason()
