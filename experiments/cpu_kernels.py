"""Candidate CPU expert paths (issue 6): weight bytes read per second, per token count.

Paths, on full-size experts in bf16 rotated through a set larger than the last-level cache:
- ``torch-split``: the engine's torch path on the split layout (w1|w3 block-interleaved, w2 by block);
- ``torch-plain``: ``F.linear`` with w1|w3 fused [2F, D] and w2 [D, F];
- ``onednn-packed``: torch's oneDNN linear with weights packed ahead (``torch.utils.mkldnn``);
- ``torch-compile``: ``torch.compile`` of the plain expert;
- ``native``: fiddler/csrc/expert_bf16.cpp (AVX512-BF16 dot products, 1-16 tokens), where the CPU has it;
- ``amx``: the same module's AMX tile path, where the CPU has AMX.
Beside them, the host's memory read bandwidth per thread count (the native module reading a
2 GB buffer once with 512-bit loads, and torch's ``sum`` over it): the denominator of issue
6's target.
For each thread count asked for, and (``--with-copies``, on a GPU host) while host->device copies
stream on a side stream, as the hybrid policy runs it, and (``--in-worker``) called from a
worker thread after a pause, as the engine's decode calls it (inside decode the CPU experts
took 1.3-1.7x their calibrated time on the GPU host), and (``--beside-busy-core``) while another
process keeps one core busy. Writes ``<out>/cpu_kernels.json``.
Usage: ``python experiments/cpu_kernels.py --out $OUT [--threads 16,12] [--with-copies] [--in-worker]
[--beside-busy-core]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from fiddler.config import resolve_model
from fiddler.cpu_experts import make_kernel, set_cpu_threads_with
from fiddler.expert_layout import split_blocks, split_ffn, to_split_layout
from fiddler.files import write_json_atomic
from fiddler.machine import machine_identity
from fiddler.moe import expert_ffn
from fiddler.native import amx_unavailable_reason, native_expert_module, native_unavailable_reason
from fiddler.timing import Clock

COLD_BYTES = 2_000_000_000
# The engine's decode calls each layer's CPU experts on a worker thread after the CPU sat idle
# while the GPU ran attention and routing: about this long on the GPU host.
DECODE_PAUSE_MS = 2.0
BUSY_START_S = 0.2  # lets the busy process start spinning before the first timed call


def make_experts(config, count: int):
    generator = torch.Generator().manual_seed(0)
    d, f = config.hidden_size, config.intermediate_size
    blocks = split_blocks(config)
    experts = []
    for _ in range(count):
        w13 = (torch.randn(2 * f, d, generator=generator) * 0.02).bfloat16()
        w2 = (torch.randn(d, f, generator=generator) * 0.02).bfloat16()
        w13b, w2b = torch.empty_like(w13), torch.empty(blocks, d, f // blocks, dtype=torch.bfloat16)
        to_split_layout(w13, w2, blocks, w13b, w2b)
        experts.append({"w13": w13, "w2": w2, "w13b": w13b, "w2b": w2b})
    return experts, f // blocks


def paths(block: int, experts) -> dict:
    found = {
        "torch-split": lambda x, e: split_ffn(x, e["w13b"], e["w2b"]),
        "torch-plain": lambda x, e: expert_ffn(x, e["w13"], e["w2"]),
    }
    try:
        from torch.utils import mkldnn as mkldnn_utils

        packed = []
        for e in experts:
            l13 = torch.nn.Linear(e["w13"].shape[1], e["w13"].shape[0], bias=False, dtype=torch.bfloat16)
            l2 = torch.nn.Linear(e["w2"].shape[1], e["w2"].shape[0], bias=False, dtype=torch.bfloat16)
            l13.weight.data, l2.weight.data = e["w13"], e["w2"]
            packed.append((mkldnn_utils.to_mkldnn(l13, torch.bfloat16), mkldnn_utils.to_mkldnn(l2, torch.bfloat16)))
        for e, p in zip(experts, packed, strict=True):
            e["packed"] = p

        def onednn(x, e):
            gate, up = e["packed"][0](x).chunk(2, dim=-1)
            return e["packed"][1](F.silu(gate) * up)

        found["onednn-packed"] = onednn
    except Exception as err:  # not every build packs bf16 linears
        print("onednn-packed unavailable:", repr(err)[:120], file=sys.stderr)
    try:
        compiled = torch.compile(expert_ffn, dynamic=True)
        found["torch-compile"] = lambda x, e: compiled(x, e["w13"], e["w2"])
    except Exception as err:
        print("torch.compile unavailable:", repr(err)[:120], file=sys.stderr)
    if native_expert_module() is not None:
        native = make_kernel("avx512-bf16")
        found["native"] = lambda x, e: native(x, e["w13b"], e["w2b"])
    if amx_unavailable_reason() is None:
        amx = make_kernel("amx-bf16")
        found["amx"] = lambda x, e: amx(x, e["w13b"], e["w2b"])
    return found


def read_bandwidth(repeats: int) -> dict[str, float]:
    """GB/s reading a buffer larger than the last-level cache once, median of ``repeats``."""
    clock = Clock("cpu")
    buffer = torch.ones(COLD_BYTES // 2, dtype=torch.bfloat16)
    readers = {"torch-sum": lambda: buffer.sum()}
    if native_expert_module() is not None:
        readers["native-read"] = lambda: native_expert_module().read_all(buffer)
    result = {}
    for name, read in readers.items():
        read()
        samples = []
        for _ in range(repeats):
            start = clock.now()
            read()
            samples.append(clock.now() - start)
        result[name] = buffer.nbytes / statistics.median(samples) / 1e9
    return result


def measure(fn, experts, tokens: int, hidden: int, repeats: int, worker=None, pause_s: float = 0.0) -> float:
    """Median seconds of one call; with ``worker`` (a one-thread executor) each call runs there
    after ``pause_s`` idle, as the engine calls CPU experts in decode."""
    clock = Clock("cpu")
    x = torch.randn(tokens, hidden).bfloat16()

    def once(expert) -> float:
        with torch.inference_mode():
            start = clock.now()
            fn(x, expert)
            return clock.now() - start

    def call(expert) -> float:
        if worker is None:
            return once(expert)
        time.sleep(pause_s)
        return worker.submit(once, expert).result()

    call(experts[0])  # warm-up (and compilation)
    return statistics.median(call(experts[(i + 1) % len(experts)]) for i in range(repeats))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64")
    parser.add_argument("--threads", default=str(torch.get_num_threads()))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--paths", help="comma-separated subset")
    parser.add_argument("--with-copies", action="store_true", help="also measure beside host->device copies")
    parser.add_argument(
        "--beside-busy-core", action="store_true", help="also measure while another process keeps one core busy"
    )
    parser.add_argument(
        "--in-worker", action="store_true", help=f"also measure from a worker thread after {DECODE_PAUSE_MS} ms idle"
    )
    args = parser.parse_args()
    config, _ = resolve_model(args.model, 1)
    expert_bytes = 3 * config.hidden_size * config.intermediate_size * 2
    experts, block = make_experts(config, max(2, math.ceil(COLD_BYTES / expert_bytes)))
    candidates = paths(block, experts)
    if args.paths:
        candidates = {k: v for k, v in candidates.items() if k in args.paths.split(",")}
    rows = []
    conditions = ["alone"] + (["beside-copies"] if args.with_copies and torch.cuda.is_available() else [])
    conditions += ["worker-after-pause"] if args.in_worker else []
    conditions += ["beside-busy-core"] if args.beside_busy_core else []
    worker = ThreadPoolExecutor(max_workers=1)
    bandwidth = {}
    for threads in map(int, args.threads.split(",")):
        # on the worker as well, or its rows keep the first count (as the 16,12 run of 2026-11-28 did)
        set_cpu_threads_with(worker, threads)
        bandwidth[threads] = read_bandwidth(args.repeats)
        print(
            f"memory read, threads={threads}: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bandwidth[threads].items())
        )
        for condition in conditions:
            copier = _Copier(experts) if condition == "beside-copies" else None
            busy = _busy_core() if condition == "beside-busy-core" else None
            for name, fn in candidates.items():
                for tokens in map(int, args.tokens.split(",")):
                    if name == "native" and tokens > 16:
                        continue
                    if copier:
                        copier.start()
                    in_worker = condition == "worker-after-pause"
                    seconds = measure(
                        fn,
                        experts,
                        tokens,
                        config.hidden_size,
                        args.repeats,
                        worker if in_worker else None,
                        DECODE_PAUSE_MS / 1e3,
                    )
                    if copier:
                        copier.stop()
                    rows.append(
                        {
                            "path": name,
                            "threads": threads,
                            "condition": condition,
                            "tokens": tokens,
                            "ms": seconds * 1e3,
                            "weight_gb_per_s": expert_bytes / seconds / 1e9,
                        }
                    )
                    print(
                        f"{name:14s} threads={threads:2d} {condition:13s} n={tokens:3d} {seconds * 1e3:8.2f} ms "
                        f"{expert_bytes / seconds / 1e9:6.1f} GB/s",
                        flush=True,
                    )
            if busy:
                busy.kill()
                busy.wait()
    write_json_atomic(
        Path(args.out) / "cpu_kernels.json",
        {
            "machine": machine_identity("cuda" if torch.cuda.is_available() else "cpu"),
            "model": config.name,
            "expert_bytes": expert_bytes,
            "native": native_unavailable_reason() or "available",
            "amx": amx_unavailable_reason() or "available",
            "memory_read_gb_per_s": bandwidth,
            "rows": rows,
        },
    )
    return 0


def _busy_core() -> subprocess.Popen:
    """A process that keeps one core busy: what a kernel on every core meets when anything else
    in the machine runs (the engine's main thread, a sampler, a driver thread)."""
    process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(BUSY_START_S)
    return process


class _Copier:
    """Keeps the copy engine busy with pinned host->device expert copies."""

    def __init__(self, experts):
        self.sources = [e["w13"].pin_memory() for e in experts[:2]]
        self.target = torch.empty_like(self.sources[0], device="cuda")
        self.stream = torch.cuda.Stream()

    def start(self) -> None:
        with torch.cuda.stream(self.stream):
            for i in range(64):
                self.target.copy_(self.sources[i % 2], non_blocking=True)

    def stop(self) -> None:
        self.stream.synchronize()


if __name__ == "__main__":
    sys.exit(main())
