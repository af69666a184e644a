import json

from fiddler.cli import main


def test_generate_json_last_line(capsys):
    code = main(
        [
            "generate",
            "--model",
            "mixtral-tiny",
            "--device",
            "cpu",
            "--prompt",
            "Hello there",
            "--max-new-tokens",
            "5",
            "--json",
        ]
    )
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert len(result["token_ids"]) == 5 and isinstance(result["text"], str)
    assert result["ttft_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert result["stats"]["executor"] == "resident"


def test_generate_checkpoint_with_prompt_ids_and_beams(capsys, tiny_checkpoint):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_checkpoint),
            "--device",
            "cpu",
            "--prompt-ids",
            "1,2,3",
            "--max-new-tokens",
            "4",
            "--beam-width",
            "2",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["text"] is None and len(result["token_ids"]) == 4


def test_user_errors_exit_2_with_one_line(capsys, tmp_path, tiny_checkpoint):
    cases = [
        (["--model", str(tmp_path / "nope"), "--prompt-ids", "1"], "neither a preset"),
        (["--model", "mixtral-tiny", "--prompt-ids", "1,x"], "comma-separated integers"),
        (["--model", "mixtral-tiny", "--prompt-ids", "1", "--dtype", "int4"], "--dtype must be one of"),
        (["--model", str(tiny_checkpoint), "--prompt", "hi"], "no tokenizer"),
        (["--model", "mixtral-tiny", "--prompt-ids", "1", "--beam-width", "0"], "--beam-width must be at least 1"),
    ]
    for args, message in cases:
        code = main(["generate", "--device", "cpu", "--max-new-tokens", "2", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and message in err[-1], (args, err)
