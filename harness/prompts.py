"""Workload prompts: ShareGPT-format conversations (the paper's data), seeded random token ids,
and long-prefill prompts made by concatenation.

Contract:
- ``read_conversations(source)`` loads ShareGPT-format JSON (a list of objects with
  ``conversations``: turns with ``from`` and ``value``) through ``datasets`` (a local file, or
  a hub data set name where the machine is online; a local file that ``datasets`` cannot parse
  is read with ``json``), and returns the first human turns plus what was skipped: entries
  that are malformed, and conversations that open with the model's turn (the paper's code
  took the first turn whoever spoke; this project keeps human turns only and counts the rest).
- ``select_prompts(texts, tokenizer, num_tokens, count)`` applies the paper's selection:
  whitespace collapsed, ``random.seed(0)`` shuffle, keep prompts with at least ``num_tokens``
  tokens (BOS included), use the first ``num_tokens`` tokens of each. Too few long-enough
  prompts raise one ``ValueError`` naming the length.
- ``long_prompts(...)``: prompts longer than any single conversation (long prefill, up to
  8192 tokens) are built by concatenating the shuffled prompts, starting at a different one
  for each prompt, BOS once at the start, then cut to the length.
- ``random_prompts(vocab_size, num_tokens, count, seed)``: BOS then seeded token ids drawn
  from the vocabulary above the special tokens (as llama-bench and vLLM offer); the default
  for models without a tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

from fiddler.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BUNDLED_SAMPLE = Path(__file__).parent / "data" / "sharegpt_sample.json"
HUMAN_ROLES = ("human", "user")
SHUFFLE_SEED = 0  # the paper's random.seed(0)
FIRST_ORDINARY_TOKEN = 3  # Mistral/Mixtral ids 0-2 are <unk>, <s>, </s>


@dataclasses.dataclass
class Conversations:
    texts: list[str]  # first human turns, whitespace collapsed, in file order
    source: str
    entries: int = 0
    malformed: int = 0
    model_first: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "entries": self.entries,
            "human_first": len(self.texts),
            "malformed": self.malformed,
            "model_first": self.model_first,
        }


def collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def _first_turn(entry: object) -> tuple[str | None, str]:
    """(text of the first turn if it is a human's, else None; 'ok' / 'malformed' / 'model_first')."""
    if not isinstance(entry, dict):
        return None, "malformed"
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        return None, "malformed"
    first = turns[0]
    if not isinstance(first, dict) or not isinstance(first.get("value"), str) or not isinstance(first.get("from"), str):
        return None, "malformed"
    if first["from"].lower() not in HUMAN_ROLES:
        return None, "model_first"
    return collapse_whitespace(first["value"]), "ok"


def _load_entries(source: str) -> list[object]:
    path = Path(source)
    try:
        import datasets
    except ImportError:  # e.g. a GPU host's image without it: local files are plain JSON anyway
        datasets = None
    if not path.exists():
        if source.endswith(".json") or "/" not in source or datasets is None:
            raise FileNotFoundError(f"prompt file {source} does not exist")
        return list(datasets.load_dataset(source, split="train"))  # a hub data set (online machines)
    try:
        if datasets is not None:
            return list(datasets.load_dataset("json", data_files=str(path), split="train"))
    except Exception as err:  # datasets raises several types on irregular rows; the file is read plainly
        log.info("datasets could not parse %s (%s); reading it with json", path, type(err).__name__)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err}); give a ShareGPT-format JSON list") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of conversations")
    return data


def read_conversations(source: str | Path = BUNDLED_SAMPLE) -> Conversations:
    entries = _load_entries(str(source))
    result = Conversations(texts=[], source=str(source), entries=len(entries))
    for entry in entries:
        text, status = _first_turn(entry)
        if status == "malformed" or (status == "ok" and not text):
            result.malformed += 1
        elif status == "model_first":
            result.model_first += 1
        else:
            result.texts.append(text)
    return result


def shuffled(texts: list[str]) -> list[str]:
    order = list(texts)
    random.Random(SHUFFLE_SEED).shuffle(order)  # the same permutation as random.seed(0); shuffle
    return order


def select_prompts(texts: list[str], tokenizer: Tokenizer, num_tokens: int, count: int) -> list[list[int]]:
    """The first ``count`` shuffled prompts with at least ``num_tokens`` tokens, cut to that."""
    chosen = []
    for text in shuffled(texts):
        ids = tokenizer.encode(text)
        if len(ids) >= num_tokens:
            chosen.append(ids[:num_tokens])
            if len(chosen) == count:
                return chosen
    raise ValueError(
        f"only {len(chosen)} prompts have at least {num_tokens} tokens, {count} are needed; use a larger "
        f"data set, fewer prompts per cell, or a shorter input length than {num_tokens}"
    )


def long_prompts(texts: list[str], tokenizer: Tokenizer, num_tokens: int, count: int) -> list[list[int]]:
    """Prompts of ``num_tokens`` made by concatenating shuffled prompts (prompt i starts at i)."""
    pieces = [tokenizer.encode(text) for text in shuffled(texts)]
    bos = tokenizer.encode("")  # what the tokenizer puts before every text (BOS, or nothing)
    bodies = [ids[len(bos) :] for ids in pieces if len(ids) > len(bos)]
    total = sum(map(len, bodies)) + len(bos)
    if not bodies or total < num_tokens or len(bodies) < count:
        raise ValueError(
            f"the prompts hold {total} tokens in {len(bodies)} prompts; {count} prompts of {num_tokens} tokens "
            "need more text or fewer prompts"
        )
    prompts = []
    for start in range(count):
        ids = list(bos)
        index = start
        while len(ids) < num_tokens:
            ids += bodies[index % len(bodies)]
            index += 1
        prompts.append(ids[:num_tokens])
    return prompts


def random_prompts(vocab_size: int, num_tokens: int, count: int, seed: int = 0, bos: int | None = 1) -> list[list[int]]:
    rng = random.Random(seed * 1_000_003 + num_tokens)
    head = [bos] if bos is not None else []
    return [
        head + [rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size) for _ in range(num_tokens - len(head))]
        for _ in range(count)
    ]
