import pytest

from fiddler.tokenizer import find_tokenizer, mistral_v1_path, open_tokenizer


def test_presets_use_the_mistral_v1_vocabulary():
    tok = find_tokenizer(None)
    assert tok is not None and tok.vocab_size == 32000
    ids = tok.encode("Hello world, how are you?")
    assert ids[0] == 1  # BOS
    assert tok.decode(ids[1:]) == "Hello world, how are you?"


def test_env_var_and_explicit_path(monkeypatch, tmp_path):
    path = mistral_v1_path()
    monkeypatch.setenv("FIDDLER_TOKENIZER", str(path))
    assert find_tokenizer(None).vocab_size == 32000
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_tokenizer(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        open_tokenizer(tmp_path / "bad.model")


def test_checkpoint_without_tokenizer_has_none(tiny_checkpoint):
    assert find_tokenizer(tiny_checkpoint) is None
