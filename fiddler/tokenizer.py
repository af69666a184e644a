"""Tokenizers: the checkpoint's own, or the Mistral v1 vocabulary for presets, offline.

Contract: ``find_tokenizer(checkpoint, explicit)`` returns a ``Tokenizer`` (``encode`` adds
BOS, as Mixtral prompts begin with it; ``decode`` drops special tokens) or ``None`` when none
is available, in which case callers work on token ids. Lookup order: an explicit path (a
``tokenizer.model`` sentencepiece file or a ``tokenizer.json``); the checkpoint directory's
own files; for presets, the path in ``$FIDDLER_TOKENIZER``, then ``tokenizer.model.v1``
inside the installed ``mistral-common`` package (the Mixtral-8x7B vocabulary), located
without importing that package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol

MISTRAL_V1_FILE = ("data", "tokenizer.model.v1")
ENV_VAR = "FIDDLER_TOKENIZER"


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        import sentencepiece

        self.path = path
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path} is not a sentencepiece model ({err})") from None
        self.vocab_size = self._sp.vocab_size()
        self.bos_id = self._sp.bos_id()

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if self.bos_id >= 0 else ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class JsonTokenizer:
    """A ``tokenizer.json`` (Hugging Face tokenizers); BOS comes from its post-processor."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = path
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception on malformed files
            raise ValueError(f"{path} is not a tokenizer.json ({err})") from None
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def open_tokenizer(path: Path) -> Tokenizer:
    if not path.exists():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    if path.suffix == ".json":
        return JsonTokenizer(path)
    return SentencePieceTokenizer(path)


def mistral_v1_path() -> Path | None:
    """tokenizer.model.v1 inside the installed mistral-common, if it is installed."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent.joinpath(*MISTRAL_V1_FILE)
    return path if path.exists() else None


def preset_tokenizer_file() -> Path | None:
    """The Mixtral vocabulary file for presets: ``$FIDDLER_TOKENIZER``, else mistral-common's."""
    candidates = [Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None, mistral_v1_path()]
    return next((path for path in candidates if path is not None and path.exists()), None)


def find_tokenizer(checkpoint: Path | None, explicit: str | None = None) -> Tokenizer | None:
    if explicit:
        return open_tokenizer(Path(explicit))
    if checkpoint is not None:
        for name in ("tokenizer.model", "tokenizer.json"):
            if (checkpoint / name).exists():
                return open_tokenizer(checkpoint / name)
        return None
    path = preset_tokenizer_file()
    return open_tokenizer(path) if path is not None else None
