"""Server hardening: size limits, timeouts, errors without internals, root confinement, keys;
and the mixed valid/malformed load test against a real uvicorn on 127.0.0.1. Since issue 18
errors are OpenAI's {"error": {...}} and a request over a limit is 400, not 422."""

from __future__ import annotations

import json

import pytest
from conftest import LLAMA_KINDS, adapter_root, tiny_llama
from fastapi.testclient import TestClient

from moslora import MoSConfig, get_mos_model
from moslora.config import ConfigError
from moslora.serving import MultiAdapterModel
from moslora.serving import server as server_module
from benchmarks.loadtest import run_mixed, word_tokenizer
from moslora.serving.server import ApiKeys, Limits, create_app

LIMITS = Limits(max_body_bytes=4096, max_prompt_chars=1000, max_prompt_tokens=50, max_tokens=32,
                request_timeout=30.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return adapter_root(tmp_path_factory, "good")


def serve(root, limits=LIMITS, **kwargs):
    mm = MultiAdapterModel(tiny_llama())
    mm.load_adapter("good", root / "good")
    return mm, create_app(mm, word_tokenizer(), root, ApiKeys({"*": "admin-key"}), limits=limits, **kwargs)


@pytest.fixture(scope="module")
def client(root):
    _, app = serve(root)
    with TestClient(app) as client:
        yield client


ADMIN = {"Authorization": "Bearer admin-key"}


def complete(client, **body):
    return client.post("/v1/completions", json={"model": "good", "prompt": "w1 w2", **body}, headers=ADMIN)


@pytest.mark.parametrize("body, status, words", [
    ({"max_tokens": 33}, 400, "max_tokens=33 is over the limit of 32"),
    ({"max_tokens": 10**30}, 400, "over the limit of 32"),
    ({"prompt": "w1 " * 400}, 400, "1200 characters, the limit is 1000"),
    ({"prompt": "w1 " * 60}, 400, "60 tokens, the limit is 50"),
    ({"prompt": ["w1", "w2"]}, 400, "string"),  # one prompt per request
    ({"prompt": "w1 " * 2000}, 413, "the limit is 4096 bytes"),
    ({"model": "m" * 129}, 400, "128"),
    ({"n": 9}, 400, "n=9 is over the limit of 8"),
])
def test_requests_over_a_limit_are_refused(client, body, status, words):
    r = complete(client, **body)
    assert r.status_code == status, r.text
    assert words in json.dumps(r.json())


def test_a_streamed_body_over_the_limit_is_413(client):
    def chunks():  # no Content-Length: the server must count what arrives
        yield b'{"model": "good", "prompt": "'
        for _ in range(100):
            yield b"w1 " * 20
        yield b'"}'

    r = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json", **ADMIN})
    assert r.status_code == 413 and "4096 bytes" in r.json()["error"]["message"]
    assert complete(client, max_tokens=2).status_code == 200  # and the server still answers


def test_a_request_not_answered_in_time_is_504_and_dropped(root):
    _, app = serve(root, limits=Limits(request_timeout=0.3))
    client = TestClient(app)  # no context: the worker never runs, so nothing gets answered
    r = complete(client, max_tokens=2)
    assert r.status_code == 504 and "no answer within 0.3 s" in r.json()["error"]["message"]
    job = app.state.scheduler.queue.get_nowait()
    assert job.future.cancelled()  # the worker will skip it, not generate for nobody
    assert client.get("/metrics.json").json()["timeouts"] == 1


def test_an_internal_error_is_a_generic_500_without_internals(root):
    mm, app = serve(root)

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail at /srv/internal/path.py line 7")

    mm.generate = broken
    with TestClient(app, raise_server_exceptions=False) as client:
        r = complete(client, max_tokens=2)
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                      "code": None}}
        assert client.get("/health").status_code == 200  # the worker survived
        assert client.get("/metrics.json").json()["internal_errors"] == 1


def test_symlinks_cannot_escape_the_adapter_root(root, tmp_path):
    outside = tmp_path / "outside"
    model = get_mos_model(tiny_llama(), MoSConfig(target_modules=LLAMA_KINDS, rank=4, budget_rank=2))
    model.save_pretrained(outside)
    (root / "link").symlink_to(outside, target_is_directory=True)  # the whole directory
    planted = root / "planted"
    planted.mkdir()  # a real directory inside, whose config is a link to a file outside
    (planted / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (planted / "adapter_model.safetensors").write_bytes((root / "good" / "adapter_model.safetensors").read_bytes())
    _, app = serve(root)
    admin = ADMIN
    with TestClient(app) as client:
        for path in ("link", "planted", "link/../good/../link"):
            r = client.post("/v1/adapters", json={"name": "x", "path": path}, headers=admin)
            assert r.status_code == 400 and "outside the adapter root" in r.json()["error"]["message"], path
        r = client.post("/v1/adapters", json={"name": "x", "path": "good"}, headers=admin)
        assert r.status_code == 200


def test_keys_are_compared_in_constant_time(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(server_module.hmac, "compare_digest", spy)
    keys = ApiKeys({"*": "admin-key"})
    assert keys.allows("x", "Bearer admin-key") and not keys.allows("x", "Bearer admin-kez")
    assert calls == [(b"admin-key", b"admin-key"), (b"admin-kez", b"admin-key")]


@pytest.mark.parametrize("kwargs, field", [
    ({"max_body_bytes": 0}, "max_body_bytes"), ({"max_prompt_chars": -1}, "max_prompt_chars"),
    ({"max_prompt_tokens": 1.5}, "max_prompt_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"request_timeout": 0.0}, "request_timeout"), ({"request_timeout": float("inf")}, "request_timeout"),
])
def test_bad_limits_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Limits(**kwargs)


@pytest.mark.parametrize("kwargs, field", [({"max_batch": 0}, "max_batch"), ({"queue_size": 0}, "queue_size"),
                                           ({"batch_window": float("nan")}, "batch_window")])
def test_bad_server_settings_name_the_field(root, kwargs, field):
    with pytest.raises(ConfigError, match=field):
        serve(root, **kwargs)


def test_mixed_load_on_a_real_server(tmp_path):
    """Valid and malformed requests mixed, from concurrent clients, over real HTTP."""
    result = run_mixed(tmp_path, adapters=4, valid=240, malformed=120, clients=12, max_tokens=4)
    print(f"\nmixed load: {json.dumps({k: v for k, v in result.items() if k != 'malformed_status'})}\n"
          f"malformed status codes: {result['malformed_status']}")
    assert result["valid_ok"] == result["valid_sent"] == 240
    assert result["valid_wrong"] == 0 and result["valid_failed"] == 0
    assert result["malformed_4xx"] == result["malformed_sent"] == 120
    assert result["responses_with_traceback"] == 0
    assert result["alive_at_end"]
    assert result["adapter_bytes_after_unload"] == 0
    assert result["total_bytes_after_unload"] == result["total_bytes_baseline"]
    assert result["adapter_tensors_alive_after_gc"] == 0
