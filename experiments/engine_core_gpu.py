"""GPU-host experiment for the engine core (issue 2), one call does all of it:

1. host: materialise the whole model's random weights (bf16) into one page-locked host arena
   (chunks touched and registered by worker threads while the GPU fills ready ones), timed;
   then host->device bandwidth of one expert from that arena.
2. engine: the whole model resident on the GPU; decode ms/token with the grouped expert path
   in a CUDA graph, the same eagerly, and the per-expert loop; teacher-forced logits kept.
3. transformers: ``MixtralForCausalLM`` on the same weights (built on meta, assigned), one
   after the other (two copies do not fit); ``generate`` decode ms/token for each experts
   implementation; teacher-forced logits compared with the engine's.

Writes ``<out>/engine_core.json`` after every phase (atomically), so a crash keeps what
finished. Usage: ``python experiments/engine_core_gpu.py --out $OUT [--model mixtral-8x7b]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from fiddler.config import resolve_model
from fiddler.engine import Engine, parse_dtype
from fiddler.files import write_json_atomic
from fiddler.generate import GenerationSettings, generate
from fiddler.hf_reference import build_transformers_model
from fiddler.loading import load_host_weights
from fiddler.machine import machine_identity
from fiddler.streams import release_cached_memory
from fiddler.timing import Clock
from fiddler.weights import RandomWeights


def release() -> None:
    release_cached_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def host_phase(config, seed: int) -> dict:
    clock = Clock("cuda")
    start = clock.now()
    source = RandomWeights(config, seed=seed, generator_device="cuda")
    host = load_host_weights(source, torch.bfloat16, pin=True, include_dense=True)
    total = clock.now() - start
    host.arena.wait_ready()
    phases = dict(host.arena.timings)
    # host -> device bandwidth of one expert from the arena
    w13, w2 = host.experts[0][0]
    dst13, dst2 = torch.empty_like(w13, device="cuda"), torch.empty_like(w2, device="cuda")
    times = []
    for _ in range(10):
        t0 = clock.now()
        dst13.copy_(w13, non_blocking=True)
        dst2.copy_(w2, non_blocking=True)
        times.append(clock.now() - t0)
    expert_bytes = w13.numel() * 2 + w2.numel() * 2
    spot = torch.empty_like(dst2)
    source.load_into("model.layers.0.block_sparse_moe.experts.0.w2.weight", spot)
    result = {
        "model_gb": host.arena.nbytes / 1e9,
        "total_s": total,
        "phases_s": phases,
        "pinned": host.arena.pinned,
        "expert_h2d_ms_median": statistics.median(times) * 1e3,
        "expert_h2d_gb_per_s": expert_bytes / statistics.median(times) / 1e9,
        "spot_check_equal": bool(torch.equal(spot, dst2)),
    }
    del w13, w2, dst13, dst2, spot
    host.close()
    return result


def timed_generations(run, repeats: int) -> dict:
    results = [run() for _ in range(repeats)]
    steps = [t for r in results for t in r.step_times_s]
    return {
        "ttft_s": statistics.median(r.ttft_s for r in results),
        "decode_ms_per_token_median": statistics.median(steps) * 1e3,
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in results),
        "token_ids": results[-1].token_ids,
    }


def engine_phase(config, seed: int, device, dtype, prompt: list[int], new_tokens: int, repeats: int):
    clock = Clock(device)
    start = clock.now()
    source = RandomWeights(config, seed=seed, generator_device=device.type)
    engine = Engine.resident(source, device, dtype, max_seq_len=len(prompt) + new_tokens)
    load_s = clock.now() - start
    settings = GenerationSettings(max_new_tokens=new_tokens)
    variants = []
    experts = engine.model.experts
    configurations = [("grouped", True), ("grouped", False), ("loop", False)]
    for strategy, graphs in configurations:
        if strategy == "grouped" and experts.strategy != "grouped":
            continue  # grouped matmuls unsupported for this device/dtype
        experts.strategy, experts.capturable = strategy, strategy == "grouped"
        engine.use_graphs = graphs and device.type == "cuda"
        generate(engine, prompt, GenerationSettings(max_new_tokens=min(4, new_tokens)))  # warm-up, graph capture
        row = timed_generations(lambda: generate(engine, prompt, settings), repeats)
        row.update(strategy=strategy, cuda_graphs=engine.stats()["cuda_graphs"], stats=engine.stats())
        variants.append(row)
        print(
            f"engine {strategy} graphs={row['cuda_graphs']}: {row['decode_ms_per_token_median']:.2f} ms/token",
            flush=True,
        )
    # Teacher-forced logits over prompt + the engine's own greedy tokens.
    sequence = prompt + variants[0]["token_ids"]
    engine.begin(1, len(sequence))
    positions = torch.arange(len(sequence), device=device)
    logits = engine.model.forward(
        torch.tensor([sequence], device=device), positions, engine.cache, kv_len=len(sequence), last_only=False
    )[0].cpu()
    result = {"load_s": load_s, "peak_gpu_gb": peak_gb(), "variants": variants}
    return result, sequence, logits  # the engine is freed with this frame


def transformers_phase(config, seed, device, dtype, prompt, new_tokens, repeats, sequence, engine_logits):
    clock = Clock(device)
    start = clock.now()
    model = build_transformers_model(RandomWeights(config, seed=seed, generator_device=device.type), device, dtype)
    load_s = clock.now() - start
    ids = torch.tensor([prompt], device=device)

    def run(n: int) -> tuple[float, list[int]]:
        t0 = clock.now()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return clock.now() - t0, out[0, len(prompt) :].tolist()

    variants = []
    implementations = ["eager", "grouped_mm"] if hasattr(model, "set_experts_implementation") else ["default"]
    for impl in implementations:
        try:
            if impl != "default":
                model.set_experts_implementation(impl)
            run(min(4, new_tokens))  # warm-up
        except Exception as err:  # an implementation this build lacks: record and go on
            variants.append({"experts_implementation": impl, "error": repr(err)[:300]})
            continue
        first = statistics.median(run(1)[0] for _ in range(repeats))
        full = [run(new_tokens) for _ in range(repeats)]
        total = statistics.median(t for t, _ in full)
        per_token = (total - first) / (new_tokens - 1)
        variants.append(
            {
                "experts_implementation": impl,
                "ttft_s": first,
                "decode_ms_per_token": per_token * 1e3,
                "decode_tokens_per_s": 1 / per_token,
                "token_ids": full[-1][1],
            }
        )
        print(f"transformers {impl}: {per_token * 1e3:.2f} ms/token", flush=True)
    with torch.no_grad():
        reference = model(torch.tensor([sequence], device=device)).logits[0].float().cpu()
    error = (engine_logits - reference).norm(dim=-1) / reference.norm(dim=-1)
    agreement = {
        "positions": len(sequence),
        "relative_error_max": float(error.max()),
        "relative_error_median": float(error.median()),
        "argmax_agreement": float((engine_logits.argmax(-1) == reference.argmax(-1)).float().mean()),
    }
    result = {"load_s": load_s, "peak_gpu_gb": peak_gb(), "variants": variants, "teacher_forced": agreement}
    return result  # the model is freed with this frame


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-host", action="store_true")
    parser.add_argument("--only-host", action="store_true", help="measure the host arena only (a fresh VM)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "engine_core.json"
    config, _ = resolve_model(args.model, args.layers)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    generator = torch.Generator().manual_seed(args.seed)
    prompt = [1, *torch.randint(3, config.vocab_size, (args.prompt_len - 1,), generator=generator).tolist()]
    record: dict = {
        "model": config.name,
        "dtype": args.dtype,
        "seed": args.seed,
        "prompt_tokens": len(prompt),
        "prompt": "BOS + seeded random token ids",
        "new_tokens": args.new_tokens,
        "env": machine_identity(device),
    }
    write_json_atomic(path, record)
    if device.type == "cuda" and not args.skip_host:
        record["host"] = host_phase(config, args.seed)
        print("host", json.dumps(record["host"]), flush=True)
        write_json_atomic(path, record)
        release()
    if args.only_host:
        return 0
    engine, sequence, logits = engine_phase(config, args.seed, device, dtype, prompt, args.new_tokens, args.repeats)
    record["engine"] = engine
    write_json_atomic(path, record)
    release()
    record["transformers"] = transformers_phase(
        config, args.seed, device, dtype, prompt, args.new_tokens, args.repeats, sequence, logits
    )
    write_json_atomic(path, record)
    print(json.dumps({k: record[k] for k in ("engine", "transformers") if k in record}, default=str)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
