"""vLLM's runtime adapter routes, ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``,
against a live uvicorn on 127.0.0.1, over raw HTTP and with the official ``openai`` client:
absent (404) unless ``--allow-runtime-adapters``; behind the ``"*"`` key; a loaded adapter is
listed and answers exactly as the same adapter served from start-up; refused loads are 400 and
change nothing; an unload lets the requests in flight on the adapter finish with it."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest
from conftest import LLAMA_KINDS, adapter_root, tiny_gpt2, tiny_llama
from fastapi.testclient import TestClient
from test_serving_openai import CHAT, PROMPT, chat_tokenizer, library_text
from test_serving_server import complete, message
from typer.testing import CliRunner

from benchmarks.loadtest import threaded_server, word_tokenizer
from moslora import MoSConfig, get_mos_model
from moslora.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from moslora.serving import BASE, MultiAdapterModel
from moslora.serving.server import ApiKeys, create_app

KEY = "admin-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """``open`` (served from start-up) and directories that must not load."""
    root = adapter_root(tmp_path_factory, "open")
    for name, base, targets in (("narrow", tiny_llama(hidden=32), LLAMA_KINDS), ("gpt2", tiny_gpt2(), ["c_attn"])):
        get_mos_model(base, MoSConfig(target_modules=targets, rank=4, budget_rank=2)).save_pretrained(root / name)
    for name in ("truncated", "garbled", "bad-config"):
        shutil.copytree(root / "open", root / name)
    weights = root / "truncated" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    weights = root / "garbled" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-256:] = bytes(256)  # the last tensor's values zeroed: same size, wrong checksum
    weights.write_bytes(bytes(data))
    (root / "bad-config" / CONFIG_NAME).write_text('{"format": ')
    (root / "empty").mkdir()
    return root


def serve(root, allow=True, **kwargs):
    mm = MultiAdapterModel(tiny_llama())
    mm.load_adapter("open", root / "open")
    return mm, create_app(mm, chat_tokenizer(), root, ApiKeys({"*": KEY}), allow_runtime_adapters=allow, **kwargs)


@pytest.fixture(scope="module")
def live(root):
    mm, app = serve(root, batch_window=0.05)
    with threaded_server(app) as url, httpx.Client(base_url=url, headers=ADMIN, timeout=60) as http:
        yield mm, app, http, openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def load(http, name, path, **kwargs):
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, **kwargs)


def unload(http, name, **kwargs):
    return http.post("/v1/unload_lora_adapter", json={"lora_name": name}, **kwargs)


def listed(http):
    return [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_the_routes_are_404_unless_allowed(root):
    mm, app = serve(root, allow=False)
    with TestClient(app) as client:
        for r in (load(client, "x", root / "open", headers=ADMIN), unload(client, "open", headers=ADMIN),
                  load(client, "x", root / "open")):  # absent, so not even a 401
            assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert mm.adapters() == ["open"] and listed(client) == [BASE, "open"]


def test_the_serve_flag_turns_the_routes_on(tmp_path, monkeypatch):
    import uvicorn

    import moslora.serving.server
    from moslora.cli import app

    seen = []
    monkeypatch.delenv("MOSLORA_API_KEYS", raising=False)
    monkeypatch.setattr(moslora.serving.server, "load_server", lambda *a, **kw: seen.append(kw["allow_runtime_adapters"]))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    for flag in ([], ["--allow-runtime-adapters"]):
        result = CliRunner().invoke(app, ["serve", "--adapters", str(tmp_path), *flag])
        assert result.exit_code == 0, result.output
    assert seen == [False, True]


def test_a_loaded_adapter_answers_as_the_same_adapter_served_from_start_up(live, root):
    _, _, _, client = live
    r = client.post("/load_lora_adapter", body={"lora_name": "again", "lora_path": str(root / "open")},
                    cast_to=httpx.Response)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'again' added successfully."
    assert r.headers["content-type"].startswith("text/plain")
    assert [m.id for m in client.models.list()] == [BASE, "again", "open"]
    assert client.models.retrieve("again").id == "again"

    def texts(model):
        c = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=8, temperature=0)
        assert c.model == chat.model == model
        return c.choices[0].text, chat.choices[0].message.content

    assert texts("again") == texts("open")
    assert texts("again")[0] != texts(BASE)[0] and texts("again")[1] != texts(BASE)[1]

    r = client.post("/unload_lora_adapter", body={"lora_name": "again"}, cast_to=httpx.Response)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'again' removed successfully."
    assert [m.id for m in client.models.list()] == [BASE, "open"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="again", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="again", messages=CHAT, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("again")
    with pytest.raises(openai.NotFoundError):  # unloaded already
        client.post("/unload_lora_adapter", body={"lora_name": "again"}, cast_to=httpx.Response)
    # the name is free again, and a relative path (to the adapter root) works as well
    r = client.post("/load_lora_adapter", body={"lora_name": "again", "lora_path": "open"}, cast_to=httpx.Response)
    assert r.status_code == 200 and texts("again") == texts("open")
    client.post("/unload_lora_adapter", body={"lora_name": "again"}, cast_to=httpx.Response)


@pytest.mark.parametrize("name, path, param, words", [
    ("x", "missing", "lora_path", "does not exist"),
    ("x", "empty", "lora_path", "is missing adapter_config.json"),
    ("x", "truncated", "lora_path", "corrupt"),
    ("x", "garbled", "lora_path", "checksum"),
    ("x", "bad-config", "lora_path", "not valid JSON"),
    ("x", "narrow", "lora_path", "base"),  # hidden size 32 for a base of 64
    ("x", "gpt2", "lora_path", "base"),  # another architecture
    ("x", "../elsewhere", "lora_path", "outside the adapter root"),
    ("x", "/etc", "lora_path", "outside the adapter root"),
    ("open", "open", "lora_name", "already served"),
    (BASE, "open", "lora_name", "already served"),
    ("bad name", "open", "lora_name", "invalid"),
])
def test_a_refused_load_is_400_and_changes_nothing(live, root, name, path, param, words):
    mm, _, http, _ = live
    before = mm.adapters(), listed(http), mm.memory_report()["adapters_total"]
    r = load(http, name, root / path if path in ("missing", "empty", "truncated", "garbled") else path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and words in message(r), message(r)
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert str(root) not in message(r), "the server's paths are not told"
    assert (mm.adapters(), listed(http), mm.memory_report()["adapters_total"]) == before
    assert complete(http, "open", max_tokens=2).status_code == 200, "the server still serves"


def test_a_corrupt_adapter_is_a_bad_request_for_the_openai_client(live, root):
    mm, _, _, client = live
    with pytest.raises(openai.BadRequestError, match="corrupt"):
        client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": str(root / "truncated")},
                    cast_to=httpx.Response)
    assert mm.adapters() == ["open"]
    assert client.completions.create(model="open", prompt=PROMPT, max_tokens=2).choices[0].text


def test_a_name_loaded_twice_is_400_and_an_unknown_unload_404(live, root):
    mm, _, http, _ = live
    assert load(http, "dup", root / "open").status_code == 200
    r = load(http, "dup", root / "gpt2")
    assert r.status_code == 400 and "already served" in message(r)
    assert unload(http, "dup").status_code == 200
    r = unload(http, "never")
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_name", r.text
    for body in ({}, {"lora_name": ""}, {"lora_name": "x", "lora_int_id": 3}, {"lora_name": "x", "other": 1}):
        assert http.post("/v1/unload_lora_adapter", json=body).status_code == 400, body
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
    assert mm.adapters() == ["open"]


def test_the_api_key_is_enforced(live, root):
    mm, _, http, client = live
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(http.base_url.join("/v1/load_lora_adapter"), json={"lora_name": "x", "lora_path": "open"},
                       headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(http.base_url.join("/v1/unload_lora_adapter"), json={"lora_name": "open"},
                          headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="wrong").post("/load_lora_adapter", body={"lora_name": "x", "lora_path": "open"},
                                                  cast_to=httpx.Response)
    assert mm.adapters() == ["open"]


def test_adapters_served_from_the_root_are_not_shadowed_nor_unloaded(tmp_path_factory):
    root = adapter_root(tmp_path_factory, "disk")
    mm = MultiAdapterModel(tiny_llama(), adapter_root=root)
    with TestClient(create_app(mm, word_tokenizer(), root, allow_runtime_adapters=True)) as client:
        r = load(client, "disk", root / "disk")
        assert r.status_code == 400 and "already served" in message(r)
        assert load(client, "alias", "disk").status_code == 200
        assert listed(client) == [BASE, "alias", "disk"]
        alias, disk = (complete(client, m, max_tokens=4).json()["choices"][0]["text"] for m in ("alias", "disk"))
        assert alias == disk
        r = unload(client, "disk")
        assert r.status_code == 400 and "remove the directory" in message(r)
        assert unload(client, "alias").status_code == 200
        assert listed(client) == [BASE, "disk"]


def test_requests_in_flight_finish_with_the_adapter_being_unloaded(live, root, monkeypatch):
    mm, app, http, client = live
    scheduler, tokens = app.state.scheduler, 96
    assert load(http, "x", root / "open").status_code == 200  # "open"'s adapter: the same answers
    prompts = ["w5 w9 w17 w4", "w8 w9", "w30 w31 w32"]
    unloaded_with = []  # requests for "x" still unanswered when the adapter was unloaded
    real_unload = mm.unload_adapter
    monkeypatch.setattr(mm, "unload_adapter", lambda name: (unloaded_with.append(scheduler.in_flight(name)),
                                                             real_unload(name)))
    results = {}

    def ask(model, prompt):
        results[model, prompt] = complete(http, model, prompt, max_tokens=tokens)

    def ask_streamed(prompt):
        chunks = client.completions.create(model="x", prompt=prompt, max_tokens=tokens, temperature=0, stream=True)
        results["stream"] = "".join(c.choices[0].text for c in chunks if c.choices)

    threads = [threading.Thread(target=ask, args=(m, p)) for p in prompts for m in ("x", "open")]
    threads.append(threading.Thread(target=ask_streamed, args=(prompts[0],)))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not (scheduler.in_flight("x") == 4 and any(r.task.job.model == "x" for r in scheduler.batch.rows)):
        assert time.monotonic() < deadline, "the requests did not start"
        time.sleep(0.005)
    unloading = threading.Thread(target=lambda: results.setdefault("unload", unload(http, "x")))
    unloading.start()
    while "x" in listed(http):  # retired at once, while its rows still run
        assert time.monotonic() < deadline
    assert scheduler.in_flight("x") > 0, "the adapter was retired while requests for it ran"
    r = complete(http, "x", max_tokens=2)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    for t in [*threads, unloading]:
        t.join(timeout=120)

    assert results["unload"].status_code == 200 and "removed successfully" in results["unload"].text
    assert unloaded_with == [0], "the adapter is unloaded only once its requests are answered"
    for p in prompts:
        x, other = results["x", p], results["open", p]
        assert x.status_code == other.status_code == 200, (x.text, other.text)
        assert x.json()["usage"]["completion_tokens"] == tokens, "each request for x ran to its end"
        assert x.json()["choices"][0]["text"] == other.json()["choices"][0]["text"], p
    assert results["stream"] == results["x", prompts[0]].json()["choices"][0]["text"]
    ids = word_tokenizer()(prompts[1])["input_ids"]
    assert results["open", prompts[1]].json()["choices"][0]["text"] == library_text(mm, "open", ids, tokens), \
        "the other rows are undisturbed"
    assert mm.adapters() == ["open"] and "x" not in listed(http) and scheduler.in_flight("x") == 0
