"""GPU-host numerics check: is the engine's bf16 as close to the truth as transformers' bf16?

With random weights a Mixtral's logits are nearly tied and its router choices flip under
rounding, so bf16 outputs drift from any reference as depth grows, whatever the system. The
fair test is side by side: on truncated Mixtral-8x7B models (sizes of the real one, fewer
layers, so that float32 fits), teacher-forced logits of each bf16 implementation (engine
grouped / loop experts, transformers eager / grouped_mm experts) against transformers in
float32 on the same weights. Also the expert kernel alone: grouped vs loop vs float32 on
random inputs (no routing chaos). Writes ``<out>/gpu_numerics.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fiddler.config import resolve_model
from fiddler.engine import Engine
from fiddler.files import write_json_atomic
from fiddler.hf_reference import build_transformers_model
from fiddler.loading import load_expert_stack
from fiddler.moe import ResidentExperts, Routing
from fiddler.streams import release_cached_memory
from fiddler.weights import RandomWeights


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return (value.float() - truth.float()).norm(dim=-1) / truth.float().norm(dim=-1)


def summary(value: torch.Tensor, truth: torch.Tensor) -> dict:
    err = relative_error(value, truth)
    return {
        "rel_err_median": float(err.median()),
        "rel_err_max": float(err.max()),
        "argmax_agreement": float((value.argmax(-1) == truth.argmax(-1)).float().mean()),
    }


def kernel_check(config, seed: int, device: str) -> list[dict]:
    """One layer's experts: grouped and loop in bf16 against float32, on random routed inputs."""
    source = RandomWeights(config, seed=seed, generator_device=device)
    w13, w2 = load_expert_stack(source, 0, device, torch.float32)
    exact = ResidentExperts([w13], [w2], strategy="loop")
    half = [w13.bfloat16()], [w2.bfloat16()]
    rows = []
    generator = torch.Generator(device=device).manual_seed(seed)
    for tokens in (1, 2, 8, 64, 512):
        hidden = torch.randn(tokens, config.hidden_size, device=device, generator=generator)
        experts = torch.stack(
            [
                torch.randperm(config.num_experts, device=device, generator=generator)[: config.num_experts_per_token]
                for _ in range(tokens)
            ]
        )
        weights = torch.softmax(torch.randn(tokens, config.num_experts_per_token, device=device), dim=-1)
        routing = Routing(experts=experts, weights=weights)
        truth = exact(0, hidden, routing)
        for strategy in ("grouped", "loop"):
            out = ResidentExperts(*half, strategy=strategy)(0, hidden.bfloat16(), routing)
            rows.append({"tokens": tokens, "strategy": strategy, **summary(out, truth)})
    return rows


def model_check(config, seed: int, device: str, sequence: list[int]) -> dict:
    ids = torch.tensor([sequence], device=device)
    source = RandomWeights(config, seed=seed, generator_device=device)
    with torch.no_grad():
        model = build_transformers_model(source, device, torch.float32)
        truth = model(ids).logits[0].float().cpu()
        del model
        release_cached_memory()
        results = {}
        model = build_transformers_model(source, device, torch.bfloat16)
        for impl in ("eager", "grouped_mm"):
            model.set_experts_implementation(impl)
            results[f"transformers-{impl}"] = summary(model(ids).logits[0].float().cpu(), truth)
        del model
        release_cached_memory()
        engine = Engine.resident(source, device, torch.bfloat16, max_seq_len=len(sequence))
        for strategy in ("grouped", "loop"):
            engine.model.experts.strategy = strategy
            engine.begin(1, len(sequence))
            positions = torch.arange(len(sequence), device=device)
            logits = engine.model.forward(ids, positions, engine.cache, kv_len=len(sequence), last_only=False)
            results[f"engine-{strategy}"] = summary(logits[0].cpu(), truth)
        del engine
        release_cached_memory()
        engine32 = Engine.resident(source, device, torch.float32, max_seq_len=len(sequence))
        engine32.begin(1, len(sequence))
        positions = torch.arange(len(sequence), device=device)
        logits = engine32.model.forward(ids, positions, engine32.cache, kv_len=len(sequence), last_only=False)
        results[f"engine-float32-{engine32.model.experts.strategy}"] = summary(logits[0].cpu(), truth)
        del engine32
        release_cached_memory()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--layers", default="1,2,8")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device
    config, _ = resolve_model(args.model, 1)
    sequence = [
        1,
        *torch.randint(
            3, config.vocab_size, (args.seq_len - 1,), generator=torch.Generator().manual_seed(args.seed)
        ).tolist(),
    ]
    record: dict = {"model": args.model, "seq_len": args.seq_len, "kernel": kernel_check(config, args.seed, device)}
    release_cached_memory()
    for row in record["kernel"]:
        print("kernel", row, flush=True)
    record["models"] = {}
    for layers in map(int, args.layers.split(",")):
        cfg, _ = resolve_model(args.model, layers)
        record["models"][layers] = model_check(cfg, args.seed, device, sequence)
        print("layers", layers, json.dumps(record["models"][layers]), flush=True)
        write_json_atomic(out / "gpu_numerics.json", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
