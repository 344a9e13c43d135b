"""The moslora-vs-vLLM serving benchmark's own parts, without vLLM: its command line, the
settings it tries, the figures it derives from rounds, and a live moslora server driven,
paused and resumed the way the benchmark does it."""

import asyncio

import httpx
import pytest

from benchmarks import serving_vllm
from benchmarks.loadtest import build_assets


def test_it_asks_for_the_interop_venv_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        serving_vllm.main(["--vllm-python", str(tmp_path / "nope" / "python")])
    assert exit_.value.code == 2
    assert "make interop" in capsys.readouterr().err


def test_an_unknown_vllm_setting_lists_the_choices(tmp_path, capsys):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    with pytest.raises(SystemExit):
        serving_vllm.main(["--vllm-python", str(python), "--vllm-settings", "turbo"])
    assert "vllm_2threads" in capsys.readouterr().err


def test_openmp_is_preloaded_only_where_the_venv_has_it(tmp_path):
    python = tmp_path / "venv" / "bin" / "python"
    assert set(serving_vllm.vllm_settings(python)) == {"vllm", "vllm_2threads", "vllm_2threads_block32"}
    (tmp_path / "venv" / "lib").mkdir(parents=True)
    (tmp_path / "venv" / "lib" / "libiomp5.so").touch()
    settings = serving_vllm.vllm_settings(python)
    assert settings["vllm_2threads_iomp"].env["LD_PRELOAD"] == str(tmp_path / "venv" / "lib" / "libiomp5.so")
    assert settings["vllm"] == ({}, ())  # vLLM's own default is left alone
    assert settings["vllm_2threads_block32"].args == ("--block-size", "32")


def test_the_bare_base_alone_needs_no_adapters(tmp_path):
    mos, peft = serving_vllm.build_adapters(tmp_path, 0)  # N = 0 only: nothing to build
    assert mos.is_dir() and not any(mos.iterdir())  # moslora serve needs its root to exist
    assert "--lora-modules" not in serving_vllm.vllm_command(tmp_path / "python", tmp_path, peft, 0, 16)
    assert "--lora-modules" in serving_vllm.vllm_command(tmp_path / "python", tmp_path, peft, 2, 16)


class _Named:
    def __init__(self, name):
        self.name = name


def _round(seconds, texts, tokens=32):
    return {"seconds": seconds, "completion_tokens": tokens, "tokens_per_s": tokens / seconds,
            "latencies": [seconds / 2, seconds], "texts": texts}


def test_speedups_are_paired_time_ratios_and_texts_are_compared_request_by_request():
    rounds = {"moslora": [_round(1.0, ["a", "b"]), _round(2.0, ["a", "b"])],
              "vllm": [_round(3.0, ["a", "x"], tokens=40), _round(4.0, ["a", "b"], tokens=40)]}
    row = serving_vllm.summarize(rounds, 10, [_Named("moslora"), _Named("vllm")])
    # per round 3/1 and 4/2, whatever each server counts as completion tokens
    assert row["moslora_over_vllm"] == pytest.approx(2.5)
    assert row["servers"]["vllm"]["same_text_as_moslora"] == "3/4"
    assert row["servers"]["moslora"]["same_text_as_moslora"] == "4/4"
    assert row["servers"]["moslora"]["latency_p50_s"] == pytest.approx(1.0)  # of 0.5, 1, 1, 2
    assert row["servers"]["vllm"]["tokens_per_s"] == pytest.approx((40 / 3 + 40 / 4) / 2)


def test_the_readme_table_names_the_best_vllm_setting_per_row():
    rounds = {"moslora": [_round(1.0, ["a"]), _round(1.0, ["a"])],
              "vllm": [_round(3.0, ["a"]), _round(3.0, ["a"])],
              "vllm_2threads": [_round(2.0, ["a"]), _round(2.0, ["b"])],
              "moslora_uncached": [_round(1.5, ["a"]), _round(1.5, ["a"])]}  # faster than vLLM: not a vLLM setting
    servers = [_Named(n) for n in rounds]
    result = {"rows": [serving_vllm.summarize(rounds, 0, servers), serving_vllm.summarize(rounds, 10, servers)],
              "prompt_cache": {"hits": 5, "misses": 7}}
    table = serving_vllm.vllm_markdown(result)
    assert "| 0 (base) | 32.0 | 10.7 | 16.0 | 2.00× |" in table  # against vllm_2threads, the faster
    assert "| 10 |" in table and "| 1/2 |" in table and "5 hits, 7 misses" in table
    assert "N = 0 1.50×, N = 10 1.50×" in table  # the cache's gain, paired


def test_a_paused_server_answers_nothing_until_it_is_resumed(tmp_path):
    base, adapters = build_assets(tmp_path, adapters=2)
    command = serving_vllm.moslora_command(adapters, base, batch=4)
    with serving_vllm.started("moslora", command, {}, "__base__", tmp_path / "server.log", timeout=120) as server:
        jobs = [(None, "w1 w2 w3"), (0, "w4 w5"), (1, "w6"), (1, "w7 w8")]
        result = asyncio.run(serving_vllm.run_round(server, jobs, max_tokens=3))
        assert len(result["texts"]) == 4 and result["completion_tokens"] > 0
        server.pause()
        with pytest.raises(httpx.TimeoutException):
            httpx.get(f"{server.url}/health", timeout=1)
        server.resume()
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        assert server.rss_bytes() > 0
        process = server.process
    assert process.poll() is not None  # stopped on leaving the block
