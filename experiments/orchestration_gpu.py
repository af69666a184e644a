"""GPU-host experiment for Fiddler's orchestration (issue 3), all in one call:

1. ``fiddler calibrate`` for full-size Mixtral-8x7B experts (saved as calibration.json).
2. Correctness (``--check-layers 0`` skips it): on Mixtral-8x7B truncated to a few layers
   (float32 fits), teacher-forced logits of every policy, repeated, against transformers-free
   float32 truth (the resident engine in float32), beside the resident engine's own bf16 error;
   with the in-run CPU corrections held fixed, so that repeats, and each ``--cpu-modes`` mode
   against the first, must agree exactly.
3. Speed: full-size Mixtral-8x7B, bf16, ``--gpu-memory-gb`` budget; one engine, every policy in
   turn: TTFT, decode tokens/s, what moved per decode token, peak GPU memory; then one run of
   each policy with per-layer timing (predicted vs measured). ``--beam-width W`` measures beam
   search of width W instead of greedy decode (a step decodes W tokens per layer): the per-layer
   timelines of beam steps, where the simulator's Fiddler predictions miss most
   (results/h200-beam-search-24gb/). ``--ab-threads 16,15`` compares CPU thread counts
   instead: each calibrated under its own (``calibration-threads<N>.json``), then every
   (thread count, policy, CPU mode) on one engine in ``--rounds`` interleaved rounds, so that
   the host's drift between minutes touches every variant alike (rates per round recorded).
   ``--adapt-paths off,on`` adds the executor's learning of where its two paths end (the
   offsets of ``fiddler.orchestrator``) as one more dimension of the variants.

Writes ``<out>/orchestration.json`` after each step (atomically).
Usage: ``python experiments/orchestration_gpu.py --out $OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from fiddler.bounds import decode_bound_tokens_per_s, same_window_model
from fiddler.build import EngineOptions, build_engine, latency_model
from fiddler.calibrate import DEFAULT_TOKEN_COUNTS, calibrate, load_calibration, save_calibration
from fiddler.config import resolve_model
from fiddler.cpu_experts import AUTO
from fiddler.engine import Engine
from fiddler.files import write_json_atomic
from fiddler.generate import GenerationSettings, generate
from fiddler.machine import machine_identity
from fiddler.orchestrator import CPU_MODES, CPU_PATH_COUNTERS, INLINE, STREAM, THREAD
from fiddler.planner import POLICIES
from fiddler.streams import release_cached_memory
from fiddler.weights import RandomWeights

LAYER_LOG_SAMPLE = 96  # decode layers kept per policy in the record (three tokens' worth)
COUNTED = (
    "experts_gpu",
    "experts_cpu",
    "experts_copied",
    "experts_split",
    "rows_gpu",
    "rows_cpu",
    "rows_copied",
    "rows_split",
    "h2d_bytes",
    "d2h_bytes",
    "predicted_s",
    # the CPU path on the host clock in untimed decode: its jobs, routing-to-compute, compute, wait
    *CPU_PATH_COUNTERS,
)


def teacher_forced(engine: Engine, sequence: list[int]) -> torch.Tensor:
    engine.begin(1, len(sequence))
    positions = torch.arange(len(sequence), device=engine.device)
    ids = torch.tensor([sequence], device=engine.device)
    return engine.model.forward(ids, positions, engine.cache, kv_len=len(sequence), last_only=False)[0].float().cpu()


def error(value: torch.Tensor, truth: torch.Tensor) -> dict:
    rel = (value - truth).norm(dim=-1) / truth.norm(dim=-1)
    return {
        "rel_err_median": float(rel.median()),
        "rel_err_max": float(rel.max()),
        "argmax_agreement": float((value.argmax(-1) == truth.argmax(-1)).float().mean()),
    }


def correctness(args, calibration_path: Path) -> dict:
    config, _ = resolve_model(args.model, args.check_layers)
    source = RandomWeights(config, seed=args.seed, generator_device=args.device)
    sequence = [1, *torch.randint(3, config.vocab_size, (63,), generator=torch.Generator().manual_seed(1)).tolist()]
    truth = teacher_forced(Engine.resident(source, args.device, torch.float32, len(sequence)), sequence)
    release_cached_memory()
    result = {"layers": args.check_layers, "positions": len(sequence)}
    result["resident-bf16"] = error(
        teacher_forced(Engine.resident(source, args.device, torch.bfloat16, len(sequence)), sequence), truth
    )
    release_cached_memory()
    expert_gb = config.expert_params * 2 / 1e9
    budget = config.dense_params * 2 / 1e9 + (2 + args.check_resident) * expert_gb + 0.05
    engine, record = build_engine(
        EngineOptions(
            config=config,
            seed=args.seed,
            device=args.device,
            dtype=torch.bfloat16,
            max_seq_len=len(sequence),
            gpu_memory_gb=budget,
            policy="hybrid",
            calibration=calibration_path,
        )
    )
    result["experts_resident"] = record["placement"]["num_resident"]
    executor = engine.model.experts
    # The in-run CPU corrections follow measured times, so with them a plan (a divided expert's
    # share) may change between repeats and the bf16 sums with it; held fixed, repeats and CPU
    # modes must agree exactly, and any difference is a fault (a result read before written).
    executor.adapt_cpu = False
    for policy in POLICIES:
        first_mode = None  # the first CPU mode's logits, which every other mode must equal
        for mode in args.cpu_modes.split(","):
            executor.policy, executor.cpu_mode = policy, mode
            runs = [teacher_forced(engine, sequence) for _ in range(args.check_repeats)]
            name = variant_name(policy, mode)
            result[name] = error(runs[0], truth) | {
                "max_abs_diff_between_repeats": max(float((r - runs[0]).abs().max()) for r in runs)
            }
            if first_mode is None:
                first_mode = runs[0]
            else:
                result[name]["max_abs_diff_to_first_mode"] = float((runs[0] - first_mode).abs().max())
            print("check", name, result[name], flush=True)
    executor.cpu_mode, executor.adapt_cpu = THREAD, True
    engine.close()
    return result


def full_size_options(args, config, calibration_path: Path | None) -> EngineOptions:
    """The engine every speed measurement uses: the budget, the calibration, ``hybrid``."""
    return EngineOptions(
        config=config,
        seed=args.seed,
        device=args.device,
        dtype=torch.bfloat16,
        max_seq_len=args.prompt_len + args.new_tokens,
        beam_width=args.beam_width,
        gpu_memory_gb=args.gpu_memory_gb,
        policy="hybrid",
        calibration=calibration_path,
        cpu_threads=args.cpu_threads,
    )


def full_size_engine(args, config, calibration_path: Path):
    return build_engine(full_size_options(args, config, calibration_path))


def speed(args, calibrations: dict[int | None, Path]) -> dict:
    """Every variant (CPU thread count, policy, CPU mode) on one engine, in ``--rounds``
    interleaved rounds so that the host's drift touches all alike; a thread count plans with
    the calibration measured under it and computes with the kernel that calibration chose."""
    config, _ = resolve_model(args.model, args.layers)
    prompt = [
        1,
        *torch.randint(
            3, config.vocab_size, (args.prompt_len - 1,), generator=torch.Generator().manual_seed(args.seed)
        ).tolist(),
    ]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    engine, record = full_size_engine(args, config, next(iter(calibrations.values())))
    result = {"build": record, "policies": {}}
    executor = engine.model.experts
    # each thread count's (latency model, kernel), read and checked as the engine reads its own
    options = full_size_options(args, config, None)
    settings = {
        threads: latency_model(dataclasses.replace(options, calibration=path), torch.device(args.device))[:2]
        for threads, path in calibrations.items()
    }
    long = GenerationSettings(max_new_tokens=args.new_tokens, beam_width=args.beam_width)
    # a decode layer routes one token per beam; a prefill layer the whole prompt
    decode_rows = args.beam_width * config.num_experts_per_token
    variants = [
        (threads, policy, mode, adapt)
        for threads in calibrations
        for policy in args.policies.split(",")
        for mode in args.cpu_modes.split(",")
        for adapt in args.adapt_paths.split(",")
    ]
    measured: dict[str, dict] = {}
    for round_index in range(args.rounds):
        for threads, policy, mode, adapt in variants:
            executor.use_cpu_threads(threads)  # on the CPU worker too
            executor.use_calibration(*settings[threads])  # the in-run corrections from it up
            executor.policy, executor.cpu_mode, executor.adapt_paths = policy, mode, adapt == "on"
            name = variant_name(policy, mode) + (f" at {threads} threads" if len(calibrations) > 1 else "")
            name += ADAPT_SUFFIX if adapt == "on" else ""
            entry = measured.setdefault(name, {"threads": threads, "runs": [], "by_round": []})
            generate(engine, prompt, GenerationSettings(max_new_tokens=3, beam_width=args.beam_width))  # warm-up
            runs = [generate(engine, prompt, long) for _ in range(args.repeats)]
            entry["runs"] += runs
            entry["by_round"].append(statistics.median(r.decode_tokens_per_s for r in runs))
            print("round", round_index, name, entry["by_round"][-1], flush=True)
            if round_index == 0:  # the layer timelines once per variant
                executor.layer_timing = True
                timed_settings = GenerationSettings(max_new_tokens=min(8, args.new_tokens), beam_width=args.beam_width)
                entry["timed"] = generate(engine, prompt, timed_settings)
                executor.layer_timing = False
                entry["layer_log"] = list(executor.layer_log)
    for name, entry in measured.items():
        runs = entry["runs"]
        decode_tokens = args.new_tokens - 1
        decoded = runs[-1].decode_counters(COUNTED)
        per_token = {k: decoded[k] / decode_tokens for k in COUNTED}
        row = {
            "cpu_threads": entry["threads"],
            "calibration": calibrations[entry["threads"]].name,
            "ttft_s": statistics.median(r.ttft_s for r in runs),
            "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
            "decode_tokens_per_s_by_round": entry["by_round"],
            "e2e_tokens_per_s": statistics.median(r.e2e_tokens_per_s for r in runs),
            "decode_ms_per_token": 1e3 / statistics.median(r.decode_tokens_per_s for r in runs),
            "per_decode_token": per_token,
            "gpu_hit_rate_decode": per_token["rows_gpu"]
            / max(
                per_token["rows_gpu"] + per_token["rows_cpu"] + per_token["rows_copied"] + per_token["rows_split"], 1e-9
            ),
            "token_ids": runs[-1].token_ids,
            # the paths' offsets the last run ended with (adapt_paths; zero without)
            "path_offsets_ms": {
                path: 1e3 * runs[-1].stats[f"{path}_offset_s"]
                for path in ("cpu", "copy")
                if f"{path}_offset_s" in runs[-1].stats
            },
        }
        # issue 8's yardstick: the missing experts' bytes alone at the calibration's rates
        # (infinite, recorded as None, when every routed expert was resident)
        latency = settings[entry["threads"]][0]
        bound = decode_bound_tokens_per_s(config, latency, row["gpu_hit_rate_decode"])
        finite = math.isfinite(bound)
        row["decode_bound_tokens_per_s"] = bound if finite else None
        row["share_of_bound"] = row["decode_tokens_per_s"] / bound if finite else None
        # the same with both paths' rates from one window of the calibration, where it records that
        window = same_window_model(load_calibration(calibrations[entry["threads"]]))
        same = decode_bound_tokens_per_s(config, window, row["gpu_hit_rate_decode"]) if window else math.inf
        row["decode_bound_same_window_tokens_per_s"] = same if math.isfinite(same) else None
        layer_log, timed = entry["layer_log"], entry["timed"]
        decode_layers = [e for e in layer_log if sum(e["tokens"].values()) <= decode_rows]
        row["layer_timing_decode"] = {
            "layers": len(decode_layers),
            "predicted_ms_mean": 1e3 * statistics.mean(e["predicted_s"] for e in decode_layers),
            "measured_ms_mean": 1e3 * statistics.mean(e["measured_s"] for e in decode_layers),
            "timed_decode_tokens_per_s": timed.decode_tokens_per_s,
            "timeline_ms_median": timeline_medians(decode_layers),
            # where the time goes, layer by layer: plan, predicted, measured, CPU compute and wait
            "sample": decode_layers[:LAYER_LOG_SAMPLE],
        }
        # the prefill's layers of the same timed run: where TTFT goes, against the planner's prediction
        prefill_layers = [e for e in layer_log if sum(e["tokens"].values()) > decode_rows]
        row["layer_timing_prefill"] = {
            "layers": len(prefill_layers),
            "predicted_ms_total": 1e3 * sum(e["predicted_s"] for e in prefill_layers),
            "measured_ms_total": 1e3 * sum(e["measured_s"] for e in prefill_layers),
            "cpu_compute_ms_total": 1e3 * sum(e["cpu_compute_s"] for e in prefill_layers),
            "timed_ttft_s": timed.ttft_s,
            "timeline_ms_median": timeline_medians(prefill_layers),
            "sample": prefill_layers[:LAYER_LOG_SAMPLE],
        }
        result["policies"][name] = row
        shown = {k: v for k, v in row.items() if k != "token_ids"}
        for part in ("layer_timing_decode", "layer_timing_prefill"):
            shown[part] = {k: v for k, v in row[part].items() if k != "sample"}
        print("speed", name, shown, flush=True)
    executor.cpu_mode, executor.adapt_paths = THREAD, False
    if torch.cuda.is_available():
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
        free_bytes, total_bytes = torch.cuda.mem_get_info()
        result["gpu_used_gb_device"] = (total_bytes - free_bytes) / 1e9
    engine.close()
    return result


VARIANT_SUFFIX = {INLINE: " (CPU rows on the main thread)", STREAM: " (stream waits for the CPU rows)"}


ADAPT_SUFFIX = " adapting path ends"  # a variant with the executor's adapt_paths on


def variant_name(policy: str, mode: str) -> str:
    """A policy's name in the record, with its CPU mode when not the default (the names earlier
    runs' files use)."""
    return policy + VARIANT_SUFFIX.get(mode, "")


def timeline_medians(layers: list[dict]) -> dict[str, float]:
    """Median of each timeline mark (ms from the layer's start) over the layers that have it."""
    keys = dict.fromkeys(k for e in layers for k in e.get("timeline_ms", {}))
    return {k: statistics.median(e["timeline_ms"][k] for e in layers if k in e["timeline_ms"]) for k in keys}


def diagnose(args, calibration_path: Path) -> dict:
    """Where the hybrid policy's time goes: per-layer logs, the CPU expert alone and beside
    copies on the real host arena, and decode speed at several CPU thread counts."""
    from fiddler.timing import Clock

    config, _ = resolve_model(args.model, args.layers)
    prompt = [
        1,
        *torch.randint(
            3, config.vocab_size, (args.prompt_len - 1,), generator=torch.Generator().manual_seed(args.seed)
        ).tolist(),
    ]
    engine, _ = full_size_engine(args, config, calibration_path)
    executor = engine.model.experts
    result: dict = {"logs": {}}
    for policy in ("hybrid", "cpu-experts") if not args.sweep_only else ():
        executor.policy = policy
        executor.layer_timing = True
        generate(engine, prompt, GenerationSettings(max_new_tokens=6))
        result["logs"][policy] = [
            {k: (list(v) if isinstance(v, tuple) else v) for k, v in e.items()}
            for e in executor.layer_log
            if sum(e["tokens"].values()) <= config.num_experts_per_token
        ]
        executor.layer_timing = False
    missing = [
        (layer, e)
        for layer in range(config.num_layers)
        for e in range(config.num_experts)
        if (layer, e) not in executor.placement.resident
    ][:12]
    host_clock = Clock("cpu")
    x = torch.randn(1, config.hidden_size).to(torch.bfloat16)
    alone = []
    for layer, e in missing:
        t0 = host_clock.now()
        executor.cpu_kernel(x, *executor.host.experts[layer][e])
        alone.append(host_clock.now() - t0)
    stream = torch.cuda.Stream()
    slot = executor.slots[0]
    with torch.cuda.stream(stream):
        for layer, e in missing * 2:
            w13b, w2b = executor.host.experts[layer][e]
            slot.w13b.copy_(w13b, non_blocking=True)
            slot.w2b.copy_(w2b, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    beside = []
    for layer, e in missing:
        t0 = host_clock.now()
        executor.cpu_kernel(x, *executor.host.experts[layer][e])
        if not done.query():
            beside.append(host_clock.now() - t0)
    done.synchronize()
    partial = {}
    for share in (1, 4, 8, 12, 16):
        times = []
        for layer, e in missing:
            w13b, w2b = executor.host.experts[layer][e]
            t0 = host_clock.now()
            executor.cpu_kernel(x, w13b[: 2 * share * executor.block], w2b[:share])
            times.append(host_clock.now() - t0)
        partial[f"{share}/{executor.blocks}"] = 1e3 * statistics.median(times)
    result["cpu_partial_expert_ms"] = partial
    print("partial", partial, flush=True)
    result["cpu_expert_arena_alone_ms"] = [1e3 * t for t in alone]
    result["cpu_expert_arena_beside_copies_ms"] = [1e3 * t for t in beside]
    executor.policy = "hybrid"
    result["threads"] = {}
    sweep = [int(t) for t in args.threads.split(",")]
    for _ in range(args.sweep_repeats):  # interleaved, so drift of the host affects all alike
        for threads in sweep:
            executor.use_cpu_threads(threads)
            rate = generate(engine, prompt, GenerationSettings(max_new_tokens=args.new_tokens)).decode_tokens_per_s
            result["threads"].setdefault(threads, []).append(rate)
            print("threads", threads, rate, flush=True)
    engine.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-gb", type=float, default=24.0)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--beam-width", type=int, default=1, help="speed: beam search of this width (1: greedy)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--cpu-modes",
        default="thread",
        help="how the CPU rows meet the main thread, each measured (and checked) per policy: thread (the "
        "worker, the main thread waits), inline (the main thread), stream (the worker, the stream waits)",
    )
    parser.add_argument(
        "--adapt-paths",
        default="off",
        help="speed: off, on or off,on: whether the executor learns where its CPU and copy paths end "
        "(each a variant, interleaved with the others)",
    )
    parser.add_argument("--cpu-threads", type=int)
    parser.add_argument(
        "--ab-threads",
        help="speed: CPU thread counts to compare (e.g. 16,15), each calibrated under its own, every variant "
        "at each in interleaved rounds on one engine (replaces --cpu-threads; not with --calibration)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="speed: interleaved rounds of every variant")
    parser.add_argument("--check-layers", type=int, default=2, help="layers of the correctness check (0: none)")
    parser.add_argument("--check-resident", type=int, default=5)
    parser.add_argument("--check-repeats", type=int, default=3)
    parser.add_argument("--calibration", type=Path, help="reuse a calibration instead of measuring")
    parser.add_argument(
        "--cpu-kernel", default=AUTO, help=f"CPU expert kernel to calibrate ({AUTO}: measure all, keep the fastest)"
    )
    parser.add_argument("--device", default="cuda", help="cpu runs a functional smoke test")
    parser.add_argument("--diagnose", action="store_true", help="only the hybrid time breakdown")
    parser.add_argument("--threads", default="16,12,8", help="CPU thread counts for the diagnosis sweep")
    parser.add_argument("--sweep-repeats", type=int, default=1)
    parser.add_argument("--sweep-only", action="store_true", help="diagnosis: skip the per-layer logs")
    args = parser.parse_args()
    unknown = sorted(set(args.cpu_modes.split(",")) - set(CPU_MODES))
    if unknown:  # before calibration spends minutes of the GPU host's time
        parser.error(f"--cpu-modes takes {', '.join(CPU_MODES)}; got {', '.join(unknown)}")
    if not set(args.adapt_paths.split(",")) <= {"off", "on"}:
        parser.error(f"--adapt-paths takes off, on or off,on; got {args.adapt_paths!r}")
    if args.check_layers < 0:
        parser.error("--check-layers must be 0 (no correctness check) or more")
    if args.new_tokens < 2 or args.repeats < 1:  # decode rates need a decode step, medians a run
        parser.error("--new-tokens must be at least 2 and --repeats at least 1")
    if not 1 <= args.beam_width < args.prompt_len:  # a decode layer's rows must tell it from prefill's
        parser.error("--beam-width must be at least 1 and below --prompt-len")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.ab_threads:
        if args.calibration is not None or args.cpu_threads is not None:
            parser.error("--ab-threads calibrates under each of its counts: leave out --calibration and --cpu-threads")
        counts = args.ab_threads.split(",")
        if not all(c.isdigit() and int(c) > 0 for c in counts) or len(set(counts)) != len(counts):
            parser.error(f"--ab-threads takes distinct positive counts, comma-separated; got {args.ab_threads!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "orchestration.json"
    record: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_identity(args.device)}
    thread_counts = [int(t) for t in args.ab_threads.split(",")] if args.ab_threads else [args.cpu_threads]
    if args.calibration is not None:
        calibrations = {args.cpu_threads: args.calibration}
    else:
        config, _ = resolve_model(args.model, args.layers)
        calibrations = {}
        for threads in thread_counts:
            name = f"calibration-threads{threads}.json" if args.ab_threads else "calibration.json"
            cal = calibrate(
                config, args.device, torch.bfloat16, threads, args.cpu_kernel, DEFAULT_TOKEN_COUNTS, 5, args.seed
            )
            calibrations[threads] = out / name
            save_calibration(cal, calibrations[threads])
            print(
                "calibration",
                threads,
                json.dumps(
                    {
                        k: cal[k]
                        for k in ("cpu_expert_s", "gpu_expert_s", "copy_expert_s", "concurrent", "cpu_weight_gb_per_s")
                    }
                ),
                flush=True,
            )
            release_cached_memory()
    calibration_path = next(iter(calibrations.values()))
    # the engine is built (and the correctness check runs) under the first thread count
    args.cpu_threads = thread_counts[0]
    if args.diagnose:
        record["diagnose"] = diagnose(args, calibration_path)
        write_json_atomic(out / "diagnose.json", record)
        return 0
    if args.check_layers:
        record["correctness"] = correctness(args, calibration_path)
        write_json_atomic(path, record)
        release_cached_memory()
    record["speed"] = speed(args, calibrations)
    write_json_atomic(path, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
