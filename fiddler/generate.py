"""Generation over an ``Engine``: greedy, temperature / top-p sampling, and beam search.

Contract: ``generate(engine, prompt_ids, settings)`` returns a ``GenerationResult`` with the new
token ids, TTFT (prefill + first token), per-step decode times and the engine's stats. With
``ignore_eos`` (the benchmark setting) EOS is masked out of every choice, as transformers'
``min_new_tokens`` does, so exactly ``max_new_tokens`` tokens come back; otherwise a sequence
ends at EOS (included). Beam search follows transformers' ``generate(num_beams=W,
do_sample=False)``: 2W candidates a step, finished hypotheses scored by
``sum_logprobs / generated_len ** length_penalty``, the same ``early_stopping`` modes, and the
KV cache reordered whenever beams are re-selected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch

from fiddler.engine import Engine
from fiddler.timing import Clock

FINISHED_PENALTY = -1.0e9  # transformers' score for "cannot be chosen"


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    beam_width: int = 1
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = True
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in transformers

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.beam_width < 1:
            raise ValueError(f"--beam-width must be at least 1, got {self.beam_width}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.beam_width > 1 and self.temperature > 0:
            raise ValueError("beam search here is deterministic: use --temperature 0 with --beam-width > 1")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


@dataclasses.dataclass
class GenerationResult:
    prompt_tokens: int
    token_ids: list[int]
    ttft_s: float
    step_times_s: list[float]  # one per decode step after the first token
    stats: dict[str, object]
    text: str | None = None
    stats_after_prefill: dict[str, object] | None = None  # the engine's counters at the first token

    def decode_counters(self, keys: Iterable[str]) -> dict[str, float]:
        """The engine's counters ``keys`` (running totals such as ``rows_cpu``, not ratios or
        settings) accrued after the first token: the decode part alone."""
        before = self.stats_after_prefill or {}
        return {k: self.stats[k] - before.get(k, 0) for k in keys}

    @property
    def decode_s(self) -> float:
        return sum(self.step_times_s)

    @property
    def decode_tokens_per_s(self) -> float | None:
        return len(self.step_times_s) / self.decode_s if self.step_times_s else None

    @property
    def e2e_tokens_per_s(self) -> float:
        """The paper's metric: new tokens / (prefill + decode time)."""
        return len(self.token_ids) / (self.ttft_s + self.decode_s)

    def to_json(self) -> dict[str, object]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "token_ids": self.token_ids,
            "text": self.text,
            "ttft_s": self.ttft_s,
            "decode_s": self.decode_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "e2e_tokens_per_s": self.e2e_tokens_per_s,
            "step_times_s": self.step_times_s,
            "stats": self.stats,
        }


def generate(engine: Engine, prompt_ids: list[int], settings: GenerationSettings) -> GenerationResult:
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    vocab = engine.config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    engine.begin(settings.beam_width, len(prompt_ids) + settings.max_new_tokens)
    prompt = torch.tensor(prompt_ids, dtype=torch.long)
    run = _beam_search if settings.beam_width > 1 else _sample
    timer = _Timer(engine)
    result = run(engine, prompt, settings, timer)
    result.stats.update(engine.stats())
    result.stats_after_prefill = timer.stats_after_prefill
    return result


class _Timer:
    """TTFT and per-step times, read through the one clock."""

    def __init__(self, engine: Engine):
        self.clock = Clock(engine.device)
        self.start = self.clock.now()
        self.last = self.start
        self.ttft: float | None = None
        self.steps: list[float] = []
        self.engine = engine
        self.stats_after_prefill: dict[str, object] | None = None

    def lap(self) -> None:
        now = self.clock.now()
        if self.ttft is None:
            self.ttft = now - self.start
            self.stats_after_prefill = self.engine.stats()
            now = self.clock.now()  # reading the stats is in no measured time
        else:
            self.steps.append(now - self.last)
        self.last = now


def _eos_ids(engine: Engine) -> list[int]:
    return [t for t in engine.config.eos_token_ids if 0 <= t < engine.config.vocab_size]


def _sample(engine: Engine, prompt: torch.Tensor, settings: GenerationSettings, timer: _Timer) -> GenerationResult:
    eos = _eos_ids(engine)
    generator = torch.Generator().manual_seed(settings.seed)
    logits = engine.prefill(prompt)
    tokens: list[int] = []
    while True:
        token = _choose(logits[0], settings, eos, generator)
        tokens.append(token)
        timer.lap()
        if len(tokens) == settings.max_new_tokens or (not settings.ignore_eos and token in eos):
            break
        logits = engine.decode(torch.tensor([token]))
    return GenerationResult(len(prompt), tokens, timer.ttft or 0.0, timer.steps, {"beam_width": 1})


def _choose(logits: torch.Tensor, settings: GenerationSettings, eos: list[int], generator: torch.Generator) -> int:
    """One token from float32 logits [V]."""
    if settings.ignore_eos and eos:
        logits = logits.clone()
        logits[eos] = -math.inf
    if settings.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.cpu() / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = sorted_probs.cumsum(0) - sorted_probs >= settings.top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclasses.dataclass
class _Hypothesis:
    score: float
    tokens: list[int]


def _beam_search(engine: Engine, prompt: torch.Tensor, settings: GenerationSettings, timer: _Timer) -> GenerationResult:
    width, vocab = settings.beam_width, engine.config.vocab_size
    eos = _eos_ids(engine)
    stops_at_eos = not settings.ignore_eos and bool(eos)
    candidates_per_step = max(2, 1 + len(eos)) * width
    logits = engine.prefill(prompt).expand(width, vocab)
    engine.expand(width)
    # Only beam 0 is live at first, so the identical beams do not all pick the same token.
    running_scores = torch.full((width,), FINISHED_PENALTY, device=logits.device)
    running_scores[0] = 0.0
    running: list[list[int]] = [[] for _ in range(width)]
    finished: list[_Hypothesis] = []
    improvable = True
    for step in range(settings.max_new_tokens):
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if settings.ignore_eos and eos:
            log_probs[:, eos] = -math.inf
        totals = (log_probs + running_scores[:, None]).view(-1)
        top_scores, top_index = torch.topk(totals, candidates_per_step)
        scores, index = top_scores.tolist(), top_index.tolist()
        generated = step + 1
        is_last = generated == settings.max_new_tokens
        hits = [is_last or (stops_at_eos and i % vocab in eos) for i in index]

        # Finished hypotheses: only the top `width` candidates may be finalised.
        full = len(finished) == width and settings.early_stopping is True
        if improvable and not full:
            for rank in range(width):
                if hits[rank]:
                    tokens = running[index[rank] // vocab] + [index[rank] % vocab]
                    finished.append(_Hypothesis(scores[rank] / generated**settings.length_penalty, tokens))
            finished = sorted(finished, key=lambda h: h.score, reverse=True)[:width]

        live = [rank for rank in range(candidates_per_step) if not hits[rank]][:width]
        if not live:
            timer.lap()
            break
        source_beams = [index[rank] // vocab for rank in live]
        next_tokens = [index[rank] % vocab for rank in live]
        running = [running[b] + [t] for b, t in zip(source_beams, next_tokens, strict=True)]
        running_scores = torch.tensor([scores[rank] for rank in live], device=logits.device)
        engine.reorder(torch.tensor(source_beams))
        timer.lap()

        if len(finished) == width:
            hypothetical = settings.max_new_tokens if settings.early_stopping == "never" else generated
            if settings.early_stopping == "never" and settings.length_penalty <= 0:
                hypothetical = generated
            best_possible = scores[live[0]] / hypothetical**settings.length_penalty
            improvable = improvable and best_possible > finished[-1].score
            if not improvable or settings.early_stopping is True:
                break
        logits = engine.decode(torch.tensor(next_tokens))
    best = finished[0] if finished else _Hypothesis(0.0, running[0])
    return GenerationResult(
        len(prompt), best.tokens, timer.ttft or 0.0, timer.steps, {"beam_width": width, "beam_score": best.score}
    )
