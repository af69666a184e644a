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


def test_calibrate_profile_and_generate_under_a_budget(capsys, tmp_path):
    cal, pop = tmp_path / "cal.json", tmp_path / "pop.json"
    assert (
        main(
            ["calibrate", "--model", "mixtral-tiny", "--device", "cpu", "--quick", "--repeats", "2", "--out", str(cal)]
        )
        == 0
    )
    assert json.loads(cal.read_text())["schema"] == "fiddler-calibration"
    assert (
        main(
            [
                "profile",
                "--model",
                "mixtral-tiny",
                "--device",
                "cpu",
                "--random-prompts",
                "3",
                "--prompt-len",
                "8",
                "--max-new-tokens",
                "2",
                "--out",
                str(pop),
            ]
        )
        == 0
    )
    counts = json.loads(pop.read_text())["counts"]
    assert sum(map(sum, counts)) == 3 * (8 + 1) * 2 * 2  # prompts x tokens x layers x top-k
    run = ["generate", "--model", "mixtral-tiny", "--device", "cpu", "--prompt-ids", "1,2,3,4", "--max-new-tokens", "4"]
    placed = ["--gpu-memory-gb", "0.017", "--policy", "paper", "--calibration", str(cal), "--popularity", str(pop)]
    generate_args = [*run, *placed, "--json"]
    assert main(generate_args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stats = result["stats"]
    assert stats["executor"] == "fiddler" and stats["policy"] == "paper"
    assert 0 < stats["experts_resident"] < 8 and stats["engine"]["placement"]["order"] == "popularity"
    assert main([*generate_args, "--cpu-mode", "stream"]) == 0  # the same run, the stream CPU mode
    streamed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert streamed["token_ids"] == result["token_ids"]
    assert streamed["stats"]["cpu_rows_on"] == "worker thread, stream waits"
    assert streamed["stats"]["engine"]["cpu_mode"] == "stream"
    assert main([*generate_args, "--adapt-paths"]) == 0  # the same run, learning where the paths end
    adapting = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert adapting["token_ids"] == result["token_ids"]
    assert adapting["stats"]["adapt_paths"] and adapting["stats"]["engine"]["adapt_paths"]
    assert not result["stats"]["adapt_paths"]


def test_budget_too_small_is_one_clear_error(capsys):
    code = main(
        [
            "generate",
            "--model",
            "mixtral-tiny",
            "--device",
            "cpu",
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "2",
            "--gpu-memory-gb",
            "0.001",
            "--policy",
            "hybrid",
        ]
    )
    assert code == 2 and "cannot hold even the non-expert part" in capsys.readouterr().err


def test_calibrate_require_steady_exits_non_zero_on_a_disturbed_host(monkeypatch, tmp_path):
    import fiddler.calibrate
    from fiddler.cli import DISTURBED_EXIT

    monkeypatch.setattr(fiddler.calibrate, "steadiness_problems", lambda measured, expert_bytes: ["a busy host"])
    cal = tmp_path / "cal.json"
    base = ["calibrate", "--model", "mixtral-tiny", "--device", "cpu", "--quick", "--repeats", "1", "--attempts", "2"]
    assert main([*base, "--out", str(cal)]) == 0  # disturbed, said in the log, not in the status
    assert main([*base, "--require-steady", "--out", str(cal)]) == DISTURBED_EXIT
    written = json.loads(cal.read_text())["steadiness"]
    assert written["problems"] == ["a busy host"] and written["attempts"] == 2
