"""Run transformers' ``generate`` and report it the way the engine reports itself.

Contract: ``timed_generate(model, prompt_ids, settings, device)`` calls ``model.generate`` as a
user would (greedy; ``min_new_tokens`` = ``max_new_tokens`` when EOS is ignored, so EOS is
masked exactly as the engine masks it; beams with the same length penalty and early stopping)
and returns a ``GenerationResult``. Times come from the project's clock at each token a
streamer receives; transformers' beam search takes no streamer, so there TTFT comes from a
separate one-token run and the decode time is spread evenly over the steps
(``stats["step_times"] = "averaged"``). ``decode_expert_copies_bytes`` is the GPU memory that
``generate`` itself takes for a decode step beyond the model's weights, cache and activations
(a system under a budget keeps room for it).
"""

from __future__ import annotations

import itertools

import torch

from fiddler.config import ModelConfig
from fiddler.generate import GenerationResult, GenerationSettings
from fiddler.placement import element_size
from fiddler.timing import Clock


class _TokenClock:
    """A transformers streamer that only reads the clock: once for the prompt, then per token."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(self.clock.now())

    def end(self) -> None:
        pass


def decode_expert_copies_bytes(config: ModelConfig, dtype: torch.dtype, beam_width: int) -> int:
    """GPU memory transformers' ``generate`` allocates for one decode step's experts: on a GPU its
    greedy and sampling loop (``_sample``; not beam search's own loop, transformers 5.17 and 5.24)
    switches the experts from ``grouped_mm`` to ``batched_mm`` for decoding
    (``GenerationMixin._optimize_model_for_decode``), which copies the weights of the expert of
    every (row, routed expert) pair into one batch, gate/up and down both alive at the down
    projection: top-k whole experts for the one row a prompt decodes (measured on the GPU host:
    0.705 GB for Mixtral-8x7B, results/h200-accelerate-memory-24gb/); none in beam search. Kept
    as room, not as a condition: a transformers without the switch only leaves it unused."""
    if beam_width > 1:
        return 0
    return config.num_experts_per_token * config.expert_params * element_size(dtype)


def _generate_kwargs(settings: GenerationSettings, model) -> dict:
    kwargs = {
        "max_new_tokens": settings.max_new_tokens,
        "do_sample": False,
        "num_beams": settings.beam_width,
        "pad_token_id": model.generation_config.eos_token_id,
    }
    if settings.ignore_eos:
        kwargs["min_new_tokens"] = settings.max_new_tokens
    if settings.beam_width > 1:
        kwargs.update(length_penalty=settings.length_penalty, early_stopping=settings.early_stopping)
    return kwargs


def timed_generate(model, prompt_ids: list[int], settings: GenerationSettings, device: str) -> GenerationResult:
    clock = Clock(device)
    ids = torch.tensor([prompt_ids], device=device)
    kwargs = _generate_kwargs(settings, model)
    with torch.inference_mode():
        if settings.beam_width == 1:
            streamer = _TokenClock(clock)
            start = clock.now()
            out = model.generate(ids, streamer=streamer, **kwargs)
            token_times = streamer.times[1:]  # the first call carries the prompt
            ttft = token_times[0] - start
            steps = [b - a for a, b in itertools.pairwise(token_times)]
            stats: dict[str, object] = {"step_times": "measured"}
        else:
            start = clock.now()
            model.generate(ids, **(kwargs | {"max_new_tokens": 1, "min_new_tokens": 1}))
            ttft = clock.now() - start
            start = clock.now()
            out = model.generate(ids, **kwargs)
            total = clock.now() - start
            new = out.shape[1] - len(prompt_ids)
            steps = [max(total - ttft, 0.0) / (new - 1)] * (new - 1) if new > 1 else []
            stats = {"step_times": "averaged"}
    tokens = out[0, len(prompt_ids) :].tolist()
    stats["beam_width"] = settings.beam_width
    return GenerationResult(len(prompt_ids), tokens, ttft, steps, stats)
