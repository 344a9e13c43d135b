"""The benchmarks' command lines refuse bad options before any work (make bench runs them)."""

import pytest

from benchmarks import quality


@pytest.mark.parametrize("args", [["--workers", "0"], ["--workers", "two"]])
def test_a_bad_worker_count_is_a_usage_error(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        quality.main(args)
    assert exit_.value.code == 2
    assert "--workers" in capsys.readouterr().err


def test_a_bad_benchmark_track_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        quality.main(["--tracks", "encoder,gpt5"])
    assert exit_.value.code == 2
    assert "choose from encoder, llm" in capsys.readouterr().err
