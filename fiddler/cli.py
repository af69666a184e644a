"""``fiddler`` command line. Argument parsing lives here and nowhere else in the library.

- ``fiddler generate --model <dir|preset> [--layers L] [--seed S] (--prompt TEXT | --prompt-ids
  1,2,3) --max-new-tokens N [--beam-width W] [--device cuda|cpu] [--dtype bfloat16|float32]
  [--gpu-memory-gb G] [--policy P] [--calibration FILE] [--popularity FILE] [--cpu-threads T]
  [--json]``: logs go to standard error; with ``--json`` the last line of standard output is
  one JSON object (``token_ids`` are the new tokens, ``text`` is null without a tokenizer).
- ``fiddler calibrate --model M --out FILE``: measure this machine's expert latencies.
- ``fiddler profile --model M (--prompts FILE | --random-prompts N) --out FILE``: count router
  selections per (layer, expert) for popularity placement.

A user error prints one ``error:`` line naming what to change and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from fiddler.build import RESIDENT, EngineOptions, build_engine
from fiddler.calibrate import DEFAULT_ATTEMPTS, DEFAULT_TOKEN_COUNTS, QUICK_TOKEN_COUNTS, calibrate, save_calibration
from fiddler.config import resolve_model
from fiddler.engine import parse_dtype
from fiddler.generate import GenerationSettings, generate
from fiddler.orchestrator import CPU_MODES, THREAD
from fiddler.planner import POLICIES
from fiddler.profiling import profile_popularity, save_popularity
from fiddler.tokenizer import Tokenizer, find_tokenizer

DISTURBED_EXIT = 3  # calibrate --require-steady: every attempt was disturbed
log = logging.getLogger("fiddler")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="preset name (e.g. mixtral-8x7b) or checkpoint directory")
    parser.add_argument("--layers", type=int, help="keep only the first L decoder layers (quick runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights of a preset")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the config's dtype)")


def parse_token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu-memory-gb", type=float, help="GPU budget in GB (1e9 bytes); default: free memory")
    parser.add_argument("--policy", choices=[RESIDENT, *POLICIES], help="where experts run (default: see README)")
    parser.add_argument("--calibration", type=Path, help="a 'fiddler calibrate' file (default: calibrate quickly)")
    parser.add_argument("--popularity", type=Path, help="a 'fiddler profile' file (default: uniform placement)")
    parser.add_argument("--cpu-threads", type=int, help="threads for CPU experts (default: all cores)")
    parser.add_argument("--staging-experts", type=int, default=2, help="GPU buffers for copied experts")
    parser.add_argument("--layer-timing", action="store_true", help="time every MoE layer (adds a sync)")
    parser.add_argument(
        "--cpu-mode",
        choices=CPU_MODES,
        default=THREAD,
        help="how CPU-computed experts meet the GPU's work: thread (the main thread waits for the CPU worker), "
        "inline (the main thread computes them), stream (the GPU stream waits for the worker; CUDA)",
    )
    parser.add_argument(
        "--adapt-paths",
        action="store_true",
        help="learn during the run where the CPU path and the copies actually end, and divide each layer's "
        "missing experts between them by it (CUDA; not yet measured to help: results/orchestration-h200/)",
    )


def device_and_dtype(args: argparse.Namespace, config) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    return device, parse_dtype(args.dtype or config.dtype)


def engine_options(args: argparse.Namespace, max_seq_len: int, beam_width: int = 1) -> EngineOptions:
    config, checkpoint = resolve_model(args.model, args.layers)
    device, dtype = device_and_dtype(args, config)
    return EngineOptions(
        config=config,
        checkpoint=checkpoint,
        seed=args.seed,
        device=device.type,
        dtype=dtype,
        max_seq_len=max_seq_len,
        beam_width=beam_width,
        gpu_memory_gb=args.gpu_memory_gb,
        policy=args.policy,
        calibration=args.calibration,
        popularity=args.popularity,
        cpu_threads=args.cpu_threads,
        staging_experts=args.staging_experts,
        layer_timing=args.layer_timing,
        cpu_mode=args.cpu_mode,
        adapt_paths=args.adapt_paths,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    config, checkpoint = resolve_model(args.model, args.layers)
    device_and_dtype(args, config)  # fail early on a bad device or dtype
    tokenizer = find_tokenizer(checkpoint, args.tokenizer)
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass --prompt-ids, or --tokenizer PATH")
        prompt_ids = tokenizer.encode(args.prompt)
    else:
        prompt_ids = parse_token_ids(args.prompt_ids)
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        beam_width=args.beam_width,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.sample_seed,
        ignore_eos=not args.stop_at_eos,
    )
    options = engine_options(args, len(prompt_ids) + args.max_new_tokens, args.beam_width)
    log.info("loading %s on %s in %s", config.name, options.device, options.dtype)
    engine, record = build_engine(options)
    result = generate(engine, prompt_ids, settings)
    result.text = tokenizer.decode(result.token_ids) if tokenizer else None
    result.stats["engine"] = record
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
        rate = result.decode_tokens_per_s
        log.info("TTFT %.3f s, decode %s tokens/s", result.ttft_s, f"{rate:.2f}" if rate else "n/a")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    config, _ = resolve_model(args.model, args.layers)
    device, dtype = device_and_dtype(args, config)
    counts = QUICK_TOKEN_COUNTS if args.quick else DEFAULT_TOKEN_COUNTS
    result = calibrate(
        config, device, dtype, args.cpu_threads, args.cpu_kernel, counts, args.repeats, args.seed, args.attempts
    )
    save_calibration(result, args.out)
    problems = result["steadiness"]["problems"]
    if problems:
        log.warning(
            "every one of %d attempts was disturbed (%s): the file keeps the least disturbed; "
            "calibrate again when the host is idle",
            result["steadiness"]["attempts"],
            "; ".join(problems),
        )
    log.info(
        "copy %.2f GB/s; CPU expert 1 token %.2f ms (%.1f GB/s of weights); written to %s",
        result["copy_gb_per_s"],
        result["cpu_expert_s"][0] * 1e3,
        result["cpu_weight_gb_per_s"][0],
        args.out,
    )
    # a script that must not plan a sweep with such a file can tell (the file is written anyway)
    return DISTURBED_EXIT if problems and args.require_steady else 0


def read_prompts(path: Path, tokenizer: Tokenizer | None) -> list[list[int]]:
    """A .txt file (one prompt per line) or a .json list of strings or of token-id lists."""
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    if path.suffix == ".json":
        items = json.loads(path.read_text())
        if not isinstance(items, list):
            raise ValueError(f"{path} must hold a JSON list of prompts")
    else:
        items = [line for line in path.read_text().splitlines() if line.strip()]
    prompts = []
    for item in items:
        if isinstance(item, list):
            prompts.append([int(t) for t in item])
        elif tokenizer is None:
            raise ValueError("text prompts need a tokenizer: give token-id lists, or --tokenizer PATH")
        else:
            prompts.append(tokenizer.encode(str(item)))
    return prompts


def cmd_profile(args: argparse.Namespace) -> int:
    config, checkpoint = resolve_model(args.model, args.layers)
    if args.prompts is not None:
        prompts = read_prompts(args.prompts, find_tokenizer(checkpoint, args.tokenizer))
    else:
        generator = torch.Generator().manual_seed(args.seed)
        prompts = [
            torch.randint(0, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
            for _ in range(args.random_prompts)
        ]
    longest = max((len(p) for p in prompts), default=0)
    args.policy = args.policy or RESIDENT
    engine, _ = build_engine(engine_options(args, longest + max(args.max_new_tokens, 1)))
    counts = profile_popularity(engine, prompts, args.max_new_tokens)
    save_popularity(counts, config.name, len(prompts), args.out)
    log.info("profiled %d prompts; written to %s", len(prompts), args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fiddler", description="Fiddler MoE inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate tokens from a prompt")
    add_model_arguments(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    gen.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json to use instead of the default")
    gen.add_argument("--max-new-tokens", type=int, required=True)
    gen.add_argument("--beam-width", type=int, default=1)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--sample-seed", type=int, default=0, help="seed of the sampler")
    gen.add_argument("--stop-at-eos", action="store_true", help="end at EOS instead of generating exactly N tokens")
    gen.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_placement_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    cal = sub.add_parser("calibrate", help="measure this machine's expert latencies")
    add_model_arguments(cal)
    cal.add_argument("--out", type=Path, required=True, help="JSON file to write")
    cal.add_argument("--cpu-threads", type=int)
    cal.add_argument(
        "--cpu-kernel",
        default="auto",
        help="auto (measure all, keep the fastest per token count), torch, avx512-bf16, amx-bf16",
    )
    cal.add_argument("--repeats", type=int, default=5)
    cal.add_argument(
        "--attempts",
        type=int,
        default=DEFAULT_ATTEMPTS,
        help="measure again while the host looks disturbed (busy cores, a CPU curve out of order), at most this often",
    )
    cal.add_argument(
        "--require-steady",
        action="store_true",
        help=f"exit with status {DISTURBED_EXIT} when every attempt was disturbed (the file is still written)",
    )
    cal.add_argument("--quick", action="store_true", help="fewer token counts")
    cal.set_defaults(func=cmd_calibrate)

    prof = sub.add_parser("profile", help="count router selections per (layer, expert)")
    add_model_arguments(prof)
    source = prof.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", type=Path, help=".txt (one per line) or .json list of prompts")
    source.add_argument("--random-prompts", type=int, help="N prompts of seeded random token ids")
    prof.add_argument("--prompt-len", type=int, default=64, help="length of random prompts")
    prof.add_argument("--tokenizer", help="tokenizer for text prompts")
    prof.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens generated per prompt")
    prof.add_argument("--out", type=Path, required=True)
    add_placement_arguments(prof)
    prof.set_defaults(func=cmd_profile)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, run the chosen command, and turn a user error into one ``error:`` line, status 2."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
