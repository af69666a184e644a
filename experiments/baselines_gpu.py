"""GPU-host experiment for the baselines (issue 4): every system on one prompt, one after another.

Each system loads the same seeded weights (generated on the GPU), runs a short warm-up, then
one generation; systems slower than ``--slow-threshold`` decode tokens/s in the warm-up are
measured over ``--slow-tokens`` new tokens only (the row says how many). Rows: TTFT, decode
tokens/s, steps measured, peak GPU memory (torch and device), host->device bytes per decode
token where the system counts them, refusals with their reason. Resumable: systems already in
``<out>/baselines.json`` are skipped. Usage:
``python experiments/baselines_gpu.py --out $OUT [--gpu-memory-gb 24] [--systems a,b]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from baselines import SYSTEMS, SystemOptions, SystemRefused, load_system
from fiddler.config import resolve_model
from fiddler.files import write_json_atomic
from fiddler.generate import GenerationSettings
from fiddler.machine import machine_identity
from fiddler.streams import release_cached_memory
from fiddler.timing import Clock


def measure(name: str, options: SystemOptions, prompt: list[int], args) -> dict:
    clock = Clock(options.device)
    start = clock.now()
    try:
        system = load_system(name, options)
    except SystemRefused as err:
        return {"system": name, "status": "refused", "reason": str(err)}
    row: dict = {"system": name, "load_s": clock.now() - start}
    try:
        warm = system.generate(prompt, GenerationSettings(max_new_tokens=2))
        rate = warm.decode_tokens_per_s or 0.0
        new_tokens = args.slow_tokens if rate < args.slow_threshold else args.new_tokens
        result = system.generate(prompt, GenerationSettings(max_new_tokens=new_tokens))
        stats = result.stats
        row.update(
            status="ok",
            new_tokens=new_tokens,
            ttft_s=result.ttft_s,
            decode_tokens_per_s=result.decode_tokens_per_s,
            e2e_tokens_per_s=result.e2e_tokens_per_s,
            decode_steps_measured=len(result.step_times_s),
            h2d_bytes_per_token=stats["h2d_bytes"] / (len(prompt) + new_tokens) if "h2d_bytes" in stats else None,
            stats={k: v for k, v in stats.items() if k != "engine"},
            engine=stats.get("engine"),  # the build record: placement, calibration used or measured
            token_ids=result.token_ids,
            **system.peak_gpu_memory(),
        )
    finally:
        system.close()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpu-memory-gb", type=float, default=24.0)
    parser.add_argument("--systems", default=",".join(sorted(SYSTEMS)))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--slow-tokens", type=int, default=3)
    parser.add_argument("--slow-threshold", type=float, default=0.5, help="decode tokens/s")
    parser.add_argument("--calibration", type=Path)
    args = parser.parse_args()
    out = Path(args.out) / "baselines.json"
    record = json.loads(out.read_text()) if out.exists() else {"machine": machine_identity(args.device), "rows": []}
    record["args"] = {k: str(v) for k, v in vars(args).items()}
    done = {row["system"] for row in record["rows"]}
    config, checkpoint = resolve_model(args.model, args.layers)
    generator = torch.Generator().manual_seed(args.seed)
    prompt = [1, *torch.randint(3, config.vocab_size, (args.prompt_len - 1,), generator=generator).tolist()]
    options = SystemOptions(
        config=config,
        max_seq_len=args.prompt_len + args.new_tokens,
        checkpoint=checkpoint,
        seed=args.seed,
        device=args.device,
        dtype=torch.bfloat16,
        gpu_memory_gb=args.gpu_memory_gb,
        calibration=args.calibration,
    )
    for name in args.systems.split(","):
        if name in done:
            continue
        row = measure(name, options, prompt, args)
        print(json.dumps({k: v for k, v in row.items() if k not in ("stats", "token_ids")}), flush=True)
        record["rows"].append(row)
        write_json_atomic(out, record)
        release_cached_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
