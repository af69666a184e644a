"""``fiddler`` command line. Argument parsing lives here and nowhere else in the library.

``fiddler generate --model <dir|preset> [--layers L] [--seed S] (--prompt TEXT | --prompt-ids
1,2,3) --max-new-tokens N [--beam-width W] [--device cuda|cpu] [--dtype bfloat16|float32]
[--json]``: logs go to standard error; with ``--json`` the last line of standard output is one
JSON object (``token_ids`` are the new tokens, ``text`` is null without a tokenizer). A user
error prints one ``error:`` line naming what to change and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from fiddler.config import resolve_model
from fiddler.engine import Engine, parse_dtype
from fiddler.generate import GenerationSettings, generate
from fiddler.tokenizer import find_tokenizer
from fiddler.weights import open_weights

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


def cmd_generate(args: argparse.Namespace) -> int:
    config, checkpoint = resolve_model(args.model, args.layers)
    device = torch.device(args.device or default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    dtype = parse_dtype(args.dtype or config.dtype)
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
    source = open_weights(config, checkpoint, args.seed, generator_device=device.type)
    log.info("loading %s (%s) on %s in %s", config.name, source.describe()["kind"], device, dtype)
    engine = Engine.resident(source, device, dtype, max_seq_len=len(prompt_ids) + args.max_new_tokens)
    result = generate(engine, prompt_ids, settings)
    result.text = tokenizer.decode(result.token_ids) if tokenizer else None
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
        rate = result.decode_tokens_per_s
        log.info("TTFT %.3f s, decode %s tokens/s", result.ttft_s, f"{rate:.2f}" if rate else "n/a")
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
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
